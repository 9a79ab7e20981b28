# SPDX-License-Identifier: Apache-2.0
"""Shared helpers of the microbenchmarks.

Run: ``pytest benchmarks/ --benchmark-only --benchmark-json=benchmarks/results-<device>.json``. Each op is
timed per implementation (``reference`` and every usable fast one) on the same inputs in the same run, so the
ratios in the report compare like with like. ``FASTDREAM_BENCH_DEVICE=cuda`` forces the device; the default
is CUDA when a GPU is visible.
"""

from __future__ import annotations

import os

import pytest
import torch

from fastdream.ops import _dispatch


def bench_device() -> torch.device:
    name = os.environ.get("FASTDREAM_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def bench_backends(op: str) -> list[str]:
    """reference first, then every usable fast implementation of ``op`` on the bench device. Triton is left
    out on the CPU (interpreted, not a performance path)."""
    dev = bench_device()
    fast = [
        b for b in _dispatch.usable_backends(op, dev) if b != "reference" and not (b == "triton" and dev.type == "cpu")
    ]
    return ["reference"] + sorted(fast)


def run_timed(benchmark, fn, *, rounds: int | None = None):
    """Time ``fn()`` with a CUDA synchronisation inside the timed region (kernels are asynchronous)."""
    dev = bench_device()

    def call():
        out = fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return out

    call()  # warm-up: JIT compilation, allocator
    if rounds is None:
        return benchmark(call)
    return benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=0)


def pytest_benchmark_update_machine_info(config, machine_info):
    """Name the bench device, its versions and the commit in the JSON's machine_info (pytest-benchmark records
    only the host CPU): a result file must say which GPU it was measured on."""
    import subprocess

    dev = bench_device()
    info = {"bench_device": str(dev), "torch": torch.__version__, "cuda": torch.version.cuda}
    if dev.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(dev)
        info["gpu_capability"] = ".".join(map(str, torch.cuda.get_device_capability(dev)))
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        info["commit"] = out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["commit"] = None
    machine_info["fastdream"] = info


@pytest.fixture
def device() -> torch.device:
    return bench_device()
