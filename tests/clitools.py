# SPDX-License-Identifier: Apache-2.0
"""Helpers for subprocess tests of ``python -m fastdream``: run it, hash folders, check one-line errors."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The smallest run the CLI accepts: a few seconds on two shared cores with the builtin prior.
TINY = [
    "--steps",
    "2",
    "--model",
    "builtin",
    "--device",
    "cpu",
    "--seed",
    "0",
    "--preview-every",
    "0",
    "--resolution",
    "16",
    "--samples-per-ray",
    "16",
    "--quiet",
    "--no-export",
    "--set",
    "field.levels=4",
    "--set",
    "field.log2_table_size=10",
    "--set",
    "field.finest_resolution=64",
    "--set",
    "render.grid_resolution=16",
]


def env(**extra: str) -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e.setdefault("OMP_NUM_THREADS", "1")
    e.setdefault("TQDM_DISABLE", "1")
    e.pop("FASTDREAM_TEST_NAN_STEPS", None)
    e.update(extra)
    return e


def fastdream(*args: str, timeout: float = 600, extra_env: dict[str, str] | None = None, **kw):
    """``python -m fastdream ARGS`` -> CompletedProcess (text)."""
    return subprocess.run(
        [sys.executable, "-m", "fastdream", *map(str, args)],
        cwd=ROOT,
        env=env(**(extra_env or {})),
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )


def tree_hash(path: Path) -> str:
    """Hash of every file's relative path, mode and content under ``path`` ("absent" if it does not exist)."""
    path = Path(path)
    if not path.exists():
        return "absent"
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path).as_posix()
        h.update(rel.encode() + b"\0")
        if p.is_file():
            h.update(p.read_bytes())
        h.update(b"\1")
    return h.hexdigest()


def assert_user_error(res: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit status 2, exactly one line on stderr, no traceback; the line contains every needle (any case)."""
    err = res.stderr
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert res.returncode == 2, f"exit {res.returncode}, stderr:\n{err}\nstdout:\n{res.stdout[-2000:]}"
    assert "Traceback" not in err, err
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    for n in needles:
        assert n.lower() in lines[0].lower(), f"{n!r} not in {lines[0]!r}"
    return lines[0]
