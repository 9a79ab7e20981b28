# SPDX-License-Identifier: Apache-2.0
"""Front-to-back volume compositing of packed ray samples, with early termination.

For the samples ``i`` of one ray, in front-to-back order, with ``delta_i = t_end - t_start``:

    alpha_i = 1 - exp(-sigma_i delta_i),   T_i = prod_{j<i} (1 - alpha_j),   w_i = T_i alpha_i
    image   = sum_i w_i c_i + (1 - opacity) * background,   opacity = sum_i w_i,
    depth   = sum_i w_i (t_start_i + t_end_i) / 2  (not normalised by the opacity)

A ray stops at the first sample whose transmittance ``T_i`` is below ``early_stop_eps``: that sample and the
ones behind it get weight 0 (what they could add is at most ``T_i``). Gradients flow to ``sigmas``, ``colors`` and
``background`` (the interval ends are constants). ``weights`` is an output too (for the orientation loss), and
gradients through it reach ``sigmas``.

The compiled backward (``csrc/include/fastdream/composite.h``) keeps no per-sample transmittance: it walks each
ray front to back again, recomputing ``T_i``, and gets the suffix sums the gradient needs as "total minus
prefix", the totals being the forward's outputs (instant-NGP / nerfacc). Memory is that of the outputs only.

Implementations: ``reference`` (PyTorch autograd over a padded [R, max samples] layout), ``cpp`` and ``cuda``.

Example:
    >>> import torch
    >>> from fastdream.ops import composite, march_rays
    >>> s = march_rays(torch.tensor([[0.0, 0.0, 3.0]]), torch.tensor([[0.0, 0.0, -1.0]]))
    >>> sigmas = torch.full((s.n_samples,), 50.0); colors = torch.ones(s.n_samples, 3)
    >>> out = composite(sigmas, colors, s, background=torch.zeros(1, 3))
    >>> round(out.opacity.item(), 3), round(out.image[0, 0].item(), 3)
    (1.0, 1.0)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from fastdream import backends
from fastdream.ops import _dispatch
from fastdream.ops._checks import check_tensor, same_device

OP = "composite"


class PackedIntervals(Protocol):
    """What compositing reads from :class:`~fastdream.ops.raymarch.RaySamples` (any object with these works)."""

    ray_indices: torch.Tensor  # [S] int64
    t_starts: torch.Tensor  # [S]
    t_ends: torch.Tensor  # [S]
    offsets: torch.Tensor  # [R + 1] int64


@dataclass
class CompositeResult:
    """Outputs of :func:`composite` for ``R`` rays of ``C`` channels and ``S`` samples.

    Attributes:
        image: [R, C] composited colour, background blended in.
        opacity: [R] accumulated opacity ``sum w`` (what the opacity regulariser reads).
        depth: [R] expected depth ``sum w t_mid``.
        weights: [S] per-sample weights (0 after early termination).
    """

    image: torch.Tensor
    opacity: torch.Tensor
    depth: torch.Tensor
    weights: torch.Tensor


def _blend(color, opacity, background):
    if background is None:
        return color
    return color + (1.0 - opacity)[:, None] * background


def _reference_core(sigmas, colors, t_starts, t_ends, ray_indices, offsets, eps):
    """(color without background [R, C], opacity [R], depth [R], weights [S]) by PyTorch autograd."""
    r = offsets.shape[0] - 1
    s, c = colors.shape
    dtype, device = sigmas.dtype, sigmas.device
    t_starts = t_starts.detach().to(dtype)
    t_ends = t_ends.detach().to(dtype)
    if s == 0 or r == 0:
        w = sigmas * 0.0
        z = colors.new_zeros(r, c) + (colors.sum() * 0.0)
        return z, sigmas.new_zeros(r) + w.sum(), sigmas.new_zeros(r), w
    counts = offsets[1:] - offsets[:-1]
    length = max(int(counts.max()), 1)
    index = torch.arange(s, device=device)
    # Samples outside their ray's [offsets[ray], offsets[ray + 1]) (march_rays_padded's padding rows, past
    # offsets[-1]) belong to no ray: weight 0, as the kernels, which walk each ray's range, give them. They write
    # into a spare last column of the dense layout, never read (all of them the same value, 0).
    inside = (index >= offsets[ray_indices]) & (index < offsets[ray_indices + 1])
    local = torch.where(inside, index - offsets[ray_indices], 0)
    column = torch.where(inside, local + 1, length + 1)
    sd = sigmas * (t_ends - t_starts)

    def exclusive(values):  # [S] -> [S]: sum over the ray's samples before each one (an exact 0 at the first)
        dense = values.new_zeros(r, length + 2).index_put((ray_indices, column), values)
        return torch.cumsum(dense, dim=1)[ray_indices, local]

    sd = torch.where(inside, sd, torch.zeros_like(sd))
    trans = torch.exp(-exclusive(sd))
    # Early termination, as the kernels do it: a ray stops at its first sample with T < eps, and every sample
    # behind that one is skipped too, whatever its density (a NaN there would make the later T NaN, not small).
    with torch.no_grad():
        first_stop = torch.full((r,), s, dtype=torch.int64, device=device)
        first_stop = first_stop.scatter_reduce(0, ray_indices, torch.where((trans < eps) & inside, index, s), "amin")
        skipped = ~inside | (index >= first_stop[ray_indices])
    if not bool(torch.isfinite(sd).all()):  # then again without the skipped samples: none of theirs reaches a grad
        sd = torch.where(skipped, torch.zeros_like(sd), sd)
        trans = torch.exp(-exclusive(sd))
    alpha = 1.0 - torch.exp(-sd)
    w = torch.where(skipped, torch.zeros_like(sd), trans * alpha)
    # not w * colors there: a NaN/inf colour of a sample that is not composited would make 0 * inf = NaN
    contrib = torch.where(skipped[:, None], torch.zeros_like(colors), w[:, None] * colors)
    color = torch.zeros(r, c, dtype=colors.dtype, device=device).index_add(0, ray_indices, contrib)
    opacity = torch.zeros(r, dtype=dtype, device=device).index_add(0, ray_indices, w)
    mid = (t_starts + t_ends) * 0.5
    depth = torch.zeros(r, dtype=dtype, device=device).index_add(0, ray_indices, w * mid)
    return color, opacity, depth, w


def _check(sigmas, colors, samples, n_rays, background, early_stop_eps):
    check_tensor("sigmas", sigmas, (None,))
    s = sigmas.shape[0]
    check_tensor("colors", colors, (s, None))
    for name in ("t_starts", "t_ends", "ray_indices", "offsets"):
        if not hasattr(samples, name):
            raise TypeError(f"samples: expected RaySamples (or an object with {name}), got {type(samples).__name__}")
    check_tensor("samples.t_starts", samples.t_starts, (s,))
    check_tensor("samples.t_ends", samples.t_ends, (s,))
    check_tensor("samples.ray_indices", samples.ray_indices, (s,), dtypes=(torch.int64,))
    check_tensor("samples.offsets", samples.offsets, (None,), dtypes=(torch.int64,))
    if samples.offsets.shape[0] < 1:
        raise ValueError("samples.offsets: expected R + 1 >= 1 entries, got 0")
    r = samples.offsets.shape[0] - 1
    if n_rays is not None and n_rays != r:
        raise ValueError(f"n_rays: expected {r} (samples.offsets has {r + 1} entries), got {n_rays}")
    if background is not None:
        if background.dim() == 1:
            check_tensor("background", background, (colors.shape[1],))
        else:
            check_tensor("background", background, (r, colors.shape[1]))
    if not (isinstance(early_stop_eps, (int, float)) and 0.0 <= early_stop_eps <= 1.0):
        raise ValueError(f"early_stop_eps: expected a number in [0, 1], got {early_stop_eps!r}")
    tensors = dict(sigmas=sigmas, colors=colors, t_starts=samples.t_starts, t_ends=samples.t_ends)
    tensors.update(ray_indices=samples.ray_indices, offsets=samples.offsets)
    if background is not None:
        tensors["background"] = background
    return same_device(**tensors)


def composite_reference(
    sigmas: torch.Tensor,  # [S]
    colors: torch.Tensor,  # [S, C]
    samples: PackedIntervals,
    n_rays: int | None = None,
    background: torch.Tensor | None = None,  # [R, C] or [C]
    early_stop_eps: float = 1e-4,
) -> CompositeResult:
    """Pure-PyTorch :func:`composite` (same arguments): the ground truth, differentiable by autograd."""
    _check(sigmas, colors, samples, n_rays, background, early_stop_eps)
    color, opacity, depth, w = _reference_core(
        sigmas, colors, samples.t_starts, samples.t_ends, samples.ray_indices, samples.offsets, early_stop_eps
    )
    return CompositeResult(_blend(color, opacity, background), opacity, depth, w)


def _ext():
    return backends.extension()


_dispatch.register(OP, "reference", _reference_core)
if hasattr(backends.extension(), "composite_forward"):  # an extension built before this op existed lacks it
    _dispatch.register(OP, "cpp", _ext)
    _dispatch.register(OP, "cuda", _ext)


@torch.library.custom_op("fastdream::composite", mutates_args=())
def _composite_op(
    sigmas: torch.Tensor,
    colors: torch.Tensor,
    t_starts: torch.Tensor,
    t_ends: torch.Tensor,
    offsets: torch.Tensor,
    early_stop_eps: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    color, opacity, depth, weights = _dispatch.get(OP, backend)().composite_forward(
        sigmas, colors, t_starts, t_ends, offsets, early_stop_eps
    )
    return color, opacity, depth, weights


@_composite_op.register_fake
def _(sigmas, colors, t_starts, t_ends, offsets, early_stop_eps, backend):
    r = offsets.shape[0] - 1
    return colors.new_empty(r, colors.shape[1]), sigmas.new_empty(r), sigmas.new_empty(r), torch.empty_like(sigmas)


@torch.library.custom_op("fastdream::composite_backward", mutates_args=())
def _composite_backward_op(
    grad_color: torch.Tensor,
    grad_opacity: torch.Tensor,
    grad_depth: torch.Tensor,
    grad_weights: torch.Tensor,
    sigmas: torch.Tensor,
    colors: torch.Tensor,
    t_starts: torch.Tensor,
    t_ends: torch.Tensor,
    offsets: torch.Tensor,
    color: torch.Tensor,
    opacity: torch.Tensor,
    depth: torch.Tensor,
    weights: torch.Tensor,
    early_stop_eps: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    g_sigmas, g_colors = _dispatch.get(OP, backend)().composite_backward(
        grad_color.contiguous(),
        grad_opacity.contiguous(),
        grad_depth.contiguous(),
        grad_weights.contiguous(),
        sigmas,
        colors,
        t_starts,
        t_ends,
        offsets,
        color,
        opacity,
        depth,
        weights,
        early_stop_eps,
    )
    return g_sigmas, g_colors


@_composite_backward_op.register_fake
def _(grad_color, grad_opacity, grad_depth, grad_weights, sigmas, colors, *rest):
    return torch.empty_like(sigmas), torch.empty_like(colors)


def _setup_context(ctx, inputs, output):
    sigmas, colors, t_starts, t_ends, offsets, early_stop_eps, backend = inputs
    ctx.save_for_backward(sigmas, colors, t_starts, t_ends, offsets, *output)
    ctx.early_stop_eps = early_stop_eps
    ctx.backend = backend


def _backward(ctx, g_color, g_opacity, g_depth, g_weights):
    sigmas, colors, t_starts, t_ends, offsets, color, opacity, depth, weights = ctx.saved_tensors
    g_color = torch.zeros_like(color) if g_color is None else g_color
    g_opacity = torch.zeros_like(opacity) if g_opacity is None else g_opacity
    g_depth = torch.zeros_like(depth) if g_depth is None else g_depth
    g_weights = torch.zeros_like(weights) if g_weights is None else g_weights
    g_sigmas, g_colors = _composite_backward_op(
        g_color,
        g_opacity,
        g_depth,
        g_weights,
        sigmas,
        colors,
        t_starts,
        t_ends,
        offsets,
        color,
        opacity,
        depth,
        weights,
        ctx.early_stop_eps,
        ctx.backend,
    )
    return g_sigmas, g_colors, None, None, None, None, None


_composite_op.register_autograd(_backward, setup_context=_setup_context)


def composite(
    sigmas: torch.Tensor,  # [S] non-negative densities
    colors: torch.Tensor,  # [S, C]
    samples: PackedIntervals,
    n_rays: int | None = None,
    background: torch.Tensor | None = None,  # [R, C] or [C]
    early_stop_eps: float = 1e-4,
) -> CompositeResult:
    """Composite ``S`` packed samples of ``R`` rays front to back (see the module docstring for the maths).

    Args:
        sigmas: densities of the samples.
        colors: colours (or any features) of the samples.
        samples: :class:`~fastdream.ops.raymarch.RaySamples` (``ray_indices``, ``t_starts``, ``t_ends``,
            ``offsets`` are read); samples of one ray contiguous and front to back.
        n_rays: R, checked against ``samples.offsets`` when given.
        background: colour behind each ray (None: black, i.e. no blending).
        early_stop_eps: a ray stops where its transmittance drops below this.

    Returns:
        :class:`CompositeResult`. Fast backends compute in float32; the reference keeps the input dtype.

    Raises:
        TypeError / ValueError: an argument of the wrong type, dtype, shape or device (named).
    """
    device = _check(sigmas, colors, samples, n_rays, background, early_stop_eps)
    backend = _dispatch.select(OP, device)
    if backend == "reference":
        return composite_reference(sigmas, colors, samples, n_rays, background, early_stop_eps)
    color, opacity, depth, weights = _composite_op(
        sigmas.float().contiguous(),
        colors.float().contiguous(),
        samples.t_starts.detach().float().contiguous(),
        samples.t_ends.detach().float().contiguous(),
        samples.offsets.contiguous(),
        float(early_stop_eps),
        backend,
    )
    bg = background.float() if background is not None else None
    return CompositeResult(_blend(color, opacity, bg), opacity, depth, weights)
