# SPDX-License-Identifier: Apache-2.0
"""The neural field and the background."""

import pytest
import torch

from fastdream.config import FieldConfig
from fastdream.field import Background, NeuralField


def small_cfg(**kw) -> FieldConfig:
    base = dict(levels=4, features=2, log2_table_size=12, base_resolution=4, finest_resolution=32, hidden=16)
    base.update(kw)
    return FieldConfig(**base)


def make_field(seed=0, **kw) -> NeuralField:
    return NeuralField(small_cfg(**kw), bound=1.0, generator=torch.Generator().manual_seed(seed))


def test_blob_density_central_and_empty_outside():
    f = make_field()
    r = torch.linspace(0, 1, 11)
    x = torch.stack([r, torch.zeros_like(r), torch.zeros_like(r)], -1)
    sigma, rho = f(x)
    assert sigma.shape == (11,) and rho.shape == (11, 3)
    assert sigma[0] > 3.0  # a dense blob at the centre
    assert sigma[-1] < 0.1  # nearly empty at the bound (the occupancy grid can skip it)
    assert torch.all(sigma[1:] <= sigma[:-1] + 1e-3)  # decreasing outwards (the table starts ~1e-4)
    assert torch.all((rho > 0) & (rho < 1))


def test_exp_activation_and_unresolved_config():
    soft, ex = make_field(), make_field(density_activation="exp")  # same seed: same pre-activation
    x = torch.rand(8, 3) - 0.5
    pre = torch.log(torch.expm1(soft.density(x).double()))  # softplus^-1
    assert torch.allclose(ex.density(x).double(), torch.exp(pre), rtol=1e-3)
    with pytest.raises(ValueError, match="resolve"):
        NeuralField(FieldConfig())


def test_same_seed_same_field():
    a, b, c = make_field(0), make_field(0), make_field(1)
    x = torch.rand(16, 3) * 2 - 1
    assert torch.equal(a(x)[0], b(x)[0])
    assert not torch.equal(a(x)[0], c(x)[0])


@pytest.mark.parametrize("method", ["analytic", "finite_difference"])
def test_normals_of_the_blob_point_outwards(method):
    f = make_field()
    with torch.no_grad():
        f.table.zero_()  # a pure blob: density decreases radially
    x = torch.nn.functional.normalize(torch.randn(32, 3), dim=-1) * 0.4
    sigma, rho, n = f.density_and_normals(x, method=method)
    assert torch.allclose(n.norm(dim=-1), torch.ones(32), atol=1e-4)
    if method == "analytic":  # exact up to fp32 (the blob's own gradient)
        torch.testing.assert_close(n, torch.nn.functional.normalize(x, dim=-1), atol=1e-5, rtol=0)
    else:  # central differences of the blob at the method's step
        cos = (n * torch.nn.functional.normalize(x, dim=-1)).sum(-1)
        assert cos.min() > 0.999


def test_analytic_normals_match_finite_differences_and_train_the_table():
    f = make_field()
    with torch.no_grad():
        f.table.normal_(0, 0.02, generator=torch.Generator().manual_seed(3))
    x = torch.rand(64, 3) * 0.8 - 0.4
    _, _, na = f.density_and_normals(x, "analytic")
    # Exact gradient by autograd through the reference encoding (double precision-free check at fp32).
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f.density(xg).sum(), xg)
    nref = -torch.nn.functional.normalize(g, dim=-1)
    # fp32 agrees to ~1e-7; a cosine bound (> 0.999) let a dropped ReLU mask in the MLP's gradient through (2e-3).
    torch.testing.assert_close(na, nref, atol=1e-5, rtol=0)
    na.sum().backward()
    assert f.table.grad is not None and f.table.grad.abs().sum() > 0


def test_background():
    bg = Background(generator=torch.Generator().manual_seed(0))
    d = torch.nn.functional.normalize(torch.randn(10, 3), dim=-1)
    c = bg(d)
    assert c.shape == (10, 3) and torch.all((c > 0) & (c < 1))
    c.sum().backward()
    assert all(p.grad is not None for p in bg.parameters())
    # The encoding written out: d, then sin and cos of 2^k pi d for k = 0..3 (frequency-major, xyz inside).
    want = [d]
    for fn in (torch.sin, torch.cos):
        want += [fn(2.0**k * torch.pi * d) for k in range(4)]
    torch.testing.assert_close(bg.encode(d), torch.cat(want, -1))
    lin0, lin1 = bg.net[0], bg.net[2]
    torch.testing.assert_close(c, torch.sigmoid(lin1(torch.relu(lin0(torch.cat(want, -1))))))


@pytest.mark.parametrize("kw", [{}, dict(levels=3, features=4, log2_table_size=9, hidden=24, hidden_layers=2)])
def test_field_state_bytes_counts_every_parameter(kw):
    from fastdream.config import STATE_BYTES_PER_PARAM, field_state_bytes

    n = sum(p.numel() for p in make_field(**kw).parameters())
    for device_type, per in STATE_BYTES_PER_PARAM.items():
        assert field_state_bytes(small_cfg(**kw), device_type) == per * n


def test_check_memory_refuses_a_field_that_cannot_fit(monkeypatch):
    from fastdream import run
    from fastdream.config import RunConfig, resolve
    from fastdream.errors import UserError

    cfg = resolve(RunConfig(prompt="a red cube"), "cpu")
    need = 40 * sum(p.numel() for p in NeuralField(cfg.field, bound=1.0).parameters())
    monkeypatch.setattr(run, "available_memory", lambda device: need)
    run.check_memory(cfg, torch.device("cpu"))  # fits exactly
    monkeypatch.setattr(run, "available_memory", lambda device: need - 1)
    with pytest.raises(UserError, match=r"field.log2_table_size.*") as e:
        run.check_memory(cfg, torch.device("cpu"))
    assert "16 levels x 2^16 entries x 2 features" in str(e.value) and "\n" not in str(e.value)
    monkeypatch.setattr(run, "available_memory", lambda device: None)  # unknown: no refusal
    run.check_memory(cfg, torch.device("cpu"))


def test_available_memory_on_this_machine():
    from fastdream.run import available_memory

    have = available_memory(torch.device("cpu"))
    assert have is None or 0 < have < 1 << 50
