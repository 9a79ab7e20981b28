# SPDX-License-Identifier: Apache-2.0
"""Occupancy-grid update (vectorised PyTorch; one implementation) with a cheap analytic density, so the grid's
own cost is what is timed: warm-up (every cell) and regular (a quarter plus the occupied cells) updates."""

from __future__ import annotations

import pytest
import torch
from conftest import bench_device, run_timed

from fastdream.ops import OccupancyGrid

pytest.importorskip("pytest_benchmark")


def _density(x: torch.Tensor) -> torch.Tensor:
    return 100.0 * torch.exp(-x.square().sum(-1) / (2 * 0.2**2))


@pytest.mark.parametrize("warmup", [True, False], ids=["warmup", "regular"])
@pytest.mark.parametrize("resolution", [64, 128])
def test_occupancy_update(benchmark, resolution, warmup):
    grid = OccupancyGrid(resolution=resolution).to(bench_device())
    grid.update(_density, warmup=True)
    benchmark.group = f"occupancy update {resolution}^3"
    gen = torch.Generator(bench_device()).manual_seed(0)
    run_timed(benchmark, lambda: grid.update(_density, warmup=warmup, generator=gen), rounds=5)
    benchmark.extra_info["occupied"] = grid.fraction_occupied()
