# SPDX-License-Identifier: Apache-2.0
"""fastdream.guidance.groupnorm against torch.nn.functional.group_norm: values, every gradient, gradcheck,
awkward shapes, layouts that fall back, NaN, empty input, and a whole diffusers VAE encoder."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastdream.guidance.groupnorm import SplitGroupNorm, split_group_norm, use_split_group_norm

SHAPES = [  # (shape, groups)
    ((1, 6, 5, 7), 3),
    ((2, 32, 17, 9), 8),
    ((3, 4, 11), 2),  # 1-D spatial
    ((1, 8, 3, 4, 5), 4),  # 3-D spatial
    ((2, 5, 1, 1), 5),  # one value per group
]


def _inputs(shape, dtype, seed=0, affine=True):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 1.5).to(dtype)
    c = shape[1]
    w = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(dtype) if affine else None
    b = torch.randn(c, generator=g, dtype=torch.float64).to(dtype) if affine else None
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return x, w, b, dy


def _run(fn, x, w, b, dy, groups):
    leaves = [t.clone().requires_grad_(True) if t is not None else None for t in (x, w, b)]
    y = fn(leaves[0], groups, leaves[1], leaves[2], 1e-5)
    y.backward(dy)
    return y.detach(), [t.grad if t is not None else None for t in leaves]


@pytest.mark.parametrize("shape, groups", SHAPES)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_group_norm_values_and_gradients(shape, groups, affine, dtype):
    x, w, b, dy = _inputs(shape, dtype, affine=affine)
    y_ref, g_ref = _run(F.group_norm, x, w, b, dy, groups)
    y, g = _run(split_group_norm, x, w, b, dy, groups)
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-10}
    torch.testing.assert_close(y, y_ref, **tol)
    for got, want in zip(g, g_ref):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, **tol)


CL_SHAPES = [  # 4-D: channels_last; 3-D and 5-D: channels innermost too ([N, C, H*W] in diffusers' attention)
    ((1, 6, 5, 7), 3),
    ((2, 32, 17, 9), 8),
    ((2, 5, 1, 1), 5),
    ((3, 8, 1, 13), 1),
    ((1, 4, 6, 2), 4),
    ((2, 12, 97), 4),
    ((1, 8, 3, 4, 5), 2),
]


def _channels_innermost(t: torch.Tensor) -> torch.Tensor:
    return t.movedim(1, -1).contiguous().movedim(-1, 1)


def _is_nhwc_path(t: torch.Tensor) -> bool:
    return t.grad_fn is not None and "NHWC" in type(t.grad_fn).__name__


@pytest.mark.parametrize("shape, groups", CL_SHAPES)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_channels_last_matches_group_norm_and_stays_channels_last(shape, groups, affine, dtype):
    """channels_last input takes the NHWC path (no copy to NCHW): values and every gradient as group_norm's on
    the same input, and the output and the input's gradient keep the input's layout."""
    x, w, b, dy = _inputs(shape, dtype, seed=1, affine=affine)
    x, dy = _channels_innermost(x), _channels_innermost(dy)
    y_ref, g_ref = _run(F.group_norm, x, w, b, dy, groups)
    leaves = [t.clone().requires_grad_(True) if t is not None else None for t in (x, w, b)]
    y = split_group_norm(leaves[0], groups, leaves[1], leaves[2], 1e-5)
    if not x.is_contiguous():  # shapes with one pixel are both layouts at once: the NCHW path takes them
        assert _is_nhwc_path(y)
        assert y.stride() == x.stride()
    y.backward(dy)
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-10}
    torch.testing.assert_close(y.detach(), y_ref, **tol)
    for got, want in zip([t.grad if t is not None else None for t in leaves], g_ref):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, **tol)
    if not x.is_contiguous():
        assert leaves[0].grad.stride() == x.stride()


def test_channels_last_gradcheck_and_gradgrad_free_of_nchw_copies():
    x, w, b, _ = _inputs((2, 6, 3, 4), torch.float64, seed=4)
    args = [x.to(memory_format=torch.channels_last).requires_grad_(True)] + [
        t.clone().requires_grad_(True) for t in (w, b)
    ]
    assert torch.autograd.gradcheck(lambda x, w, b: split_group_norm(x, 3, w, b, 1e-5), args)


def test_channels_last_mean_far_from_zero_and_only_input_gradient():
    """Groups whose mean is 100 standard deviations from zero (E[x^2] - mean^2 from fp32 sums: the documented
    trade-off, errors ~1e-3): the NHWC path's error against float64 is that of the NCHW split path (within 2x),
    with a frozen weight and bias (the VAE's case: only the input's gradient)."""
    x, w, b, dy = _inputs((1, 8, 9, 7), torch.float64, seed=2)
    x = x + 300.0
    a = x.clone().requires_grad_(True)
    y64 = F.group_norm(a, 4, w, b)
    y64.backward(dy)
    errs = {}
    for layout in (torch.contiguous_format, torch.channels_last):
        c = x.float().to(memory_format=layout).requires_grad_(True)
        y = split_group_norm(c, 4, w.float(), b.float())
        assert _is_nhwc_path(y) == (layout == torch.channels_last)
        y.backward(dy.float())
        errs[layout] = ((y.double() - y64).abs().max().item(), (c.grad.double() - a.grad).abs().max().item())
    for nhwc, nchw in zip(errs[torch.channels_last], errs[torch.contiguous_format]):
        assert nhwc <= 2 * nchw + 1e-5


def test_gradcheck_float64():
    x, w, b, _ = _inputs((2, 6, 3, 4), torch.float64, seed=3)
    args = [t.clone().requires_grad_(True) for t in (x, w, b)]
    assert torch.autograd.gradcheck(lambda x, w, b: split_group_norm(x, 3, w, b, 1e-5), args)


def test_other_layouts_fall_back_with_same_values():
    x, w, b, _ = _inputs((2, 8, 6, 5), torch.float32)
    t = x.transpose(2, 3)  # neither NCHW nor channels_last
    y = split_group_norm(t.requires_grad_(True), 4, w, b)
    assert not _is_nhwc_path(y) and "Split" not in type(y.grad_fn).__name__
    torch.testing.assert_close(y, F.group_norm(x.transpose(2, 3), 4, w, b))
    x3 = x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)[..., :4]  # a channels_last slice: not dense
    torch.testing.assert_close(split_group_norm(x3, 4, w, b), F.group_norm(x3, 4, w, b))


def test_nan_stays_in_its_group_empty_input_and_bad_groups():
    x, w, b, _ = _inputs((1, 4, 3, 3), torch.float32)
    x[0, 0, 1, 1] = float("nan")
    y = split_group_norm(x, 2, w, b)
    assert torch.isnan(y[0, :2]).all() and torch.isfinite(y[0, 2:]).all()
    empty = torch.zeros(0, 4, 3, 3)
    assert split_group_norm(empty, 2, w, b).shape == empty.shape
    with pytest.raises(RuntimeError):  # group_norm's own message: channels not divisible by groups
        split_group_norm(torch.zeros(1, 5, 2, 2), 2)


def test_module_swap_keeps_parameters_and_matches_a_diffusers_vae():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
    ).eval()
    x = torch.rand(1, 3, 24, 40) * 2 - 1
    a = x.clone().requires_grad_(True)
    ref = vae.encode(a).latent_dist.mean
    ref.square().sum().backward()
    state = {k: v.clone() for k, v in vae.state_dict().items()}
    n = use_split_group_norm(vae.encoder)
    assert n == sum(isinstance(m, torch.nn.GroupNorm) for m in vae.encoder.modules()) and n >= 5
    assert all(isinstance(m, SplitGroupNorm) for m in vae.encoder.modules() if isinstance(m, torch.nn.GroupNorm))
    assert all(torch.equal(state[k], v) for k, v in vae.state_dict().items())
    bb = x.clone().requires_grad_(True)
    out = vae.encode(bb).latent_dist.mean
    out.square().sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(bb.grad, a.grad, rtol=1e-3, atol=1e-5)
    # The whole encoder in channels_last (fastdream bench --vae-layout channels_last): every GroupNorm on the NHWC
    # path (no copy to NCHW), the same latents and input gradient.
    vae = vae.to(memory_format=torch.channels_last)
    seen = []
    hooks = [
        m.register_forward_hook(lambda m, i, o: seen.append(_is_nhwc_path(o)))
        for m in vae.encoder.modules()
        if isinstance(m, SplitGroupNorm)
    ]
    cl = x.clone().to(memory_format=torch.channels_last).requires_grad_(True)
    out = vae.encode(cl).latent_dist.mean
    out.square().sum().backward()
    for h in hooks:
        h.remove()
    assert len(seen) == n and all(seen)  # the attention's norm too: its [N, C, H*W] view is channels-innermost
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cl.grad, a.grad, rtol=1e-3, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 on CUDA")
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cuda_fp16_error_within_twice_pytorchs_own(layout):
    x, w, b, dy = _inputs((1, 128, 96, 80), torch.float64, seed=5)
    y64, g64 = _run(F.group_norm, x, w, b, dy, 32)
    half = [t.cuda().half() for t in (x, w, b, dy)]
    if layout == "channels_last":
        half[0], half[3] = (t.to(memory_format=torch.channels_last) for t in (half[0], half[3]))
    y_pt, g_pt = _run(F.group_norm, *half, 32)
    y_sp, g_sp = _run(split_group_norm, *half, 32)

    def err(a, ref):
        return (a.double().cpu() - ref).abs().max().item()

    assert err(y_sp, y64) <= 2 * err(y_pt, y64) + 1e-3
    for sp, pt, ref in zip(g_sp, g_pt, g64):
        assert err(sp, ref) <= 2 * err(pt, ref) + 1e-3
