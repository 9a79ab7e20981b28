# SPDX-License-Identifier: Apache-2.0
"""Run folders that lose nothing: ownership checks, atomic writes, safe checkpoint loading, RNG state.

A run folder belongs to one run (its ``config.json``). This module decides, before anything is written,
whether a command may use a folder (:func:`prepare_run_dir`), writes every file atomically (temporary file in
the same folder, flush, fsync, ``os.replace``, fsync of the folder) so that a ``kill -9`` at any moment leaves
either the old file or the new one under the final name, and loads checkpoints with
``torch.load(weights_only=True)``, which cannot execute code.

Example:
    >>> import tempfile, torch
    >>> d = Path(tempfile.mkdtemp())
    >>> p = save_checkpoint({"step": 3, "w": torch.ones(2)}, checkpoint_path(d, 3))
    >>> p.name, load_checkpoint(p)["step"], latest_checkpoint(d) == p
    ('step_00000003.pt', 3, True)
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import random
import re
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastdream.errors import UserError

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
_CHECKPOINT_RE = re.compile(r"^(?:step_|ckpt_|checkpoint_)?0*(\d+)\.(?:pt|pth|safetensors)$")
# What fastdream writes into a run folder: --overwrite removes these and nothing else.
RUN_ARTIFACTS = (
    CONFIG_FILE,
    CHECKPOINT_DIR,
    "previews",
    "turntable.mp4",
    "mesh.glb",
    "mesh.obj",
    "mesh.mtl",
    "texture.png",
    "metrics.json",
    "metrics.jsonl",
    "log.txt",
    "status.json",
)


class NonFiniteError(UserError):
    """Too many non-finite steps in a row: the run stops with one line (its last checkpoint is intact)."""


# ----------------------------------------------------------------------------------------------- atomic IO


def _fsync_dir(folder: Path) -> None:
    # The rename itself is durable only once the directory entry is on disk.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | Path, write: Callable[[io.BufferedWriter], None]) -> Path:
    """Write ``path`` through ``write(file)`` so that it is never seen half-written.

    The data go to a temporary file in the same folder (same file system, so the rename is atomic), which is
    flushed and fsynced before ``os.replace`` moves it over ``path``. On any error the temporary file is removed
    and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


# ------------------------------------------------------------------------------------------------ checkpoints


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    """``RUN/checkpoints/step_00000200.pt``."""
    return Path(run_dir) / CHECKPOINT_DIR / f"step_{step:08d}.pt"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every checkpoint of a run, oldest first (temporary files are ignored)."""
    found = []
    for folder in (Path(run_dir) / CHECKPOINT_DIR, Path(run_dir)):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            m = _CHECKPOINT_RE.match(p.name)
            if m and p.is_file():
                found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1][1] if ckpts else None


def nonfinite_entries(state: Any, prefix: str = "") -> list[str]:
    """Names of the floating-point tensors in a (nested) state that hold NaN or inf."""
    bad: list[str] = []
    if isinstance(state, torch.Tensor):
        if state.is_floating_point() and state.numel() and not bool(torch.isfinite(state).all()):
            bad.append(prefix or "<tensor>")
    elif isinstance(state, dict):
        for k, v in state.items():
            bad += nonfinite_entries(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            bad += nonfinite_entries(v, f"{prefix}[{i}]")
    elif isinstance(state, float) and not math.isfinite(state):
        bad.append(prefix or "<float>")
    return bad


def save_checkpoint(state: dict[str, Any], path: str | Path, keep: int | None = None) -> Path:
    """Atomically ``torch.save`` ``state`` to ``path``; refuse to write NaN/inf (a checkpoint never holds one).

    Args:
        state: tensors, numbers, strings, lists and dicts only (what ``weights_only=True`` loads back).
        path: the final name (see :func:`checkpoint_path`).
        keep: if set, delete all but the newest ``keep`` checkpoints of the run after the write.

    Raises:
        NonFiniteError: the state holds NaN or inf (nothing is written).
    """
    bad = nonfinite_entries(state)
    if bad:
        raise NonFiniteError(f"refusing to save a checkpoint holding NaN/inf in {', '.join(bad[:3])}")
    path = Path(path)
    atomic_write(path, lambda f: torch.save(state, f))
    if keep is not None and keep > 0:
        run_dir = path.parent.parent if path.parent.name == CHECKPOINT_DIR else path.parent
        for _, old in list_checkpoints(run_dir)[:-keep]:
            if old != path:
                with contextlib.suppress(OSError):
                    old.unlink()
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint without executing anything from the file (``weights_only=True``).

    Raises:
        UserError: the file is missing, truncated, corrupt or not a fastdream checkpoint.
    """
    path = Path(path)
    hint = "delete it to resume from the previous checkpoint, or start again with --overwrite"
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; run without --resume to start a new run")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path), device=str(map_location))
        else:
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated zip, bad pickle, unsafe global, I/O error: all mean "unusable file"
        reason = " ".join(str(err).split())[:120] or type(err).__name__
        raise UserError(f"checkpoint {path} is corrupt or truncated ({reason}); {hint}") from err
    if not isinstance(state, dict):
        raise UserError(f"checkpoint {path} is not a fastdream checkpoint (not a dict); {hint}")
    return state


# ---------------------------------------------------------------------------------------------- random state


def rng_state(generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Every random state a run draws from, in a form ``weights_only=True`` loads back."""
    import numpy as np

    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [str(np_state[0]), torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        "generators": {k: g.get_state() for k, g in (generators or {}).items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator] | None = None) -> None:
    """Restore what :func:`rng_state` captured (generators by name; missing entries are left alone)."""
    import numpy as np

    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if "python" in state:
        random.setstate(_as_tuple(state["python"]))
    if "numpy" in state:
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    for k, g in (generators or {}).items():
        if k in state.get("generators", {}):
            g.set_state(state["generators"][k].cpu())


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


# ---------------------------------------------------------------------------------------------------- devices


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; ``"cuda"``/``"cuda:N"`` only when that GPU exists.

    Raises:
        UserError: unknown device, or a CUDA device this machine does not have.
    """
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError) as err:
        raise UserError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from err
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise UserError(f"--device {name} is not supported; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise UserError(f"--device {name}: {why}; use --device cpu (or auto)")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s); use cuda:0..")
    return dev


# ------------------------------------------------------------------------------------------ run-folder owners


@dataclass
class RunDir:
    """What :func:`prepare_run_dir` found: ``resume_from`` is the checkpoint to continue from (or None)."""

    path: Path
    resume_from: Path | None
    existing_config: dict[str, Any] | None


def read_run_config(run_dir: str | Path) -> dict[str, Any] | None:
    """The ``config.json`` of a run folder as a dict, None when absent.

    Raises:
        UserError: it exists but cannot be read or parsed.
    """
    p = Path(run_dir) / CONFIG_FILE
    if not p.exists():
        return None
    try:
        d = json.loads(p.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{p} is unreadable ({err.__class__.__name__}); fix or delete it, or pass --overwrite") from err
    if not isinstance(d, dict):
        raise UserError(f"{p} is not a fastdream config; delete it or pass --overwrite")
    return d


def _describe(cfg: dict[str, Any]) -> str:
    prompt = cfg.get("prompt")
    return f"prompt {prompt!r}" if prompt else "another configuration"


def _check_writable(path: Path) -> None:
    """Create ``path`` (and parents) and prove a file can be written there, or raise a one-line UserError."""
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {path} is a file, not a folder; choose another --out")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise UserError(f"cannot write to the output folder {path} ({reason}); choose another --out") from err


def prepare_run_dir(
    out: str | Path,
    identity: dict[str, Any],
    *,
    resume: bool = False,
    overwrite: bool = False,
    identity_of: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> RunDir:
    """Decide whether this run may use ``out``, before anything is written there.

    - ``out`` holds another run (a ``config.json`` whose identity differs): refused unless ``overwrite``.
    - ``out`` holds this run with checkpoints: refused unless ``resume`` (continue) or ``overwrite`` (restart).
    - ``resume`` with no checkpoint in ``out``: refused.
    - ``out`` cannot be created or written: refused.
    - ``overwrite`` deletes only what fastdream writes (:data:`RUN_ARTIFACTS`), never other files.

    Args:
        out: the run folder.
        identity: what makes two runs the same (e.g. ``RunConfig.identity()``).
        identity_of: turns a stored ``config.json`` dict into its identity (default: the dict itself, less
            ``out``, ``device``, ``optim.steps`` and the periods).

    Raises:
        UserError: one line saying what is wrong and which option fixes it.
    """
    path = Path(out).expanduser()
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other; pass one of them")
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {path} is a file, not a folder; choose another --out")
    existing = read_run_config(path) if path.is_dir() and not overwrite else None
    ckpt = latest_checkpoint(path) if path.is_dir() else None
    if resume:
        if existing is None:
            raise UserError(f"--resume: {path} holds no run to resume; run without --resume to start one")
        if ckpt is None:
            raise UserError(f"--resume: {path} holds no checkpoint yet; run without --resume (or --overwrite)")
    if existing is not None:
        theirs = (identity_of or default_identity)(existing)
        if _canon(theirs) != _canon(identity):
            raise UserError(
                f"{path} holds a different run ({_describe(existing)}); pass --overwrite to replace it "
                f"or choose another --out"
            )
        if not resume and ckpt is not None:
            raise UserError(
                f"{path} already holds this run (checkpoint {ckpt.name}); pass --resume to continue it "
                f"or --overwrite to start again"
            )
    elif path.is_dir() and not overwrite and any(_is_artifact(p) for p in path.iterdir()):
        raise UserError(f"{path} holds files of a fastdream run but no config.json; pass --overwrite or another --out")
    _check_writable(path)
    if overwrite:
        remove_run_artifacts(path)
        ckpt = None
    return RunDir(path=path, resume_from=ckpt if resume else None, existing_config=existing)


def _is_artifact(p: Path) -> bool:
    return p.name in RUN_ARTIFACTS or bool(_CHECKPOINT_RE.match(p.name))


def remove_run_artifacts(path: Path) -> None:
    """Delete what a previous run wrote into ``path`` (and nothing else)."""
    for p in list(path.iterdir()):
        if _is_artifact(p):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()


def default_identity(cfg: dict[str, Any]) -> dict[str, Any]:
    """A stored config minus what may change between a run and its resumption."""
    d = json.loads(json.dumps(cfg))
    for k in ("out", "device"):
        d.pop(k, None)
    optim = d.get("optim")
    if isinstance(optim, dict):
        for k in ("steps", "save_every", "preview_every"):
            optim.pop(k, None)
    return d


def _canon(d: Any) -> str:
    return json.dumps(d, sort_keys=True, default=str)


# ---------------------------------------------------------------------------------------------------- numerics


class NonFiniteGuard:
    """Skip steps whose loss or gradients are NaN/inf; stop after ``max_in_row`` in a row.

    Usage in a training step::

        loss.backward()
        if guard.check(loss, params):   # False: gradients zeroed, step skipped and counted
            optimizer.step()
    """

    def __init__(self, max_in_row: int = 25):
        self.max_in_row = int(max_in_row)
        self.skipped = 0
        self.in_row = 0

    def check(self, loss: torch.Tensor | float, params: list[torch.Tensor] | None = None, step: int = -1) -> bool:
        finite = bool(torch.isfinite(torch.as_tensor(loss)).all())
        if finite and params:
            grads = [p.grad for p in params if p.grad is not None]
            # one reduction, one host sync
            finite = bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()) if grads else True
        if finite:
            self.in_row = 0
            return True
        self.skipped += 1
        self.in_row += 1
        for p in params or ():
            p.grad = None
        if self.in_row >= self.max_in_row:
            where = f" (at step {step})" if step >= 0 else ""
            raise NonFiniteError(
                f"{self.in_row} steps in a row had a NaN/inf loss or gradient{where}; lower --lr or "
                f"--guidance-scale, then --resume from the last checkpoint"
            )
        return False

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped, "in_row": self.in_row}

    def load_state_dict(self, d: dict[str, int]) -> None:
        self.skipped, self.in_row = int(d.get("skipped", 0)), int(d.get("in_row", 0))


# ------------------------------------------------------------------------------------------------------ signals


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM (torchrun, schedulers) raises KeyboardInterrupt like Ctrl-C, so the trainer's
    interrupt path saves a checkpoint. Only in the main thread; restored on exit."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
