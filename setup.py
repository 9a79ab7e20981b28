# SPDX-License-Identifier: Apache-2.0
"""Build fastdream and its compiled extension ``fastdream._C``.

The C++ CPU code is always built. The CUDA code is built as well when torch is a CUDA build and an nvcc of
the same CUDA major version is found. An install does not fail for the CUDA part alone: when nvcc is missing,
of another major version than torch's CUDA, or fails to compile, the extension is built without its CUDA part
(the GPU then runs the Triton kernels and the PyTorch references), and why is recorded in
``fastdream/_build_info.json`` beside it, which ``fastdream info`` and the commands' warnings report (pip shows
no build output unless ``-v``). Environment overrides:

* ``FASTDREAM_CUDA=0`` / ``1``: force the CUDA part off / on (on: the install fails if it cannot be built).
* ``FASTDREAM_CUDA_ARCHS="8.0;9.0"``: CUDA architectures (default: the visible GPU's, else 8.0 and 9.0, with
  9.0's PTX for newer GPUs to compile at load time).
* ``FASTDREAM_BUILD_JOBS=N``: parallel compile jobs (ninja), default: the number of cores.

A C++ compiler without OpenMP (Apple's clang) builds the CPU kernels without it, on one thread (recorded too).

Build against the torch that will import the extension: ``pip install --no-build-isolation .``
"""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
import shutil
import site
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def _log(msg: str) -> None:
    print(f"[fastdream build] {msg}", file=sys.stderr)


def _find_cuda_home() -> str | None:
    """The CUDA toolkit folder holding the real nvcc (``/usr/local/bin/nvcc`` may be a wrapper script)."""
    env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if env and Path(env, "bin", "nvcc").exists():
        return env
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(nvcc).resolve().parent.parent)
    candidates += [Path(p) for p in sorted(glob.glob("/usr/local/cuda*"), reverse=True)]
    for c in candidates:
        if (c / "bin" / "nvcc").exists() and (c / "include" / "cuda_runtime.h").exists():
            return str(c)
    return None


def _pip_cuda_dirs() -> tuple[list[str], list[str]]:
    """Include and library folders of pip's CUDA packages (``site-packages/nvidia/cu13`` and friends)."""
    roots = list(site.getsitepackages()) + [site.getusersitepackages()] + sys.path
    inc, lib = [], []
    for r in dict.fromkeys(roots):
        for base in glob.glob(os.path.join(r, "nvidia", "cu*")) + glob.glob(os.path.join(r, "nvidia", "*")):
            if os.path.isdir(os.path.join(base, "include")) and os.path.join(base, "include") not in inc:
                inc.append(os.path.join(base, "include"))
            if os.path.isdir(os.path.join(base, "lib")) and os.path.join(base, "lib") not in lib:
                lib.append(os.path.join(base, "lib"))
    return inc, lib


@dataclass
class CudaPlan:
    """Whether to build the CUDA part, and why not."""

    build: bool
    forced: bool  # FASTDREAM_CUDA=1: a failure fails the install
    why_not: str  # '' when build
    cuda_home: str | None = None
    nvcc: str | None = None  # nvcc's release, e.g. "13.0"


def _nvcc_release(cuda_home: str) -> tuple[str | None, str]:
    """nvcc's CUDA release ("13.0") and '', or None and why it could not be read."""
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"{nvcc} --version could not run ({e})"
    m = re.search(r"release (\d+)\.(\d+)", out.stdout)
    if out.returncode != 0 or m is None:
        return None, f"{nvcc} --version failed (exit status {out.returncode}, no release number)"
    return f"{m.group(1)}.{m.group(2)}", ""


def _cxx() -> list[str]:
    """The C++ compiler command the build calls (torch's ninja build: ``CXX``, else ``c++``)."""
    return shlex.split(os.environ.get("CXX") or "c++") or ["c++"]


def check_cxx() -> None:
    """The C++ compiler the build will call must exist: without one, pip's error is a line deep in the log.

    Raises:
        SystemExit: one line naming the compiler and what to install.
    """
    cxx = _cxx()
    if shutil.which(cxx[0]) is None:
        where = "CXX names" if os.environ.get("CXX") else "the default"
        raise SystemExit(
            f"fastdream builds a C++ extension, but the C++ compiler {cxx[0]!r} ({where}) was not found: install "
            "one (e.g. apt install g++, dnf install gcc-c++, conda install gxx) or set CXX, then install again"
        )


def openmp_flags() -> tuple[list[str], str]:
    """``-fopenmp`` when the C++ compiler builds and links OpenMP code, else no flag and why: the C++ CPU kernels
    (ATen's parallel_for, whose OpenMP loop is compiled into the extension) then run on one thread, and the install
    goes on. Apple's clang, for one, rejects the flag."""
    cxx = _cxx()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "omp.cpp")
        src.write_text("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        try:
            out = subprocess.run(
                [*cxx, "-fopenmp", str(src), "-o", str(Path(tmp, "omp"))], capture_output=True, text=True, timeout=120
            )
        except (OSError, subprocess.SubprocessError) as e:
            return [], f"{cxx[0]} -fopenmp could not run ({e})"
    if out.returncode != 0:
        lines = [line.strip() for line in out.stderr.splitlines() if line.strip()]
        first = lines[0] if lines else f"exit status {out.returncode}"
        return [], f"{cxx[0]} cannot build OpenMP code ({first[:160]})"
    return ["-fopenmp"], ""


# What openmp_flags() decided (setup.py's main sets it; -fopenmp when imported, e.g. by the tests).
OPENMP: tuple[list[str], str] = (["-fopenmp"], "")


def cuda_plan() -> CudaPlan:
    """Decide on the CUDA part before building.

    Raises:
        SystemExit: FASTDREAM_CUDA=1 and the CUDA part cannot be built (the reason, one line).
    """
    flag = os.environ.get("FASTDREAM_CUDA", "").strip().lower()
    if flag in ("0", "off", "false", "no"):
        return CudaPlan(False, False, f"FASTDREAM_CUDA={os.environ['FASTDREAM_CUDA']} was set at build time")
    forced = flag in ("1", "on", "true", "yes")
    import torch

    home = release = None
    if torch.version.cuda is None:
        why = f"torch {torch.__version__} is a CPU-only build"
    else:
        home = _find_cuda_home()
        if home is None:
            why = "no CUDA toolkit was found at build time (nvcc on PATH, CUDA_HOME, /usr/local/cuda*)"
        else:
            release, why = _nvcc_release(home)
            # torch's build refuses another major version (its own check raises deep inside the build).
            major = torch.version.cuda.split(".")[0]
            if release is not None and release.split(".")[0] != major:
                why = (
                    f"nvcc {release} ({home}) cannot build for torch's CUDA {torch.version.cuda}: a CUDA {major}.x "
                    "toolkit is needed (point CUDA_HOME at one)"
                )
    if not why:
        return CudaPlan(True, forced, "", home, release)
    if forced:
        raise SystemExit(f"FASTDREAM_CUDA={os.environ['FASTDREAM_CUDA']}, but {why}")
    return CudaPlan(False, False, why, home, release)


def build_with_fallback(plan: CudaPlan, build, fallback) -> CudaPlan:
    """Run ``build()``; when it fails on the CUDA part and the CUDA part was not forced, log why and run
    ``fallback()`` (the CPU-only build) instead. Returns the plan that was built."""
    try:
        build()
        return plan
    except Exception as e:  # ninja's RuntimeError, distutils' CompileError, nvcc's own failures
        if not plan.build or plan.forced:
            raise
        first = " ".join(str(e).split())[:200] or type(e).__name__
        why = (
            f"its CUDA part failed to compile with nvcc {plan.nvcc} ({type(e).__name__}: {first}; pip install -v "
            "shows the compiler's output, FASTDREAM_CUDA=1 makes this failure stop the install)"
        )
        _log(f"WARNING: {why}. Building the C++ CPU extension without it.")
    fallback()
    return CudaPlan(False, False, why, plan.cuda_home, plan.nvcc)


BUILD_INFO = "_build_info.json"


def build_info(plan: CudaPlan) -> dict:
    """What ``fastdream/_build_info.json`` records about the build (read by fastdream.backends)."""
    import torch

    archs = None
    if plan.build:
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
        if not archs or archs == "native":  # torch compiled for the visible GPUs, the newest with its PTX
            caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
            archs = ";".join(f"{a}.{b}" for a, b in caps) + "+PTX" if caps else "torch's default"
    return {
        "cuda": plan.build,
        "why_not_cuda": plan.why_not,
        "nvcc": plan.nvcc,
        "cuda_archs": archs,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "openmp": bool(OPENMP[0]),
        "why_not_openmp": OPENMP[1],
    }


def _cpu_extension():
    from torch.utils.cpp_extension import CppExtension

    return CppExtension(
        "fastdream._C",
        _SOURCES,
        include_dirs=_INCLUDE,
        extra_compile_args={"cxx": _CXX + OPENMP[0]},
        extra_link_args=list(OPENMP[0]),
    )


_INCLUDE = [str(ROOT / "csrc" / "include")]
_SOURCES = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
# No -std flag: torch adds the standard its headers need (C++20 from torch 2.10 on).
_CXX = ["-O3"]  # and OPENMP's flag


def _extensions(plan: CudaPlan):
    if os.environ.get("FASTDREAM_BUILD_JOBS"):
        os.environ["MAX_JOBS"] = os.environ["FASTDREAM_BUILD_JOBS"]
    if not plan.build:
        _log(f"building the C++ CPU extension without its CUDA part: {plan.why_not}")
        return [_cpu_extension()]
    os.environ.setdefault("CUDA_HOME", plan.cuda_home)
    cuda_home = plan.cuda_home
    import torch
    from torch.utils.cpp_extension import CUDAExtension

    if "FASTDREAM_CUDA_ARCHS" in os.environ:
        os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ["FASTDREAM_CUDA_ARCHS"]
    elif "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
        # No GPU to ask: two architectures keep the build short (A100, H100), and 9.0's PTX lets a newer GPU
        # compile the kernels when they load (torch adds the PTX of the newest architecture it detects, too).
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
    pip_inc, pip_lib = _pip_cuda_dirs()
    lib_dirs = list(pip_lib)
    # pip's CUDA runtime ships libcudart.so.13 without the unversioned name the linker asks for.
    has_cudart = any(Path(d, "libcudart.so").exists() for d in [f"{cuda_home}/lib64", f"{cuda_home}/lib"])
    if not has_cudart:
        for d in pip_lib:
            versioned = sorted(glob.glob(os.path.join(d, "libcudart.so.*")))
            if versioned:
                link_dir = ROOT / "build" / "cudart-link"
                link_dir.mkdir(parents=True, exist_ok=True)
                target = link_dir / "libcudart.so"
                if target.is_symlink() or target.exists():
                    target.unlink()
                target.symlink_to(versioned[0])
                lib_dirs.insert(0, str(link_dir))
                break
    sources = _SOURCES + sorted(glob.glob("csrc/cuda/*.cu"))
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "the visible GPU's")
    _log(f"building the C++ CPU and CUDA extension (CUDA_HOME={cuda_home}, nvcc {plan.nvcc}, archs={archs})")
    return [
        CUDAExtension(
            "fastdream._C",
            sources,
            # The toolkit's own headers come first; pip's fill in what it lacks (cusparse.h, ...).
            include_dirs=_INCLUDE + [f"{cuda_home}/include"] + pip_inc,
            library_dirs=lib_dirs,
            define_macros=[("FD_WITH_CUDA", "1")],
            extra_compile_args={"cxx": _CXX + OPENMP[0], "nvcc": ["-O3", "--use_fast_math"]},
            extra_link_args=list(OPENMP[0]),
        )
    ]


def _cmdclass(plan: CudaPlan):
    from torch.utils.cpp_extension import BuildExtension

    class Build(BuildExtension):
        """torch's build, falling back to the CPU-only extension when the CUDA part fails to compile, and
        recording the outcome in fastdream/_build_info.json beside the extension."""

        def build_extensions(self) -> None:
            def fallback() -> None:
                # The same Extension object, made the CPU-only one: setuptools finalised it (private fields a new
                # object would lack), and torch added the CUDA build's flags to it.
                (ext,) = self.extensions
                for key, value in vars(_cpu_extension()).items():
                    if not key.startswith("_"):
                        setattr(ext, key, value)
                super(Build, self).build_extensions()

            built = build_with_fallback(plan, super().build_extensions, fallback)
            # Beside the extension in build_lib (setuptools builds there, --inplace and pip install -e included)
            out = Path(self.get_ext_fullpath("fastdream._C")).parent / BUILD_INFO
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(build_info(built), indent=2) + "\n", encoding="utf-8")
            self._build_info_file = out

        def copy_extensions_to_source(self) -> None:
            """--inplace and pip install -e: the record goes to the source tree with the extension."""
            super().copy_extensions_to_source()
            info = getattr(self, "_build_info_file", None)
            if info is not None:
                package_dir = self.get_finalized_command("build_py").get_package_dir("fastdream")
                shutil.copyfile(info, Path(package_dir) / BUILD_INFO)

    return {"build_ext": Build.with_options(use_ninja=shutil.which("ninja") is not None)}


try:
    import torch  # noqa: F401
except ImportError as e:  # pragma: no cover - the message is the point
    raise SystemExit(
        "fastdream builds a C++/CUDA extension against the installed torch: install torch first "
        "(pip install torch), then pip install --no-build-isolation ."
    ) from e

if __name__ == "__main__":  # also under pip (setuptools runs this file as __main__); tests import it
    check_cxx()
    OPENMP = openmp_flags()
    if not OPENMP[0]:
        _log(f"WARNING: {OPENMP[1]}; building without OpenMP: the C++ CPU kernels will run on one thread")
    _PLAN = cuda_plan()
    setup(
        name="fastdream",
        version="0.1.0",
        description="Fast, trustworthy text-to-3D (DreamFusion / Score Distillation Sampling) with fused kernels",
        long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
        long_description_content_type="text/markdown",
        python_requires=">=3.10",
        packages=find_packages(include=["fastdream", "fastdream.*"]) + ["fastdream.kernels"],
        package_dir={"fastdream.kernels": "kernels"},
        ext_modules=_extensions(_PLAN),
        cmdclass=_cmdclass(_PLAN),
        install_requires=[
            "torch>=2.4",
            "numpy",
            "diffusers>=0.30",
            "transformers>=4.40",
            "safetensors",
            "imageio>=2.30",
            "imageio-ffmpeg",
            "trimesh>=4",
            "scikit-image>=0.22",
            "scipy",  # fastdream evaluate (nearest-point distances); scikit-image needs it too
            "tqdm",
        ],
        extras_require={
            "triton": ["triton>=3.0"],
            "dev": ["pytest", "pytest-benchmark", "hypothesis", "ruff", "clang-format", "triton>=3.0"],
        },
        entry_points={"console_scripts": ["fastdream=fastdream.cli:main"]},
        zip_safe=False,
    )
