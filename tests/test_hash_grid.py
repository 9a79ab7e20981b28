# SPDX-License-Identifier: Apache-2.0
"""Hash-grid encoding: the reference against hand-computed cases and autograd, every backend against the
reference (outputs and all gradients), edge cases and input checks."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastdream.ops import (
    HashGridConfig,
    _dispatch,
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


# Points exactly on the cube's faces, edges and corners (u = 0 or 1): the cell clamp keeps their corners inside
# the level's block (a dense level's last vertex, the table's end); random points never land there.
FACE_POINTS = [
    [1.0, 0.3, -0.2],
    [-1.0, -0.45, 0.7],
    [0.1, 1.0, 1.0],
    [1.0, 1.0, 1.0],
    [-1.0, 1.0, 0.5],
    [-1.0, -1.0, -1.0],
    [0.25, -0.6, 1.0],
]


def test_reference_on_the_faces_keeps_the_inside_derivative():
    """Both references take a face point's derivative from inside the cube (the kernels' convention). The autograd
    one took torch.clamp's, which is 0 on the bounds in PyTorch 2.14, and disagreed with the Jacobian reference."""
    table = _table(SMALL, dtype=torch.float64)
    x = torch.tensor(FACE_POINTS, dtype=torch.float64, requires_grad=True)
    g = torch.randn(len(FACE_POINTS), SMALL.out_dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (hash_encode_reference(x, table, SMALL) * g).sum().backward()
    _, jac = hash_encode_with_jacobian_reference(x.detach(), table, SMALL)
    torch.testing.assert_close(x.grad, torch.einsum("nk,nkd->nd", g, jac))
    assert (x.grad.abs() > 1e-3).all()  # the face's own axis too
    h = 1e-7  # one-sided, from inside
    inward = -torch.sign(x.detach()) * (x.detach().abs() == 1)
    for d in range(3):
        step = torch.zeros(3, dtype=torch.float64)
        step[d] = h
        side = torch.where(inward[:, d : d + 1] != 0, inward[:, d : d + 1], torch.ones(1, dtype=torch.float64))
        e1 = hash_encode_reference(x.detach() + side * step, table, SMALL)
        fd = (e1 - hash_encode_reference(x.detach(), table, SMALL)) / (side * h)
        torch.testing.assert_close(jac[..., d], fd, atol=1e-5, rtol=1e-5)


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


# ------------------------------------------------------------------------------------------ fast backends

OP = "hash_encode"
FAST_BACKENDS = ("cpp", "cuda", "triton")


def _device_for(backend: str) -> torch.device:
    if backend in ("cuda", "triton") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def _interpreted(backend: str) -> bool:
    return backend == "triton" and not torch.cuda.is_available()


@pytest.fixture(params=FAST_BACKENDS)
def backend(request) -> str:
    name = request.param
    if name not in _dispatch.usable_backends(OP, _device_for(name)):
        pytest.skip(f"{name} is not usable here (not compiled, no GPU, or TRITON_INTERPRET unset)")
    return name


def _tol(backend: str, device: torch.device, atol_scale: float = 1.0, rtol_scale: float = 1.0) -> dict:
    """fp16 table reads (CUDA): errors grow with the Jacobian's scale (res / 2 bound) and with sums over points and
    levels, hence the scales. fp32 on the CPU meets 1e-4 everywhere (measured: below 2e-5 against float64)."""
    if backend in ("cuda", "triton") and device.type == "cuda":  # fp16 table reads (values up to 1 here)
        return {"atol": 3e-3 * atol_scale, "rtol": 3e-3 * rtol_scale}
    return {"atol": 1e-4, "rtol": 1e-4}


def _mixed_points(n: int, seed: int = 0) -> torch.Tensor:
    """Points in and around the cube: about a fifth lie outside the bound."""
    return _points(n, seed=seed, spread=1.2)


SIZES = (0, 1, 97, 129, 1025)  # 129: two Triton programs of 128 points, the second with one (interpreted too)


@pytest.mark.parametrize("n", SIZES)
def test_backend_forward_and_jacobian_match_reference(backend, n):
    if n > 200 and _interpreted(backend):
        pytest.skip("the Triton interpreter is too slow for this size; it runs on CUDA")
    device = _device_for(backend)
    x = _mixed_points(n, seed=n)
    table = _table(SMALL)
    want_enc, want_jac = hash_encode_with_jacobian_reference(x.double(), table.double(), SMALL)
    with use_backend(backend):
        enc = hash_encode(x.to(device), table.to(device), SMALL)
        enc2, jac = hash_encode_with_jacobian(x.to(device), table.to(device), SMALL)
    assert enc.shape == (n, SMALL.out_dim) and jac.shape == (n, SMALL.out_dim, 3)
    assert enc.dtype == torch.float32 and jac.dtype == torch.float32
    tol = _tol(backend, device)
    torch.testing.assert_close(enc.cpu().double(), want_enc, **tol)
    torch.testing.assert_close(enc2.cpu().double(), want_enc, **tol)
    torch.testing.assert_close(jac.cpu().double(), want_jac, **_tol(backend, device, 20, 20))


@pytest.mark.parametrize("n", SIZES)
def test_backend_gradients_match_reference(backend, n):
    if n > 200 and _interpreted(backend):
        pytest.skip("the Triton interpreter is too slow for this size; it runs on CUDA")
    device = _device_for(backend)
    g = torch.Generator().manual_seed(7)
    x = _mixed_points(n, seed=n + 1)
    table = _table(SMALL)
    g_enc = torch.randn(n, SMALL.out_dim, generator=g)
    g_jac = torch.randn(n, SMALL.out_dim, 3, generator=g)

    def grads(fn, x_, t_):
        x_ = x_.clone().requires_grad_(True)
        t_ = t_.clone().requires_grad_(True)
        enc = fn[0](x_, t_, SMALL)
        (enc * g_enc.to(enc)).sum().backward()
        gx, gt = x_.grad, t_.grad
        t2 = t_.detach().clone().requires_grad_(True)
        e2, j2 = fn[1](x_.detach(), t2, SMALL)
        ((e2 * g_enc.to(e2)).sum() + (j2 * g_jac.to(j2)).sum()).backward()
        return gx, gt, t2.grad

    ref = grads((hash_encode_reference, hash_encode_with_jacobian_reference), x.double(), table.double())
    with use_backend(backend):
        got = grads((hash_encode, hash_encode_with_jacobian), x.to(device), table.to(device))
    scale = _tol(backend, device, 50, 10)  # sums over many points and levels
    for name, a, b in zip(("x", "table", "table via jacobian"), got, ref):
        assert a is not None, name
        torch.testing.assert_close(a.cpu().double(), b, **scale, msg=lambda m, name=name: f"grad {name}: {m}")


def test_backend_on_the_faces_and_corners_matches_reference(backend):
    """A kernel that drops the cell clamp reads vertex res + 1 at u = 1 (past a dense level's block, past the
    table on the last one): encoding, Jacobian and both gradients differ then on exactly these points."""
    device = _device_for(backend)
    x = torch.tensor(FACE_POINTS)
    table = _table(SMALL)
    g = torch.Generator().manual_seed(11)
    g_enc = torch.randn(len(x), SMALL.out_dim, generator=g)
    g_jac = torch.randn(len(x), SMALL.out_dim, 3, generator=g)

    def run(encode, with_jacobian, x_, t_):
        x_ = x_.clone().requires_grad_(True)
        t_ = t_.clone().requires_grad_(True)
        enc = encode(x_, t_, SMALL)
        (enc * g_enc.to(enc)).sum().backward()
        t2 = t_.detach().clone().requires_grad_(True)
        e2, jac = with_jacobian(x_.detach(), t2, SMALL)
        (jac * g_jac.to(jac)).sum().backward()
        return [v.detach().cpu().double() for v in (enc, e2, jac, x_.grad, t_.grad, t2.grad)]

    want = run(hash_encode_reference, hash_encode_with_jacobian_reference, x.double(), table.double())
    with use_backend(backend):
        got = run(hash_encode, hash_encode_with_jacobian, x.to(device), table.to(device))
    names = ("encoding", "encoding (with jacobian)", "jacobian", "grad x", "grad table", "grad table via jacobian")
    scales = ((1, 1), (1, 1), (20, 20), (50, 10), (50, 10), (50, 10))
    for name, a, b, (sa, sr) in zip(names, got, want, scales):
        torch.testing.assert_close(a, b, **_tol(backend, device, sa, sr), msg=lambda m, name=name: f"{name}: {m}")


def test_backend_nonfinite_inputs_are_defined(backend):
    device = _device_for(backend)
    nan, inf = float("nan"), float("inf")
    x = torch.tensor([[nan, 0.2, 0.3], [inf, -inf, nan], [nan, nan, nan], [0.1, -0.2, 0.3], [3.0, -4.0, 0.5]])
    table = _table(SMALL)
    want_enc, want_jac = hash_encode_with_jacobian_reference(x, table, SMALL)
    with use_backend(backend):
        xd = x.to(device).requires_grad_(True)
        td = table.to(device).requires_grad_(True)
        enc = hash_encode(xd, td, SMALL)
        enc.square().sum().backward()
        _, jac = hash_encode_with_jacobian(xd.detach(), td, SMALL)
    torch.testing.assert_close(enc.detach().cpu(), want_enc, **_tol(backend, device))
    torch.testing.assert_close(jac.detach().cpu(), want_jac, **_tol(backend, device, 20, 20))
    assert torch.isfinite(xd.grad).all() and torch.isfinite(td.grad).all()
    assert (xd.grad[1:3] == 0).all() and (xd.grad[0, 0] == 0) and (xd.grad[4, :2] == 0).all()


def _as_read(table: torch.Tensor, backend: str, device: torch.device) -> torch.Tensor:
    """The table as the backend under test reads it in its first-order passes: rounded to fp16 by the GPU
    backends on CUDA (their fp32 compute reads an fp16 copy), else as it is."""
    if backend in ("cuda", "triton") and device.type == "cuda":
        return table.half().float()
    return table


def _assert_second_order_close(got, want, torch_same, backend, device) -> None:
    """The error against float64 at most twice PyTorch's own error in the same precision on the same path
    (``torch_same``: the reference in float32 on the table as the backend reads it, ``_as_read``). Through sin
    of a gradient, values in the hundreds, no fixed tolerance fits both a tight check and PyTorch itself: with
    fp16 table reads (CUDA), the rounding of the table alone moves single elements of d/dx by 0.76 (seen on an
    H200, cuda and triton alike, where a fixed tolerance failed; the reference on the rounded table moves them
    the same). Their second-order passes read the fp32 table, so they are not exactly the reference on the
    rounded table either: emulated on the CPU (the fp16 path's autograd around the C++ kernels), their error was
    0.94-1.31x PyTorch's on the rounded table."""
    err = (got.cpu().double() - want).abs().max().item()
    torch_err = (torch_same.double() - want).abs().max().item()
    assert err <= 2 * torch_err + 1e-6, f"error {err:.3g} > twice PyTorch's error {torch_err:.3g} ({backend})"


def _second_order(fn, x, table):
    """hash_encode's backward differentiated again on SMALL: (the x-gradient gx of sum enc^2, and the gradients of
    sum sin(gx) to the table and to x)."""
    t = table.clone().requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    enc = fn(xr, t, SMALL)
    (gx,) = torch.autograd.grad(enc.square().sum(), xr, create_graph=True)
    gt, gxx = torch.autograd.grad(gx.sin().sum(), (t, xr))
    return gx.detach(), gt, gxx


def test_backend_second_order_through_table_matches_reference(backend):
    """d/d table of a loss on the x-gradient (hash_encode's backward differentiated again)."""
    device = _device_for(backend)
    x = _points(23, seed=11)
    table = _table(SMALL)

    def run(fn, x_, t_):
        return _second_order(fn, x_, t_)[1]

    want = run(hash_encode_reference, x.double(), table.double())
    with use_backend(backend):
        got = run(hash_encode, x.to(device), table.to(device))
    _assert_second_order_close(
        got, want, run(hash_encode_reference, x, _as_read(table, backend, device)), backend, device
    )


def test_backend_second_derivative_in_x_matches_reference(backend):
    device = _device_for(backend)
    x = _points(13, seed=12)
    table = _table(SMALL)

    def run(fn, x_, t_):
        xr = x_.clone().requires_grad_(True)
        enc = fn(xr, t_, SMALL)
        (gx,) = torch.autograd.grad(enc.square().sum(), xr, create_graph=True)
        (gxx,) = torch.autograd.grad(gx.sin().sum(), xr)
        return gxx

    want = run(hash_encode_reference, x.double(), table.double())
    with use_backend(backend):
        got = run(hash_encode, x.to(device), table.to(device))
    _assert_second_order_close(
        got, want, run(hash_encode_reference, x, _as_read(table, backend, device)), backend, device
    )


def _both_passes(enc_fn, jac_fn, x, table, cfg, g_enc, g_jac):
    """The encoding pass (enc, its grads to x and table) and the Jacobian pass (enc, jac, its grad to the table)
    under fixed random output gradients: (enc, enc of the Jacobian pass, jac, grad x, grad table, grad table of
    the Jacobian pass)."""
    xr, tr = x.clone().requires_grad_(True), table.clone().requires_grad_(True)
    enc = enc_fn(xr, tr, cfg)
    (enc * g_enc.to(enc)).sum().backward()
    t2 = table.clone().requires_grad_(True)
    e2, jac = jac_fn(x, t2, cfg)
    ((e2 * g_enc.to(e2)).sum() + (jac * g_jac.to(jac)).sum()).backward()
    return enc, e2, jac, xr.grad, tr.grad, t2.grad


def _fp16_reads_switch(backend: str) -> tuple[object, str]:
    """(module, attribute) of a CUDA backend's fp16-table-reads switch."""
    if backend == "triton":
        import fastdream.kernels.hash_grid as kernels

        return kernels, "FP16_TABLE_READS_ON_CUDA"
    import fastdream.ops.hash_grid as hg

    return hg, "CUDA_FP16_TABLE_READS"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: the fp16-read paths")
@pytest.mark.parametrize("fp16_reads", [True, False])
@pytest.mark.parametrize("gpu_backend", ["cuda", "triton"])
def test_cuda_table_reads_are_exact_on_the_table_they_read(gpu_backend, fp16_reads, monkeypatch):
    """fp16 reads: the only error is the rounding of the table (the reference on the fp16-rounded table agrees to
    fp32 accuracy); every output and gradient stays fp32. fp32 reads: the reference on the table itself. For
    Triton too, whose tests elsewhere allow fp16's error against the fp32 table."""
    if gpu_backend not in _dispatch.usable_backends(OP, torch.device("cuda")):
        pytest.skip(f"the {gpu_backend} backend is not usable here")
    monkeypatch.setattr(*_fp16_reads_switch(gpu_backend), fp16_reads)
    n = 1025
    x = _mixed_points(n, seed=3)
    table = _table(SMALL) * 1e-2  # the scale of a trained table (init is 1e-4)
    read = table.half().double() if fp16_reads else table.double()
    g = torch.Generator().manual_seed(9)
    g_enc, g_jac = torch.randn(n, SMALL.out_dim, generator=g), torch.randn(n, SMALL.out_dim, 3, generator=g)

    def run(enc_fn, jac_fn, x_, t_):
        return _both_passes(enc_fn, jac_fn, x_, t_, SMALL, g_enc, g_jac)

    want = run(hash_encode_reference, hash_encode_with_jacobian_reference, x.double(), read)
    with use_backend(gpu_backend):
        got = run(hash_encode, hash_encode_with_jacobian, x.cuda(), table.cuda())
    names = ("enc", "enc (jacobian pass)", "jac", "grad x", "grad table", "grad table (jacobian pass)")
    for name, a, b in zip(names, got, want):
        assert a.dtype == torch.float32, name
        scale = b.abs().max().item() + 1e-30
        torch.testing.assert_close(a.cpu().double(), b, atol=2e-6 * scale, rtol=1e-5, msg=lambda m, k=name: f"{k}: {m}")
    if fp16_reads:  # and the rounding is visible: the fp32 table would give other values
        exact = run(hash_encode_reference, hash_encode_with_jacobian_reference, x.double(), table.double())
        assert not torch.allclose(got[0].cpu().double(), exact[0], atol=0, rtol=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: the cached fp16 copy of the table")
@pytest.mark.parametrize("gpu_backend", ["cuda", "triton"])
def test_cuda_fp16_table_copy_follows_in_place_updates(gpu_backend, monkeypatch):
    """The fp16 copy is cached while the table is unchanged: an optimiser's in-place step, and a new table that may
    reuse the old one's memory, must each be read afresh (a stale copy would train on old values silently)."""
    if gpu_backend not in _dispatch.usable_backends(OP, torch.device("cuda")):
        pytest.skip(f"the {gpu_backend} backend is not usable here")
    monkeypatch.setattr(*_fp16_reads_switch(gpu_backend), True)
    x = _mixed_points(257, seed=4)
    table = torch.nn.Parameter((_table(SMALL) * 1e-2).cuda())

    def check() -> None:
        with use_backend(gpu_backend), torch.no_grad():
            got = hash_encode(x.cuda(), table, SMALL).cpu().double()
        want = hash_encode_reference(x.double(), table.detach().half().double().cpu(), SMALL)
        torch.testing.assert_close(got, want, atol=2e-6 * want.abs().max().item(), rtol=1e-5)

    check()
    check()  # the cached copy
    with torch.no_grad():
        table.add_(0.01 * torch.randn_like(table))  # an in-place step, same object
    check()
    table = torch.nn.Parameter((_table(SMALL, seed=8) * 1e-2).cuda())  # a new tensor (maybe the same address)
    check()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: CUDA graphs")
@pytest.mark.parametrize("gpu_backend", ["cuda", "triton"])
def test_cuda_graph_replays_read_the_table_as_it_is_then(gpu_backend, monkeypatch):
    """A CUDA graph captured after an eager call (the warm-up every capture has) and replayed after an in-place
    update must read the updated table: Triton's cached fp16 copy, taken during capture, left the cast out of the
    graph, so every replay read the copy of the warm-up."""
    if gpu_backend not in _dispatch.usable_backends(OP, torch.device("cuda")):
        pytest.skip(f"the {gpu_backend} backend is not usable here")
    monkeypatch.setattr(*_fp16_reads_switch(gpu_backend), True)
    x = _mixed_points(257, seed=5).cuda()
    table = torch.nn.Parameter((_table(SMALL) * 1e-2).cuda())
    with use_backend(gpu_backend), torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            hash_encode(x, table, SMALL)  # the warm-up: caches a copy, if anything does
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = hash_encode(x, table, SMALL)
        for seed in (11, 12):
            table.add_(0.01 * torch.randn(table.shape, generator=torch.Generator().manual_seed(seed)).cuda())
            graph.replay()
            torch.cuda.synchronize()
            want = hash_encode_reference(x.double().cpu(), table.detach().half().double().cpu(), SMALL)
            got = out.cpu().double()
            torch.testing.assert_close(got, want, atol=2e-6 * want.abs().max().item(), rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: the warp-aggregated table gradient")
@pytest.mark.parametrize("n", [1, 33, 1025])
@pytest.mark.parametrize("order", ["rays", "shuffled"])
@pytest.mark.parametrize(
    ("kind", "max_heads"), [("warp", None), ("hybrid", None), ("hybrid", "0"), ("hybrid", "32"), ("", None)]
)
def test_cuda_aggregated_backwards_match_the_plain_one(n, order, kind, max_heads, monkeypatch):
    """The warp-aggregated and hybrid (default) table gradients against FASTDREAM_HASH_BACKWARD=plain: the same
    gradients (encoding and Jacobian paths), for points along rays (long runs of shared vertices in a warp) and
    shuffled (hardly any), at sizes that leave partial warps. The hybrid kernel runs at its default threshold and
    at both ends: FASTDREAM_HASH_MAX_HEADS=0 never aggregates, 32 always does. An empty variable is the default."""
    if "cuda" not in _dispatch.usable_backends(OP, torch.device("cuda")):
        pytest.skip("the CUDA extension is not built")
    g = torch.Generator().manual_seed(n)
    t = torch.linspace(-1.1, 1.1, n)[:, None]
    x = torch.randn(1, 3, generator=g) * 0.3 + t * torch.nn.functional.normalize(torch.randn(1, 3, generator=g))
    if order == "shuffled":
        x = x[torch.randperm(n, generator=g)]
    x, table = x.cuda(), (_table(SMALL) * 1e-2).cuda()
    g_enc = torch.randn(n, SMALL.out_dim, generator=g).cuda()
    g_jac = torch.randn(n, SMALL.out_dim, 3, generator=g).cuda()

    def grads():
        t1, t2 = table.clone().requires_grad_(True), table.clone().requires_grad_(True)
        with use_backend("cuda"):
            hash_encode(x, t1, SMALL).backward(g_enc)
            e, j = hash_encode_with_jacobian(x, t2, SMALL)
            torch.autograd.backward([e, j], [g_enc, g_jac])
        return t1.grad, t2.grad

    monkeypatch.setenv("FASTDREAM_HASH_BACKWARD", "plain")
    plain = grads()
    monkeypatch.setenv("FASTDREAM_HASH_BACKWARD", kind)
    if max_heads is not None:
        monkeypatch.setenv("FASTDREAM_HASH_MAX_HEADS", max_heads)
    warp = grads()
    for name, a, b in zip(("encoding", "jacobian"), warp, plain):
        assert a.dtype == torch.float32
        scale = b.abs().max().item()
        torch.testing.assert_close(a, b, atol=1e-6 * scale, rtol=1e-5, msg=lambda m, k=name: f"{k}: {m}")
    read = table.half().double().cpu()  # and both equal the reference on the table the kernels read
    tr = read.clone().requires_grad_(True)
    hash_encode_reference(x.double().cpu(), tr, SMALL).backward(g_enc.double().cpu())
    torch.testing.assert_close(warp[0].cpu().double(), tr.grad, atol=1e-6 * tr.grad.abs().max().item(), rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: the table-gradient kernel switch")
@pytest.mark.parametrize(("var", "value"), [("FASTDREAM_HASH_BACKWARD", "fast"), ("FASTDREAM_HASH_MAX_HEADS", "33")])
def test_cuda_backward_switches_reject_unknown_values(var, value, monkeypatch):
    """A mistyped kernel switch is an error naming the variable, not a silent fallback to another kernel."""
    if "cuda" not in _dispatch.usable_backends(OP, torch.device("cuda")):
        pytest.skip("the CUDA extension is not built")
    monkeypatch.setenv("FASTDREAM_HASH_BACKWARD", "hybrid")
    monkeypatch.setenv(var, value)
    x = (torch.rand(40, 3, generator=torch.Generator().manual_seed(1)) * 2 - 1).cuda()
    table = (_table(SMALL) * 1e-2).cuda().requires_grad_(True)
    with use_backend("cuda"), pytest.raises(RuntimeError, match=var):
        hash_encode(x, table, SMALL).sum().backward()


def test_cpp_float64_gradcheck_and_gradgradcheck():
    if "cpp" not in _dispatch.usable_backends(OP, torch.device("cpu")):
        pytest.skip("the C++ extension is not built")
    cfg = HashGridConfig(levels=2, features=2, log2_table_size=4, base_resolution=2, finest_resolution=5)
    x = _points(5, seed=5, dtype=torch.float64, spread=0.9).requires_grad_(True)
    table = _table(cfg, dtype=torch.float64).requires_grad_(True)
    fast = {"fast_mode": True}  # random projections: the same check at a fraction of the custom-op calls
    with use_backend("cpp"):
        assert hash_encode(x, table, cfg).dtype == torch.float64
        assert torch.autograd.gradcheck(lambda x_, t_: hash_encode(x_, t_, cfg), (x, table))
        assert torch.autograd.gradgradcheck(lambda x_, t_: hash_encode(x_, t_, cfg), (x, table), **fast)
        assert torch.autograd.gradcheck(lambda t_: hash_encode_with_jacobian(x, t_, cfg), (table,), **fast)
        assert torch.autograd.gradgradcheck(lambda t_: hash_encode_with_jacobian(x, t_, cfg), (table,), **fast)


def test_cpp_custom_ops_pass_opcheck():
    """Schema, fake (meta) implementations and autograd registration, as torch.compile relies on them."""
    if "cpp" not in _dispatch.usable_backends(OP, torch.device("cpu")):
        pytest.skip("the C++ extension is not built")
    from fastdream.ops import hash_grid as hg

    x = _points(7)
    table = _table(SMALL).requires_grad_(True)
    res = list(SMALL.resolutions)
    torch.library.opcheck(hg._encode_op, (x, table, res, SMALL.bound, "cpp"))
    torch.library.opcheck(hg._jacobian_op, (x, table, res, SMALL.bound, "cpp"))
    g = torch.randn(7, SMALL.out_dim)
    torch.library.opcheck(hg._encode_backward_op, (g, x, table.detach(), res, SMALL.bound, True, "cpp"))


@settings(max_examples=20, deadline=None)
@given(
    levels=st.integers(1, 3),
    features=st.integers(1, 3),
    log2=st.integers(3, 9),
    base=st.integers(1, 6),
    growth=st.integers(0, 8),
    bound=st.sampled_from([0.5, 1.0, 2.5]),
    n=st.integers(0, 40),
    seed=st.integers(0, 2**16),
)
def test_property_fast_backends_match_reference(levels, features, log2, base, growth, bound, n, seed):
    cfg = HashGridConfig(
        levels=levels,
        features=features,
        log2_table_size=log2,
        base_resolution=base,
        finest_resolution=base + growth,
        bound=bound,
    )
    x = _points(n, seed=seed, spread=1.3 * bound)
    table = _table(cfg, seed=seed + 1)
    want_enc, want_jac = hash_encode_with_jacobian_reference(x.double(), table.double(), cfg)
    g = torch.randn(n, cfg.out_dim, generator=torch.Generator().manual_seed(seed))
    tr = table.double().requires_grad_(True)
    hash_encode_reference(x.double(), tr, cfg).backward(g.double())
    checked = 0
    for b in _dispatch.usable_backends(OP, torch.device("cpu")):
        if b == "reference" or (_interpreted(b) and n > 8):
            continue
        with use_backend(b):
            t = table.clone().requires_grad_(True)
            enc = hash_encode(x, t, cfg)
            enc.backward(g)
            _, jac = hash_encode_with_jacobian(x, table, cfg)
        torch.testing.assert_close(enc.double(), want_enc, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(jac.double(), want_jac, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(t.grad.double(), tr.grad, atol=1e-4, rtol=1e-4)
        checked += 1
    if checked == 0:
        pytest.skip("no fast backend usable on the CPU here")


# --------------------------------------------------------------------------------------------- input checks


@pytest.mark.parametrize(
    "make, exc, word",
    [
        (lambda: (torch.zeros(4, 3, dtype=torch.int64), _table(SMALL), SMALL), TypeError, "x"),
        (lambda: (torch.zeros(4, 2), _table(SMALL), SMALL), ValueError, "x"),
        (lambda: (torch.zeros(4, 3), torch.zeros(3, 128, 2), SMALL), ValueError, "table"),
        (lambda: (torch.zeros(4, 3), _table(SMALL).to(torch.int32), SMALL), TypeError, "table"),
        (lambda: (torch.zeros(4, 3), _table(SMALL).to("meta"), SMALL), ValueError, "table"),
        (lambda: ([[0.0, 0.0, 0.0]], _table(SMALL), SMALL), TypeError, "x"),
        (lambda: (torch.zeros(4, 3).to_sparse(), _table(SMALL), SMALL), ValueError, "x"),
        (lambda: (torch.zeros(4, 3), _table(SMALL), {"levels": 3}), TypeError, "cfg"),
    ],
)
@pytest.mark.parametrize("fn", [hash_encode, hash_encode_with_jacobian])
def test_bad_inputs_raise_naming_the_argument(fn, make, exc, word):
    args = make()
    with pytest.raises(exc, match=rf"^{word}:"):
        fn(*args)


# --- audit additions --------------------------------------------------------------------------------------------

NONFINITE_AND_OUTSIDE = [
    [float("nan"), 0.2, 0.3],
    [float("inf"), -float("inf"), float("nan")],
    [1.5, 0.2, -0.3],
    [-2.0, 3.0, 0.1],
    [0.1, -0.2, 0.3],
    [1.0, 0.3, -1.0],
]


@pytest.mark.parametrize("n_extra", [0, 125])  # 6 + 125 = 131 points: two Triton programs, the second partial
def test_backend_second_order_at_nonfinite_and_outside_points(backend, n_extra):
    """hash_encode's double backward (d/d table and d/d x of a loss on the x-gradient) where u is clamped or x is
    not finite: finite, and the reference's."""
    device = _device_for(backend)
    x = torch.cat([torch.tensor(NONFINITE_AND_OUTSIDE), _mixed_points(n_extra, seed=3)])
    table = _table(SMALL)

    def run(fn, x_, t_):
        return _second_order(fn, x_, t_)

    want = run(hash_encode_reference, x.double(), table.double())
    torch_same = run(hash_encode_reference, x, _as_read(table, backend, device))
    with use_backend(backend):
        got = run(hash_encode, x.to(device), table.to(device))
    for a, w, t in zip(got, want, torch_same):
        assert torch.isfinite(a).all()
        _assert_second_order_close(a, w, t, backend, device)


@pytest.mark.parametrize(
    "cfg",
    [
        HashGridConfig(
            levels=2, features=3, log2_table_size=12, base_resolution=300, finest_resolution=4096, bound=1.3
        ),
        HashGridConfig(levels=1, features=1, log2_table_size=1, base_resolution=1, finest_resolution=1),
        HashGridConfig(levels=3, features=4, log2_table_size=5, base_resolution=1, finest_resolution=3, bound=0.25),
    ],
    ids=["res4096-hashed", "tiny-table", "F4-small-bound"],
)
def test_backend_awkward_configs_at_two_programs(backend, cfg):
    """Configurations the 12-resolution SMALL never reaches (hashed levels at res 4096: vertex indices times the
    primes overflow uint32; a 2-entry table; F = 4) at 131 points. Against the float32 reference: at res 4096 the
    float32 position alone moves the encoding by ~1e-4 from float64."""
    device = _device_for(backend)
    n = 131
    x = _points(n, seed=2, spread=1.2 * cfg.bound)
    table = _table(cfg)
    gen = torch.Generator().manual_seed(0)
    g_enc, g_jac = torch.randn(n, cfg.out_dim, generator=gen), torch.randn(n, cfg.out_dim, 3, generator=gen)

    def run(encode, with_jacobian, x_, t_):
        enc, _, jac, gx, gt, gt2 = _both_passes(encode, with_jacobian, x_, t_, cfg, g_enc, g_jac)
        return [v.detach().cpu() for v in (enc, jac, gx, gt, gt2)]

    want = run(hash_encode_reference, hash_encode_with_jacobian_reference, x, table)
    with use_backend(backend):
        got = run(hash_encode, hash_encode_with_jacobian, x.to(device), table.to(device))
    for name, a, b in zip(("enc", "jac", "grad x", "grad table", "grad table via jacobian"), got, want):
        scale = b.abs().max().item() + 1e-12
        tol = _tol(backend, device, 50 * scale, 10) if device.type == "cuda" else {"atol": 1e-5 * scale, "rtol": 1e-4}
        torch.testing.assert_close(a, b, **tol, msg=lambda m, name=name: f"{name}: {m}")
