# SPDX-License-Identifier: Apache-2.0
"""Hash-grid encoding: the reference against hand-computed cases and autograd, every backend against the
reference (outputs and all gradients), edge cases and input checks."""

from __future__ import annotations

import math

import pytest
import torch

from fastdream.ops import (
    HashGridConfig,
    hash_encode,
    hash_encode_reference,
    hash_encode_with_jacobian,
    hash_encode_with_jacobian_reference,
    init_hash_table,
    use_backend,
)
from fastdream.ops.hash_grid import PRIME_Y, PRIME_Z

SMALL = HashGridConfig(levels=3, features=2, log2_table_size=8, base_resolution=2, finest_resolution=12)


def _points(n: int, seed: int = 0, dtype=torch.float32, spread: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return ((torch.rand(n, 3, generator=g, dtype=torch.float64) * 2 - 1) * spread).to(dtype)


def _table(cfg: HashGridConfig, seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    # Larger than the default init so that differences are visible in the tests.
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(cfg.levels, cfg.table_size, cfg.features, generator=g, dtype=torch.float64) * 2 - 1).to(dtype)


# ------------------------------------------------------------------------------------------------ config


def test_config_resolutions_and_dense_levels():
    cfg = HashGridConfig()
    res = cfg.resolutions
    assert res[0] == 16 and res[-1] == 2048 and len(res) == 16
    assert all(a < b for a, b in zip(res, res[1:]))
    b = math.exp((math.log(2048) - math.log(16)) / 15)
    assert res[5] == math.floor(16 * b**5)
    # (res + 1)^3 <= 2^19 exactly for res <= 79.
    assert [cfg.is_dense(l) for l in range(16)] == [r <= 79 for r in res]
    assert cfg.out_dim == 32


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"levels": 0}, "levels"),
        ({"features": 0}, "features"),
        ({"log2_table_size": 40}, "log2_table_size"),
        ({"base_resolution": 32, "finest_resolution": 16}, "finest_resolution"),
        ({"bound": 0.0}, "bound"),
    ],
)
def test_config_rejects_bad_values(kwargs, word):
    with pytest.raises(ValueError, match=word):
        HashGridConfig(**kwargs)


def test_init_hash_table_shape_range_and_determinism():
    t = init_hash_table(SMALL, generator=torch.Generator().manual_seed(3))
    assert t.shape == (3, 256, 2) and t.dtype == torch.float32
    assert t.abs().max() <= 1e-4 and t.abs().max() > 5e-5
    assert torch.equal(t, init_hash_table(SMALL, generator=torch.Generator().manual_seed(3)))


# --------------------------------------------------------------------------------- reference, by hand


def _vertex_table(fn, res: int, log2: int) -> torch.Tensor:
    """A one-level dense table holding fn(i, j, k) at vertex (i, j, k)."""
    t = torch.zeros(1, 1 << log2, 1, dtype=torch.float64)
    for i in range(res + 1):
        for j in range(res + 1):
            for k in range(res + 1):
                t[0, i + j * (res + 1) + k * (res + 1) ** 2, 0] = fn(i, j, k)
    return t


def test_reference_dense_level_reproduces_linear_and_trilinear_fields():
    cfg = HashGridConfig(levels=1, features=1, log2_table_size=6, base_resolution=2, finest_resolution=2, bound=2.0)
    assert cfg.is_dense(0)
    x = _points(50, dtype=torch.float64, spread=2.0)
    u = (x + 2.0) / 4.0 * 2  # grid coordinates in [0, res]
    lin = _vertex_table(lambda i, j, k: 1 + 2 * i + 3 * j - 4 * k, 2, 6)
    enc, jac = hash_encode_with_jacobian_reference(x, lin, cfg)
    torch.testing.assert_close(enc[:, 0], 1 + 2 * u[:, 0] + 3 * u[:, 1] - 4 * u[:, 2])
    # d enc / d x = (2, 3, -4) * res / (2 bound) = (1, 1.5, -2)
    torch.testing.assert_close(jac[:, 0], torch.tensor([1.0, 1.5, -2.0], dtype=torch.float64).expand(50, 3))
    # Trilinear interpolation of the product i*j*k inside one cell is exactly the product.
    prod = _vertex_table(lambda i, j, k: i * j * k, 2, 6)
    enc = hash_encode_reference(x, prod, cfg)
    torch.testing.assert_close(enc[:, 0], u.prod(-1))


def test_reference_hashed_level_uses_the_spatial_hash():
    cfg = HashGridConfig(levels=1, features=1, log2_table_size=3, base_resolution=4, finest_resolution=4)
    assert not cfg.is_dense(0)
    table = torch.arange(8, dtype=torch.float64).reshape(1, 8, 1) * 10
    # u = (1, 2, 3) / 4: exactly on vertex (1, 2, 3).
    x = torch.tensor([[1 / 4, 2 / 4, 3 / 4]], dtype=torch.float64) * 2 - 1
    want = (1 ^ (2 * PRIME_Y) ^ (3 * PRIME_Z)) % 8
    assert hash_encode_reference(x, table, cfg).item() == pytest.approx(10.0 * want)


def test_reference_jacobian_matches_autograd_and_finite_differences():
    x = _points(20, seed=4, dtype=torch.float64, spread=0.95)
    table = _table(SMALL, dtype=torch.float64)
    enc, jac = hash_encode_with_jacobian_reference(x, table, SMALL)
    torch.testing.assert_close(enc, hash_encode_reference(x, table, SMALL))
    xr = x.clone().requires_grad_(True)
    e = hash_encode_reference(xr, table, SMALL)
    rows = [torch.autograd.grad(e[:, k].sum(), xr, retain_graph=True)[0] for k in range(SMALL.out_dim)]
    torch.testing.assert_close(jac, torch.stack(rows, dim=1))
    h = 1e-6
    for d in range(3):
        dx = torch.zeros(3, dtype=torch.float64)
        dx[d] = h
        fd = (hash_encode_reference(x + dx, table, SMALL) - hash_encode_reference(x - dx, table, SMALL)) / (2 * h)
        torch.testing.assert_close(jac[..., d], fd, atol=1e-6, rtol=1e-5)


def test_reference_gradcheck_table_and_x():
    cfg = HashGridConfig(levels=2, features=2, log2_table_size=5, base_resolution=2, finest_resolution=5)
    x = _points(6, seed=5, dtype=torch.float64, spread=0.9).requires_grad_(True)
    table = _table(cfg, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x_, t_: hash_encode_reference(x_, t_, cfg), (x, table))
    assert torch.autograd.gradcheck(lambda t_: hash_encode_with_jacobian_reference(x, t_, cfg), (table,))


def test_reference_outside_bound_is_clamped():
    table = _table(SMALL)
    x = torch.tensor([[5.0, 0.2, -0.3], [-7.0, 3.0, 0.0], [0.1, 0.2, 0.3]])
    clamped = x.clamp(-1, 1)
    enc, jac = hash_encode_with_jacobian_reference(x, table, SMALL)
    torch.testing.assert_close(enc, hash_encode_reference(clamped, table, SMALL))
    assert (jac[0, :, 0] == 0).all() and (jac[1, :, :2] == 0).all()
    assert jac[2].abs().sum() > 0


def test_reference_nan_and_inf_are_defined():
    table = _table(SMALL)
    nan, inf = float("nan"), float("inf")
    x = torch.tensor([[nan, 0.2, 0.3], [inf, -inf, nan], [nan, nan, nan]], requires_grad=True)
    enc, jac = hash_encode_with_jacobian_reference(x, table, SMALL)
    assert torch.isfinite(enc).all() and torch.isfinite(jac).all()
    # NaN and -inf go to the lower face, +inf to the upper one.
    want = torch.tensor([[-1.0, 0.2, 0.3], [1.0, -1.0, -1.0], [-1.0, -1.0, -1.0]])
    torch.testing.assert_close(enc, hash_encode_reference(want, table, SMALL))
    assert (jac[0, :, 0] == 0).all() and (jac[1] == 0).all() and (jac[2] == 0).all()
    hash_encode_reference(x, table, SMALL).sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad[0, 0] == 0) and (x.grad[1:] == 0).all()


def test_public_functions_route_to_the_reference_when_forced():
    x = _points(9)
    table = _table(SMALL)
    with use_backend("reference"):
        torch.testing.assert_close(hash_encode(x, table, SMALL), hash_encode_reference(x, table, SMALL))
        enc, jac = hash_encode_with_jacobian(x, table, SMALL)
    e2, j2 = hash_encode_with_jacobian_reference(x, table, SMALL)
    torch.testing.assert_close(enc, e2)
    torch.testing.assert_close(jac, j2)
