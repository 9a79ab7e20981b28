# SPDX-License-Identifier: Apache-2.0
"""Density-gradient normals ``n = -grad tau / |grad tau|`` (DreamFusion's analytic normals).

The field is ``tau = density_mlp(hash_encode(x))``. The gradient splits along the chain rule:

    d tau / d x = (d tau / d enc) @ (d enc / d x)        # [N, L*F] @ [N, L*F, 3]

``d enc / d x`` comes from the fused pass :func:`hash_encode_with_jacobian` (encoding and Jacobian in
one kernel); ``d tau / d enc`` from ``torch.autograd.grad(create_graph=True)`` through the MLP only. A loss
on the normals therefore trains both the MLP (through the double backward of the MLP, plain PyTorch) and
the table (through the fused pass's backward, the kernels' second-order path). Sample positions are
constants: no gradient flows to ``x``.

:func:`finite_difference_normals` (six extra density evaluations per point) stays available for
comparison.

Example:
    >>> import torch
    >>> from fastdream.ops import HashGridConfig, init_hash_table
    >>> from fastdream.ops.normals import density_gradient, normals_from_gradient
    >>> cfg = HashGridConfig(levels=2, features=2, log2_table_size=8, base_resolution=4, finest_resolution=8)
    >>> table = init_hash_table(cfg, generator=torch.Generator().manual_seed(0)).requires_grad_()
    >>> mlp = torch.nn.Linear(cfg.out_dim, 1)
    >>> tau, g = density_gradient(torch.zeros(3, 3), table, cfg, lambda e: mlp(e).squeeze(-1))
    >>> normals_from_gradient(g).shape
    torch.Size([3, 3])
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastdream.ops._checks import check_tensor
from fastdream.ops.hash_grid import HashGridConfig, hash_encode_with_jacobian


def _as_density(out: torch.Tensor, n: int, what: str) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{what}: expected it to return a tensor, got {type(out).__name__}")
    if out.dim() == 2 and out.shape[1] == 1:
        out = out[:, 0]
    if out.shape != (n,):
        raise ValueError(f"{what}: expected it to return a [N] (or [N, 1]) tensor with N = {n}, got {list(out.shape)}")
    return out


def density_gradient(
    x: torch.Tensor,  # [N, 3] world positions
    table: torch.Tensor,  # [L, 2**T, F]
    cfg: HashGridConfig,
    density_mlp: Callable[[torch.Tensor], torch.Tensor],  # enc [N, L*F] -> density [N] (or [N, 1])
) -> tuple[torch.Tensor, torch.Tensor]:  # density [N], grad [N, 3]
    """The density and its spatial gradient, analytically; both differentiable w.r.t. ``table`` and the
    MLP's parameters (``x`` is a constant).

    Under ``torch.no_grad()`` the outputs carry no graph (the MLP's input gradient is still computed).

    Raises:
        TypeError / ValueError: a wrong input (named), or an MLP output of the wrong shape.
    """
    enc, jac = hash_encode_with_jacobian(x, table, cfg)
    n = enc.shape[0]
    keep_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        # When nothing upstream needs a gradient the encoding is a leaf we differentiate the MLP at.
        enc_in = enc if enc.requires_grad else enc.detach().requires_grad_(True)
        density = _as_density(density_mlp(enc_in), n, "density_mlp")
        (g_enc,) = torch.autograd.grad(
            density, enc_in, torch.ones_like(density), create_graph=keep_graph, allow_unused=True
        )
    if g_enc is None:  # a density that ignores the encoding
        g_enc = torch.zeros_like(enc_in)
    grad = torch.bmm(g_enc.to(jac.dtype)[:, None, :], jac)[:, 0, :]
    if not keep_graph:
        density, grad = density.detach(), grad.detach()
    return density, grad


def normals_from_gradient(grad: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:  # [N, 3] -> [N, 3]
    """``-grad / |grad|``; a zero gradient gives a zero normal (finite value and finite derivative)."""
    check_tensor("grad", grad, (None, 3))
    sq = grad.square().sum(-1, keepdim=True)
    return -grad * torch.rsqrt(sq.clamp_min(eps * eps))


def finite_difference_gradient(
    density_fn: Callable[[torch.Tensor], torch.Tensor],  # positions [M, 3] -> density [M]
    x: torch.Tensor,  # [N, 3]
    eps: float = 1e-3,
) -> torch.Tensor:  # [N, 3]
    """Central differences of ``density_fn`` with step ``eps`` (world units): 6 evaluations per point,
    batched into one call; differentiable through ``density_fn``."""
    check_tensor("x", x, (None, 3))
    if not eps > 0:
        raise ValueError(f"eps: expected a positive step, got {eps}")
    n = x.shape[0]
    offsets = torch.eye(3, dtype=x.dtype, device=x.device) * eps
    probes = torch.cat([x[None] + offsets[:, None], x[None] - offsets[:, None]], dim=0).reshape(6 * n, 3)
    d = _as_density(density_fn(probes), 6 * n, "density_fn").reshape(2, 3, n)
    return ((d[0] - d[1]) / (2 * eps)).T


def finite_difference_normals(
    density_fn: Callable[[torch.Tensor], torch.Tensor],  # positions [M, 3] -> density [M]
    x: torch.Tensor,  # [N, 3]
    eps: float = 1e-3,
) -> torch.Tensor:  # [N, 3]
    """Normals ``-grad / |grad|`` from :func:`finite_difference_gradient` (the comparison option)."""
    return normals_from_gradient(finite_difference_gradient(density_fn, x, eps))


__all__ = ["density_gradient", "finite_difference_gradient", "finite_difference_normals", "normals_from_gradient"]
