# SPDX-License-Identifier: Apache-2.0
"""Triton Lambertian shading (see fastdream/ops/shading.py for the maths and the reference)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastdream.kernels._utils import block_size


@triton.jit
def _load3(ptr, offs, mask):
    x = tl.load(ptr + offs * 3 + 0, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(ptr + offs * 3 + 1, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(ptr + offs * 3 + 2, mask=mask, other=0.0).to(tl.float32)
    return x, y, z


@triton.jit
def _light_dir(px, py, pz, light_ptr):
    lx = tl.load(light_ptr + 0) - px
    ly = tl.load(light_ptr + 1) - py
    lz = tl.load(light_ptr + 2) - pz
    d2 = lx * lx + ly * ly + lz * lz
    inv = 1.0 / tl.sqrt(tl.where(d2 < 1e-12, 1e-12, d2))  # a NaN distance stays NaN (tl.maximum would drop it)
    return lx * inv, ly * inv, lz * inv


@triton.jit
def _shade_fwd_kernel(
    rho_ptr, n_ptr, p_ptr, light_ptr, amb_ptr, dif_ptr, out_ptr, S, MODE: tl.constexpr, BLOCK: tl.constexpr
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < S
    rx, ry, rz = _load3(rho_ptr, offs, mask)
    if MODE == 0:
        ox, oy, oz = rx, ry, rz
    else:
        nx, ny, nz = _load3(n_ptr, offs, mask)
        px, py, pz = _load3(p_ptr, offs, mask)
        lx, ly, lz = _light_dir(px, py, pz, light_ptr)
        cos = nx * lx + ny * ly + nz * lz
        lam = tl.where(cos <= 0.0, 0.0, cos)  # keeps NaN, like the reference's relu
        ox = tl.load(dif_ptr + 0) * lam + tl.load(amb_ptr + 0)
        oy = tl.load(dif_ptr + 1) * lam + tl.load(amb_ptr + 1)
        oz = tl.load(dif_ptr + 2) * lam + tl.load(amb_ptr + 2)
        if MODE == 1:
            ox, oy, oz = ox * rx, oy * ry, oz * rz
    tl.store(out_ptr + offs * 3 + 0, ox, mask=mask)
    tl.store(out_ptr + offs * 3 + 1, oy, mask=mask)
    tl.store(out_ptr + offs * 3 + 2, oz, mask=mask)


@triton.jit
def _shade_bwd_kernel(
    g_ptr,
    rho_ptr,
    n_ptr,
    p_ptr,
    light_ptr,
    amb_ptr,
    dif_ptr,
    g_rho_ptr,
    g_n_ptr,
    S,
    MODE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < S
    gx, gy, gz = _load3(g_ptr, offs, mask)
    if MODE == 0:
        grx, gry, grz = gx, gy, gz
        gnx = tl.zeros([BLOCK], dtype=tl.float32)  # not gx * 0: a NaN/inf upstream gradient reaches nothing here
        gny = gnx
        gnz = gnx
    else:
        rx, ry, rz = _load3(rho_ptr, offs, mask)
        nx, ny, nz = _load3(n_ptr, offs, mask)
        px, py, pz = _load3(p_ptr, offs, mask)
        lx, ly, lz = _light_dir(px, py, pz, light_ptr)
        cos = nx * lx + ny * ly + nz * lz
        lam = tl.where(cos <= 0.0, 0.0, cos)
        dx = tl.load(dif_ptr + 0)
        dy = tl.load(dif_ptr + 1)
        dz = tl.load(dif_ptr + 2)
        if MODE == 2:
            # white, whatever the albedo (NaN included); and the albedo gets no gradient, whatever the upstream one
            rx = tl.full([BLOCK], 1.0, dtype=tl.float32)
            ry = rx
            rz = rx
            grx = tl.zeros([BLOCK], dtype=tl.float32)
            gry = grx
            grz = grx
        else:
            grx = gx * (dx * lam + tl.load(amb_ptr + 0))
            gry = gy * (dy * lam + tl.load(amb_ptr + 1))
            grz = gz * (dz * lam + tl.load(amb_ptr + 2))
        g_lam = tl.where(cos <= 0.0, 0.0, gx * rx * dx + gy * ry * dy + gz * rz * dz)  # NaN passes, like relu
        gnx, gny, gnz = lx * g_lam, ly * g_lam, lz * g_lam
    tl.store(g_rho_ptr + offs * 3 + 0, grx, mask=mask)
    tl.store(g_rho_ptr + offs * 3 + 1, gry, mask=mask)
    tl.store(g_rho_ptr + offs * 3 + 2, grz, mask=mask)
    tl.store(g_n_ptr + offs * 3 + 0, gnx, mask=mask)
    tl.store(g_n_ptr + offs * 3 + 1, gny, mask=mask)
    tl.store(g_n_ptr + offs * 3 + 2, gnz, mask=mask)


def shade_forward(albedo, normals, positions, light, ambient, diffuse, mode: int) -> torch.Tensor:
    """Launcher: contiguous float32 [S, 3] inputs, [3] light vectors -> [S, 3]."""
    s = albedo.shape[0]
    out = torch.empty_like(albedo)
    if s == 0:
        return out
    blk = block_size(s)
    _shade_fwd_kernel[(triton.cdiv(s, blk),)](
        albedo, normals, positions, light, ambient, diffuse, out, s, MODE=int(mode), BLOCK=blk
    )
    return out


def shade_backward(grad, albedo, normals, positions, light, ambient, diffuse, mode: int):
    """Launcher of the backward: -> (grad_albedo [S, 3], grad_normals [S, 3])."""
    s = albedo.shape[0]
    g_rho = torch.empty_like(albedo)
    g_n = torch.empty_like(normals)
    if s == 0:
        return g_rho, g_n
    blk = block_size(s)
    _shade_bwd_kernel[(triton.cdiv(s, blk),)](
        grad, albedo, normals, positions, light, ambient, diffuse, g_rho, g_n, s, MODE=int(mode), BLOCK=blk
    )
    return g_rho, g_n
