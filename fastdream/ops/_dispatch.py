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
override to an implementation that exists but cannot run on the tensors' device is an error. The CLI checks
the variables once, before any command runs (:func:`check_env`): an unknown backend or op, or a backend not
usable here, is one line on stderr instead of a traceback deep inside a run.

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
from fastdream.errors import UserError

ENV = "FASTDREAM_BACKEND"  # all ops; ENV + "_<OP>" for one op

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
    env = os.environ.get(f"{ENV}_{op.upper()}") or os.environ.get(ENV)
    return env.strip().lower() if env else None


def env_overrides() -> dict[str, str]:
    """The backend overrides set in the environment, ``{variable: value}`` (empty values mean unset)."""
    return {k: v for k, v in sorted(os.environ.items()) if (k == ENV or k.startswith(ENV + "_")) and v.strip()}


def env_problems(device: torch.device | None = None) -> list[str]:
    """What is wrong with the ``FASTDREAM_BACKEND*`` variables: one line per bad variable, [] when none.

    Args:
        device: the device the ops will run on; None for any device visible here (the CPU, and CUDA with a GPU).
    """
    import fastdream.ops  # noqa: F401  (each op module registers its implementations on import)

    devices = [device] if device is not None else [torch.device("cpu")]
    if device is None and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    ops = sorted(op for op in _REGISTRY if not op.startswith("_"))  # "_...": ops registered by tests
    problems = []
    for var, raw in env_overrides().items():
        value = raw.strip().lower()
        op = var[len(ENV) + 1 :].lower() if var != ENV else None
        if op is not None and op not in _REGISTRY:
            problems.append(f"{var}={raw}: there is no op {op!r}; the ops are {', '.join(ops)}")
            continue
        if value not in backends.BACKENDS:
            problems.append(f"{var}={raw}: unknown backend; use one of {', '.join(backends.BACKENDS)}, or unset it")
            continue
        if op is not None and value not in _REGISTRY[op]:
            have = ", ".join(b for b in backends.BACKENDS if b in _REGISTRY[op])
            problems.append(f"{var}={raw}: op {op} has no {value} implementation in this build; it has {have}")
            continue
        if not any(value in _REGISTRY[o] for o in ([op] if op else ops)):
            continue  # the global override leaves ops without such an implementation alone
        if not any(backends.usable(value, d) for d in devices):
            why = backends.why_unusable(value, devices[0])
            problems.append(f"{var}={raw}: the {value} backend is not usable here ({why}); unset it or pick another")
    return problems


def check_env(device: torch.device | None = None) -> None:
    """Refuse bad ``FASTDREAM_BACKEND*`` variables up front (see :func:`env_problems`).

    Raises:
        UserError: the first problem, one line.
    """
    problems = env_problems(device)
    if problems:
        raise UserError(problems[0] + " (see `fastdream info`)")


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
