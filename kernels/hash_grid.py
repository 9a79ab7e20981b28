# SPDX-License-Identifier: Apache-2.0
"""Triton hash-grid encoding (see fastdream/ops/hash_grid.py for the scheme and the reference).

One program handles ``BLOCK`` points and loops over the levels; the 8 corners and the ``F`` features are
unrolled. The table gradient accumulates with ``tl.atomic_add`` in float32.

Precision: on CUDA the kernels read an fp16 copy of the table (``FP16_TABLE_READS_ON_CUDA``; the gathers
are the memory traffic that matters). The copy is cached while the table is unchanged (same storage and
version counter), so a forward and its backward cast once per optimizer step. Interpolation, the
Jacobian and every gradient are computed and accumulated in float32. On the CPU (``TRITON_INTERPRET=1``)
the table is read as given.
"""

from __future__ import annotations

import functools
import weakref

import torch
import triton
import triton.language as tl

from fastdream.kernels._utils import block_size

FP16_TABLE_READS_ON_CUDA = True


@triton.jit
def _normalise(x, bound, two_bound):
    u = (x + bound) / two_bound
    inside = (u >= 0.0) & (u <= 1.0)
    u = tl.where(u >= 0.0, u, 0.0)  # NaN and -inf -> 0
    u = tl.where(u > 1.0, 1.0, u)
    du = tl.where(inside, 1.0 / two_bound, 0.0)
    return u, du


@triton.jit
def _load_point(x_ptr, offs, mask, bound, two_bound):
    x0 = tl.load(x_ptr + offs * 3 + 0, mask=mask, other=0.0)
    x1 = tl.load(x_ptr + offs * 3 + 1, mask=mask, other=0.0)
    x2 = tl.load(x_ptr + offs * 3 + 2, mask=mask, other=0.0)
    u0, du0 = _normalise(x0, bound, two_bound)
    u1, du1 = _normalise(x1, bound, two_bound)
    u2, du2 = _normalise(x2, bound, two_bound)
    return u0, u1, u2, du0, du1, du2


@triton.jit
def _cell_axis(u, resf):
    p = u * resf
    p0 = tl.minimum(tl.floor(p), resf - 1.0)
    return p0.to(tl.uint32), p - p0


@triton.jit
def _level(levels_ptr, l):
    """Level ``l``'s row of the [L, 4] int64 table: resolution, dense flag, hash mask, table offset."""
    res = tl.load(levels_ptr + 4 * l + 0)
    dense = tl.load(levels_ptr + 4 * l + 1)
    hmask = tl.load(levels_ptr + 4 * l + 2).to(tl.uint32)
    offset = tl.load(levels_ptr + 4 * l + 3)
    return res, dense, hmask, offset


@triton.jit
def _corner(i0, i1, i2, f0, f1, f2, res, dense, hmask, C: tl.constexpr):
    b0: tl.constexpr = C & 1
    b1: tl.constexpr = (C >> 1) & 1
    b2: tl.constexpr = (C >> 2) & 1
    j0 = i0 + b0
    j1 = i1 + b1
    j2 = i2 + b2
    stride = (res + 1).to(tl.uint32)
    dense_idx = j0 + j1 * stride + j2 * stride * stride
    hash_idx = (j0 ^ (j1 * 2654435761) ^ (j2 * 805459861)) & hmask
    idx = tl.where(dense != 0, dense_idx, hash_idx).to(tl.int64)
    w0 = f0 if b0 else 1.0 - f0
    w1 = f1 if b1 else 1.0 - f1
    w2 = f2 if b2 else 1.0 - f2
    s0: tl.constexpr = 1.0 if b0 else -1.0
    s1: tl.constexpr = 1.0 if b1 else -1.0
    s2: tl.constexpr = 1.0 if b2 else -1.0
    return idx, w0 * w1 * w2, s0 * w1 * w2, s1 * w0 * w2, s2 * w0 * w1


@triton.jit
def _forward_kernel(
    x_ptr,
    table_ptr,
    levels_ptr,
    enc_ptr,
    jac_ptr,
    N,
    bound,
    two_bound,
    L: tl.constexpr,
    F: tl.constexpr,
    WITH_JAC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    u0, u1, u2, du0, du1, du2 = _load_point(x_ptr, offs, mask, bound, two_bound)
    for l in range(L):
        res, dense, hmask, offset = _level(levels_ptr, l)
        resf = res.to(tl.float32)
        i0, f0 = _cell_axis(u0, resf)
        i1, f1 = _cell_axis(u1, resf)
        i2, f2 = _cell_axis(u2, resf)
        base = table_ptr + offset
        for f in tl.static_range(F):
            e = tl.zeros([BLOCK], dtype=tl.float32)
            j0 = tl.zeros([BLOCK], dtype=tl.float32)
            j1 = tl.zeros([BLOCK], dtype=tl.float32)
            j2 = tl.zeros([BLOCK], dtype=tl.float32)
            for c in tl.static_range(8):
                idx, w, d0, d1, d2 = _corner(i0, i1, i2, f0, f1, f2, res, dense, hmask, c)
                v = tl.load(base + idx * F + f, mask=mask, other=0.0).to(tl.float32)
                e += w * v
                if WITH_JAC:
                    j0 += d0 * v
                    j1 += d1 * v
                    j2 += d2 * v
            k = (offs * L + l) * F + f
            tl.store(enc_ptr + k, e, mask=mask)
            if WITH_JAC:
                tl.store(jac_ptr + k * 3 + 0, j0 * resf * du0, mask=mask)
                tl.store(jac_ptr + k * 3 + 1, j1 * resf * du1, mask=mask)
                tl.store(jac_ptr + k * 3 + 2, j2 * resf * du2, mask=mask)


@triton.jit
def _backward_table_kernel(
    x_ptr,
    grad_enc_ptr,
    grad_jac_ptr,
    levels_ptr,
    grad_table_ptr,
    N,
    bound,
    two_bound,
    L: tl.constexpr,
    F: tl.constexpr,
    WITH_JAC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    u0, u1, u2, du0, du1, du2 = _load_point(x_ptr, offs, mask, bound, two_bound)
    for l in range(L):
        res, dense, hmask, offset = _level(levels_ptr, l)
        resf = res.to(tl.float32)
        i0, f0 = _cell_axis(u0, resf)
        i1, f1 = _cell_axis(u1, resf)
        i2, f2 = _cell_axis(u2, resf)
        base = grad_table_ptr + offset
        for f in tl.static_range(F):
            k = (offs * L + l) * F + f
            g = tl.load(grad_enc_ptr + k, mask=mask, other=0.0)
            if WITH_JAC:
                gj0 = tl.load(grad_jac_ptr + k * 3 + 0, mask=mask, other=0.0) * resf * du0
                gj1 = tl.load(grad_jac_ptr + k * 3 + 1, mask=mask, other=0.0) * resf * du1
                gj2 = tl.load(grad_jac_ptr + k * 3 + 2, mask=mask, other=0.0) * resf * du2
            for c in tl.static_range(8):
                idx, w, d0, d1, d2 = _corner(i0, i1, i2, f0, f1, f2, res, dense, hmask, c)
                v = w * g
                if WITH_JAC:
                    v += d0 * gj0 + d1 * gj1 + d2 * gj2
                tl.atomic_add(base + idx * F + f, v, mask=mask & (v != 0.0))


@triton.jit
def _backward_x_kernel(
    x_ptr,
    table_ptr,
    grad_ptr,
    levels_ptr,
    grad_x_ptr,
    N,
    bound,
    two_bound,
    L: tl.constexpr,
    F: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    u0, u1, u2, du0, du1, du2 = _load_point(x_ptr, offs, mask, bound, two_bound)
    gx0 = tl.zeros([BLOCK], dtype=tl.float32)
    gx1 = tl.zeros([BLOCK], dtype=tl.float32)
    gx2 = tl.zeros([BLOCK], dtype=tl.float32)
    for l in range(L):
        res, dense, hmask, offset = _level(levels_ptr, l)
        resf = res.to(tl.float32)
        i0, f0 = _cell_axis(u0, resf)
        i1, f1 = _cell_axis(u1, resf)
        i2, f2 = _cell_axis(u2, resf)
        base = table_ptr + offset
        a0 = tl.zeros([BLOCK], dtype=tl.float32)
        a1 = tl.zeros([BLOCK], dtype=tl.float32)
        a2 = tl.zeros([BLOCK], dtype=tl.float32)
        for f in tl.static_range(F):
            g = tl.load(grad_ptr + (offs * L + l) * F + f, mask=mask, other=0.0)
            for c in tl.static_range(8):
                idx, w, d0, d1, d2 = _corner(i0, i1, i2, f0, f1, f2, res, dense, hmask, c)
                v = tl.load(base + idx * F + f, mask=mask, other=0.0).to(tl.float32) * g
                a0 += d0 * v
                a1 += d1 * v
                a2 += d2 * v
        gx0 += a0 * resf * du0
        gx1 += a1 * resf * du1
        gx2 += a2 * resf * du2
    tl.store(grad_x_ptr + offs * 3 + 0, gx0, mask=mask)
    tl.store(grad_x_ptr + offs * 3 + 1, gx1, mask=mask)
    tl.store(grad_x_ptr + offs * 3 + 2, gx2, mask=mask)


# ------------------------------------------------------------------------------------------------ launchers


@functools.lru_cache(maxsize=64)
def _levels_tensor(resolutions: tuple[int, ...], table_size: int, features: int, device: str) -> torch.Tensor:
    """[L, 4] int64 (resolution, dense, hash mask, offset of the level in the table) on ``device``; cached so
    that a step makes no host-to-device copy."""
    rows = [
        [r, int((r + 1) ** 3 <= table_size), table_size - 1, l * table_size * features]
        for l, r in enumerate(resolutions)
    ]
    return torch.tensor(rows, dtype=torch.int64, device=device)


_half_cache: dict[str, tuple] = {}


def _readable_table(table: torch.Tensor) -> torch.Tensor:
    """The table the kernels read: an fp16 copy on CUDA (cached while the very same tensor is unchanged: same
    object, same version counter, so an in-place optimizer step or a new tensor at a recycled address
    recasts), else the table itself. While a CUDA graph is being captured the cast is made afresh, uncached: it is
    then part of the graph, so each replay reads the table as it is then (a cached copy would be read stale by every
    replay, and freed once an eager call recast it)."""
    if not (table.is_cuda and FP16_TABLE_READS_ON_CUDA):
        return table
    if torch.cuda.is_current_stream_capturing():
        return table.detach().to(torch.float16)
    key = str(table.device)
    hit = _half_cache.get(key)
    if hit is not None and hit[0]() is table and hit[1] == table._version:
        return hit[2]
    half = table.detach().to(torch.float16)
    _half_cache[key] = (weakref.ref(table), table._version, half)
    return half


def _launch_args(x: torch.Tensor, resolutions, table_size: int, features: int, bound: float):
    n = x.shape[0]
    blk = block_size(n, cap=128)
    levels = _levels_tensor(tuple(int(r) for r in resolutions), int(table_size), int(features), str(x.device))
    return n, blk, (triton.cdiv(n, blk),), levels, float(bound), float(2.0 * bound)


def hash_encode_forward(x, table, resolutions, bound: float) -> torch.Tensor:
    """Launcher: x [N, 3] float32, table [L, S, F] -> enc [N, L*F] float32."""
    L, S, F = table.shape
    n, blk, grid, levels, b, tb = _launch_args(x, resolutions, S, F, bound)
    enc = torch.empty(n, L * F, device=x.device, dtype=torch.float32)
    if n == 0:
        return enc
    _forward_kernel[grid](x, _readable_table(table), levels, enc, enc, n, b, tb, L=L, F=F, WITH_JAC=False, BLOCK=blk)
    return enc


def hash_encode_jacobian_forward(x, table, resolutions, bound: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Launcher of the fused pass: -> (enc [N, L*F], jac [N, L*F, 3]) float32."""
    L, S, F = table.shape
    n, blk, grid, levels, b, tb = _launch_args(x, resolutions, S, F, bound)
    enc = torch.empty(n, L * F, device=x.device, dtype=torch.float32)
    jac = torch.empty(n, L * F, 3, device=x.device, dtype=torch.float32)
    if n == 0:
        return enc, jac
    _forward_kernel[grid](x, _readable_table(table), levels, enc, jac, n, b, tb, L=L, F=F, WITH_JAC=True, BLOCK=blk)
    return enc, jac


def hash_encode_backward(grad, x, table, resolutions, bound: float, need_x: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Launcher of the backward: grad [N, L*F] -> (grad_table [L, S, F] float32, grad_x [N, 3] float32;
    zeros when not ``need_x``)."""
    L, S, F = table.shape
    n, blk, grid, levels, b, tb = _launch_args(x, resolutions, S, F, bound)
    grad_table = torch.zeros(L, S, F, device=x.device, dtype=torch.float32)
    grad_x = torch.zeros(n, 3, device=x.device, dtype=torch.float32)
    if n == 0:
        return grad_table, grad_x
    _backward_table_kernel[grid](x, grad, grad, levels, grad_table, n, b, tb, L=L, F=F, WITH_JAC=False, BLOCK=blk)
    if need_x:
        _backward_x_kernel[grid](x, _readable_table(table), grad, levels, grad_x, n, b, tb, L=L, F=F, BLOCK=blk)
    return grad_table, grad_x


def hash_encode_jacobian_backward(grad_enc, grad_jac, x, resolutions, bound: float, table_size: int) -> torch.Tensor:
    """Launcher of the fused pass's backward: (grad_enc [N, L*F], grad_jac [N, L*F, 3]) -> grad_table."""
    L = len(resolutions)
    F = grad_enc.shape[1] // L
    n, blk, grid, levels, b, tb = _launch_args(x, resolutions, table_size, F, bound)
    grad_table = torch.zeros(L, table_size, F, device=x.device, dtype=torch.float32)
    if n == 0:
        return grad_table
    _backward_table_kernel[grid](
        x, grad_enc, grad_jac, levels, grad_table, n, b, tb, L=L, F=F, WITH_JAC=True, BLOCK=blk
    )
    return grad_table
