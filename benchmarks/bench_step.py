# SPDX-License-Identifier: Apache-2.0
"""The whole SDS step (``fastdream bench``'s step) under pytest-benchmark, so ``pytest benchmarks/
--benchmark-only`` reports it next to the per-op numbers.

- builtin prior, fused ops and the reference ops, on the bench device (the CPU here: the trainer's CPU field,
  64x64 renders; a few rounds, each a full step of 1-3 s on two loaded cores);
- on CUDA also the SD-2.1-base-shaped UNet + VAE (random weights, fp16, channels_last), plain.

Each round is one whole step including an occupancy-grid update (the trainer updates every 16 steps), so these
times are an upper bound of ``fastdream bench``'s amortised step. ``FASTDREAM_BENCH_TINY=1`` swaps in the tiny
configs (a smoke run in seconds). Per-part medians: ``fastdream bench``.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import bench_device, run_timed

from fastdream.bench import BenchConfig, StepRunner, build_guidance
from fastdream.ops import use_backend

pytest.importorskip("pytest_benchmark")

TINY = os.environ.get("FASTDREAM_BENCH_TINY", "") not in ("", "0")
DEVICE = bench_device()
CASES = [("builtin", "fused"), ("builtin", "reference")]
if DEVICE.type == "cuda":
    CASES += [("sd", "fused"), ("sd", "reference")]


def _rounds(model: str, ops: str) -> int:
    if DEVICE.type == "cuda":
        return 20
    return 2 if ops == "reference" else 3  # seconds per step on two shared cores


@pytest.mark.parametrize("model, ops", CASES)
def test_sds_step(benchmark, model, ops):
    if model != "builtin":
        pytest.importorskip("diffusers")
    cfg = BenchConfig(model=model, device=str(DEVICE), ops=ops, tiny=TINY)
    forced = "reference" if ops == "reference" else None
    with use_backend(forced):
        guidance = build_guidance(cfg, DEVICE)
        runner = StepRunner(cfg, DEVICE, guidance, int(guidance.resolution))
        runner.warm_grid()
        runner.step()  # warm-up: allocator, first-call costs
        benchmark.group = f"SDS step {model} {runner.resolution}x{runner.resolution} {DEVICE.type}"
        benchmark.extra_info.update(model=model, ops=ops, tiny=TINY, samples=runner.n_samples)
        loss = run_timed(benchmark, runner.step, rounds=_rounds(model, ops))
    assert torch.isfinite(loss)
    assert runner.n_samples > 0
