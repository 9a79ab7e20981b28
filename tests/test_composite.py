# SPDX-License-Identifier: Apache-2.0
"""Compositing: the reference against a per-ray loop, then every usable implementation against the reference,
outputs and gradients (sigmas, colors, background, and through the weights)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastdream.ops import RaySamples, _dispatch, composite, composite_reference, use_backend

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BACKENDS = [
    pytest.param(d, b, id=f"{d}-{b}")
    for d in DEVICES
    for b in sorted(_dispatch.usable_backends("composite", torch.device(d)))
    if b != "reference"
] or [pytest.param("cpu", "none", marks=pytest.mark.skip(reason="no fast backend for composite here"))]
CPU_FAST = sorted(b for b in _dispatch.usable_backends("composite", torch.device("cpu")) if b != "reference")


def _samples(counts: list[int] | torch.Tensor, seed: int = 0, device: str = "cpu", dtype=torch.float32) -> RaySamples:
    """Packed intervals with random positive lengths, front to back, ``counts[r]`` per ray."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.as_tensor(counts, dtype=torch.long)
    r, s = counts.numel(), int(counts.sum())
    offsets = torch.zeros(r + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(counts, 0)
    ray_indices = torch.repeat_interleave(torch.arange(r), counts)
    deltas = 0.005 + 0.03 * torch.rand(s, generator=g, dtype=torch.float64)
    local_cum = torch.cumsum(deltas, 0)
    start_of_ray = torch.cat([torch.zeros(1, dtype=torch.float64), local_cum])[offsets[:-1]][ray_indices]
    t_ends = 1.0 + local_cum - start_of_ray
    t_starts = t_ends - deltas
    pos = torch.zeros(s, 3)
    return RaySamples(
        ray_indices.to(device),
        t_starts.to(device, dtype),
        t_ends.to(device, dtype),
        pos.to(device, dtype),
        pos.to(device, dtype),
        offsets.to(device),
    )


def _inputs(n_rays: int, seed: int = 0, device: str = "cpu", dtype=torch.float32, scale: float = 30.0, c: int = 3):
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 60, (n_rays,), generator=g)
    if n_rays > 2:
        counts[0] = 0  # a ray with no samples
    s = _samples(counts, seed, device, dtype)
    sigmas = (torch.rand(s.n_samples, generator=g, dtype=dtype) * scale).to(device)
    colors = torch.rand(s.n_samples, c, generator=g, dtype=dtype).to(device)
    background = torch.rand(n_rays, c, generator=g, dtype=dtype).to(device)
    return sigmas, colors, s, background


def _loop_composite(sigmas, colors, s, background, eps=1e-4):
    """The definition, one sample at a time, in float64."""
    r = s.n_rays
    image = torch.zeros(r, colors.shape[1], dtype=torch.float64)
    opacity = torch.zeros(r, dtype=torch.float64)
    depth = torch.zeros(r, dtype=torch.float64)
    weights = torch.zeros(s.n_samples, dtype=torch.float64)
    for ray in range(r):
        trans = 1.0
        for i in range(int(s.offsets[ray]), int(s.offsets[ray + 1])):
            if trans < eps:
                break
            delta = float(s.t_ends[i] - s.t_starts[i])
            alpha = 1.0 - math.exp(-float(sigmas[i]) * delta)
            weights[i] = trans * alpha
            image[ray] += weights[i] * colors[i].double()
            opacity[ray] += weights[i]
            depth[ray] += weights[i] * 0.5 * float(s.t_starts[i] + s.t_ends[i])
            trans *= 1.0 - alpha
        image[ray] += (1.0 - opacity[ray]) * background[ray].double()
    return image, opacity, depth, weights


def _run(backend, sigmas, colors, s, background, eps=1e-4, seed=1):
    """Forward, then backward of a random linear loss on every output (weights included)."""
    sig = sigmas.detach().clone().requires_grad_()
    col = colors.detach().clone().requires_grad_()
    bg = background.detach().clone().requires_grad_()
    with use_backend(backend):
        out = composite(sig, col, s, background=bg, early_stop_eps=eps)
    g = torch.Generator().manual_seed(seed)
    loss = sum(
        (t * torch.randn(t.shape, generator=g).to(t.device, t.dtype)).sum()
        for t in (out.image, out.opacity, out.depth, out.weights)
    )
    loss.backward()
    grads = [x.grad if x.grad is not None else torch.zeros_like(x) for x in (sig, col, bg)]
    return [t.detach() for t in (out.image, out.opacity, out.depth, out.weights)] + grads


NAMES = ("image", "opacity", "depth", "weights", "grad_sigmas", "grad_colors", "grad_background")


# --- the reference ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [1e-4, 0.0, 0.3])
def test_reference_matches_the_definition(eps):
    sigmas, colors, s, bg = _inputs(13, dtype=torch.float64)
    out = composite_reference(sigmas, colors, s, background=bg, early_stop_eps=eps)
    want = _loop_composite(sigmas, colors, s, bg, eps)
    for name, a, b in zip(NAMES, (out.image, out.opacity, out.depth, out.weights), want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


def test_reference_gradcheck_float64():
    sigmas, colors, s, bg = _inputs(5, seed=2, dtype=torch.float64, scale=5.0)
    sigmas.requires_grad_()
    colors.requires_grad_()
    bg.requires_grad_()

    def f(sig, col, b):
        out = composite_reference(sig, col, s, background=b)
        return out.image, out.opacity, out.depth, out.weights

    assert torch.autograd.gradcheck(f, (sigmas, colors, bg), eps=1e-6, atol=1e-6)


def test_early_stop_zeroes_the_rest_of_the_ray():
    s = _samples([50])
    sigmas = torch.full((50,), 1e4)  # opaque from the first sample
    out = composite_reference(sigmas, torch.rand(50, 3), s, early_stop_eps=1e-4)
    assert out.weights[0] > 0.99 and (out.weights[2:] == 0).all()
    torch.testing.assert_close(out.opacity, torch.ones(1))


# --- every implementation against the reference ----------------------------------------------------------------


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("n", [0, 1, 97, 1025])
def test_matches_reference(device, backend, n):
    args = _inputs(n, seed=n, device=device)
    ref = _run("reference", *args)
    fast = _run(backend, *args)
    for name, a, b in zip(NAMES, fast, ref):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_backward_matches_float64_reference(device, backend):
    """The recompute-T backward (suffix = total - prefix) stays close to float64 autograd."""
    sigmas, colors, s, bg = _inputs(97, seed=3, device=device)
    ref = _run("reference", sigmas.double(), colors.double(), _samples_to(s, torch.float64), bg.double())
    fast = _run(backend, sigmas, colors, s, bg)
    for name, a, b in zip(NAMES, fast, ref):
        torch.testing.assert_close(a.double(), b, rtol=2e-4, atol=2e-4, msg=name)


def _samples_to(s: RaySamples, dtype) -> RaySamples:
    return RaySamples(s.ray_indices, s.t_starts.to(dtype), s.t_ends.to(dtype), s.positions, s.directions, s.offsets)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("eps", [0.0, 1e-4, 0.05])
def test_early_stop_matches_reference(device, backend, eps):
    args = _inputs(60, seed=7, device=device, scale=300.0)  # dense: most rays terminate early
    ref = _run("reference", *args, eps=eps)
    fast = _run(backend, *args, eps=eps)
    for name, a, b in zip(NAMES, fast, ref):
        # The tolerance of the other tests, not one that scales with eps: a backend stopping one sample late or
        # early differs by up to eps in a weight, and this test is there to see it.
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=name)
    if eps > 0:
        # after termination the weights are exactly zero (not merely small)
        assert int((fast[3] == 0).sum()) >= int((ref[3] == 0).sum()) * 0.95


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_single_channel_and_broadcast_background(device, backend):
    sigmas, colors, s, _ = _inputs(20, seed=4, device=device, c=1)
    bg = torch.tensor([0.25], device=device)
    with use_backend(backend):
        out = composite(sigmas, colors, s, background=bg)
    ref = composite_reference(sigmas, colors, s, background=bg)
    torch.testing.assert_close(out.image, ref.image, rtol=1e-4, atol=1e-5)


EDGE_BACKENDS = [pytest.param("cpu", "reference", id="cpu-reference")] + BACKENDS  # every device's fast paths too


def _to(s: RaySamples, device: str) -> RaySamples:
    fields = (s.ray_indices, s.t_starts, s.t_ends, s.positions, s.directions, s.offsets)
    return RaySamples(*(x.to(device) for x in fields))


@pytest.mark.parametrize("device,backend", EDGE_BACKENDS)
def test_nan_and_inf_sigmas_are_defined(device, backend):
    sigmas, colors, s, bg = _inputs(5, seed=9)
    first = int(s.offsets[1])  # ray 0 is empty: ray 1 starts here
    sigmas[first] = float("nan")
    sigmas[int(s.offsets[2])] = float("inf")
    with use_backend(backend):
        out = composite(sigmas.to(device), colors.to(device), _to(s, device), background=bg.to(device))
    opacity, image = out.opacity.cpu(), out.image.cpu()
    assert torch.isnan(opacity[1])  # NaN propagates along its own ray only
    torch.testing.assert_close(opacity[2], torch.tensor(1.0))  # an infinite density is opaque
    assert torch.isfinite(image[3:]).all() and torch.isfinite(image[0]).all()
    if backend != "reference":  # and every output and gradient is the reference's, NaN where it has NaN
        want = _run("reference", sigmas, colors, s, bg)
        got = _run(backend, sigmas.to(device), colors.to(device), _to(s, device), bg.to(device))
        for name, a, b in zip(NAMES, got, want):
            torch.testing.assert_close(a.cpu(), b, equal_nan=True, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("device,backend", EDGE_BACKENDS)
def test_no_samples_gives_background(device, backend):
    s = _to(_samples([0, 0, 0]), device)
    bg = torch.rand(3, 3, device=device)
    sig = torch.zeros(0, requires_grad=True, device=device)
    col = torch.zeros(0, 3, requires_grad=True, device=device)
    with use_backend(backend):
        out = composite(sig, col, s, background=bg)
    torch.testing.assert_close(out.image, bg)
    assert (out.opacity == 0).all() and out.weights.shape == (0,)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_offsets_past_the_samples_read_and_write_nothing_outside_them(device, backend):
    """The compiled kernels read only ``offsets`` (checking them against the samples would cost a device sync per
    step): entries below 0 or past S are clamped, so a bad ``offsets`` cannot touch memory outside the samples.
    The first and last ray then see exactly their clamped ranges, forward and backward."""
    sigmas, colors, s, bg = _inputs(6, seed=11, device=device)
    n = s.n_samples
    good = _run(backend, sigmas, colors, s, bg)
    bad = s.offsets.clone()
    bad[0], bad[-1] = -1000, n + 1000
    fields = (s.ray_indices, s.t_starts, s.t_ends, s.positions, s.directions, bad)
    out = _run(backend, sigmas, colors, RaySamples(*fields), bg)
    for name, a, b in zip(NAMES, out, good):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


# --- input checks -----------------------------------------------------------------------------------------------


def test_bad_inputs_name_the_argument():
    sigmas, colors, s, bg = _inputs(4)
    with pytest.raises(ValueError, match="colors"):
        composite(sigmas, colors[:-1], s)
    with pytest.raises(ValueError, match="sigmas"):
        composite(sigmas[:, None], colors, s)
    with pytest.raises(TypeError, match="sigmas"):
        composite(sigmas.long(), colors, s)
    with pytest.raises(ValueError, match="background"):
        composite(sigmas, colors, s, background=bg[:-1])
    with pytest.raises(ValueError, match="n_rays"):
        composite(sigmas, colors, s, n_rays=99)
    with pytest.raises(TypeError, match="offsets"):
        bad = RaySamples(s.ray_indices, s.t_starts, s.t_ends, s.positions, s.directions, s.offsets.int())
        composite(sigmas, colors, bad)
    with pytest.raises(TypeError, match="samples"):
        composite(sigmas, colors, None)
    with pytest.raises(ValueError, match="sigmas"):
        composite(sigmas.to_sparse(), colors, s)
    with pytest.raises(ValueError, match="early_stop_eps"):
        composite(sigmas, colors, s, early_stop_eps=2.0)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="colors"):
            composite(sigmas, colors.cuda(), s)


# --- properties -------------------------------------------------------------------------------------------------


@settings(max_examples=20, deadline=None)
@given(n=st.integers(0, 30), seed=st.integers(0, 2**16), scale=st.sampled_from([0.1, 10.0, 1000.0]))
def test_property_weights_bounded_and_backends_agree(n, seed, scale):
    sigmas, colors, s, bg = _inputs(n, seed=seed, scale=scale)
    ref = _run("reference", sigmas, colors, s, bg)
    assert (ref[3] >= 0).all() and (ref[1] <= 1 + 1e-6).all()
    torch.testing.assert_close(ref[1], torch.zeros(n).index_add(0, s.ray_indices, ref[3]))
    for backend in CPU_FAST:
        fast = _run(backend, sigmas, colors, s, bg)
        for name, a, b in zip(NAMES, fast, ref):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=name)


# --- torch.library registration ---------------------------------------------------------------------------------


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_custom_op_passes_opcheck(device, backend):
    from fastdream.ops.composite import _composite_op

    sigmas, colors, s, _ = _inputs(9, seed=11, device=device)
    args = (sigmas.requires_grad_(), colors.requires_grad_(), s.t_starts, s.t_ends, s.offsets, 1e-4, backend)
    torch.library.opcheck(_composite_op, args)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_torch_compile_traces_the_custom_op(device, backend):
    sigmas, colors, s, bg = _inputs(30, seed=12, device=device)

    def f(sig, col):
        with use_backend(backend):
            out = composite(sig, col, s, background=bg)
        return out.image.sum() + out.opacity.square().sum()

    sig, col = sigmas.clone().requires_grad_(), colors.clone().requires_grad_()
    f(sig, col).backward()
    sig2, col2 = sigmas.clone().requires_grad_(), colors.clone().requires_grad_()
    torch._dynamo.reset()
    torch.compile(f, backend="aot_eager")(sig2, col2).backward()
    torch.testing.assert_close(sig2.grad, sig.grad)
    torch.testing.assert_close(col2.grad, col.grad)


# --- pruning occluded samples before the field pass -------------------------------------------------------------


def _run_keyed(backend, sigmas, colors, s, background, coef, sample_idx):
    """Forward and backward of a fixed random linear loss on every output; the weights' coefficients are
    ``coef[sample_idx]``, so that a pruned run weighs each sample as the full run does."""
    sig = sigmas.detach().clone().requires_grad_()
    col = colors.detach().clone().requires_grad_()
    bg = background.detach().clone().requires_grad_()
    with use_backend(backend):
        out = composite(sig, col, s, background=bg)
    ci, co, cd, cw = coef
    loss = (out.image * ci).sum() + (out.opacity * co).sum() + (out.depth * cd).sum()
    loss = loss + (out.weights * cw[sample_idx]).sum()
    loss.backward()
    grads = [x.grad if x.grad is not None else torch.zeros_like(x) for x in (sig, col, bg)]
    return [t.detach() for t in (out.image, out.opacity, out.depth, out.weights)] + grads


def _prune_and_compare(backend, sigmas, colors, s, background, skip_rays=()):
    """Composite on all samples and on prune_occluded's subset: every output and gradient must agree (except on
    ``skip_rays``, whose full composite is NaN behind a NaN density)."""
    from fastdream.ops import prune_occluded

    kept = prune_occluded(s, sigmas)
    # The kept samples are a per-ray prefix: find them in the full set by (ray, t_start).
    key_full = s.ray_indices.double() * 1e4 + s.t_starts.double()
    key_kept = kept.ray_indices.double() * 1e4 + kept.t_starts.double()
    idx = torch.searchsorted(key_full, key_kept)
    assert torch.equal(key_full[idx], key_kept)
    g = torch.Generator().manual_seed(7)
    r = s.n_rays
    coef = [torch.randn(*shape, generator=g) for shape in ((r, 3), (r,), (r,), (s.n_samples,))]
    full = _run_keyed(backend, sigmas, colors, s, background, coef, torch.arange(s.n_samples))
    pruned = _run_keyed(backend, sigmas[idx], colors[idx], kept, background, coef, idx)
    dropped = torch.ones(s.n_samples, dtype=torch.bool)
    dropped[idx] = False
    skip = torch.zeros(r, dtype=torch.bool)
    skip[list(skip_rays)] = True
    for name, a, b in zip(NAMES, full, pruned):
        if name in ("weights", "grad_sigmas", "grad_colors"):
            assert torch.all(a[dropped & ~skip[s.ray_indices]] == 0), name  # pruning drops what compositing ignores
            a, b = a[idx][~skip[kept.ray_indices]], b[~skip[kept.ray_indices]]
        else:  # per-ray outputs
            a, b = a[~skip], b[~skip]
        assert torch.equal(torch.isnan(a), torch.isnan(b)), name
        assert torch.allclose(a.nan_to_num(), b.nan_to_num(), rtol=1e-5, atol=1e-6), name
    return kept


@pytest.mark.parametrize("backend", ["reference"] + CPU_FAST)
@pytest.mark.parametrize("n", [0, 1, 97, 1025])
def test_pruning_occluded_samples_changes_nothing(backend, n):
    sigmas, colors, s, background = _inputs(n, seed=n, scale=300.0)  # dense: most rays terminate early
    kept = _prune_and_compare(backend, sigmas, colors, s, background)
    if n >= 97:
        assert kept.n_samples < 0.5 * s.n_samples  # and it does drop the inside of opaque rays
    assert kept.offsets[-1] == kept.n_samples and (kept.offsets[1:] >= kept.offsets[:-1]).all()


@pytest.mark.parametrize("backend", ["reference"] + CPU_FAST)
def test_pruning_keeps_transparent_rays_and_handles_nan_and_inf(backend):
    from fastdream.ops import prune_occluded

    sigmas, colors, s, background = _inputs(40, seed=3, scale=0.01)  # nearly empty: nothing to drop
    assert prune_occluded(s, sigmas) is s
    sigmas, colors, s, background = _inputs(40, seed=4, scale=5.0)
    sigmas[s.offsets[5] + 2] = float("nan")
    sigmas[s.offsets[9] + 1] = float("inf")
    kept = prune_occluded(s, sigmas)
    # The NaN/inf sample stays, the rest of its ray goes, and the other rays are untouched by it.
    for r, j in ((5, 2), (9, 1)):
        assert kept.offsets[r + 1] - kept.offsets[r] == j + 1
    other = [r for r in range(40) if r not in (5, 9)]
    full_counts = (s.offsets[1:] - s.offsets[:-1])[other]
    kept_counts = (kept.offsets[1:] - kept.offsets[:-1])[other]
    assert (kept_counts <= full_counts).all() and kept_counts.sum() > 0
    _prune_and_compare(backend, sigmas, colors, s, background, skip_rays=(5,))


def test_pruning_checks_its_arguments():
    from fastdream.ops import prune_occluded

    sigmas, _, s, _ = _inputs(5)
    with pytest.raises(ValueError, match="sigmas"):
        prune_occluded(s, sigmas[:-1])
    with pytest.raises(ValueError, match="early_stop_eps"):
        prune_occluded(s, sigmas, early_stop_eps=0.0)
    with pytest.raises(ValueError, match="sigmas: expected a tensor on cpu"):  # checked before any launch
        prune_occluded(s, torch.empty_like(sigmas, device="meta"))


# --- audit additions --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference"] + CPU_FAST)
def test_samples_outside_every_ray_range_get_weight_zero(backend):
    """march_rays_padded's padding rows (ray index 0, t = 0, past offsets[-1]) go straight into composite in the
    CUDA-graph render (fastdream/render_graphs.py): they must add nothing, on every backend."""
    from fastdream.ops import march_rays, march_rays_padded

    g = torch.Generator().manual_seed(0)
    o = torch.nn.functional.normalize(torch.randn(7, 3, generator=g), dim=-1) * 2.5
    d = torch.randn(7, 3, generator=g) * 0.3 - o
    n = march_rays(o, d).n_samples
    padded, _ = march_rays_padded(o, d, capacity=n + 10)
    sig = torch.rand(n + 10, generator=g) * 20
    col = torch.rand(n + 10, 3, generator=g)
    bg = torch.rand(7, 3, generator=g)
    want = _run("cpp" if CPU_FAST else "reference", sig[:n], col[:n], _slice(padded, n), bg)
    got = _run(backend, sig, col, padded, bg)
    for name, a, b in zip(NAMES, got, want):
        if name in ("weights", "grad_sigmas", "grad_colors"):
            assert (a[n:] == 0).all(), name
            a = a[:n]
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def _slice(s: RaySamples, n: int) -> RaySamples:
    return RaySamples(s.ray_indices[:n], s.t_starts[:n], s.t_ends[:n], s.positions[:n], s.directions[:n], s.offsets)


@pytest.mark.parametrize("backend", CPU_FAST)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_colour_gradient_matches_reference(backend, value):
    """A NaN/inf colour at sample i reaches d/d sigma_k for k <= i only (w_i does not depend on sigma_k, k > i)."""
    s = _samples([4, 3])
    sig = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    col = torch.rand(7, 3, generator=torch.Generator().manual_seed(0))
    col[1, 0] = value
    bg = torch.rand(2, 3, generator=torch.Generator().manual_seed(1))
    want = _run("reference", sig, col, s, bg)
    got = _run(backend, sig, col, s, bg)
    for name, a, b in zip(NAMES, got, want):
        torch.testing.assert_close(a, b, equal_nan=True, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("backend", ["reference"] + CPU_FAST)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_colour_behind_early_stop_adds_nothing(backend, value):
    """'that sample and the ones behind it get weight 0': their colours must not reach the image (0 * inf = NaN)."""
    s = _samples([4, 3])
    sig = torch.tensor([1e4, 1.0, 1.0, 1.0, 5.0, 6.0, 7.0])  # ray 0 stops after its first sample
    col = torch.rand(7, 3, generator=torch.Generator().manual_seed(0))
    col[3, 0] = value
    with use_backend(backend):
        out = composite(sig, col, s, background=torch.zeros(2, 3))
    assert out.weights[3] == 0 and torch.isfinite(out.image).all(), out.image


@pytest.mark.parametrize("backend", CPU_FAST)
@pytest.mark.parametrize("eps", [1.0, 0.999])
@pytest.mark.parametrize("c", [0, 5])
def test_awkward_channels_eps_and_float64_inputs(backend, eps, c):
    sigmas, colors, s, bg = _inputs(31, seed=5, scale=3.0, c=c)
    ref = _run("reference", sigmas, colors, s, bg, eps=eps)
    fast = _run(backend, sigmas, colors, s, bg, eps=eps)
    for name, a, b in zip(NAMES, fast, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=name)
    args64 = (sigmas.double(), colors.double(), _samples_to(s, torch.float64), bg.double())
    ref64 = _run("reference", *args64, eps=eps)
    fast64 = _run(backend, *args64, eps=eps)  # computed in float32; the input gradients come back float64
    for name, a, b in zip(NAMES, fast64, ref64):
        torch.testing.assert_close(a.double(), b, rtol=2e-4, atol=2e-4, msg=name)
    assert fast64[4].dtype == fast64[5].dtype == torch.float64


@pytest.mark.parametrize("backend", ["reference"] + CPU_FAST)
def test_padding_rows_when_every_ray_misses(backend):
    """march_rays_padded of rays that all miss: every row is padding (offsets all 0). Zero weights and images;
    the reference's dense layout had a single column and raised an IndexError."""
    from fastdream.ops import march_rays_padded

    o = torch.tensor([[0.0, 0.0, 3.0], [3.0, 0.0, 0.0]])
    d = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # both pass outside the bounding sphere
    padded, total = march_rays_padded(o, d, capacity=8)
    assert int(total) == 0 and padded.offsets.tolist() == [0, 0, 0]
    sig, col, bg = torch.rand(8) * 5, torch.rand(8, 3), torch.rand(2, 3)
    got = _run(backend, sig, col, padded, bg)
    for name, a in zip(NAMES, got):
        if name == "grad_background":
            continue
        want = bg if name == "image" else torch.zeros_like(a)
        torch.testing.assert_close(a, want, msg=name)


@pytest.mark.parametrize("backend", ["reference"] + CPU_FAST)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_density_behind_early_stop_adds_nothing(backend, value):
    """A ray stops at its first sample with T < eps: the samples behind it get weight 0 and no gradient, whatever
    their density (the reference carried a NaN there through its running sum into every later sample)."""
    s = _samples([4, 3])
    sig = torch.tensor([1e4, value, 1.0, 1.0, 5.0, 6.0, 7.0])  # ray 0 stops after its first sample
    col = torch.rand(7, 3, generator=torch.Generator().manual_seed(0))
    bg = torch.rand(2, 3, generator=torch.Generator().manual_seed(1))
    got = _run(backend, sig, col, s, bg)
    weights, grad_sigmas, grad_colors = got[3], got[4], got[5]
    assert all(torch.isfinite(t).all() for t in got), got
    assert weights[0] > 0.99 and (weights[1:4] == 0).all()
    assert (grad_sigmas[1:4] == 0).all() and (grad_colors[1:4] == 0).all()
    if backend != "reference":
        for name, a, b in zip(NAMES, got, _run("reference", sig, col, s, bg)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
