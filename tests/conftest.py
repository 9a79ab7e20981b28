# SPDX-License-Identifier: Apache-2.0
"""Shared test helpers: which backends can run here, and comparisons against the reference."""

from __future__ import annotations

import os

import pytest
import torch

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
def _seed():
    torch.manual_seed(0)
    yield


def pytest_runtest_logreport(report):
    """With FASTDREAM_FAILURE_LOG set, append each failure's traceback to that file as it happens (device runs
    under a hard time cap keep what failed even when the run is cut off before pytest's summary)."""
    path = os.environ.get("FASTDREAM_FAILURE_LOG")
    if path and report.failed:
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"==== {report.nodeid} ({report.when})\n{report.longreprtext}\n")
