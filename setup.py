# SPDX-License-Identifier: Apache-2.0
"""Build fastdream and its compiled extension ``fastdream._C``.

The C++ CPU code is always built. The CUDA code is built as well when torch is a CUDA build and nvcc is
found. Environment overrides:

* ``FASTDREAM_CUDA=0`` / ``1``: force the CUDA part off / on (on: fail if it cannot be built).
* ``FASTDREAM_CUDA_ARCHS="8.0;9.0"``: CUDA architectures (default: the visible GPU's, else 8.0 and 9.0).
* ``FASTDREAM_BUILD_JOBS=N``: parallel compile jobs (ninja), default: the number of cores.

Build against the torch that will import the extension: ``pip install --no-build-isolation .``
"""

from __future__ import annotations

import glob
import os
import shutil
import site
import sys
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


def _want_cuda() -> bool:
    flag = os.environ.get("FASTDREAM_CUDA", "").strip().lower()
    if flag in ("0", "off", "false", "no"):
        return False
    import torch

    ok = torch.version.cuda is not None and _find_cuda_home() is not None
    if flag in ("1", "on", "true", "yes") and not ok:
        raise SystemExit("FASTDREAM_CUDA=1 but torch is not a CUDA build or nvcc was not found")
    return ok


def _extensions():
    cuda_home = _find_cuda_home()
    if cuda_home:
        os.environ.setdefault("CUDA_HOME", cuda_home)
    if os.environ.get("FASTDREAM_BUILD_JOBS"):
        os.environ["MAX_JOBS"] = os.environ["FASTDREAM_BUILD_JOBS"]
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    include = [str(ROOT / "csrc" / "include")]
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    # No -std flag: torch adds the standard its headers need (C++20 from torch 2.10 on).
    cxx = ["-O3", "-fopenmp"]
    with_cuda = _want_cuda()
    if not with_cuda:
        _log("building the C++ CPU extension (CUDA part off)")
        return [
            CppExtension(
                "fastdream._C",
                sources,
                include_dirs=include,
                extra_compile_args={"cxx": cxx},
                extra_link_args=["-fopenmp"],
            )
        ]

    import torch

    if "FASTDREAM_CUDA_ARCHS" in os.environ:
        os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ["FASTDREAM_CUDA_ARCHS"]
    elif "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
        # No GPU to ask: two architectures keep the build short (A100, H100).
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
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
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    _log(f"building the C++ CPU and CUDA extension (CUDA_HOME={cuda_home}, archs={os.environ['TORCH_CUDA_ARCH_LIST']})")
    return [
        CUDAExtension(
            "fastdream._C",
            sources,
            # The toolkit's own headers come first; pip's fill in what it lacks (cusparse.h, ...).
            include_dirs=include + [f"{cuda_home}/include"] + pip_inc,
            library_dirs=lib_dirs,
            define_macros=[("FD_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--use_fast_math"]},
            extra_link_args=["-fopenmp"],
        )
    ]


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


try:
    import torch  # noqa: F401
except ImportError as e:  # pragma: no cover - the message is the point
    raise SystemExit(
        "fastdream builds a C++/CUDA extension against the installed torch: install torch first "
        "(pip install torch), then pip install --no-build-isolation ."
    ) from e

setup(
    name="fastdream",
    version="0.1.0",
    description="Fast, trustworthy text-to-3D (DreamFusion / Score Distillation Sampling) with fused kernels",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["fastdream", "fastdream.*"]) + ["fastdream.kernels"],
    package_dir={"fastdream.kernels": "kernels"},
    ext_modules=_extensions(),
    cmdclass=_cmdclass(),
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
