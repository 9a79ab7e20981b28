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

Gradients: :func:`hash_encode` is differentiable w.r.t. ``table`` and ``x`` (and its backward, w.r.t. the
incoming gradient and ``table``: second derivatives through ``x`` are not implemented and raise).
:func:`hash_encode_with_jacobian` (the fused pass used for analytic normals) is differentiable w.r.t.
``table`` only — a loss on the encoding or on the Jacobian trains the table, while ``x`` is treated as a
constant (samples are not optimised); its backward is differentiable again (the encoding is linear in
the table, so the backward of the backward is the forward), so gradgradcheck holds to any order in
``table``.

Implementations: ``reference`` (PyTorch), ``cpp`` (C++ CPU loop, ``csrc/include/fastdream/hash_grid.h``),
``triton`` (``fastdream.kernels.hash_grid``; on CUDA it reads an fp16 copy of the table and accumulates
gradients in fp32).

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

PRIME_Y = 2654435761
PRIME_Z = 805459861

# On CUDA the Triton kernels read an fp16 copy of the table (half the memory traffic of the gathers, which
# dominate); interpolation and every gradient accumulate in fp32.
CUDA_FP16_TABLE_READS = True


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
    inside = (u_raw >= 0) & (u_raw <= 1)  # False for NaN; torch.clamp's gradient mask (inclusive)
    u = torch.nan_to_num(u_raw, nan=0.0, posinf=1.0, neginf=0.0).clamp(0.0, 1.0)
    return u, inside


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


def hash_encode_reference(
    x: torch.Tensor,  # [N, 3] world positions
    table: torch.Tensor,  # [L, 2**T, F]
    cfg: HashGridConfig,
) -> torch.Tensor:  # [N, L * F]
    """Pure-PyTorch encoding (plain autograd: differentiable w.r.t. ``table`` and ``x``, any order)."""
    dtype = _ref_dtype(x, table)
    x = x.to(dtype)
    table = table.to(dtype)
    u, _ = _normalise(x, cfg.bound)
    outs = []
    for l, res in enumerate(cfg.resolutions):
        idx, frac, bits = _level_corners(u, res, cfg.is_dense(l), cfg.table_size)
        w, _ = _corner_weights(frac, bits)
        feat = table[l][idx]  # [N, 8, F]
        outs.append((w[..., None] * feat).sum(1))
    if not outs:
        return x.new_zeros(x.shape[0], 0)
    return torch.cat(outs, dim=1)


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
    n = x.shape[0]
    return torch.cat(outs, dim=1).reshape(n, -1), torch.cat(jacs, dim=1).reshape(n, -1, 3)


# ---------------------------------------------------------------------------------------------- dispatch


def _check(x: object, table: object, cfg: object) -> torch.device:
    if not isinstance(cfg, HashGridConfig):
        raise TypeError(f"cfg: expected a HashGridConfig, got {type(cfg).__name__}")
    check_tensor("x", x, (None, 3), FLOAT_DTYPES)
    check_tensor("table", table, (cfg.levels, cfg.table_size, cfg.features), FLOAT_DTYPES)
    return same_device(x=x, table=table)


_dispatch.register(OP, "reference", None)


def hash_encode(
    x: torch.Tensor,  # [N, 3] world positions
    table: torch.Tensor,  # [L, 2**T, F]
    cfg: HashGridConfig,
) -> torch.Tensor:  # [N, L * F]
    """Encode ``N`` world positions; differentiable w.r.t. ``table`` and ``x``.

    Fast backends compute in float32 and return float32; the reference keeps the promoted input dtype.

    Raises:
        TypeError / ValueError: an argument of the wrong type, dtype, shape or device (named).
    """
    device = _check(x, table, cfg)
    backend = _dispatch.select(OP, device)
    if backend == "reference":
        return hash_encode_reference(x, table, cfg)
    return _fast_encode(x, table, cfg, backend)


def hash_encode_with_jacobian(
    x: torch.Tensor,  # [N, 3] world positions
    table: torch.Tensor,  # [L, 2**T, F]
    cfg: HashGridConfig,
) -> tuple[torch.Tensor, torch.Tensor]:  # [N, L * F], [N, L * F, 3]
    """The fused pass: the encoding and its spatial Jacobian ``d enc / d x``.

    Differentiable w.r.t. ``table`` (to any order); ``x`` is treated as a constant.

    Raises:
        TypeError / ValueError: an argument of the wrong type, dtype, shape or device (named).
    """
    device = _check(x, table, cfg)
    backend = _dispatch.select(OP, device)
    if backend == "reference":
        return hash_encode_with_jacobian_reference(x, table, cfg)
    return _fast_encode_with_jacobian(x, table, cfg, backend)


def _fast_encode(x, table, cfg, backend):  # replaced below once the fast backends exist
    raise NotImplementedError(backend)


def _fast_encode_with_jacobian(x, table, cfg, backend):
    raise NotImplementedError(backend)


__all__ = [
    "HashGridConfig",
    "hash_encode",
    "hash_encode_reference",
    "hash_encode_with_jacobian",
    "hash_encode_with_jacobian_reference",
    "init_hash_table",
]

_ = backends  # used by the fast paths
