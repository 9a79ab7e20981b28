# SPDX-License-Identifier: Apache-2.0
"""Ray marching: fast implementations against the reference, 64x64 and 128x128 rays, with and without a grid.

Marching has no backward (sample positions are constants of a step), so only the forward is timed.
"""

from __future__ import annotations

import pytest
import torch
from conftest import bench_backends, bench_device, run_timed

from fastdream.cameras import get_rays, orbit_cameras
from fastdream.ops import OccupancyGrid, march_rays, use_backend

pytest.importorskip("pytest_benchmark")

SIDES = [64, 128]


def camera_rays(side: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    rays_o, rays_d = get_rays(orbit_cameras(1, elevation=20.0, distance=2.2), side, side)
    return rays_o.to(device), rays_d.to(device)


def blob_grid(device: torch.device, resolution: int = 64) -> OccupancyGrid:
    """A grid around a ball of radius 0.5 (about the size of the builtin prior's primitives)."""
    grid = OccupancyGrid(resolution=resolution).to(device)
    grid.update(lambda x: 100.0 * (x.norm(dim=-1) < 0.5).float(), warmup=True)
    return grid


@pytest.mark.parametrize("backend", bench_backends("march_rays"))
@pytest.mark.parametrize("with_grid", [False, True], ids=["no-grid", "grid"])
@pytest.mark.parametrize("side", SIDES)
def test_march_rays(benchmark, backend, with_grid, side):
    dev = bench_device()
    rays_o, rays_d = camera_rays(side, dev)
    grid = blob_grid(dev) if with_grid else None
    benchmark.group = f"march_rays {side}x{side} {'grid' if with_grid else 'no grid'}"
    with use_backend(backend):
        if backend == "reference" and dev.type == "cpu":
            # a second or more per call on two cores: two rounds, no warm-up (nothing to compile or cache)
            out = benchmark.pedantic(lambda: march_rays(rays_o, rays_d, grid), rounds=2, iterations=1)
        else:
            out = run_timed(benchmark, lambda: march_rays(rays_o, rays_d, grid))
    benchmark.extra_info["samples"] = out.n_samples


@pytest.mark.parametrize("backend", [b for b in bench_backends("march_rays_padded") if b != "reference"])
@pytest.mark.parametrize("with_grid", [False, True], ids=["no-grid", "grid"])
@pytest.mark.parametrize("side", SIDES)
def test_march_rays_padded(benchmark, backend, with_grid, side):
    """The fixed-size march of the CUDA-graph render (no host round-trip), at the bucket of its sample count: in
    the same group as march_rays, so the cost of the padding (and the gain of no sync) reads off side by side."""
    from fastdream.field_graphs import capacity
    from fastdream.ops import march_rays_padded

    dev = bench_device()
    rays_o, rays_d = camera_rays(side, dev)
    grid = blob_grid(dev) if with_grid else None
    benchmark.group = f"march_rays {side}x{side} {'grid' if with_grid else 'no grid'}"
    with use_backend(backend):
        cap = capacity(march_rays(rays_o, rays_d, grid).n_samples)
        samples, total = run_timed(benchmark, lambda: march_rays_padded(rays_o, rays_d, grid, capacity=cap))
    benchmark.extra_info["samples"] = int(total)
    benchmark.extra_info["capacity"] = cap
