# SPDX-License-Identifier: Apache-2.0
"""The one place that picks an implementation for an op.

Every op registers a pure-PyTorch ``reference`` (ground truth, universal fallback) and any fast
implementations (``cpp``, ``cuda``, ``triton``). :func:`select` returns the first implementation in the op's
preference order that is registered and usable on the tensors' device.

Overrides, strongest first:

* :func:`use_backend` (a context manager, used by tests and benchmarks),
* ``FASTDREAM_BACKEND_<OP>`` (e.g. ``FASTDREAM_BACKEND_HASH_ENCODE=reference``),
* ``FASTDREAM_BACKEND`` (all ops).

An override names a backend; where the op has no such implementation the default order applies (so
``FASTDREAM_BACKEND=triton`` speeds up the ops that have a Triton kernel and leaves the others alone). An
override to an implementation that exists but cannot run on the tensors' device is an error.

Example:
    >>> from fastdream.ops import _dispatch
    >>> _dispatch.select("shade", torch.device("cpu")) in ("cpp", "reference")
    True
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator

import torch

from fastdream import backends

# Default preference per device type: the fastest first.
DEFAULT_ORDER: dict[str, tuple[str, ...]] = {
    "cuda": ("cuda", "triton", "reference"),
    # Triton on the CPU only runs interpreted (slower than the reference): never picked unless forced.
    "cpu": ("cpp", "reference"),
}

_REGISTRY: dict[str, dict[str, Callable]] = {}
_ORDER: dict[str, dict[str, tuple[str, ...]]] = {}
_local = threading.local()


def register(op: str, backend: str, impl: object) -> None:
    """Register ``impl`` (any object the op's module knows how to call) as ``backend`` of ``op``."""
    if backend not in backends.BACKENDS:
        raise ValueError(f"unknown backend {backend!r}")
    _REGISTRY.setdefault(op, {})[backend] = impl


def set_order(op: str, device_type: str, order: tuple[str, ...]) -> None:
    """Override the default preference order of ``op`` on ``device_type`` (e.g. measured faster)."""
    _ORDER.setdefault(op, {})[device_type] = order


def implementations(op: str) -> dict[str, Callable]:
    return dict(_REGISTRY.get(op, {}))


def usable_backends(op: str, device: torch.device) -> list[str]:
    """Registered implementations of ``op`` that can run on ``device``, in no particular order."""
    return [b for b in _REGISTRY.get(op, {}) if backends.usable(b, device)]


def _override(op: str) -> str | None:
    forced = getattr(_local, "forced", None)
    if forced:
        return forced
    env = os.environ.get(f"FASTDREAM_BACKEND_{op.upper()}") or os.environ.get("FASTDREAM_BACKEND")
    return env.strip().lower() if env else None


# Under torch.compile the choice is a constant of the trace (the environment and the extension do not change
# while a graph runs), so dynamo does not trace into the environment lookups and the extension loader.
@torch._dynamo.assume_constant_result
def select(op: str, device: torch.device | str) -> str:
    """Name of the implementation of ``op`` to run on ``device``."""
    device = torch.device(device)
    impls = _REGISTRY.get(op)
    if not impls:
        raise KeyError(f"no implementation registered for op {op!r}")
    forced = _override(op)
    if forced is not None:
        if forced not in backends.BACKENDS:
            raise ValueError(f"FASTDREAM_BACKEND: unknown backend {forced!r}; expected one of {backends.BACKENDS}")
        if forced in impls:
            if not backends.usable(forced, device):
                raise RuntimeError(
                    f"backend {forced!r} was asked for op {op!r} but cannot run on {device.type} here "
                    f"(see `fastdream info`)"
                )
            return forced
    order = _ORDER.get(op, {}).get(device.type) or DEFAULT_ORDER.get(device.type, ("reference",))
    for name in order:
        if name in impls and backends.usable(name, device):
            return name
    return "reference"


def get(op: str, backend: str) -> Callable:
    return _REGISTRY[op][backend]


@contextlib.contextmanager
def use_backend(backend: str | None) -> Iterator[None]:
    """Force ``backend`` for every op called in this block (this thread); None restores the default."""
    prev = getattr(_local, "forced", None)
    _local.forced = backend
    try:
        yield
    finally:
        _local.forced = prev
