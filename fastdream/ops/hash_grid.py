# SPDX-License-Identifier: Apache-2.0
"""Multi-resolution hash-grid encoding (instant-NGP, Müller et al. 2022) and its spatial Jacobian.

Level ``l`` of ``L`` has resolution ``res_l = floor(base * b**l)`` with
``b = exp((ln finest - ln base) / (L - 1))``; its grid has ``(res_l + 1)**3`` vertices. A level whose
vertices fit in the table (``(res_l + 1)**3 <= 2**T``) indexes them densely
(``i + j (res_l + 1) + k (res_l + 1)**2``), finer levels hash them
(``(i * 1 ^ j * 2654435761 ^ k * 805459861) mod 2**T``, uint32 arithmetic). Each level interpolates its
``F`` features trilinearly from the 8 vertices around the point; the encoding concatenates the levels:
``enc[n, l * F + f]``.

Positions are world coordinates: ``u = (x + bound) / (2 bound)`` maps the cube ``[-bound, bound]^3`` to
``[0, 1]^3``. Defined behaviour off the cube, never an out-of-bounds access:

* coordinates outside the cube are clamped onto its faces (the encoding is constant outside, its
  derivative in that coordinate is 0);
* ``+inf`` clamps to the upper face, ``-inf`` and ``NaN`` to the lower face (``u = 0``); the derivative
  in a non-finite coordinate is 0. The outputs are always finite for a finite table.

Gradients: :func:`hash_encode` is differentiable w.r.t. ``table`` and ``x``, and so is its backward (the
pure second derivative in ``x``, the trilinear Hessian term, is computed by the PyTorch reference: rare
and slow; everything else by the kernels).
:func:`hash_encode_with_jacobian` (the fused pass used for analytic normals) is differentiable w.r.t.
``table`` only — a loss on the encoding or on the Jacobian trains the table, while ``x`` is treated as a
constant (samples are not optimised); its backward is differentiable again (the encoding is linear in
the table, so the backward of the backward is the forward), so gradgradcheck holds to any order in
``table``.

Implementations: ``reference`` (PyTorch), ``cpp`` (C++ CPU loop) and ``cuda`` (the same per-point code,
``csrc/include/fastdream/hash_grid.h``, launched on the GPU), ``triton`` (``fastdream.kernels.hash_grid``).

Precision on CUDA: both GPU backends read an **fp16 copy of the table** (cast from the fp32 master table at each
call: 0.1 GB of traffic for the default 64 MiB table, against ~2 GB of gathers for 2^20 points) and compute,
interpolate and accumulate every gradient in fp32; the table's gradient is fp32. The only error against the
fp32 reference is the rounding of the table entries (relative 2^-11): the tests check the fast paths against the
reference evaluated on the fp16-rounded table, to fp32 accuracy. ``CUDA_FP16_TABLE_READS = False`` here (and
``FP16_TABLE_READS_ON_CUDA`` in the Triton module) reads fp32 instead. float64 inputs are always read as given
(exact gradchecks), as is everything on the CPU. The second-order paths (a backward's own backward, whose
"table" is a gradient direction that fp16 could underflow) read fp32. On CUDA the default backend is ``cuda``,
measured faster than Triton on an H200 in every pass (benchmarks/RESULTS.md). Its table gradient (F = 2, fp32)
sums the contributions of neighbouring points that share a vertex inside a warp before the atomic add where a
warp has such runs, and adds the two vertices along x with one paired atomic everywhere (the "hybrid" kernel, the
default since 2026-11-28: 0.88x the warp-only kernel on the renderer's own samples on an H200, 0.92x on an H100;
``FASTDREAM_HASH_BACKWARD=warp``: aggregation in every warp, the earlier default; ``=plain``: one atomic per
point, level and vertex pair; see csrc/cuda/hash_grid.cu).

Example:
    >>> import torch
    >>> from fastdream.ops import HashGridConfig, hash_encode, init_hash_table
    >>> cfg = HashGridConfig(levels=4, features=2, log2_table_size=10, base_resolution=4, finest_resolution=32)
    >>> table = init_hash_table(cfg, generator=torch.Generator().manual_seed(0))
    >>> hash_encode(torch.rand(5, 3) * 2 - 1, table, cfg).shape
    torch.Size([5, 8])
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fastdream import backends
from fastdream.ops import _dispatch
from fastdream.ops._checks import FLOAT_DTYPES, check_tensor, same_device

OP = "hash_encode"

# The ``cuda`` backend reads an fp16 copy of an fp32 table (see the module docstring).
CUDA_FP16_TABLE_READS = True
_CUDA_FP16 = "cuda+fp16"  # the backend name the custom ops carry for that path

PRIME_Y = 2654435761
PRIME_Z = 805459861


@dataclass(frozen=True)
class HashGridConfig:
    """Settings of the multi-resolution hash grid.

    Attributes:
        levels: number of resolution levels ``L`` (16).
        features: features per level ``F`` (2).
        log2_table_size: ``T``; each level has a table of ``2**T`` entries (19).
        base_resolution: resolution of the coarsest level (16).
        finest_resolution: resolution of the finest level across the bound (2048).
        bound: the grid covers the cube ``[-bound, bound]^3`` (1.0).
    """

    levels: int = 16
    features: int = 2
    log2_table_size: int = 19
    base_resolution: int = 16
    finest_resolution: int = 2048
    bound: float = 1.0

    def __post_init__(self) -> None:
        if self.levels < 1:
            raise ValueError(f"levels: expected >= 1, got {self.levels}")
        if self.features < 1:
            raise ValueError(f"features: expected >= 1, got {self.features}")
        if not 1 <= self.log2_table_size <= 30:
            raise ValueError(f"log2_table_size: expected 1..30, got {self.log2_table_size}")
        if self.base_resolution < 1:
            raise ValueError(f"base_resolution: expected >= 1, got {self.base_resolution}")
        if self.finest_resolution < self.base_resolution:
            raise ValueError(
                f"finest_resolution: expected >= base_resolution ({self.base_resolution}), got {self.finest_resolution}"
            )
        if not (self.bound > 0 and math.isfinite(self.bound)):
            raise ValueError(f"bound: expected a finite positive number, got {self.bound}")

    @property
    def out_dim(self) -> int:
        return self.levels * self.features

    @property
    def table_size(self) -> int:
        return 1 << self.log2_table_size

    @property
    def growth(self) -> float:
        """Per-level growth factor ``b``."""
        if self.levels == 1:
            return 1.0
        return math.exp((math.log(self.finest_resolution) - math.log(self.base_resolution)) / (self.levels - 1))

    @property
    def resolutions(self) -> tuple[int, ...]:
        """``res_l`` per level. The 1e-9 keeps ``base * b**(L-1)`` from rounding down below ``finest``."""
        b = self.growth
        return tuple(max(1, math.floor(self.base_resolution * b**l + 1e-9)) for l in range(self.levels))

    def is_dense(self, level: int) -> bool:
        return (self.resolutions[level] + 1) ** 3 <= self.table_size


def init_hash_table(
    cfg: HashGridConfig,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:  # [L, 2**T, F]
    """A table of uniform values in ``[-1e-4, 1e-4]`` (instant-NGP's initialisation)."""
    gen_device = generator.device if generator is not None else device
    t = torch.rand(cfg.levels, cfg.table_size, cfg.features, generator=generator, dtype=dtype, device=gen_device)
    return ((t * 2 - 1) * 1e-4).to(device=device)


# ---------------------------------------------------------------------------------------------- reference

_CORNERS = [(c & 1, (c >> 1) & 1, (c >> 2) & 1) for c in range(8)]


def _normalise(x: torch.Tensor, bound: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``u`` in ``[0, 1]^3`` (clamped, non-finite coordinates replaced) and where ``du/dx`` is non-zero."""
    u_raw = (x + bound) / (2 * bound)
    inside = (u_raw >= 0) & (u_raw <= 1)  # False for NaN
    # The kernels' convention: a point on a face (u = 0 or 1) keeps the inside's derivative. Not torch.clamp's
    # gradient, which is 0 there in recent PyTorch (2.14) and would disagree with the Jacobian reference.
    fixed = torch.nan_to_num(u_raw.detach(), nan=0.0, posinf=1.0, neginf=0.0).clamp(0.0, 1.0)
    return torch.where(inside, u_raw, fixed), inside


def _level_corners(u: torch.Tensor, res: int, dense: bool, size: int):
    """Vertex indices [N, 8] and fractional positions [N, 3] of the cell holding each point."""
    p = u * res
    p0 = torch.floor(p.detach()).clamp(max=res - 1)
    frac = p - p0
    i0 = p0.long()
    bits = torch.tensor(_CORNERS, device=u.device, dtype=torch.long)  # [8, 3]
    ic = i0[:, None, :] + bits[None]  # [N, 8, 3]
    if dense:
        idx = ic[..., 0] + ic[..., 1] * (res + 1) + ic[..., 2] * (res + 1) ** 2
    else:
        idx = (ic[..., 0] ^ (ic[..., 1] * PRIME_Y) ^ (ic[..., 2] * PRIME_Z)) & (size - 1)
    return idx, frac, bits


def _corner_weights(frac: torch.Tensor, bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Trilinear weights [N, 8] and their derivatives w.r.t. the fractional position [N, 8, 3]."""
    b = bits[None].to(frac.dtype)  # [1, 8, 3]
    f = frac[:, None, :]
    w1 = b * f + (1 - b) * (1 - f)  # [N, 8, 3]: per-axis weights
    w = w1.prod(-1)
    sign = 2 * b - 1
    dw = torch.stack(
        [
            sign[..., 0] * w1[..., 1] * w1[..., 2],
            sign[..., 1] * w1[..., 0] * w1[..., 2],
            sign[..., 2] * w1[..., 0] * w1[..., 1],
        ],
        dim=-1,
    ).expand(frac.shape[0], 8, 3)
    return w, dw


def _ref_dtype(x: torch.Tensor, table: torch.Tensor) -> torch.dtype:
    return torch.promote_types(torch.promote_types(x.dtype, table.dtype), torch.float32)


def _encode_levels(x: torch.Tensor, table: torch.Tensor, resolutions, bound: float) -> torch.Tensor:
    u, _ = _normalise(x, bound)
    size = table.shape[1]
    outs = []
    for l, res in enumerate(resolutions):
        idx, frac, bits = _level_corners(u, res, (res + 1) ** 3 <= size, size)
        w, _ = _corner_weights(frac, bits)
        feat = table[l][idx]  # [N, 8, F]
        outs.append((w[..., None] * feat).sum(1))
    return torch.cat(outs, dim=1)


def hash_encode_reference(
    x: torch.Tensor,  # [N, 3] world positions
    table: torch.Tensor,  # [L, 2**T, F]
    cfg: HashGridConfig,
) -> torch.Tensor:  # [N, L * F]
    """Pure-PyTorch encoding (plain autograd: differentiable w.r.t. ``table`` and ``x``, any order)."""
    dtype = _ref_dtype(x, table)
    return _encode_levels(x.to(dtype), table.to(dtype), cfg.resolutions, cfg.bound)


def hash_encode_with_jacobian_reference(
    x: torch.Tensor,  # [N, 3] world positions
    table: torch.Tensor,  # [L, 2**T, F]
    cfg: HashGridConfig,
) -> tuple[torch.Tensor, torch.Tensor]:  # [N, L * F], [N, L * F, 3]
    """Pure-PyTorch encoding and its spatial Jacobian ``d enc / d x``, both differentiable w.r.t. ``table``
    (``x`` is detached, like in the fast implementations)."""
    dtype = _ref_dtype(x, table)
    x = x.detach().to(dtype)
    table = table.to(dtype)
    u, inside = _normalise(x, cfg.bound)
    outs, jacs = [], []
    for l, res in enumerate(cfg.resolutions):
        idx, frac, bits = _level_corners(u, res, cfg.is_dense(l), cfg.table_size)
        w, dw = _corner_weights(frac, bits)
        feat = table[l][idx]  # [N, 8, F]
        outs.append((w[..., None] * feat).sum(1))
        scale = inside.to(dtype) * (res / (2 * cfg.bound))  # [N, 3]: d p / d x
        jacs.append(torch.einsum("ncf,ncd->nfd", feat, dw) * scale[:, None, :])
    return torch.cat(outs, dim=1), torch.cat(jacs, dim=1)


# ---------------------------------------------------------------------------------------------- dispatch


class _Impl:
    """A fast implementation on contiguous float32 tensors (``resolutions`` a list of ints)::

    forward(x, table, resolutions, bound) -> enc
    backward(grad, x, table, resolutions, bound, need_x) -> (grad_table, grad_x)
    jacobian_forward(x, table, resolutions, bound) -> (enc, jac)
    jacobian_backward(grad_enc, grad_jac, x, resolutions, bound, table_size) -> grad_table
    """

    def __init__(self, forward, backward, jacobian_forward, jacobian_backward):
        self.forward = forward
        self.backward = backward
        self.jacobian_forward = jacobian_forward
        self.jacobian_backward = jacobian_backward


def _cpp_impl() -> _Impl:
    ext = backends.extension()
    return _Impl(
        ext.hash_encode_forward,
        ext.hash_encode_backward,
        ext.hash_encode_jacobian_forward,
        ext.hash_encode_jacobian_backward,
    )


def _cuda_fp16_impl() -> _Impl:
    """The CUDA extension reading an fp16 copy of the (fp32) table; gradients and outputs stay fp32."""
    ext = backends.extension()

    def half(table: torch.Tensor) -> torch.Tensor:
        return table.detach().to(torch.float16)

    def backward(grad, x, table, resolutions, bound, need_x):
        # Only the gradient to x reads the table; the table's gradient is fp32 either way.
        return ext.hash_encode_backward(grad, x, half(table) if need_x else table, resolutions, bound, need_x)

    return _Impl(
        lambda x, table, resolutions, bound: ext.hash_encode_forward(x, half(table), resolutions, bound),
        backward,
        lambda x, table, resolutions, bound: ext.hash_encode_jacobian_forward(x, half(table), resolutions, bound),
        ext.hash_encode_jacobian_backward,
    )


def _impl(backend: str) -> _Impl:
    if backend == _CUDA_FP16:
        return _cuda_fp16_impl()
    return _dispatch.get(OP, backend)()


def _exact(backend: str) -> str:
    """The backend for the second-order paths: fp32 table reads (their "table" is a gradient direction)."""
    return "cuda" if backend == _CUDA_FP16 else backend


def _triton_impl() -> _Impl:
    from fastdream.kernels import hash_grid as k

    return _Impl(
        k.hash_encode_forward, k.hash_encode_backward, k.hash_encode_jacobian_forward, k.hash_encode_jacobian_backward
    )


# cpp and cuda are the same entry point: the extension dispatches on the tensors' device.
_dispatch.register(OP, "reference", hash_encode_reference)
_dispatch.register(OP, "cpp", _cpp_impl)
_dispatch.register(OP, "cuda", _cpp_impl)
_dispatch.register(OP, "triton", _triton_impl)
# Measured on an H200 (2026-11-26, 2^20 points, defaults, medians of one run): the CUDA C++ launch (fp32
# reads, float2 loads and atomics) beats Triton (fp16 reads of a cached copy) in every pass: forward 0.98 vs
# 1.80 ms, forward+backward 2.71 vs 6.48 ms, with the Jacobian 5.45 vs 10.23 ms. So it comes first; Triton
# stays the fallback.
_dispatch.set_order(OP, "cuda", ("cuda", "triton", "reference"))


# The custom ops below carry the autograd of the fast backends, so that torch.compile can trace them. The
# encoding is linear in the table, so each backward's derivative w.r.t. its incoming gradient is a forward
# again: every backward op is itself differentiable (w.r.t. the gradient and the table), which gives the
# second-order path of the normals loss and gradgradcheck.


@torch.library.custom_op("fastdream::hash_encode", mutates_args=())
def _encode_op(
    x: torch.Tensor, table: torch.Tensor, resolutions: list[int], bound: float, backend: str
) -> torch.Tensor:
    return _impl(backend).forward(x, table, resolutions, bound)


@_encode_op.register_fake
def _(x, table, resolutions, bound, backend):
    return x.new_empty(x.shape[0], table.shape[0] * table.shape[2])


@torch.library.custom_op("fastdream::hash_encode_backward", mutates_args=())
def _encode_backward_op(
    grad: torch.Tensor,
    x: torch.Tensor,
    table: torch.Tensor,
    resolutions: list[int],
    bound: float,
    need_x: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    g_table, g_x = _impl(backend).backward(grad.contiguous(), x, table, resolutions, bound, need_x)
    return g_table, g_x


@_encode_backward_op.register_fake
def _(grad, x, table, resolutions, bound, need_x, backend):
    return torch.empty_like(table), torch.empty_like(x)


@torch.library.custom_op("fastdream::hash_encode_jacobian", mutates_args=())
def _jacobian_op(
    x: torch.Tensor, table: torch.Tensor, resolutions: list[int], bound: float, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    enc, jac = _impl(backend).jacobian_forward(x, table, resolutions, bound)
    return enc, jac


@_jacobian_op.register_fake
def _(x, table, resolutions, bound, backend):
    k = table.shape[0] * table.shape[2]
    return x.new_empty(x.shape[0], k), x.new_empty(x.shape[0], k, 3)


@torch.library.custom_op("fastdream::hash_encode_jacobian_backward", mutates_args=())
def _jacobian_backward_op(
    grad_enc: torch.Tensor,
    grad_jac: torch.Tensor,
    x: torch.Tensor,
    resolutions: list[int],
    bound: float,
    table_size: int,
    backend: str,
) -> torch.Tensor:
    return _impl(backend).jacobian_backward(
        grad_enc.contiguous(), grad_jac.contiguous(), x, resolutions, bound, table_size
    )


@_jacobian_backward_op.register_fake
def _(grad_enc, grad_jac, x, resolutions, bound, table_size, backend):
    levels = len(resolutions)
    return grad_enc.new_empty(levels, table_size, grad_enc.shape[1] // levels)


def _save_common(ctx, resolutions, bound, backend) -> None:
    ctx.resolutions = resolutions
    ctx.bound = bound
    ctx.backend = backend


# hash_encode: d/d(x, table)
def _encode_setup(ctx, inputs, output):
    x, table, resolutions, bound, backend = inputs
    ctx.save_for_backward(x, table)
    _save_common(ctx, resolutions, bound, backend)


def _encode_backward(ctx, grad):
    x, table = ctx.saved_tensors
    need_x = ctx.needs_input_grad[0]
    g_table, g_x = _encode_backward_op(grad, x, table, ctx.resolutions, ctx.bound, need_x, ctx.backend)
    return (g_x if need_x else None), g_table, None, None, None


_encode_op.register_autograd(_encode_backward, setup_context=_encode_setup)


# hash_encode's backward: d/d(grad, table). g_table = A(x)^T grad, g_x = sum_k grad_k J_k(x, table).
def _encode_backward_setup(ctx, inputs, output):
    grad, x, table, resolutions, bound, need_x, backend = inputs
    ctx.save_for_backward(grad, x, table)
    ctx.need_x = need_x
    _save_common(ctx, resolutions, bound, backend)


def _encode_backward_backward(ctx, v_table, v_x):
    grad, x, table = ctx.saved_tensors
    res, bound, backend = ctx.resolutions, ctx.bound, _exact(ctx.backend)
    g_grad = g_x = g_table = None
    if v_table is not None:
        v_table = v_table.contiguous()
        g_grad = _encode_op(x, v_table, res, bound, backend)
        if ctx.needs_input_grad[1]:  # d/dx <v_table, A(x)^T grad> = backward to x with table := v_table
            g_x = _encode_backward_op(grad, x, v_table, res, bound, True, backend)[1]
    if ctx.need_x and v_x is not None:
        _, jac = _jacobian_op(x, table, res, bound, backend)
        term = (jac * v_x[:, None, :]).sum(-1)
        g_grad = term if g_grad is None else g_grad + term
        if ctx.needs_input_grad[2]:
            g_table = _jacobian_backward_op(
                torch.zeros_like(grad), grad[:, :, None] * v_x[:, None, :], x, res, bound, table.shape[1], backend
            )
        if ctx.needs_input_grad[1]:
            # The trilinear Hessian term sum_k grad_k d2 enc_k / dx2 . v_x has no kernel: the reference
            # computes it (rare: a second derivative in the positions themselves).
            h = _reference_hessian_term(grad, x, table, v_x, res, bound)
            g_x = h if g_x is None else g_x + h
    return g_grad, g_x, g_table, None, None, None, None


def _reference_hessian_term(grad, x, table, v_x, resolutions, bound) -> torch.Tensor:
    with torch.enable_grad():
        xr = x.detach().requires_grad_(True)
        enc = _encode_levels(xr, table.detach(), resolutions, bound)
        (gx,) = torch.autograd.grad(enc, xr, grad.detach(), create_graph=True)
        (h,) = torch.autograd.grad(gx, xr, v_x.detach(), allow_unused=True)
    return torch.zeros_like(x) if h is None else h


_encode_backward_op.register_autograd(_encode_backward_backward, setup_context=_encode_backward_setup)


# hash_encode_with_jacobian: d/d table only (x constant).
def _jacobian_setup(ctx, inputs, output):
    x, table, resolutions, bound, backend = inputs
    ctx.save_for_backward(x)
    ctx.table_size = table.shape[1]
    ctx.out_dim = table.shape[0] * table.shape[2]
    _save_common(ctx, resolutions, bound, backend)


def _jacobian_backward(ctx, grad_enc, grad_jac):
    (x,) = ctx.saved_tensors
    if grad_enc is None:
        grad_enc = x.new_zeros(x.shape[0], ctx.out_dim)
    if grad_jac is None:
        grad_jac = x.new_zeros(x.shape[0], ctx.out_dim, 3)
    g_table = _jacobian_backward_op(grad_enc, grad_jac, x, ctx.resolutions, ctx.bound, ctx.table_size, ctx.backend)
    return None, g_table, None, None, None


_jacobian_op.register_autograd(_jacobian_backward, setup_context=_jacobian_setup)


# hash_encode_with_jacobian's backward is linear in (grad_enc, grad_jac): its adjoint is the fused forward.
def _jacobian_backward_setup(ctx, inputs, output):
    grad_enc, grad_jac, x, resolutions, bound, table_size, backend = inputs
    ctx.save_for_backward(x)
    _save_common(ctx, resolutions, bound, backend)


def _jacobian_backward_backward(ctx, v_table):
    (x,) = ctx.saved_tensors
    if v_table is None:
        return None, None, None, None, None, None, None
    enc, jac = _jacobian_op(x, v_table.contiguous(), ctx.resolutions, ctx.bound, _exact(ctx.backend))
    return enc, jac, None, None, None, None, None


_jacobian_backward_op.register_autograd(_jacobian_backward_backward, setup_context=_jacobian_backward_setup)


def _fast_dtype(backend: str, x: torch.Tensor, table: torch.Tensor) -> torch.dtype:
    """float32, except float64 on the C++/CUDA backends when an input is float64 (exact gradchecks)."""
    if backend in ("cpp", "cuda") and torch.float64 in (x.dtype, table.dtype):
        return torch.float64
    return torch.float32


def _reads(backend: str, dtype: torch.dtype) -> str:
    """``cuda`` with fp32 compute reads the table in fp16 unless ``CUDA_FP16_TABLE_READS`` is off."""
    if backend == "cuda" and dtype == torch.float32 and CUDA_FP16_TABLE_READS:
        return _CUDA_FP16
    return backend


def _check(x: object, table: object, cfg: object) -> torch.device:
    if not isinstance(cfg, HashGridConfig):
        raise TypeError(f"cfg: expected a HashGridConfig, got {type(cfg).__name__}")
    check_tensor("x", x, (None, 3), FLOAT_DTYPES)
    check_tensor("table", table, (cfg.levels, cfg.table_size, cfg.features), FLOAT_DTYPES)
    return same_device(x=x, table=table)


def hash_encode(
    x: torch.Tensor,  # [N, 3] world positions
    table: torch.Tensor,  # [L, 2**T, F]
    cfg: HashGridConfig,
) -> torch.Tensor:  # [N, L * F]
    """Encode ``N`` world positions; differentiable w.r.t. ``table`` and ``x``.

    Fast backends compute in float32 and return float32 (``cpp``/``cuda``: float64 when an input is
    float64); the reference keeps the promoted input dtype. The backward of the fast backends is
    differentiable again (its second derivative in ``x`` alone falls back to PyTorch: slow, and once only).

    Raises:
        TypeError / ValueError: an argument of the wrong type, dtype, shape or device (named).
    """
    device = _check(x, table, cfg)
    backend = _dispatch.select(OP, device)
    if backend == "reference":
        return hash_encode_reference(x, table, cfg)
    dt = _fast_dtype(backend, x, table)
    return _encode_op(
        x.to(dt).contiguous(), table.to(dt).contiguous(), list(cfg.resolutions), cfg.bound, _reads(backend, dt)
    )


def hash_encode_with_jacobian(
    x: torch.Tensor,  # [N, 3] world positions
    table: torch.Tensor,  # [L, 2**T, F]
    cfg: HashGridConfig,
) -> tuple[torch.Tensor, torch.Tensor]:  # [N, L * F], [N, L * F, 3]
    """The fused pass: the encoding and its spatial Jacobian ``jac[n, k, d] = d enc[n, k] / d x[n, d]``.

    Differentiable w.r.t. ``table`` (to any order); ``x`` is treated as a constant (no gradient flows to
    it). Fast backends compute in float32 and return float32 (``cpp``/``cuda``: float64 when an input is
    float64).

    Raises:
        TypeError / ValueError: an argument of the wrong type, dtype, shape or device (named).
    """
    device = _check(x, table, cfg)
    backend = _dispatch.select(OP, device)
    if backend == "reference":
        return hash_encode_with_jacobian_reference(x, table, cfg)
    dt = _fast_dtype(backend, x, table)
    return _jacobian_op(
        x.detach().to(dt).contiguous(),
        table.to(dt).contiguous(),
        list(cfg.resolutions),
        cfg.bound,
        _reads(backend, dt),
    )


__all__ = [
    "HashGridConfig",
    "hash_encode",
    "hash_encode_reference",
    "hash_encode_with_jacobian",
    "hash_encode_with_jacobian_reference",
    "init_hash_table",
]
