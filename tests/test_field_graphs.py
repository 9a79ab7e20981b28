# SPDX-License-Identifier: Apache-2.0
"""The field replayed from CUDA graphs (fastdream.field_graphs): buckets, the eager fallback, and on CUDA the
same values and gradients as the eager field, across buckets and optimiser updates."""

from __future__ import annotations

import pytest
import torch

from fastdream.config import FieldConfig
from fastdream.field import NeuralField
from fastdream.field_graphs import MIN_CAPACITY, GraphedDensityAndNormals, capacity


def _field(device: str = "cpu") -> NeuralField:
    cfg = FieldConfig(levels=4, features=2, log2_table_size=12, base_resolution=4, finest_resolution=32, hidden=16)
    field = NeuralField(cfg, bound=1.0, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():  # a table of trained magnitude, so that the normals depend on it
        field.table.uniform_(-0.05, 0.05, generator=torch.Generator(device=device).manual_seed(1))
    return field


def _points(n: int, seed: int, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return ((torch.rand(n, 3, generator=g) * 2 - 1) * 0.9).to(device)


@pytest.mark.parametrize("n", [0, 1, 1023, 1024, 1025, 9701, 2**17 + 3])
def test_capacity_is_a_bucket_at_most_an_eighth_larger(n):
    c = capacity(n)
    assert c >= max(n, MIN_CAPACITY) and c <= max(MIN_CAPACITY, n + n // 8 + 1)
    k = c.bit_length() - 4
    assert c % (1 << max(k, 0)) == 0  # m * 2^k with 8 <= m <= 16: few distinct buckets
    assert capacity(c) == c


def test_cpu_and_no_grad_calls_are_the_eager_field():
    field = _field()
    graphed = GraphedDensityAndNormals(field)
    x = _points(37, seed=2)
    for got, want in zip(graphed(x), field.density_and_normals(x)):
        assert torch.equal(got, want)
    assert graphed.captures == 0
    with pytest.raises(ValueError, match="max_graphs"):
        GraphedDensityAndNormals(field, max_graphs=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graphs_match_the_eager_field_across_buckets_and_updates():
    field = _field("cuda")
    graphed = GraphedDensityAndNormals(field, max_graphs=2)
    opt = torch.optim.Adam(field.parameters(), lr=1e-2)
    view = torch.nn.functional.normalize(torch.randn(3), dim=0).cuda()

    def loss_of(outputs):
        sigma, albedo, normals = outputs
        return sigma.mean() + albedo.square().mean() + (normals @ view).square().mean()

    def grads(fn, x):
        field.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16):
            out = fn(x)
            loss = loss_of(out)
        loss.backward()
        return [o.detach().clone() for o in out], {k: p.grad.clone() for k, p in field.named_parameters()}

    sizes = [3000, 5000, 3001, 9000, 3002]  # buckets 3072, 5120, 3072 again, 9216 (evicts one), 3072
    for step, n in enumerate(sizes):
        x = _points(n, seed=10 + step, device="cuda")
        out_g, grad_g = grads(graphed, x)
        out_e, grad_e = grads(field.density_and_normals, x)
        for name, a, b in zip(("density", "albedo", "normals"), out_g, out_e):
            assert a.shape[0] == n
            torch.testing.assert_close(a, b, atol=5e-3, rtol=5e-3, msg=lambda m, k=name, s=step: f"step {s} {k}: {m}")
        for name in grad_e:
            scale = grad_e[name].abs().max().item() + 1e-12
            torch.testing.assert_close(
                grad_g[name],
                grad_e[name],
                atol=2e-3 * scale,
                rtol=2e-2,
                msg=lambda m, k=name, s=step: f"step {s} {k}: {m}",
            )
        opt.step()  # in place: the next replay must see the new parameters
    assert graphed.captures == 4  # 3072, 5120, 9216, and 3072 again after its eviction (max_graphs=2)
