# SPDX-License-Identifier: Apache-2.0
"""The build's CUDA decision and its fallback (setup.py), and how the installed package reports them.

An install must not fail for the CUDA part alone: an nvcc of another major version than torch's CUDA, or one that
fails to compile, gives the CPU-only extension and a recorded reason, which ``fastdream info`` and the commands'
warnings show. The toolkits here are fake: a script standing in for nvcc.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

from fastdream import backends

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup_py():
    """setup.py as a module (its setup() call runs only as __main__, which is how pip runs it)."""
    name = "fastdream_setup_under_test"
    spec = importlib.util.spec_from_file_location(name, ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # its dataclass looks its module up
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(name, None)


def fake_toolkit(root: Path, release: str | None, version_fails: bool = False) -> Path:
    """A CUDA_HOME whose nvcc reports ``release`` and fails every compile (or fails ``--version`` too)."""
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "include" / "cuda_runtime.h").write_text("#error fake toolkit\n")
    version = f"echo 'Cuda compilation tools, release {release}, V{release}.0'; exit 0" if release else "exit 0"
    if version_fails:
        version = "echo 'nvcc: cannot load libnvvm' >&2; exit 1"
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text(
        "#!/bin/sh\n"
        f'for a in "$@"; do if [ "$a" = "--version" ]; then {version}; fi; done\n'
        "echo 'nvcc fatal   : fake toolkit: cannot compile' >&2\nexit 1\n"
    )
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return root


@pytest.fixture
def clean_env(monkeypatch):
    for var in ("FASTDREAM_CUDA", "CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


# --- the decision before building ------------------------------------------------------------------------------------


def test_switched_off(setup_py, clean_env):
    clean_env.setenv("FASTDREAM_CUDA", "0")
    plan = setup_py.cuda_plan()
    assert not plan.build and not plan.forced
    assert "FASTDREAM_CUDA=0" in plan.why_not


def test_cpu_only_torch(setup_py, clean_env):
    clean_env.setattr(torch.version, "cuda", None)
    plan = setup_py.cuda_plan()
    assert not plan.build
    assert "CPU-only build" in plan.why_not and torch.__version__ in plan.why_not
    clean_env.setenv("FASTDREAM_CUDA", "1")
    with pytest.raises(SystemExit, match=r"FASTDREAM_CUDA=1, but torch .* is a CPU-only build"):
        setup_py.cuda_plan()


def test_no_toolkit(setup_py, clean_env):
    clean_env.setattr(torch.version, "cuda", "13.0")
    clean_env.setattr(setup_py, "_find_cuda_home", lambda: None)
    plan = setup_py.cuda_plan()
    assert not plan.build and "no CUDA toolkit was found" in plan.why_not
    clean_env.setenv("FASTDREAM_CUDA", "on")
    with pytest.raises(SystemExit, match="FASTDREAM_CUDA=on, but no CUDA toolkit"):
        setup_py.cuda_plan()


def test_nvcc_of_another_major_version_is_not_used(setup_py, clean_env, tmp_path):
    # torch's own build raises on this deep inside the compile ("The detected CUDA version mismatches"), which
    # failed the whole install; now the CUDA part is left out, with the reason and the fix.
    home = fake_toolkit(tmp_path / "cuda-12.4", "12.4")
    clean_env.setenv("CUDA_HOME", str(home))
    clean_env.setattr(torch.version, "cuda", "13.0")
    plan = setup_py.cuda_plan()
    assert not plan.build and plan.nvcc == "12.4"
    assert f"nvcc 12.4 ({home}) cannot build for torch's CUDA 13.0" in plan.why_not
    assert "a CUDA 13.x toolkit is needed" in plan.why_not
    clean_env.setenv("FASTDREAM_CUDA", "1")
    with pytest.raises(SystemExit, match="FASTDREAM_CUDA=1, but nvcc 12.4"):
        setup_py.cuda_plan()


def test_nvcc_of_another_minor_version_is_used(setup_py, clean_env, tmp_path):
    home = fake_toolkit(tmp_path / "cuda-13.2", "13.2")
    clean_env.setenv("CUDA_HOME", str(home))
    clean_env.setattr(torch.version, "cuda", "13.0")
    plan = setup_py.cuda_plan()
    assert plan.build and not plan.forced and plan.why_not == ""
    assert (plan.cuda_home, plan.nvcc) == (str(home), "13.2")
    clean_env.setenv("FASTDREAM_CUDA", "yes")
    assert setup_py.cuda_plan().forced


def test_nvcc_that_cannot_say_its_version(setup_py, clean_env, tmp_path):
    home = fake_toolkit(tmp_path / "cuda", "13.0", version_fails=True)
    clean_env.setenv("CUDA_HOME", str(home))
    clean_env.setattr(torch.version, "cuda", "13.0")
    plan = setup_py.cuda_plan()
    assert not plan.build and "--version failed (exit status 1" in plan.why_not


def test_no_cpp_compiler_is_one_clear_line(setup_py, clean_env, tmp_path):
    clean_env.delenv("CXX", raising=False)
    clean_env.setenv("PATH", str(tmp_path))  # no c++ there
    with pytest.raises(SystemExit, match=r"C\+\+ compiler 'c\+\+' \(the default\) was not found: install one"):
        setup_py.check_cxx()
    clean_env.setenv("CXX", "clang++-99 -stdlib=libc++")
    with pytest.raises(SystemExit, match=r"'clang\+\+-99' \(CXX names\)"):
        setup_py.check_cxx()
    clean_env.setenv("CXX", sys.executable)  # any program that exists passes
    setup_py.check_cxx()


def fake_compiler(path: Path, rejects_openmp: bool) -> Path:
    """A C++ compiler that rejects -fopenmp as Apple's clang does, or accepts everything."""
    reject = "clang: error: unsupported option '-fopenmp'"
    body = f'for a in "$@"; do if [ "$a" = "-fopenmp" ]; then echo "{reject}" >&2; exit 1; fi; done\n'
    path.write_text("#!/bin/sh\n" + (body if rejects_openmp else "") + "exit 0\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_a_compiler_without_openmp_builds_without_it(setup_py, clean_env, tmp_path):
    """Apple's clang has no -fopenmp: the install goes on without it (one thread), says why, and records it."""
    clean_env.setenv("CXX", f"{fake_compiler(tmp_path / 'clang++', rejects_openmp=True)} -stdlib=libc++")
    flags, why = setup_py.openmp_flags()
    assert flags == [] and why.startswith(str(tmp_path / "clang++")) and "unsupported option '-fopenmp'" in why
    clean_env.setattr(setup_py, "OPENMP", (flags, why))
    ext = setup_py._cpu_extension()
    assert not any("openmp" in a for a in ext.extra_compile_args["cxx"] + ext.extra_link_args)
    info = setup_py.build_info(setup_py.CudaPlan(False, False, "FASTDREAM_CUDA=0 was set at build time"))
    assert info["openmp"] is False and info["why_not_openmp"] == why
    from fastdream.commands.info import _build_line

    assert f"without OpenMP (the C++ CPU kernels run on one thread: {why})" in _build_line(info)
    clean_env.setenv("CXX", str(fake_compiler(tmp_path / "g++", rejects_openmp=False)))
    assert setup_py.openmp_flags() == (["-fopenmp"], "")


def test_this_machines_compiler_builds_openmp_code(setup_py, clean_env):
    """The real compiler here (GCC) compiles and links the probe: the extension keeps its threads."""
    clean_env.delenv("CXX", raising=False)
    assert setup_py.openmp_flags() == (["-fopenmp"], "")
    ext = setup_py._cpu_extension()
    assert "-fopenmp" in ext.extra_compile_args["cxx"] and ext.extra_link_args == ["-fopenmp"]
    assert setup_py.build_info(setup_py.CudaPlan(False, False, "off"))["openmp"] is True


# --- the fallback when the CUDA part fails to compile ----------------------------------------------------------------


def _calls():
    calls = []

    def build():
        calls.append("build")
        raise RuntimeError("Error compiling objects for extension")

    return calls, build, lambda: calls.append("fallback")


def test_a_cuda_compile_failure_falls_back_to_the_cpu_build(setup_py):
    calls, build, fallback = _calls()
    plan = setup_py.CudaPlan(True, False, "", "/opt/cuda", "13.0")
    built = setup_py.build_with_fallback(plan, build, fallback)
    assert calls == ["build", "fallback"]
    assert not built.build and built.nvcc == "13.0"
    assert "CUDA part failed to compile with nvcc 13.0" in built.why_not
    assert "Error compiling objects for extension" in built.why_not and "pip install -v" in built.why_not


def test_no_fallback_when_forced_or_when_the_cpu_build_fails(setup_py):
    for plan in (setup_py.CudaPlan(True, True, "", "/opt/cuda", "13.0"), setup_py.CudaPlan(False, False, "off")):
        calls, build, fallback = _calls()
        with pytest.raises(RuntimeError, match="Error compiling"):
            setup_py.build_with_fallback(plan, build, fallback)
        assert calls == ["build"]


def test_a_successful_build_is_recorded_as_planned(setup_py, clean_env):
    plan = setup_py.CudaPlan(True, False, "", "/opt/cuda", "13.0")
    calls = []
    assert setup_py.build_with_fallback(plan, lambda: calls.append("build"), lambda: calls.append("x")) is plan
    assert calls == ["build"]
    clean_env.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    info = setup_py.build_info(plan)
    assert info["cuda"] is True and info["why_not_cuda"] == "" and info["cuda_archs"] == "8.0;9.0+PTX"
    assert info["torch"] == torch.__version__ and info["nvcc"] == "13.0"
    off = setup_py.build_info(setup_py.CudaPlan(False, False, "FASTDREAM_CUDA=0 was set at build time"))
    assert off["cuda"] is False and off["cuda_archs"] is None and off["why_not_cuda"].startswith("FASTDREAM_CUDA=0")


# --- what the package says about it ----------------------------------------------------------------------------------


@pytest.fixture
def recorded(monkeypatch, tmp_path):
    """A build record saying the CUDA part was left out, and an extension without it."""
    path = tmp_path / "_build_info.json"
    why = "nvcc 12.4 (/opt/cuda-12.4) cannot build for torch's CUDA 13.0: a CUDA 13.x toolkit is needed"
    path.write_text(json.dumps({"cuda": False, "why_not_cuda": why}))
    monkeypatch.setattr(backends, "BUILD_INFO", path)
    backends.build_info.cache_clear()
    monkeypatch.setattr(backends, "cuda_compiled", lambda: False)
    yield why
    backends.build_info.cache_clear()


def test_the_recorded_reason_is_what_the_package_reports(recorded):
    why = backends.why_unusable("cuda", torch.device("cuda"))
    assert why == f"fastdream._C was built without its CUDA part: {recorded}"
    row = next(r for r in backends.status() if r.name == "cuda")
    assert not row.compiled and not row.usable and recorded in row.note


def test_no_record_says_so(monkeypatch, tmp_path):
    monkeypatch.setattr(backends, "BUILD_INFO", tmp_path / "missing.json")
    backends.build_info.cache_clear()
    try:
        assert backends.build_info() == {}
        assert "recorded no reason" in backends.why_no_cuda_part()
    finally:
        backends.build_info.cache_clear()


def test_warning_on_a_gpu_without_the_cuda_part(recorded, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(backends, "_warned", False)
    monkeypatch.delenv("FASTDREAM_BACKEND", raising=False)
    if backends.extension() is None:
        pytest.skip("the extension is not built")
    backends.warn_if_extension_missing("cpu")  # the CPU does not need the CUDA part
    assert capsys.readouterr().err == ""
    backends.warn_if_extension_missing("cuda:0")
    backends.warn_if_extension_missing("cuda:0")  # once per process
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("warning: fastdream._C was built without its CUDA part: nvcc 12.4")
    monkeypatch.setattr(backends, "_warned", False)
    monkeypatch.setenv("FASTDREAM_BACKEND", "reference")  # asked for: nothing to warn about
    backends.warn_if_extension_missing("cuda:0")
    assert capsys.readouterr().err == ""


def test_an_extension_built_for_another_torch_says_so(monkeypatch, tmp_path, capsys):
    # The loader's own error is an undefined C++ symbol; the build record says what it means.
    path = tmp_path / "_build_info.json"
    path.write_text(json.dumps({"cuda": False, "torch": "2.9.0+cu128"}))
    monkeypatch.setattr(backends, "BUILD_INFO", path)
    backends.build_info.cache_clear()
    symbol = "ImportError: /x/fastdream/_C.so: undefined symbol: _ZN3c104cuda9SetDeviceEab"
    monkeypatch.setattr(backends, "_load_extension", lambda: (None, symbol))
    monkeypatch.setattr(backends, "_warned", False)
    monkeypatch.delenv("FASTDREAM_BACKEND", raising=False)
    try:
        assert (
            backends.extension_error()
            == f"built against torch 2.9.0+cu128, imported by torch {torch.__version__}: {symbol}"
        )
        backends.warn_if_extension_missing("cpu")
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and "did not load (built against torch 2.9.0+cu128, imported by torch" in err[0]
        row = next(r for r in backends.status() if r.name == "cpp")
        assert not row.usable and row.note.startswith("not loaded: built against torch 2.9.0+cu128")
        path.write_text(json.dumps({"torch": torch.__version__}))  # the same torch: the loader's error alone
        backends.build_info.cache_clear()
        assert backends.extension_error() == symbol
    finally:
        backends.build_info.cache_clear()


class _ProbedExtension:
    """An extension with a CUDA part whose kernels have no image for the GPU (an sm_120 card, built for 8.0 and
    9.0 without PTX)."""

    def __init__(self):
        self.asked = []

    def cuda_compiled(self):
        return True

    def cuda_kernel_image_error(self, index):
        self.asked.append(index)
        return "cudaErrorNoKernelImageForDevice: no kernel image is available for execution on the device"


def test_a_gpu_the_kernels_were_not_built_for(monkeypatch, tmp_path):
    ext = _ProbedExtension()
    path = tmp_path / "_build_info.json"
    path.write_text(json.dumps({"cuda": True, "why_not_cuda": "", "cuda_archs": "8.0;9.0", "nvcc": "13.0"}))
    monkeypatch.setattr(backends, "BUILD_INFO", path)
    backends.build_info.cache_clear()
    monkeypatch.setattr(backends, "extension", lambda: ext)
    monkeypatch.setattr(backends, "_image_errors", {})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (12, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: "NVIDIA RTX PRO 6000")
    try:
        dev = torch.device("cuda:0")
        assert not backends.usable("cuda", dev)
        assert not backends.usable("cuda", torch.device("cuda"))  # the current device: the same answer
        assert ext.asked == [0]  # asked once
        why = backends.why_unusable("cuda", dev)
        assert "no CUDA code for this GPU (NVIDIA RTX PRO 6000, compute capability 12.0; built for 8.0;9.0" in why
        assert "cudaErrorNoKernelImageForDevice" in why and 'FASTDREAM_CUDA_ARCHS="12.0"' in why
        from fastdream.ops import _dispatch

        assert _dispatch.select("composite", dev) == "reference"  # not the cuda backend, which would fail
        row = next(r for r in backends.status() if r.name == "cuda")
        assert row.compiled and not row.usable and "no CUDA code for this GPU" in row.note
    finally:
        backends.build_info.cache_clear()


def test_the_kernels_are_not_probed_during_a_capture(monkeypatch):
    ext = _ProbedExtension()
    monkeypatch.setattr(backends, "extension", lambda: ext)
    monkeypatch.setattr(backends, "_image_errors", {})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert backends.cuda_kernel_image_error(torch.device("cuda:1")) == ""
    assert ext.asked == [] and backends._image_errors == {}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_cuda_probe_on_a_real_gpu():
    if not backends.cuda_compiled():
        pytest.skip("the extension has no CUDA part")
    assert backends.cuda_kernel_image_error(torch.device("cuda")) == ""
    assert backends.usable("cuda", torch.device("cuda"))
    bad = backends._probe_kernel_image(torch.cuda.device_count())  # no such device: an error, not a crash
    assert bad != ""
    x = torch.ones(97, device="cuda")  # and CUDA still works after it
    assert float(x.sum()) == 97.0


# --- a real install from a copy of the sources, with an nvcc that cannot compile ------------------------------------


def _copy_sources(dst: Path) -> None:
    skip = shutil.ignore_patterns("*.so", "__pycache__", "_build_info.json", "*.egg-info")
    for name in ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, dst / name)
    for name in ("csrc", "fastdream", "kernels"):
        shutil.copytree(ROOT / name, dst / name, ignore=skip, symlinks=False)


def test_the_source_distribution_has_what_the_build_needs(tmp_path):
    """An sdist (what PyPI serves when no wheel fits) held the listed sources but not the headers they include,
    so every build from it failed. Every file of csrc/ and kernels/ must be in it."""
    src = tmp_path / "src"
    src.mkdir()
    _copy_sources(src)
    proc = subprocess.run(
        [sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")],
        cwd=src,
        env={**os.environ, "FASTDREAM_CUDA": "0"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sdist,) = (tmp_path / "dist").glob("fastdream-*.tar.gz")
    with tarfile.open(sdist) as tar:
        have = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    need = {"setup.py", "pyproject.toml", "README.md"}
    for folder in ("csrc", "kernels"):
        files = [p for p in (ROOT / folder).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
        need |= {p.relative_to(ROOT).as_posix() for p in files}
    assert any(n.startswith("csrc/include/fastdream/") for n in need)
    assert not sorted(need - have), f"missing from the sdist: {sorted(need - have)}"
    assert not any(n.endswith(("_build_info.json", ".so")) for n in have)  # build products stay out


@pytest.mark.slow
@pytest.mark.skipif(torch.version.cuda is None, reason="torch is a CPU-only build: the CUDA part is never tried")
def test_install_survives_an_nvcc_that_cannot_compile(tmp_path):
    """pip builds the wheel: the CUDA part fails, the CPU-only extension is built instead, and the installed
    package loads it and says why it has no CUDA part (about 2 minutes: the C++ files are compiled)."""
    src = tmp_path / "src"
    src.mkdir()
    _copy_sources(src)
    home = fake_toolkit(tmp_path / "cuda", torch.version.cuda)
    env = {k: v for k, v in os.environ.items() if k not in ("FASTDREAM_CUDA", "CUDA_PATH", "TORCH_CUDA_ARCH_LIST")}
    env.update(CUDA_HOME=str(home), PIP_NO_CACHE_DIR="1", FASTDREAM_CUDA_ARCHS="9.0")
    wheels = tmp_path / "wheels"
    cmd = [sys.executable, "-m", "pip", "wheel", "-v", "--no-build-isolation", "--no-deps", "-w", str(wheels), "."]
    proc = subprocess.run(cmd, cwd=src, env=env, capture_output=True, text=True, timeout=1500)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "WARNING: its CUDA part failed to compile with nvcc" in log
    (whl,) = wheels.glob("fastdream-*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(whl).extractall(site)
    info = json.loads((site / "fastdream" / "_build_info.json").read_text())
    assert info["cuda"] is False and info["nvcc"] == torch.version.cuda
    assert "CUDA part failed to compile" in info["why_not_cuda"]
    probe = (
        "import json, fastdream._C as C; from fastdream.commands import info;"
        "d = info.collect(); print(json.dumps([C.cuda_compiled(), C.__file__, d['backends']]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(site)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    compiled, path, rows = json.loads(out.stdout.strip().splitlines()[-1])
    assert compiled is False and Path(path).is_relative_to(site)
    cpp = next(r for r in rows if r["name"] == "cpp")
    cuda = next(r for r in rows if r["name"] == "cuda")
    assert cpp["usable"] and not cuda["compiled"]
    assert cuda["note"].startswith("not compiled into fastdream._C: its CUDA part failed to compile with nvcc")
