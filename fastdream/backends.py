# SPDX-License-Identifier: Apache-2.0
"""Which implementations of the ops are compiled and usable here.

The compiled extension ``fastdream._C`` is loaded lazily and its failure to load is recorded, not raised:
importing fastdream works without it, and ``fastdream info`` says why it is missing.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from types import ModuleType

import torch

BACKENDS = ("cuda", "triton", "cpp", "reference")


@functools.cache
def _load_extension() -> tuple[ModuleType | None, str]:
    try:
        return importlib.import_module("fastdream._C"), ""
    except Exception as e:  # ImportError, or an undefined symbol from a torch mismatch
        return None, f"{type(e).__name__}: {e}"


def extension() -> ModuleType | None:
    """The compiled extension module, or None when it is not built or fails to load."""
    return _load_extension()[0]


def extension_error() -> str:
    """Why the extension failed to load ('' when it loaded)."""
    return _load_extension()[1]


_warned = False


def warn_if_extension_missing() -> None:
    """Once per process, before long work: a line on stderr when the compiled extension did not load (a torch
    other than the one it was built against, a plain ``pip install .`` gone wrong). Its ops then fall back to
    Triton (CUDA) or to their PyTorch reference, many times slower, and nothing else would say so. Not when the
    reference is asked for."""
    global _warned
    if _warned or extension() is not None or os.environ.get("FASTDREAM_BACKEND", "").strip().lower() == "reference":
        return
    _warned = True
    why = " ".join(extension_error().split())[:160]
    print(
        f"warning: the compiled extension fastdream._C did not load ({why}); its ops fall back to Triton where "
        f"usable, else to their PyTorch reference, many times slower. Reinstall with pip install "
        f"--no-build-isolation (see the README) and check fastdream info",
        file=sys.stderr,
    )


def cuda_compiled() -> bool:
    ext = extension()
    return bool(ext is not None and ext.cuda_compiled())


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpret() -> bool:
    """Triton kernels run on the CPU tensors under ``TRITON_INTERPRET=1`` (slowly: for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class BackendStatus:
    name: str
    compiled: bool
    usable: bool
    note: str


def usable(backend: str, device: torch.device) -> bool:
    """Whether ``backend`` can run ops on tensors of ``device``."""
    if backend == "reference":
        return True
    if backend == "cpp":
        return device.type == "cpu" and extension() is not None
    if backend == "cuda":
        return device.type == "cuda" and cuda_compiled()
    if backend == "triton":
        if not triton_available():
            return False
        return device.type == "cuda" or (device.type == "cpu" and triton_interpret())
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


def why_unusable(backend: str, device: torch.device) -> str:
    """Why ``backend`` cannot run ops on tensors of ``device`` ('' when it can): for one-line errors."""
    if usable(backend, device):
        return ""
    gpu = torch.cuda.is_available()
    if backend == "cpp":
        if extension() is None:
            return f"the extension fastdream._C did not load ({extension_error()})"
        return f"it runs on CPU tensors only, and this command runs on {device.type}"
    if backend == "cuda":
        if extension() is None:
            return f"the extension fastdream._C did not load ({extension_error()})"
        if not cuda_compiled():
            return "fastdream._C was built without its CUDA part (no nvcc at build time)"
        return "no CUDA GPU is visible" if not gpu else "it runs on CUDA tensors only, and this command runs on cpu"
    # triton
    if not triton_available():
        return "triton is not installed (pip install triton)"
    return "no CUDA GPU is visible, and Triton runs on the CPU only under TRITON_INTERPRET=1, slowly, for tests"


def status() -> list[BackendStatus]:
    """One line per backend for ``fastdream info``."""
    gpu = torch.cuda.is_available()
    ext, err = _load_extension()
    rows = [BackendStatus("reference", True, True, "pure PyTorch, every device")]
    rows.append(
        BackendStatus("cpp", ext is not None, ext is not None, "C++ CPU loops" if ext else f"not loaded: {err}")
    )
    cc = cuda_compiled()
    note = "compiled" if cc else "not compiled into fastdream._C"
    if cc and not gpu:
        note += "; no GPU visible"
    rows.append(BackendStatus("cuda", cc, cc and gpu, note))
    tri = triton_available()
    if not tri:
        tnote = "triton not installed (pip install triton)"
    elif gpu:
        tnote = "JIT on the GPU"
    else:
        tnote = "no GPU; runs on the CPU only under TRITON_INTERPRET=1" + (" (set)" if triton_interpret() else "")
    rows.append(BackendStatus("triton", tri, tri and (gpu or triton_interpret()), tnote))
    return rows
