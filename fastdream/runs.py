# SPDX-License-Identifier: Apache-2.0
"""Run folders that lose nothing: who may write where, decided before anything is written.

A run folder belongs to one run (its ``config.json``). :func:`prepare_run_dir` decides whether a command may use
a folder: another run's folder is refused unless ``--overwrite`` (which deletes only fastdream's own files),
``--resume`` needs a checkpoint, an unwritable folder is reported in one line. Files are written atomically by
:mod:`fastdream.checkpoint` (temporary file, flush, fsync, ``os.replace``), checkpoints load with
``weights_only=True``.

Example:
    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp()) / "run"
    >>> prepare_run_dir(d, {"prompt": "a red cube"}).resume_from is None
    True
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastdream.checkpoint import CHECKPOINT_DIR, atomic_write, latest_checkpoint
from fastdream.errors import UserError

CONFIG_FILE = "config.json"
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


# ----------------------------------------------------------------------------------------------- atomic IO


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as JSON atomically (:func:`fastdream.checkpoint.atomic_write`)."""
    atomic_write(path, json.dumps(obj, indent=2) + "\n")
    return Path(path)


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
    return p.name in RUN_ARTIFACTS


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
