# SPDX-License-Identifier: Apache-2.0
"""Density-gradient normals: gradcheck and gradgradcheck of the whole path (table and MLP weights), the
fast backends against the reference, and analytic against finite-difference normals."""

from __future__ import annotations

import pytest
import torch

from fastdream.ops import (
    HashGridConfig,
    _dispatch,
    density_gradient,
    finite_difference_gradient,
    finite_difference_normals,
    hash_encode,
    normals_from_gradient,
    use_backend,
)

OP = "hash_encode"
TINY = HashGridConfig(levels=2, features=2, log2_table_size=5, base_resolution=2, finest_resolution=5)
# Fewer inputs for the numerical Jacobians of gradcheck / gradgradcheck.
CHECK = HashGridConfig(levels=2, features=1, log2_table_size=4, base_resolution=2, finest_resolution=4)


def _device_for(backend: str) -> torch.device:
    if backend in ("cuda", "triton") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def _require(backend: str) -> torch.device:
    device = _device_for(backend)
    if backend not in _dispatch.usable_backends(OP, device):
        pytest.skip(f"{backend} is not usable here (not compiled, no GPU, or TRITON_INTERPRET unset)")
    return device


def _mlp(in_dim: int, dtype=torch.float64, seed: int = 0, hidden: int = 8) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(in_dim, hidden), torch.nn.Softplus(), torch.nn.Linear(hidden, 1)).to(
        dtype
    )


def _inputs(cfg: HashGridConfig, n: int, dtype=torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, 3, generator=g, dtype=torch.float64) * 1.8 - 0.9).to(dtype)
    table = (torch.rand(cfg.levels, cfg.table_size, cfg.features, generator=g, dtype=torch.float64) - 0.5).to(dtype)
    return x, table


def _normals_fn(x, cfg, mlp):
    """normals(table, w1, b1, w2, b2) with the MLP's parameters as explicit inputs (for gradcheck)."""

    def fn(table, w1, b1, w2, b2):
        def density(enc):
            h = torch.nn.functional.softplus(enc @ w1.T + b1)
            return (h @ w2.T + b2)[:, 0]

        _, grad = density_gradient(x, table, cfg, density)
        return normals_from_gradient(grad)

    return fn


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_normals_gradcheck_and_gradgradcheck_float64(backend):
    _require(backend)
    x, table = _inputs(CHECK, 4)
    mlp = _mlp(CHECK.out_dim, hidden=4)
    params = [table.requires_grad_(True)] + [p.detach().clone().requires_grad_(True) for p in mlp.parameters()]
    fn = _normals_fn(x, CHECK, mlp)
    with use_backend(backend):
        assert fn(*params).dtype == torch.float64
        assert torch.autograd.gradcheck(fn, params)
        assert torch.autograd.gradgradcheck(fn, params)


@pytest.mark.parametrize("backend", ["cpp", "cuda", "triton"])
def test_normals_path_matches_reference(backend):
    """Density, gradient, normals and the gradients of a normals loss w.r.t. table and MLP weights."""
    device = _require(backend)
    x, table = _inputs(TINY, 31, dtype=torch.float32, seed=3)
    mlp = _mlp(TINY.out_dim, dtype=torch.float32)
    view = torch.nn.functional.normalize(torch.randn(31, 3, generator=torch.Generator().manual_seed(4)), dim=-1)

    # The GPU backends read the table in fp16 (fastdream/ops/hash_grid.py): the reference gets the same rounded
    # table, and everything else must then agree to fp32 accuracy.
    fp16_reads = backend in ("cuda", "triton") and device.type == "cuda"

    def run(dev, table=table):
        m = _mlp(TINY.out_dim, dtype=torch.float32).to(dev)
        m.load_state_dict(mlp.state_dict())
        # A fresh leaf each run: table.to("cpu") would be table itself, which the first run would mark as
        # requiring a gradient (making the next run's copy a non-leaf) and whose .grad both runs would share.
        t = table.clone().to(dev).requires_grad_(True)
        tau, grad = density_gradient(x.to(dev), t, TINY, lambda e: m(e))
        n = normals_from_gradient(grad)
        loss = (n * view.to(dev)).sum().square() + tau.sum()
        loss.backward()
        return [v.detach().cpu().clone() for v in (tau, grad, n, t.grad, m[0].weight.grad, m[2].weight.grad)]

    with use_backend("reference"):
        want = run(torch.device("cpu"), table.half().float() if fp16_reads else table)
    with use_backend(backend):
        got = run(device)
    tol = {"atol": 2e-4, "rtol": 2e-4}
    names = ("density", "gradient", "normals", "table grad", "w1 grad", "w2 grad")
    for name, a, b in zip(names, got, want):
        torch.testing.assert_close(a, b, **tol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("backend", ["reference", "cpp", "cuda", "triton"])
def test_loss_on_normals_trains_table_and_mlp(backend):
    device = _require(backend)
    x, table = _inputs(TINY, 17, dtype=torch.float32, seed=5)
    table = table.to(device).requires_grad_(True)
    mlp = _mlp(TINY.out_dim, dtype=torch.float32).to(device)
    with use_backend(backend):
        _, grad = density_gradient(x.to(device), table, TINY, lambda e: mlp(e))
        n = normals_from_gradient(grad)
        # Only the normals enter the loss: the table and MLP gradients come from the second-order path.
        n[:, 1].sum().backward()
    assert table.grad is not None and table.grad.abs().sum() > 0
    assert mlp[0].weight.grad is not None and mlp[0].weight.grad.abs().sum() > 0
    assert mlp[2].weight.grad is not None and mlp[2].weight.grad.abs().sum() > 0


def test_analytic_normals_match_finite_differences_on_a_smooth_field():
    """Dense levels holding a linear field interpolate it exactly, so tau = MLP(enc(x)) is smooth."""
    cfg = HashGridConfig(levels=2, features=2, log2_table_size=9, base_resolution=3, finest_resolution=6)
    assert all(cfg.is_dense(l) for l in range(cfg.levels))
    table = torch.zeros(cfg.levels, cfg.table_size, cfg.features, dtype=torch.float64)
    a = torch.tensor([[0.7, -0.3, 0.5], [-0.2, 0.9, 0.4]], dtype=torch.float64)  # feature f = a_f . u
    for l, res in enumerate(cfg.resolutions):
        ijk = torch.stack(torch.meshgrid(*[torch.arange(res + 1)] * 3, indexing="ij"), -1).reshape(-1, 3)
        idx = ijk[:, 0] + ijk[:, 1] * (res + 1) + ijk[:, 2] * (res + 1) ** 2
        table[l, idx] = (ijk.double() / res) @ a.T
    mlp = _mlp(cfg.out_dim)
    x = torch.rand(64, 3, generator=torch.Generator().manual_seed(8), dtype=torch.float64) * 1.6 - 0.8

    def density_fn(p):
        return mlp(hash_encode(p, table, cfg))[:, 0]

    with use_backend("reference"):
        _, grad = density_gradient(x, table, cfg, lambda e: mlp(e))
        fd = finite_difference_gradient(density_fn, x, eps=1e-4)
        n_fd = finite_difference_normals(density_fn, x, eps=1e-4)
    torch.testing.assert_close(grad, fd, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(normals_from_gradient(grad), n_fd, atol=1e-6, rtol=1e-6)
    assert grad.abs().min() > 0  # a field that actually varies


def test_normals_from_gradient_is_safe_at_zero():
    g = torch.tensor([[0.0, 0.0, 0.0], [0.0, 3.0, 4.0]], requires_grad=True)
    n = normals_from_gradient(g)
    torch.testing.assert_close(n.detach(), torch.tensor([[0.0, 0.0, 0.0], [0.0, -0.6, -0.8]]))
    n.sum().backward()
    assert torch.isfinite(g.grad).all()
    # A tiny gradient that is not zero still gives a unit normal (the clamp is on |g|^2, at eps^2).
    small = torch.tensor([[1e-8, 0.0, 0.0], [0.0, -3e-9, 4e-9]])
    torch.testing.assert_close(normals_from_gradient(small), torch.tensor([[-1.0, 0.0, 0.0], [0.0, 0.6, -0.8]]))


def test_density_gradient_without_grad_mode_and_with_frozen_table():
    x, table = _inputs(TINY, 9, dtype=torch.float32)
    mlp = _mlp(TINY.out_dim, dtype=torch.float32)
    tau, grad = density_gradient(x, table.requires_grad_(True), TINY, lambda e: mlp(e))
    with torch.no_grad():
        tau2, grad2 = density_gradient(x, table, TINY, lambda e: mlp(e))
    assert not tau2.requires_grad and not grad2.requires_grad
    torch.testing.assert_close(grad2, grad.detach())
    # A frozen table: the MLP still gets gradients from a normals loss.
    _, grad3 = density_gradient(x, table.detach(), TINY, lambda e: mlp(e))
    normals_from_gradient(grad3).sum().backward()
    assert mlp[0].weight.grad.abs().sum() > 0


def test_density_mlp_of_the_wrong_shape_is_named():
    x, table = _inputs(TINY, 4, dtype=torch.float32)
    with pytest.raises(ValueError, match="density_mlp"):
        density_gradient(x, table, TINY, lambda e: e[:, :2])


@pytest.mark.parametrize("backend", ["reference", "cpp", "cuda", "triton"])
def test_empty_input(backend):
    device = _require(backend)
    _, table = _inputs(TINY, 0, dtype=torch.float32)
    table = table.to(device).requires_grad_(True)
    mlp = _mlp(TINY.out_dim, dtype=torch.float32).to(device)
    x = torch.zeros(0, 3, device=device)
    with use_backend(backend):
        tau, grad = density_gradient(x, table, TINY, lambda e: mlp(e))
        normals_from_gradient(grad).sum().backward()
        fd = finite_difference_normals(lambda p: mlp(hash_encode(p, table, TINY)), x)
    assert tau.shape == (0,) and grad.shape == (0, 3) and fd.shape == (0, 3)
    assert table.grad is not None and (table.grad == 0).all()


# --- audit additions --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["cpp", "cuda", "triton"])
def test_normals_path_at_nonfinite_and_outside_points_matches_reference(backend):
    """129 points (two Triton programs), a third outside the cube, three non-finite or far away: the density
    gradient is 0 in clamped coordinates (normal 0 where all three are), and every output and gradient of a
    normals loss is finite and the reference's."""
    device = _require(backend)
    nan, inf = float("nan"), float("inf")
    x, table = _inputs(TINY, 129, dtype=torch.float32, seed=3)
    x = x * 1.4
    x[0] = torch.tensor([nan, 0.2, 0.3])
    x[1] = torch.tensor([inf, -inf, nan])
    x[2] = torch.tensor([5.0, 5.0, 5.0])
    mlp = _mlp(TINY.out_dim, dtype=torch.float32)
    view = torch.nn.functional.normalize(torch.randn(129, 3, generator=torch.Generator().manual_seed(4)), dim=-1)
    fp16_reads = backend in ("cuda", "triton") and device.type == "cuda"

    def run(dev, t0):
        m = _mlp(TINY.out_dim, dtype=torch.float32).to(dev)
        m.load_state_dict(mlp.state_dict())
        t = t0.clone().to(dev).requires_grad_(True)
        tau, grad = density_gradient(x.to(dev), t, TINY, lambda e: m(e))
        n = normals_from_gradient(grad)
        ((n * view.to(dev)).sum().square() + tau.sum()).backward()
        return [v.detach().cpu().clone() for v in (tau, grad, n, t.grad, m[0].weight.grad, m[2].weight.grad)]

    with use_backend("reference"):
        want = run(torch.device("cpu"), table.half().float() if fp16_reads else table)
    with use_backend(backend):
        got = run(device, table)
    assert (want[1][1:3] == 0).all() and (want[2][1:3] == 0).all() and want[1][0, 0] == 0
    for name, a, b in zip(("density", "gradient", "normals", "table grad", "w1 grad", "w2 grad"), got, want):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-4, msg=lambda m, name=name: f"{name}: {m}")
