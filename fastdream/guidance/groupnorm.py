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
negligible unless a group's mean is hundreds of standard deviations from zero. Inputs that are not
contiguous NCHW (e.g. channels_last) fall back to ``torch.nn.functional.group_norm``.

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


class _SplitGroupNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, groups: int, eps: float):
        n, c = x.shape[:2]
        mean, rstd = _stats(x, groups, eps)  # [N, G]
        per = c // groups
        w = weight.to(mean.dtype) if weight is not None else torch.ones(c, dtype=mean.dtype, device=x.device)
        b = bias.to(mean.dtype) if bias is not None else torch.zeros(c, dtype=mean.dtype, device=x.device)
        rstd_c = rstd.repeat_interleave(per, dim=1)  # [N, C]
        mean_c = mean.repeat_interleave(per, dim=1)
        scale = rstd_c * w
        shift = b - mean_c * scale
        view = (n, c) + (1,) * (x.dim() - 2)
        y = torch.addcmul(shift.to(x.dtype).view(view), x, scale.to(x.dtype).view(view))
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.groups = groups
        ctx.has_bias = bias is not None
        return y

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
            ctx.has_bias and ctx.needs_input_grad[2],
        ]
        dx, dw, db = torch.ops.aten.native_group_norm_backward(
            dy.contiguous(), x, mean.to(x.dtype), rstd.to(x.dtype), weight, n, c, hw, ctx.groups, mask
        )
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
    if not x.is_contiguous() or x.numel() == 0:
        return F.group_norm(x, num_groups, weight, bias, eps)
    return _SplitGroupNorm.apply(x, weight, bias, num_groups, eps)


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
