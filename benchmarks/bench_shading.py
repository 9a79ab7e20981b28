# SPDX-License-Identifier: Apache-2.0
"""Lambertian shading: fast implementations against the reference, forward and forward+backward."""

from __future__ import annotations

import pytest
import torch
from conftest import bench_backends, bench_device, run_timed

from fastdream.ops import shade, use_backend

pytest.importorskip("pytest_benchmark")

SIZES = [2**18, 2**20]


def _inputs(s: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    rho = torch.rand(s, 3, generator=g)
    n = torch.nn.functional.normalize(torch.randn(s, 3, generator=g), dim=-1)
    p = torch.randn(s, 3, generator=g) * 0.5
    light = torch.tensor([0.7, 1.9, 2.2])
    amb, dif = torch.full((3,), 0.1), torch.full((3,), 0.9)
    return [t.to(device) for t in (rho, n, p, light, amb, dif)]


@pytest.mark.parametrize("backend", bench_backends("shade"))
@pytest.mark.parametrize("s", SIZES)
def test_shade_forward(benchmark, backend, s):
    args = _inputs(s, bench_device())
    benchmark.group = f"shade forward S={s}"
    with use_backend(backend), torch.no_grad():
        run_timed(benchmark, lambda: shade(*args, mode="shaded"))


@pytest.mark.parametrize("backend", bench_backends("shade"))
@pytest.mark.parametrize("s", SIZES)
def test_shade_forward_backward(benchmark, backend, s):
    args = _inputs(s, bench_device())
    rho, n = args[0].requires_grad_(), args[1].requires_grad_()
    grad = torch.rand_like(rho)
    benchmark.group = f"shade forward+backward S={s}"

    def step():
        out = shade(rho, n, *args[2:], mode="shaded")
        return torch.autograd.grad(out, (rho, n), grad)

    with use_backend(backend):
        run_timed(benchmark, step)
