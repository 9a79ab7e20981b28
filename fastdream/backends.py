# SPDX-License-Identifier: Apache-2.0
"""Which implementations of the ops are compiled and usable here.

The compiled extension ``fastdream._C`` is loaded lazily and its failure to load is recorded, not raised:
importing fastdream works without it, and ``fastdream info`` says why it is missing.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
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
    """Why the extension failed to load ('' when it loaded). When its build record names another torch than the
    one running, that comes first: the loader's own error is then an undefined C++ symbol."""
    err = _load_extension()[1]
    built = build_info().get("torch") if err else None
    if built and built != torch.__version__:
        err = f"built against torch {built}, imported by torch {torch.__version__}: {err}"
    return err


BUILD_INFO = Path(__file__).with_name("_build_info.json")


@functools.cache
def build_info() -> dict:
    """What setup.py recorded about the extension's build (``fastdream/_build_info.json``: ``cuda``,
    ``why_not_cuda``, ``nvcc``, ``cuda_archs``, ``torch``, ``torch_cuda``, ``openmp``, ``why_not_openmp``); {} when
    there is no record (a build from before it existed, or not built by setup.py)."""
    try:
        info = json.loads(BUILD_INFO.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def why_no_cuda_part() -> str:
    """Why fastdream._C has no CUDA part, as its build recorded it (for messages)."""
    why = build_info().get("why_not_cuda")
    return str(why) if why else "its build recorded no reason (was nvcc found?)"


_image_errors: dict[int, str] = {}  # per CUDA device index: '' or why the kernels cannot run there


def _probe_kernel_image(index: int) -> str:
    probe = getattr(extension(), "cuda_kernel_image_error", None)
    if probe is None:  # a build from before the probe existed: assume it runs
        return ""
    try:
        return probe(index)
    except Exception as e:  # noqa: BLE001 - an index out of range, a broken driver: not runnable, and why
        return f"{type(e).__name__}: {e}"


def cuda_kernel_image_error(device: torch.device) -> str:
    """'' when the extension's CUDA kernels can run on ``device`` (compiled for its architecture, or PTX that
    compiles for it), else the CUDA error. Asked once per device (the dispatcher calls this on every op), and not
    while a CUDA graph is being captured."""
    if device.type != "cuda":
        return ""
    known = _image_errors.get(device.index) if device.index is not None else None
    if known is not None:
        return known
    if not cuda_compiled() or not torch.cuda.is_available() or torch.cuda.is_current_stream_capturing():
        return ""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _image_errors:
        _image_errors[index] = _probe_kernel_image(index)
    return _image_errors[index]


_warned = False


def warn_if_extension_missing(device: torch.device | str | None = None) -> None:
    """Once per process, before long work: a line on stderr when the compiled extension did not load (a torch
    other than the one it was built against, a plain ``pip install .`` gone wrong), or when ``device`` is a GPU
    its CUDA part cannot run on (built without it, or not for this GPU's architecture). Its ops then fall back to
    Triton (CUDA) or to their PyTorch reference, many times slower, and nothing else would say so. Not when the
    reference is asked for."""
    global _warned
    if _warned or os.environ.get("FASTDREAM_BACKEND", "").strip().lower() == "reference":
        return
    if extension() is None:
        _warned = True
        why = " ".join(extension_error().split())[:160]
        print(
            f"warning: the compiled extension fastdream._C did not load ({why}); its ops fall back to Triton where "
            f"usable, else to their PyTorch reference, many times slower. Reinstall with pip install "
            f"--no-build-isolation (see the README) and check fastdream info",
            file=sys.stderr,
        )
        return
    device = torch.device(device) if device is not None else None
    if device is None or device.type != "cuda" or not torch.cuda.is_available() or usable("cuda", device):
        return
    _warned = True
    print(
        f"warning: {why_unusable('cuda', device)}. On this GPU, its ops fall back to Triton where usable, else "
        "to their PyTorch reference: slower, same results",
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
        return device.type == "cuda" and cuda_compiled() and not cuda_kernel_image_error(device)
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
            return f"fastdream._C was built without its CUDA part: {why_no_cuda_part()}"
        if not gpu:
            return "no CUDA GPU is visible"
        if device.type != "cuda":
            return "it runs on CUDA tensors only, and this command runs on cpu"
        return _no_kernels_for(device)
    # triton
    if not triton_available():
        return "triton is not installed (pip install triton)"
    return "no CUDA GPU is visible, and Triton runs on the CPU only under TRITON_INTERPRET=1, slowly, for tests"


def _no_kernels_for(device: torch.device) -> str:
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        major, minor = torch.cuda.get_device_capability(index)
        gpu = f"{torch.cuda.get_device_name(index)}, compute capability {major}.{minor}"
        fix = f'reinstall with FASTDREAM_CUDA_ARCHS="{major}.{minor}" set (see the README)'
    except Exception:  # noqa: BLE001 - an index out of range
        gpu, fix = f"cuda:{index}", "check --device"
    built = build_info().get("cuda_archs") or "architectures not recorded"
    err = cuda_kernel_image_error(device)
    return f"fastdream._C has no CUDA code for this GPU ({gpu}; built for {built}; {err}): {fix}"


def status() -> list[BackendStatus]:
    """One line per backend for ``fastdream info``."""
    gpu = torch.cuda.is_available()
    ext = extension()
    rows = [BackendStatus("reference", True, True, "pure PyTorch, every device")]
    rows.append(
        BackendStatus(
            "cpp", ext is not None, ext is not None, "C++ CPU loops" if ext else f"not loaded: {extension_error()}"
        )
    )
    cc = cuda_compiled()
    info = build_info()
    if not cc:
        note = f"not compiled into fastdream._C: {why_no_cuda_part()}" if ext is not None else "fastdream._C not loaded"
    else:
        note = "compiled" + (f" by nvcc {info['nvcc']} for {info['cuda_archs']}" if info.get("cuda_archs") else "")
    runs = cc and gpu and usable("cuda", torch.device("cuda"))
    if cc and not gpu:
        note += "; no GPU visible"
    elif cc and not runs:
        note = why_unusable("cuda", torch.device("cuda"))
    rows.append(BackendStatus("cuda", cc, runs, note))
    tri = triton_available()
    if not tri:
        tnote = "triton not installed (pip install triton)"
    elif gpu:
        tnote = "JIT on the GPU"
    else:
        tnote = "no GPU; runs on the CPU only under TRITON_INTERPRET=1" + (" (set)" if triton_interpret() else "")
    rows.append(BackendStatus("triton", tri, tri and (gpu or triton_interpret()), tnote))
    return rows
