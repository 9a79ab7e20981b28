# SPDX-License-Identifier: Apache-2.0
"""Ray marching: the reference's geometry, then every usable implementation against the reference."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastdream.ops import (
    OccupancyGrid,
    RaySamples,
    _dispatch,
    march_rays,
    march_rays_padded,
    march_rays_reference,
    ray_sphere,
    use_backend,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _backend_params(op: str) -> list:
    params = [
        pytest.param(d, b, id=f"{d}-{b}")
        for d in DEVICES
        for b in sorted(_dispatch.usable_backends(op, torch.device(d)))
        if b != "reference"
    ]
    return params or [pytest.param("cpu", "none", marks=pytest.mark.skip(reason=f"no fast backend for {op} here"))]


BACKENDS = _backend_params("march_rays")
CPU_BACKENDS = sorted(_dispatch.usable_backends("march_rays", torch.device("cpu")))  # reference included
CPU_FAST = [b for b in CPU_BACKENDS if b != "reference"]


def _rays(n: int, seed: int = 0, device: str = "cpu", inside: bool = False):
    """Rays from a shell of radius 2..3 towards points near the origin (most hit, some miss)."""
    g = torch.Generator().manual_seed(seed)
    o = torch.nn.functional.normalize(torch.randn(n, 3, generator=g), dim=-1) * (2 + torch.rand(n, 1, generator=g))
    if inside:
        o = o * 0.3
    target = torch.randn(n, 3, generator=g) * 0.6
    d = target - o
    return o.to(device), d.to(device)


def _blob_grid(device: str = "cpu", res: int = 32) -> OccupancyGrid:
    grid = OccupancyGrid(resolution=res).to(device)
    grid.update(lambda x: 50.0 * ((x - 0.2).norm(dim=-1) < 0.45).float(), warmup=True)
    return grid


def _assert_same(a: RaySamples, b: RaySamples, exact: bool) -> None:
    """Identical samples (``exact``: the CPU loop does the reference's float32 operations in the same order), or on
    CUDA (fast-math sqrt and division) the same samples up to float tolerance, allowing a ray's count to differ by
    one where its last step lands within rounding of the sphere (at most 1% of the rays)."""
    a, b = (
        RaySamples(*(x.cpu() for x in (r.ray_indices, r.t_starts, r.t_ends, r.positions, r.directions, r.offsets)))
        for r in (a, b)
    )
    for name in ("t_starts", "t_ends", "positions", "directions"):
        assert getattr(a, name).dtype == getattr(b, name).dtype == torch.float32, name
    if exact:
        assert torch.equal(a.offsets, b.offsets), "offsets differ"
        assert torch.equal(a.ray_indices, b.ray_indices), "ray_indices differ"
        for name in ("t_starts", "t_ends", "positions", "directions"):
            torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0, msg=name)
        return
    ca, cb = a.offsets.diff(), b.offsets.diff()
    assert (ca - cb).abs().le(1).all() and int((ca != cb).sum()) <= 0.01 * ca.numel(), "counts differ"
    k = torch.minimum(ca, cb)  # compare the first min(count) samples of every ray
    ray = torch.repeat_interleave(torch.arange(k.numel()), k)
    local = torch.arange(int(k.sum())) - torch.repeat_interleave(torch.cumsum(k, 0) - k, k)
    ia, ib = a.offsets[ray] + local, b.offsets[ray] + local
    for name in ("t_starts", "t_ends", "positions", "directions"):
        torch.testing.assert_close(getattr(a, name)[ia], getattr(b, name)[ib], rtol=1e-5, atol=1e-5, msg=name)


def _check_invariants(s: RaySamples, rays_o: torch.Tensor, bound: float = 1.0) -> None:
    r = rays_o.shape[0]
    assert s.offsets.shape == (r + 1,) and s.offsets[0] == 0 and s.offsets[-1] == s.n_samples
    counts = s.offsets[1:] - s.offsets[:-1]
    assert torch.equal(s.ray_indices, torch.repeat_interleave(torch.arange(r, device=counts.device), counts))
    assert (s.t_ends > s.t_starts).all()
    assert (s.t_starts >= 0).all()
    assert (s.positions.norm(dim=-1) <= bound * (1 + 1e-5)).all()
    mid = s.t_mids
    torch.testing.assert_close(s.positions, rays_o[s.ray_indices] + s.directions * mid[:, None], rtol=1e-5, atol=1e-5)
    same_ray = s.ray_indices[1:] == s.ray_indices[:-1]
    assert (s.t_starts[1:][same_ray] >= s.t_ends[:-1][same_ray] - 1e-6).all()


# --- the reference's geometry ---------------------------------------------------------------------------------


def test_ray_sphere_hits_misses_and_inside():
    o = torch.tensor([[0.0, 0.0, 3.0], [0.0, 2.0, 3.0], [0.0, 0.0, 0.5], [0.0, 0.0, 3.0], [0.0, 0.0, 3.0]])
    d = torch.tensor([[0.0, 0.0, -2.0], [0.0, 0.0, -1.0], [0.0, 0.0, -1.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    t_near, t_far, hit = ray_sphere(o, d, 1.0)
    assert hit.tolist() == [True, False, True, False, False]
    torch.testing.assert_close(t_near[[0, 2]], torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(t_far[[0, 2]], torch.tensor([4.0, 1.5]))


def test_fixed_step_spans_diameter_in_128_samples():
    s = march_rays_reference(torch.tensor([[0.0, 0.0, 3.0]]), torch.tensor([[0.0, 0.0, -1.0]]))
    assert s.n_samples == 128
    torch.testing.assert_close(s.t_starts[0], torch.tensor(2.0))
    torch.testing.assert_close(s.t_ends[-1], torch.tensor(4.0))
    torch.testing.assert_close(s.deltas, torch.full((128,), 1 / 64), rtol=1e-4, atol=1e-5)


def test_cone_angle_grows_steps_and_clamps():
    o, d = torch.tensor([[0.0, 0.0, 3.0]]), torch.tensor([[0.0, 0.0, -1.0]])
    s = march_rays_reference(o, d, cone_angle=0.02, max_step=0.07)
    assert s.n_samples < 128
    interior = s.deltas[:-1]  # the last interval is cut at the sphere
    torch.testing.assert_close(interior, (s.t_starts[:-1] * 0.02).clamp(1 / 64, 0.07), rtol=1e-5, atol=1e-6)
    assert interior.max() > 1 / 64


def test_max_samples_per_ray_keeps_the_front():
    o, d = torch.tensor([[0.0, 0.0, 3.0]]), torch.tensor([[0.0, 0.0, -1.0]])
    s = march_rays_reference(o, d, max_samples_per_ray=10)
    assert s.n_samples == 10 and float(s.t_starts[0]) == 2.0
    assert march_rays_reference(o, d, max_samples_per_ray=0).n_samples == 0


def test_grid_skips_empty_cells_and_keeps_occupied_ones():
    o, d = _rays(200)
    grid = _blob_grid()
    full = march_rays_reference(o, d)
    s = march_rays_reference(o, d, grid)
    _check_invariants(s, o)
    assert 0 < s.n_samples < full.n_samples
    assert grid.occupied_at(s.positions).all()
    dropped = ~grid.occupied_at(full.positions)
    assert int(dropped.sum()) == full.n_samples - s.n_samples


def test_jitter_is_reproducible_and_within_first_step():
    o, d = _rays(50)
    a = march_rays_reference(o, d, jitter=True, generator=torch.Generator().manual_seed(3))
    b = march_rays_reference(o, d, jitter=True, generator=torch.Generator().manual_seed(3))
    _assert_same(a, b, exact=True)
    t_near, _, hit = ray_sphere(o, d)
    first = a.t_starts[a.offsets[:-1][hit & (a.offsets[1:] > a.offsets[:-1])]]
    near = t_near[hit & (a.offsets[1:] > a.offsets[:-1])]
    assert ((first >= near) & (first < near + 1 / 64 + 1e-6)).all()
    assert not torch.equal(first, near)


# --- every implementation against the reference ---------------------------------------------------------------


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("n", [0, 1, 97, 1025])
@pytest.mark.parametrize("with_grid", [False, True])
def test_matches_reference(device, backend, n, with_grid):
    o, d = _rays(n, seed=n, device=device)
    grid = _blob_grid(device) if with_grid else None
    ref = march_rays_reference(o, d, grid)
    with use_backend(backend):
        fast = march_rays(o, d, grid)
    _check_invariants(fast, o)
    _assert_same(fast, ref, exact=device == "cpu")


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_matches_reference_cone_jitter_inside(device, backend):
    o, d = _rays(300, seed=5, device=device, inside=True)
    kw = dict(cone_angle=0.01, max_step=0.05, step=0.01, max_samples_per_ray=100, bound=1.2)
    ref = march_rays_reference(o, d, jitter=True, generator=torch.Generator(device).manual_seed(1), **kw)
    with use_backend(backend):
        fast = march_rays(o, d, jitter=True, generator=torch.Generator(device).manual_seed(1), **kw)
    assert (ref.offsets[1:] > ref.offsets[:-1]).all()  # every ray starts inside: all get samples
    _assert_same(fast, ref, exact=device == "cpu")


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_grid_smaller_than_the_sphere_skips_points_outside_it(device, backend):
    o, d = _rays(200, seed=8, device=device)
    grid = OccupancyGrid(resolution=8, bound=0.5).to(device)  # every cell occupied, but only |x|_inf <= 0.5
    ref = march_rays_reference(o, d, grid)
    with use_backend(backend):
        fast = march_rays(o, d, grid)
    assert 0 < ref.n_samples and (ref.positions.abs() <= 0.5).all()
    _assert_same(fast, ref, exact=device == "cpu")


EDGE_BACKENDS = [pytest.param("cpu", "reference", id="cpu-reference")] + BACKENDS  # every device's fast paths too


@pytest.mark.parametrize("device,backend", EDGE_BACKENDS)
def test_every_cell_empty_gives_no_samples(device, backend):
    o, d = _rays(97, device=device)
    grid = OccupancyGrid(resolution=16).to(device)
    grid.update(lambda x: torch.zeros(x.shape[0], device=x.device), warmup=True)
    assert not grid.occupied.any()
    with use_backend(backend):
        s = march_rays(o, d, grid)
    assert s.n_samples == 0 and s.positions.shape == (0, 3)
    assert torch.equal(s.offsets.cpu(), torch.zeros(98, dtype=torch.long))


@pytest.mark.parametrize("device,backend", EDGE_BACKENDS)
def test_nan_inf_and_zero_rays_get_no_samples(device, backend):
    o, d = _rays(6, device=device)
    d[0] = float("nan")
    d[1] = float("inf")
    d[2] = 0.0
    o[3] = float("inf")
    o[4, 0] = float("nan")
    with use_backend(backend):
        s = march_rays(o, d)
    counts = (s.offsets[1:] - s.offsets[:-1]).tolist()
    assert counts[:5] == [0, 0, 0, 0, 0]
    assert torch.isfinite(s.positions).all()


@pytest.mark.parametrize("device,backend", EDGE_BACKENDS)
def test_rays_that_miss_or_point_away(device, backend):
    o = torch.tensor([[0.0, 1.5, 3.0], [0.0, 0.0, 3.0], [0.0, 0.0, 3.0]], device=device)
    d = torch.tensor([[0.0, 0.0, -1.0], [0.0, 0.0, 1.0], [0.0, 0.0, -1.0]], device=device)
    with use_backend(backend):
        s = march_rays(o, d)
    assert s.offsets.tolist() == [0, 0, 0, 128]


@pytest.mark.parametrize("device,backend", EDGE_BACKENDS)
@pytest.mark.parametrize("distance", [3.0, 1e3, 1e4, 1e5])
def test_far_origins_hit_and_miss_like_near_ones(device, backend, distance):
    """Oblique rays from ``distance`` x the bound, passing the centre at 0 .. 2 x the bound. The textbook
    discriminant (o.d)^2 - (|o|^2 - r^2) cancels in float32 from ~1e3 on (at 1e4 every ray missed, at 1e3 one
    passing at 0.99 did); the answer must not depend on how far away the camera is."""
    g = torch.Generator().manual_seed(int(distance))
    u = torch.nn.functional.normalize(torch.randn(5, 3, generator=g, dtype=torch.float64), dim=-1)
    side = torch.nn.functional.normalize(torch.linalg.cross(u, torch.randn(5, 3, generator=g, dtype=torch.float64)))
    miss = torch.tensor([0.0, 0.5, 0.9, 1.1, 2.0], dtype=torch.float64)  # closest approach to the centre
    o = (-distance * u + miss[:, None] * side).float().to(device)
    d = u.float().to(device)
    chord = 2 * (1 - miss.clamp_max(1) ** 2).sqrt()
    t_near, t_far, hit = ray_sphere(o, d)
    assert hit.tolist() == [True, True, True, False, False]
    ulp = distance * 2.0**-23
    torch.testing.assert_close(t_near.cpu()[:3].double(), distance - chord[:3] / 2, rtol=0, atol=8 * ulp + 1e-5)
    with use_backend(backend):
        s = march_rays(o, d)
    counts = (s.offsets[1:] - s.offsets[:-1]).cpu()
    expected = torch.ceil(chord * 64)
    assert ((counts - expected).abs() <= 2).all(), (counts.tolist(), expected.tolist())
    assert (s.positions.norm(dim=-1) <= 1.0 + 16 * ulp + 1e-5).all()


# An origin 3e5 from the sphere, aimed at it: t + step rounds back to t there (with the textbook discriminant the
# hit was also spurious and wide).
FAR_O, FAR_D = [-118493.90625, 206870.015625, 182109.796875], [118494.0546875, -206869.671875, -182109.625]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("with_grid", [False, True])
def test_far_away_ray_terminates_without_degenerate_samples(backend, with_grid):
    """The march must stop where t stops moving (it looped forever with a grid) and emit no zero-length samples
    outside the sphere (it emitted max_samples_per_ray of them without one). In a subprocess: a hang fails."""
    import subprocess
    import sys

    script = f"""
import torch
from fastdream.ops import OccupancyGrid, march_rays, use_backend
grid = OccupancyGrid(resolution=8) if {with_grid} else None
with use_backend({backend!r}):
    s = march_rays(torch.tensor([{FAR_O}]), torch.tensor([{FAR_D}]), grid)
assert (s.t_ends > s.t_starts).all(), "zero-length samples"
assert (s.positions.norm(dim=-1) <= 1.0 + 1e-5).all(), "samples outside the sphere"
print("ok", s.n_samples)
"""
    try:
        res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("march_rays did not terminate on a far-away ray")
    assert res.returncode == 0 and res.stdout.startswith("ok"), res.stderr[-2000:]


# --- input checks -----------------------------------------------------------------------------------------------


def test_bad_inputs_name_the_argument():
    o, d = _rays(4)
    with pytest.raises(ValueError, match="rays_d"):
        march_rays(o, d[:3])
    with pytest.raises(ValueError, match="rays_o"):
        march_rays(o[:, :2], d)
    with pytest.raises(TypeError, match="rays_o"):
        march_rays(o.long(), d)
    with pytest.raises(TypeError, match="rays_d"):
        march_rays(o, d.numpy())
    with pytest.raises(ValueError, match="rays_o"):
        march_rays(o.to_sparse(), d)
    with pytest.raises(ValueError, match="step"):
        march_rays(o, d, step=0.0)
    with pytest.raises(ValueError, match="max_samples_per_ray"):
        march_rays(o, d, max_samples_per_ray=-1)
    with pytest.raises(ValueError, match="cone_angle"):
        march_rays(o, d, cone_angle=-1.0)
    with pytest.raises(ValueError, match="bound"):
        march_rays(o, d, bound=float("nan"))
    with pytest.raises(TypeError, match="grid"):
        march_rays(o, d, grid="grid")
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="rays_d"):
            march_rays(o, d.cuda())


# --- properties -------------------------------------------------------------------------------------------------


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(0, 40),
    seed=st.integers(0, 2**16),
    step=st.floats(0.005, 0.2),
    cone=st.sampled_from([0.0, 0.004, 0.05]),
    inside=st.booleans(),
    jitter=st.booleans(),
)
def test_property_invariants_and_backends_agree(n, seed, step, cone, inside, jitter):
    o, d = _rays(n, seed=seed, inside=inside)
    grid = _blob_grid(res=16) if seed % 2 else None
    kw = dict(step=step, cone_angle=cone, jitter=jitter)
    ref = march_rays_reference(o, d, grid, generator=torch.Generator().manual_seed(seed), **kw)
    _check_invariants(ref, o)
    t_near, t_far, hit = ray_sphere(o, d)
    counts = ref.offsets[1:] - ref.offsets[:-1]
    assert (counts[~hit] == 0).all()
    if grid is None and cone == 0.0 and not jitter:
        expected = torch.ceil((t_far - t_near)[hit] / step).long().clamp_max(1024)
        assert ((counts[hit] - expected).abs() <= 1).all()  # +-1: rounding of the accumulated t at t_far
    for backend in CPU_FAST:
        with use_backend(backend):
            fast = march_rays(o, d, grid, generator=torch.Generator().manual_seed(seed), **kw)
        _assert_same(fast, ref, exact=True)
    assert math.isfinite(float(ref.t_ends.sum()))


def test_compiled_caller_gets_the_same_samples():
    o, d = _rays(40, seed=2)

    def f(o, d):
        s = march_rays(o, d)
        return s.positions.sum(0) * 2.0, s.n_samples

    torch._dynamo.reset()
    got, n = torch.compile(f, backend="eager")(o, d)
    want, m = f(o, d)
    assert n == m
    torch.testing.assert_close(got, want)


# --- a fixed output size: march_rays_padded (CUDA graphs) -----------------------------------------------------------

PADDED_BACKENDS = [pytest.param("cpu", "reference", id="cpu-reference")] + [
    pytest.param(d, b, id=f"{d}-{b}")
    for d in DEVICES
    for b in sorted(_dispatch.usable_backends("march_rays_padded", torch.device(d)))
    if b != "reference"
]


@pytest.mark.parametrize("device,backend", PADDED_BACKENDS)
@pytest.mark.parametrize("n", [0, 1, 97, 1025])
@pytest.mark.parametrize("slack", ["over", "exact", "cut", "zero"])
def test_padded_is_march_rays_cut_or_padded_to_capacity(device, backend, n, slack):
    """The same samples as march_rays (same backend, same jitter) in the first rows, zeros after them, offsets
    clamped to the capacity, and the true total (cut mid-ray, the ray at the cut keeps its first samples: the
    clamped offsets and the equal first rows say so)."""
    o, d = _rays(n, seed=n, device=device)
    grid = _blob_grid(device) if n % 2 else None
    with use_backend(backend):
        full = march_rays(o, d, grid, jitter=True, generator=torch.Generator(device).manual_seed(4))
        s_total = full.n_samples
        cap = {"over": s_total + 37, "exact": s_total, "cut": s_total // 2 + 1, "zero": 0}[slack]
        u = torch.rand(n, device=device, generator=torch.Generator(device).manual_seed(4))  # the same draw
        padded, total = march_rays_padded(o, d, grid, capacity=cap, jitter=u)
    assert total.device == o.device and total.dtype == torch.int64 and total.tolist() == [s_total]
    assert padded.n_samples == cap and padded.positions.shape == (cap, 3)
    assert torch.equal(padded.offsets, full.offsets.clamp_max(cap))
    k = min(cap, s_total)
    for name in ("ray_indices", "t_starts", "t_ends", "positions", "directions"):
        got, want = getattr(padded, name), getattr(full, name)
        assert torch.equal(got[:k], want[:k]), name
        assert not got[k:].any(), f"{name}: padding rows must be zeros"


@pytest.mark.parametrize("device,backend", PADDED_BACKENDS)
def test_padded_edge_cases(device, backend):
    with use_backend(backend):
        o, d = _rays(6, device=device)
        d[0] = float("nan")
        o[3] = float("inf")
        empty = OccupancyGrid(resolution=8).to(device)
        empty.update(lambda x: torch.zeros(x.shape[0], device=x.device), warmup=True)
        s, total = march_rays_padded(o, d, empty, capacity=16)  # every cell empty
        assert total.item() == 0 and not s.positions.any() and not s.offsets.any()
        s, total = march_rays_padded(o, d, capacity=10_000)  # NaN/inf rays: no samples, finite rows
        counts = s.offsets.diff().tolist()
        assert counts[0] == counts[3] == 0 and torch.isfinite(s.positions).all()
        none_o, none_d = torch.zeros(0, 3, device=device), torch.zeros(0, 3, device=device)
        s, total = march_rays_padded(none_o, none_d, capacity=5)  # no rays
        assert total.item() == 0 and s.offsets.tolist() == [0] and s.t_starts.shape == (5,)


def test_padded_bad_inputs_name_the_argument():
    o, d = _rays(4)
    with pytest.raises(ValueError, match="capacity"):
        march_rays_padded(o, d, capacity=-1)
    with pytest.raises(ValueError, match="capacity"):
        march_rays_padded(o, d, capacity=2.5)
    with pytest.raises(ValueError, match="jitter"):
        march_rays_padded(o, d, capacity=8, jitter=torch.zeros(3))
    with pytest.raises(ValueError, match="rays_d"):
        march_rays_padded(o, d[:3], capacity=8)


# --- audit additions --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("max_samples", [1, 2, 7])
@pytest.mark.parametrize("kw", [{}, {"cone_angle": 0.03, "step": 0.011}, {"bound": 1.7, "step": 0.037}])
def test_small_max_samples_grid_and_float64_rays_match_reference(device, backend, max_samples, kw):
    """max_samples_per_ray cutting rays through a grid (the compiled fill pass re-marches with the cut count), float64
    rays (cast once, like the reference), a bound other than the grid's; the padded march too, cut mid-ray."""
    o, d = _rays(97, seed=max_samples, device=device)
    o, d = o.double(), d.double()
    grid = _blob_grid(device, res=13)
    ref = march_rays_reference(o, d, grid, max_samples_per_ray=max_samples, **kw)
    assert ref.n_samples > 0 and ref.offsets.diff().max() == max_samples
    cap = max(ref.n_samples - 5, 0)
    with use_backend("reference"):
        pad_ref, total_ref = march_rays_padded(o, d, grid, capacity=cap, max_samples_per_ray=max_samples, **kw)
    with use_backend(backend):
        fast = march_rays(o, d, grid, max_samples_per_ray=max_samples, **kw)
        pad, total = march_rays_padded(o, d, grid, capacity=cap, max_samples_per_ray=max_samples, **kw)
    _assert_same(fast, ref, exact=device == "cpu")
    assert total.item() == total_ref.item() == ref.n_samples
    if device == "cpu":
        for name in ("ray_indices", "t_starts", "t_ends", "positions", "directions", "offsets"):
            assert torch.equal(getattr(pad, name), getattr(pad_ref, name)), name


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_one_cell_grid_and_grid_larger_than_the_sphere(device, backend):
    o, d = _rays(50, seed=3, device=device)
    for grid in (OccupancyGrid(resolution=1), OccupancyGrid(resolution=5, bound=3.0)):
        grid = grid.to(device)
        ref = march_rays_reference(o, d, grid)
        with use_backend(backend):
            fast = march_rays(o, d, grid)
        assert ref.n_samples > 0
        _assert_same(fast, ref, exact=device == "cpu")
