# SPDX-License-Identifier: Apache-2.0
"""The whole SDS step (``fastdream bench``'s step) under pytest-benchmark, so ``pytest benchmarks/
--benchmark-only`` reports it next to the per-op numbers.

- builtin prior, fused ops and the reference ops, on the bench device (the CPU here: the trainer's CPU field,
  64x64 renders; a few rounds, each a full step of 1-3 s on two loaded cores);
- on CUDA also the SD-2.1-base-shaped UNet + VAE (random weights, fp16; UNet channels_last, VAE contiguous), plain.

Each round of ``test_sds_step`` is one whole step including an occupancy-grid update (the trainer updates every 16
steps), so these times are an upper bound of ``fastdream bench``'s amortised step. ``test_sds_step_amortised``
(CUDA) times the configurations the goals are quoted for, as ``generate`` runs them (``--cuda-graphs``, and for
SD ``--compile-vae``): each round is 16 steps with one grid update, as the trainer does, so round time / 16 is the
step the 25 ms goal (SD) and the 10,000-steps goal mean. Every case renders ``fastdream bench``'s default scene (a
field occupied like a trained object, ``--scene object``). ``FASTDREAM_BENCH_TINY=1`` swaps in the tiny configs (a
smoke run in seconds). Per-part medians: ``fastdream bench``.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import bench_device, run_timed

from fastdream.bench import BenchConfig, StepRunner, build_guidance, settle_gradient_scaler
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


AMORTISED = 16  # steps per round: the trainer's grid-update period


def _synced(fn):
    def call():
        out = fn()
        torch.cuda.synchronize()
        return out

    return call


BEST = {
    "builtin": dict(render_graphs=True),  # generate --cuda-graphs
    "sd": dict(cuda_graphs=True, render_graphs=True, compile_vae=True),  # generate --cuda-graphs --compile-vae
}


@pytest.mark.skipif(DEVICE.type != "cuda", reason="the CUDA-graph configurations need a GPU")
@pytest.mark.parametrize("model", list(BEST))
def test_sds_step_amortised(benchmark, model):
    if model != "builtin":
        pytest.importorskip("diffusers")
    cfg = BenchConfig(model=model, device=str(DEVICE), tiny=TINY, **BEST[model])
    guidance = build_guidance(cfg, DEVICE)  # with the UNet's and VAE's graphs or compilation, as generate
    runner = StepRunner(cfg, DEVICE, guidance, int(guidance.resolution))
    runner.warm_grid()
    for _ in range(2 * AMORTISED):  # captures, compilation, the gradient scaler's first overflows
        runner.step(grid_update=False)

    def sixteen_steps():
        for i in range(AMORTISED):
            loss = runner.step(grid_update=i == AMORTISED - 1)
        return loss

    settle_gradient_scaler(runner)  # its first overflows (skipped steps) must not be timed
    sixteen_steps()  # one more untimed round; the skips counted below are the timed rounds' only
    benchmark.group = f"SDS step amortised {model} {runner.resolution}x{runner.resolution} {DEVICE.type}"
    skipped = runner.skipped
    loss = benchmark.pedantic(_synced(sixteen_steps), rounds=10, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update(
        model=model,
        steps_per_round=AMORTISED,
        config=BEST[model],
        samples=runner.n_samples,
        skipped_in_timed_rounds=runner.skipped - skipped,
    )
    assert torch.isfinite(loss)
