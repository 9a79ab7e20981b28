# SPDX-License-Identifier: Apache-2.0
"""Compositing: fast implementations against the reference, forward and forward+backward, on the samples of
64x64 and 128x128 camera rays through a ball-shaped grid, and on CUDA 512x512 too: at the smaller sides every
implementation is bound by its kernel launches (64x64 and 128x128 took the same time on an H200), so only the
largest side compares the kernels' own work."""

from __future__ import annotations

import pytest
import torch
from bench_raymarch import blob_grid, camera_rays
from conftest import bench_backends, bench_device, run_timed

from fastdream.ops import composite, march_rays, use_backend

pytest.importorskip("pytest_benchmark")

SIDES = [64, 128] + ([512] if bench_device().type == "cuda" else [])


def _inputs(side: int, device: torch.device):
    rays_o, rays_d = camera_rays(side, device)
    samples = march_rays(
        rays_o, rays_d, blob_grid(device), jitter=True, generator=torch.Generator(device).manual_seed(0)
    )
    g = torch.Generator(device).manual_seed(1)
    sigmas = torch.rand(samples.n_samples, device=device, generator=g) * 20.0
    colors = torch.rand(samples.n_samples, 3, device=device, generator=g)
    background = torch.rand(rays_o.shape[0], 3, device=device, generator=g)
    return sigmas, colors, samples, background


@pytest.mark.parametrize("backend", bench_backends("composite"))
@pytest.mark.parametrize("side", SIDES)
def test_composite_forward(benchmark, backend, side):
    sigmas, colors, samples, bg = _inputs(side, bench_device())
    benchmark.group = f"composite forward {side}x{side}"
    benchmark.extra_info["samples"] = samples.n_samples
    with use_backend(backend), torch.no_grad():
        run_timed(benchmark, lambda: composite(sigmas, colors, samples, background=bg))


@pytest.mark.parametrize("backend", bench_backends("composite"))
@pytest.mark.parametrize("side", SIDES)
def test_composite_forward_backward(benchmark, backend, side):
    sigmas, colors, samples, bg = _inputs(side, bench_device())
    sigmas.requires_grad_()
    colors.requires_grad_()
    bg.requires_grad_()
    g_image = torch.rand(bg.shape, device=bg.device)
    benchmark.group = f"composite forward+backward {side}x{side}"
    benchmark.extra_info["samples"] = samples.n_samples

    def step():
        out = composite(sigmas, colors, samples, background=bg)
        loss = (out.image * g_image).sum() + out.opacity.square().sum()
        return torch.autograd.grad(loss, (sigmas, colors, bg))

    with use_backend(backend):
        run_timed(benchmark, step)
