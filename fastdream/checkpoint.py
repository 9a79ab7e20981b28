# SPDX-License-Identifier: Apache-2.0
"""The run folder's files, written so that an interruption at any moment loses nothing.

Every file is written to a temporary name in the same folder, flushed, fsync'ed and renamed over the final
name (``os.replace`` is atomic on POSIX), then the folder is fsync'ed: a ``kill -9`` leaves either the old
file or the new one, never a torn one. Checkpoints are plain ``torch.save`` dicts of tensors and numbers,
loaded with ``weights_only=True`` (nothing loaded can execute code).

Layout of a run folder::

    config.json                 the resolved RunConfig
    checkpoints/step_000200.pt  the last ``keep`` checkpoints
    previews/step_000200.png    preview grids (colour, normals, textureless)
    turntable.mp4, mesh.glb, mesh.obj
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
import tempfile
import threading
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from fastdream.errors import UserError

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^step_(\d{6,})\.pt$")


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None] | bytes | str) -> None:
    """Write ``path`` atomically: ``write(fileobj)`` (or the bytes / text) into a temporary file beside it,
    flush, fsync, rename over ``path``, fsync the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            if isinstance(write, str):
                f.write(write.encode())
            elif isinstance(write, bytes):
                f.write(write)
            else:
                write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # a failed clean-up (a read-only folder) must not hide the reason of the failed write
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def unwritable_reason(folder: str | os.PathLike) -> str | None:
    """Why files cannot be created in ``folder`` (or, when it does not exist yet, in the folder that would hold
    it), or None when they can. Creates a temporary file and removes it: ``os.access`` answers yes to root on a
    read-only mount.

    Example:
        >>> unwritable_reason("/proc/no-such-folder") is not None
        True
    """
    probe = Path(folder)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is a file, not a folder"
    try:
        fd, tmp = tempfile.mkstemp(prefix=".fastdream-probe-", dir=probe)
    except OSError as e:
        return f"{probe}: {e.strerror or type(e).__name__}"
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(tmp)
    return None


def checkpoint_path(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"step_{step:06d}.pt"


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint of the run, oldest first."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def _non_finite(obj: Any, prefix: str = "", floats: bool = False) -> str | None:
    """Name of the first floating tensor (``floats``: or Python float) holding NaN/inf in a nested dict/list."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() and not bool(torch.isfinite(obj).all()):
            return prefix or "tensor"
        return None
    if floats and isinstance(obj, float):
        return None if math.isfinite(obj) else (prefix or "value")
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return None
    for k, v in items:
        bad = _non_finite(v, f"{prefix}.{k}" if prefix else str(k), floats)
        if bad:
            return bad
    return None


def save_checkpoint(run_dir: str | os.PathLike, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Atomically write ``state`` as the checkpoint of ``step`` and delete all but the last ``keep``.

    Raises:
        RuntimeError: ``state`` holds a NaN or inf (a checkpoint never does; the trainer skips such steps).
        UserError: the file cannot be written (read-only folder, full disk); the earlier checkpoints are kept.
    """
    bad = _non_finite(state)
    if bad:
        raise RuntimeError(f"refusing to save a checkpoint holding NaN/inf (in {bad})")
    buf = io.BytesIO()
    torch.save(state, buf)
    path = checkpoint_path(run_dir, step)
    try:
        atomic_write(path, buf.getvalue())
    except OSError as e:
        last = latest_checkpoint(run_dir)
        kept = f"the last checkpoint {last.name} is kept" if last is not None else "no earlier checkpoint exists"
        raise UserError(
            f"cannot save checkpoint {path} ({e.strerror or type(e).__name__}); {kept}; free disk space or make "
            f"{path.parent} writable, then continue with --resume"
        ) from e
    # Clean-up only: a folder that took the new checkpoint but refuses a deletion loses nothing.
    for _, old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        with contextlib.suppress(OSError):
            old.unlink(missing_ok=True)
    # temporary files of writes cut short by a kill -9 (one writer per run folder: none is in flight now)
    for stale in path.parent.glob(".step_*.pt.tmp-*"):
        with contextlib.suppress(OSError):
            stale.unlink(missing_ok=True)
    return path


def snapshot(obj: Any) -> Any:
    """A copy of a nested state (dicts, lists, tuples, tensors, numbers) whose tensors live on the CPU and belong to
    the copy: the trainer changes its parameters and optimiser moments in place at the next step. CUDA tensors are
    copied into pinned memory without blocking, then their devices are synchronised once."""
    devices: set[torch.device] = set()

    def copy(o: Any) -> Any:
        if isinstance(o, torch.Tensor):
            t = o.detach()
            if t.device.type != "cuda":
                return t.to("cpu", copy=True)
            out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            out.copy_(t, non_blocking=True)
            devices.add(t.device)
            return out
        if isinstance(o, dict):
            return {k: copy(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return type(o)(copy(v) for v in o)
        return o  # numbers, strings, None: immutable

    out = copy(obj)
    for device in devices:
        torch.cuda.synchronize(device)
    return out


class CheckpointWriter:
    """Writes checkpoints (:func:`save_checkpoint`) in a background thread, one at a time, so that training goes on
    while a file of ~200 MB (CUDA defaults: hash table and Adam moments) is serialised, written and fsynced: about
    1 s each on a 2-core CPU, 50 times in a 10,000-step run at the default --save-every.

    :meth:`submit` waits for the previous write, copies the state (:func:`snapshot`) and returns; :meth:`wait` blocks
    until the write is done and raises what it raised (UserError: disk full, folder not writable; RuntimeError: a
    NaN/inf in the state, and then nothing is written). A write that is not waited for is still atomic: a kill
    leaves the earlier checkpoints and a temporary file that the next run removes.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._path: Path | None = None

    def submit(self, run_dir: str | os.PathLike, step: int, state: dict[str, Any], keep: int = 2) -> Path:
        """Start writing ``state`` as the checkpoint of ``step``; returns the path it will have."""
        self.wait()
        copied = snapshot(state)
        self._thread = threading.Thread(
            target=self._write, args=(run_dir, step, copied, keep), name="fastdream-checkpoint", daemon=False
        )
        self._thread.start()
        return checkpoint_path(run_dir, step)

    def _write(self, run_dir: str | os.PathLike, step: int, state: dict[str, Any], keep: int) -> None:
        try:
            self._path = save_checkpoint(run_dir, step, state, keep=keep)
        except BaseException as e:  # re-raised in the training thread by wait()
            self._error = e

    def poll(self) -> None:
        """Raise the error of a write that has already failed (without waiting for one in flight): a full disk
        stops the run at the next step, not at the next checkpoint."""
        if self._thread is not None and not self._thread.is_alive():
            self.wait()

    def wait(self) -> Path | None:
        """Block until the pending write (if any) is done; its path, or None when none was submitted."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error
        return self._path


def load_checkpoint(path: str | os.PathLike, map_location: torch.device | str = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``.

    Raises:
        UserError: the file is missing, truncated, corrupt or not a fastdream checkpoint.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():  # a foreign pickle's protocol warning would come before our one line
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError as e:
        raise UserError(f"checkpoint {path} does not exist") from e
    except Exception as e:  # truncated zip, pickle refusing a non-tensor global, ...
        raise UserError(
            f"checkpoint {path} is corrupt or truncated ({type(e).__name__}); delete it to use an earlier "
            f"one, or start over (fastdream generate --overwrite)"
        ) from e
    if not isinstance(state, dict) or state.get("format") != 1 or "field" not in state:
        raise UserError(
            f"{path} is not a fastdream checkpoint; delete it or start over (fastdream generate --overwrite)"
        )
    return state


def _shape(value: Any) -> str:
    return str(list(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__


def state_mismatch(modules: Mapping[str, torch.nn.Module | None], state: Mapping[str, Any]) -> str | None:
    """The first difference between the modules' parameters and buffers and a checkpoint's, one line, or None.

    Args:
        modules: the run's modules by checkpoint key (``{"field": field, "background": bg, "grid": grid}``);
            None for one the run does not have (its entry in the checkpoint is then not compared).
        state: the loaded checkpoint.

    Returns:
        e.g. ``"field.table: checkpoint [16, 524288, 2], config [16, 65536, 2]"``, ``"field.mlp.3.weight: in
        the checkpoint, not in config"``, or None when every name and shape agrees.
    """
    for name, module in modules.items():
        if module is None:
            continue
        saved = state.get(name)
        if not isinstance(saved, Mapping):
            return f"{name}: not in the checkpoint"
        own = module.state_dict()
        for key, value in own.items():
            if key not in saved:
                return f"{name}.{key}: in config, not in the checkpoint"
            theirs = saved[key]
            if isinstance(value, torch.Tensor) and (
                not isinstance(theirs, torch.Tensor) or tuple(theirs.shape) != tuple(value.shape)
            ):
                return f"{name}.{key}: checkpoint {_shape(theirs)}, config {_shape(value)}"
        extra = next((k for k in saved if k not in own), None)
        if extra is not None:
            return f"{name}.{extra}: in the checkpoint, not in config"
    return None


def check_state_finite(path: str | os.PathLike, state: Mapping[str, Any]) -> None:
    """Refuse a checkpoint holding NaN/inf anywhere (tensors, learning rates) or a negative step: fastdream never
    writes one, and resuming it failed at the first save with a traceback.

    Raises:
        UserError: one line naming the first bad entry.
    """
    bad = _non_finite(dict(state), floats=True)
    step = state.get("step")
    if bad is None and not (isinstance(step, int) and step >= 0):
        bad = f"step {step!r}"
    named = _NAME.match(Path(path).name)
    if bad is None and named is not None and int(named.group(1)) != step:  # the run would claim steps it never did
        bad = f"step {step!r}, where its name says {int(named.group(1))}"
    if bad is not None:
        raise UserError(
            f"checkpoint {path} holds an impossible value (in {bad}); fastdream never writes one, so the file was "
            f"edited or damaged: delete it to go back to the checkpoint before, or start over with generate --overwrite"
        )


def check_state_matches(
    path: str | os.PathLike, modules: Mapping[str, torch.nn.Module | None], state: Mapping[str, Any]
) -> None:
    """Refuse a checkpoint whose tensors do not fit the modules built from the run's config.json.

    Raises:
        UserError: one line naming the first mismatching tensor and both shapes.
    """
    diff = state_mismatch(modules, state)
    if diff is not None:
        path = Path(path)
        config = path.parent.parent / "config.json" if path.parent.name == CHECKPOINT_DIR else "config.json"
        raise UserError(
            f"checkpoint {path} does not match {config} ({diff}); restore the config.json the run was made "
            f"with, or start the run over with generate --overwrite"
        )
