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

import io
import os
import re
from collections.abc import Callable
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
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


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


def _non_finite(obj: Any, prefix: str = "") -> str | None:
    """Name of the first floating tensor holding NaN/inf in a nested dict/list, or None."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() and not bool(torch.isfinite(obj).all()):
            return prefix or "tensor"
        return None
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return None
    for k, v in items:
        bad = _non_finite(v, f"{prefix}.{k}" if prefix else str(k))
        if bad:
            return bad
    return None


def save_checkpoint(run_dir: str | os.PathLike, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Atomically write ``state`` as the checkpoint of ``step`` and delete all but the last ``keep``.

    Raises:
        RuntimeError: ``state`` holds a NaN or inf (a checkpoint never does; the trainer skips such steps).
    """
    bad = _non_finite(state)
    if bad:
        raise RuntimeError(f"refusing to save a checkpoint holding NaN/inf (in {bad})")
    buf = io.BytesIO()
    torch.save(state, buf)
    path = checkpoint_path(run_dir, step)
    atomic_write(path, buf.getvalue())
    for _, old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    # temporary files of writes cut short by a kill -9 (one writer per run folder: none is in flight now)
    for stale in path.parent.glob(".step_*.pt.tmp-*"):
        stale.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: torch.device | str = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``.

    Raises:
        UserError: the file is missing, truncated, corrupt or not a fastdream checkpoint.
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError as e:
        raise UserError(f"checkpoint {path} does not exist") from e
    except Exception as e:  # truncated zip, pickle refusing a non-tensor global, ...
        raise UserError(
            f"checkpoint {path} is corrupt or truncated ({type(e).__name__}); delete it to use an earlier "
            f"one, or start over with --overwrite"
        ) from e
    if not isinstance(state, dict) or state.get("format") != 1 or "field" not in state:
        raise UserError(f"{path} is not a fastdream checkpoint; delete it or start over with --overwrite")
    return state
