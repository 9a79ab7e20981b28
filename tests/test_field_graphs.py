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
def test_capacity_is_a_bucket_at_most_a_quarter_larger(n):
    c = capacity(n)
    assert c >= max(n, MIN_CAPACITY) and c <= max(MIN_CAPACITY, n + n // 4 + 1)
    k = c.bit_length() - 3
    assert c % (1 << max(k, 0)) == 0  # m * 2^k with 4 <= m <= 8: four buckets per octave
    assert capacity(c) == c
    assert len({capacity(m) for m in range(5000, 10001)}) <= 5


def test_cpu_and_no_grad_calls_are_the_eager_field():
    field = _field()
    graphed = GraphedDensityAndNormals(field)
    x = _points(37, seed=2)
    for got, want in zip(graphed(x), field.density_and_normals(x)):
        assert torch.equal(got, want)
    assert graphed.captures == 0
    with pytest.raises(ValueError, match="max_graphs"):
        GraphedDensityAndNormals(field, max_graphs=0)


def test_padding_buckets_sightings_and_eviction_with_an_eager_stand_in(monkeypatch):
    """The wrapper's own logic on the CPU: make_graphed_callables replaced by the eager module, so padding to the
    bucket, cutting back, the second-sight capture and LRU eviction run here; values and every gradient must equal
    the unpadded field's."""

    class CpuGraphed(GraphedDensityAndNormals):
        def _eager(self, x, method):  # the real one sends every CPU call to the eager field
            return not (torch.is_grad_enabled() and self.field.training)

    captured = []

    def fake_make_graphed_callables(module, sample_args, num_warmup_iters):
        captured.append(sample_args[0].shape[0])
        return module

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", fake_make_graphed_callables)
    field = _field()
    graphed = CpuGraphed(field, max_graphs=2)
    sizes = [1500, 1500, 3000, 3000, 1501, 5000, 5000, 1502]  # buckets 1536, 1536, 3072, 3072, 1536, 5120, ...
    for step, n in enumerate(sizes):
        x = _points(n, seed=step)
        out = []
        for fn in (graphed, field.density_and_normals):
            field.zero_grad(set_to_none=True)
            sigma, albedo, normals = fn(x)
            assert sigma.shape == (n,) and albedo.shape == (n, 3) and normals.shape == (n, 3)
            (sigma.mean() + albedo.square().mean() + normals[:, 0].mean()).backward()
            out.append([sigma, albedo, normals] + [p.grad.clone() for p in field.parameters()])
        for a, b in zip(*out):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # second sight: 1536 at call 2, 3072 at call 4; 5120 at call 7 evicts the least recently used (3072); 1536 stays
    assert captured == [1536, 3072, 5120]
    assert graphed.captures == 3 and graphed.replays == 5
    assert [k[0] for k in graphed._graphs] == [5120, 1536]
    with pytest.raises(ValueError, match="min_sightings"):
        GraphedDensityAndNormals(field, min_sightings=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graphs_match_the_eager_field_across_buckets_and_updates():
    field = _field("cuda")
    graphed = GraphedDensityAndNormals(field, max_graphs=2, min_sightings=1)
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

    sizes = [3000, 5000, 3001, 9000, 3002]  # buckets 3072, 5120, 3072 again, 10240 (evicts 5120), 3072 again
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
    # 3072, 5120, 10240; 3072 was used again before 10240 came, so 5120 was the one evicted (max_graphs=2)
    assert graphed.captures == 3 and [k[0] for k in graphed._graphs] == [10240, 3072]
