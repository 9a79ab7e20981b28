# SPDX-License-Identifier: Apache-2.0
"""GroupNorm for few, large groups (the SD VAE at 512x512: one image, 32 groups of up to 2M values each).

PyTorch's CUDA GroupNorm computes the statistics with one thread block per (image, group): 32 blocks for one
VAE activation, a small fraction of an H100. On an H200 that kernel took 6 ms of a 40 ms SDS step
(benchmarks/RESULTS.md). Here every reduction is an ordinary PyTorch reduction (``mean``, ``vector_norm`` and
``sum`` with fp32 accumulation), which PyTorch splits over many blocks when the rows are long, and the
normalisation is one fused multiply-add per pass:

    forward:  mean_g, E_g[x^2] (two reductions); y = x * scale[n, c] + shift[n, c] (one elementwise pass)
    backward: PyTorch's ``native_group_norm_backward`` with these statistics (its reductions are per (image,
              channel), parallel enough already)

The variance is E[x^2] - mean^2 with fp32 sums, clamped at 0: its relative error is about 1e-7 (mean / std)^2,
negligible unless a group's mean is hundreds of standard deviations from zero.

Input with its channels innermost (channels_last 4-D, NHWC in memory, and the [N, C, H*W] views of it that
diffusers' attention blocks normalise) has its own path, so that a channels_last VAE stays channels_last:
PyTorch's CUDA GroupNorm copies such input to NCHW and returns NCHW, and the convolutions around it transpose
back (session 5 measured the channels_last VAE slower for that reason). Its statistics are per-channel column sums
over the pixels (``sum`` and ``vector_norm`` over dim 1 of the [N, pixels, C] view, fp32 accumulation), added up
per group. Its backward is written with PyTorch operations, since ``native_group_norm_backward`` takes NCHW only:
per-channel sums of dy and dy * x, then dx = a * dy + b * x + c with per-(image, channel) a, b, c (two passes).
The product dy * x is formed in the input's dtype (fp16 on CUDA: a gradient scaler sees an overflow there like
any other). Other layouts fall back to ``torch.nn.functional.group_norm``. Not yet timed on a GPU: ``fastdream
bench --model sd --cuda-graphs --vae-layout channels_last`` measures it against the default contiguous VAE.

The default of ``StableDiffusionGuidance`` (``vae_groupnorm="native"`` and ``fastdream bench --vae-groupnorm
native`` restore PyTorch's): checked against ``group_norm`` (values, gradients, float64 gradcheck, an fp16 error
test on CUDA) and measured on an H100 (benchmarks/RESULTS.md): the 512x512 encode 11.6 -> 7.3 ms, the SDS step
44.0 -> 40.7 ms in one call. An earlier backward written with PyTorch reductions (fp32 temporaries of dy * x)
cost 2.3 ms a step more than PyTorch's own, which is now used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _stats(x: torch.Tensor, groups: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, rstd) per (image, group), fp32 (fp64 for fp64 input), shape [N, G]."""
    n = x.shape[0]
    xg = x.reshape(n, groups, -1)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    count = xg.shape[-1]
    mean = xg.mean(-1, dtype=acc)
    sq = torch.linalg.vector_norm(xg, 2, dim=-1, dtype=acc).square() / count
    var = (sq - mean.square()).clamp_min(0)
    return mean, torch.rsqrt(var + eps)


def _normalize(x, mean, rstd, weight, bias) -> torch.Tensor:
    """y = x * scale[n, c] + shift[n, c] in one elementwise pass, with scale = rstd * w and shift = b - mean *
    scale from the per-(image, group) statistics (computed in their precision, applied in x's dtype)."""
    n, c = x.shape[:2]
    per = c // mean.shape[1]
    w = weight.to(mean.dtype) if weight is not None else torch.ones(c, dtype=mean.dtype, device=x.device)
    b = bias.to(mean.dtype) if bias is not None else torch.zeros(c, dtype=mean.dtype, device=x.device)
    scale = rstd.repeat_interleave(per, dim=1) * w  # [N, C]
    shift = b - mean.repeat_interleave(per, dim=1) * scale
    view = (n, c) + (1,) * (x.dim() - 2)
    return torch.addcmul(shift.to(x.dtype).view(view), x, scale.to(x.dtype).view(view))


def _forward(ctx, x, weight, bias, groups: int, stats: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Both autograd functions' forward, given the (mean, rstd) statistics [N, G]."""
    mean, rstd = stats
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.groups = groups
    ctx.bias_dtype = bias.dtype if bias is not None else None
    return _normalize(x, mean, rstd, weight, bias)


class _SplitGroupNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, groups: int, eps: float):
        return _forward(ctx, x, weight, bias, groups, _stats(x, groups, eps))

    @staticmethod
    def backward(ctx, dy):
        # PyTorch's own GroupNorm backward, given the statistics computed above: its reductions are per (image,
        # channel), already spread over many blocks (the split backward written out with PyTorch reductions was
        # 2.3 ms a step slower on an H100: fp32 temporaries of dy * x at 512x512x128).
        x, weight, mean, rstd = ctx.saved_tensors
        n, c = x.shape[:2]
        hw = x.numel() // max(1, n * c)
        mask = [
            ctx.needs_input_grad[0],
            weight is not None and ctx.needs_input_grad[1],
            ctx.bias_dtype is not None and ctx.needs_input_grad[2],
        ]
        dx, dw, db = torch.ops.aten.native_group_norm_backward(
            dy.contiguous(), x, mean.to(x.dtype), rstd.to(x.dtype), weight, n, c, hw, ctx.groups, mask
        )
        return dx, dw, db, None, None


def _channels_last(t: torch.Tensor) -> bool:
    """Whether ``t`` [N, C, *spatial] holds its channels innermost, densely: channels_last for 4-D, and the
    [N, C, H*W] views of such tensors that diffusers' attention blocks normalise."""
    return t.dim() >= 3 and t.movedim(1, -1).is_contiguous()


def _channels_last_view(t: torch.Tensor) -> torch.Tensor:
    """[N, C, *spatial] with channels innermost -> its [N, prod(spatial), C] memory as a view (no copy)."""
    return t.movedim(1, -1).reshape(t.shape[0], -1, t.shape[1])


def _like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``t`` with the strides of ``ref`` (a no-op where an elementwise operation already kept them)."""
    return t if t.stride() == ref.stride() else torch.empty_like(ref, dtype=t.dtype).copy_(t)


def _stats_nhwc(x: torch.Tensor, groups: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """As :func:`_stats` for channels-innermost input: per-channel sums over the pixels, then per group."""
    n, c = x.shape[:2]
    xv = _channels_last_view(x)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    count = (c // groups) * xv.shape[1]
    s1 = xv.sum(1, dtype=acc).view(n, groups, -1).sum(-1)  # [N, G]
    s2 = torch.linalg.vector_norm(xv, 2, dim=1, dtype=acc).square().view(n, groups, -1).sum(-1)
    mean = s1 / count
    var = (s2 / count - mean.square()).clamp_min(0)
    return mean, torch.rsqrt(var + eps)


class _SplitGroupNormNHWC(torch.autograd.Function):
    """Channels-innermost input and output (:func:`_channels_last`); every [N, C]-sized quantity in fp32 (fp64
    for fp64 input)."""

    @staticmethod
    def forward(ctx, x, weight, bias, groups: int, eps: float):
        return _like(_forward(ctx, x, weight, bias, groups, _stats_nhwc(x, groups, eps)), x)

    @staticmethod
    def backward(ctx, dy):
        # With x̂ = (x - μ) r per group of D = C/G * H*W values, y = w x̂ + b, per-channel sums over H*W
        # S_c = Σ dy and P_c = Σ dy x, and per group A = Σ_c w_c S_c / D, B = r Σ_c w_c (P_c - μ S_c) / D:
        #   dx = r w_c dy - r A - r x̂ B = (r w_c) dy + (-r² B) x + (-r A + r² B μ)
        #   dw_c = Σ_n r (P_c - μ S_c),  db_c = Σ_n S_c.
        x, weight, mean, rstd = ctx.saved_tensors
        groups = ctx.groups
        n, c = x.shape[:2]
        per = c // groups
        acc = mean.dtype
        dy = _like(dy, x)
        dyv, xv = _channels_last_view(dy), _channels_last_view(x)
        s = dyv.sum(1, dtype=acc)  # [N, C]
        p = (dyv * xv).sum(1, dtype=acc)
        w = weight.to(acc) if weight is not None else torch.ones(c, dtype=acc, device=x.device)
        count = per * xv.shape[1]
        a_g = (w * s).view(n, groups, per).sum(-1) / count  # [N, G]
        b_g = rstd * (w * (p - mean.repeat_interleave(per, dim=1) * s)).view(n, groups, per).sum(-1) / count
        c2 = -rstd.square() * b_g
        c3 = -rstd * a_g - c2 * mean
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            a = rstd.repeat_interleave(per, dim=1) * w
            view = (n, c) + (1,) * (x.dim() - 2)
            xc = torch.addcmul(c3.repeat_interleave(per, dim=1).to(x.dtype).view(view), x,
                               c2.repeat_interleave(per, dim=1).to(x.dtype).view(view))  # fmt: skip
            dx = _like(torch.addcmul(xc, dy, a.to(x.dtype).view(view)), x)
        if weight is not None and ctx.needs_input_grad[1]:
            dw = (rstd.repeat_interleave(per, dim=1) * (p - mean.repeat_interleave(per, dim=1) * s)).sum(0)
            dw = dw.to(weight.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            db = s.sum(0).to(ctx.bias_dtype)
        return dx, dw, db, None, None


def split_group_norm(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``F.group_norm`` with split reductions (see the module doc). Same arguments and results."""
    if x.dim() < 2 or x.shape[1] % num_groups != 0:
        return F.group_norm(x, num_groups, weight, bias, eps)  # its own error message
    if x.numel() == 0:
        return F.group_norm(x, num_groups, weight, bias, eps)
    if x.is_contiguous():
        return _SplitGroupNorm.apply(x, weight, bias, num_groups, eps)
    if _channels_last(x):
        return _SplitGroupNormNHWC.apply(x, weight, bias, num_groups, eps)
    return F.group_norm(x, num_groups, weight, bias, eps)


class SplitGroupNorm(torch.nn.GroupNorm):
    """``torch.nn.GroupNorm`` whose forward is :func:`split_group_norm` (same parameters and state dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return split_group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


def use_split_group_norm(module: torch.nn.Module) -> int:
    """Turn every ``torch.nn.GroupNorm`` under ``module`` into a :class:`SplitGroupNorm`, in place (parameters
    kept). Returns how many were changed."""
    count = 0
    for m in module.modules():
        if type(m) is torch.nn.GroupNorm:
            m.__class__ = SplitGroupNorm
            count += 1
    return count
