# SPDX-License-Identifier: Apache-2.0
"""Shared test helpers: which backends can run here, comparisons against the reference, and a finished tiny run
for the CLI tests (``run_dir``)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from clitools import TINY, fastdream

from fastdream.ops import _dispatch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def fast_backends(op: str, device: str) -> list[str]:
    """The non-reference implementations of ``op`` that can run on ``device`` here."""
    return sorted(b for b in _dispatch.usable_backends(op, torch.device(device)) if b != "reference")


def backend_params(op: str) -> list:
    """pytest params (device, backend) for every usable fast implementation of ``op``; a skipped placeholder
    when there is none, so the report says why."""
    params = [pytest.param(d, b, id=f"{d}-{b}") for d in DEVICES for b in fast_backends(op, d)]
    return params or [pytest.param("cpu", "none", marks=pytest.mark.skip(reason=f"no fast backend for {op} here"))]


@pytest.fixture(autouse=True)
def _seed(monkeypatch: pytest.MonkeyPatch):
    torch.manual_seed(0)
    # In-process commands print the missing-extension warning once per process: where the extension does not load,
    # whichever test ran first would see an extra stderr line. tests/test_dispatch.py tests the warning itself.
    from fastdream import backends

    monkeypatch.setattr(backends, "_warned", True)
    yield


def pytest_runtest_logreport(report):
    """With FASTDREAM_FAILURE_LOG set, append each failure's traceback to that file as it happens (device runs
    under a hard time cap keep what failed even when the run is cut off before pytest's summary)."""
    path = os.environ.get("FASTDREAM_FAILURE_LOG")
    if path and report.failed:
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"==== {report.nodeid} ({report.when})\n{report.longreprtext}\n")


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run of "a red cube": config.json and checkpoints at steps 2 and 4 (shared: copy it with
    ``run_dir`` before changing anything)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    res = fastdream("generate", "a red cube", *TINY, "--out", out, "--steps", "4", "--save-every", "2")
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000002.pt", "step_000004.pt"]
    return out


@pytest.fixture
def run_dir(reference_run: Path, tmp_path: Path) -> Path:
    """A private copy of the reference run, with a file of the user's beside the run's files."""
    d = tmp_path / "run"
    shutil.copytree(reference_run, d)
    (d / "notes.txt").write_text("the user's own file\n")
    return d


@pytest.fixture(scope="session")
def exported_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run of "a red cube" with its exports: config.json, checkpoints 2 and 4, meshes, video
    (shared: copy it with ``exported_run_dir`` before changing anything)."""
    out = tmp_path_factory.mktemp("exported") / "run"
    tiny = [a for a in TINY if a != "--no-export"]
    res = fastdream("generate", "a red cube", *tiny, "--out", out, "--steps", "4", "--save-every", "2")
    assert res.returncode == 0, res.stderr
    assert (out / "mesh.obj").is_file() and (out / "checkpoints" / "step_000004.pt").is_file()
    return out


@pytest.fixture
def exported_run_dir(exported_run: Path, tmp_path: Path) -> Path:
    """A private copy of :func:`exported_run`."""
    d = tmp_path / "run"
    shutil.copytree(exported_run, d)
    return d
