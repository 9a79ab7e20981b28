# SPDX-License-Identifier: Apache-2.0
"""fastdream against its peers on the same machine, in the same run, on the same inputs.

- nerfacc (>= 0.5, ``OccGridEstimator``): occupancy-grid ray marching, and volume rendering forward+backward of
  the same packed samples, against ``march_rays`` and ``composite``;
- tiny-cuda-nn (``tinycudann``): the multiresolution hash grid forward+backward against ``hash_encode`` at the
  same configuration (16 levels, 2 features, 2**19 entries, 16..2048);
- the pure-PyTorch hash grid (fastdream's reference) is in the same hash-grid group, as the baseline.

The peers are optional and never dependencies: a comparison is skipped, with the reason, where the peer does not
import or has no kernels for the device (both are CUDA-only). Each peer test records ``fastdream_ms``, ``peer_ms``
and ``peer_over_fastdream`` (> 1: fastdream is faster) in ``extra_info`` and prints the ratio, so the JSON
report holds ratios, not only times.
"""

from __future__ import annotations

import importlib
import statistics
import time

import pytest
import torch
from conftest import bench_device, run_timed

from fastdream.cameras import get_rays, orbit_cameras
from fastdream.ops import HashGridConfig, OccupancyGrid, composite, hash_encode, march_rays, use_backend

pytest.importorskip("pytest_benchmark")

DEVICE = bench_device()
GRID_RES = 128
STEP = 2.0 / 128  # marching step: 128 samples across the bounding sphere's diameter
N_POINTS = 2**20
HASH = HashGridConfig()


def _peer(name: str):
    """The peer module, or a pytest skip saying why it cannot be compared here."""
    try:
        mod = importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - a broken install is a reason to skip, whatever it raises
        pytest.skip(f"{name} does not import here ({type(e).__name__}: {e}); pip install it to compare")
    if DEVICE.type != "cuda":
        pytest.skip(f"{name}'s kernels are CUDA-only; run on a GPU machine")
    return mod


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _median_ms(fn, reps: int = 20) -> float:
    fn()
    times = []
    for _ in range(reps):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _record(benchmark, ours, theirs, what: str) -> None:
    a, b = _median_ms(ours), _median_ms(theirs)
    benchmark.extra_info.update(fastdream_ms=a, peer_ms=b, peer_over_fastdream=b / a)
    print(f"\n{what}: fastdream {a:.3f} ms, peer {b:.3f} ms, peer/fastdream = {b / a:.2f}x")


# --- shared inputs -----------------------------------------------------------------------------------------------


def _scene():
    """Rays of 4 cameras at 128x128 and a grid occupied inside the sphere of radius 0.6 (symmetric under axis
    permutations, so nerfacc's and fastdream's cell orderings hold the same occupancy)."""
    rays_o, rays_d = get_rays(orbit_cameras(4), 128, 128)
    grid = OccupancyGrid(GRID_RES, bound=1.0, step=STEP)
    centers = grid.cell_centers(torch.arange(grid.n_cells))
    grid.occupied.copy_(centers.norm(dim=-1) < 0.6)
    return rays_o.to(DEVICE), rays_d.to(DEVICE), grid.to(DEVICE)


def _nerfacc_estimator(nerfacc, grid: OccupancyGrid):
    if not hasattr(nerfacc, "OccGridEstimator"):
        pytest.skip(f"nerfacc {getattr(nerfacc, '__version__', '?')} has no OccGridEstimator (needs >= 0.5)")
    aabb = torch.tensor([-1.0, -1.0, -1.0, 1.0, 1.0, 1.0], device=DEVICE)
    est = nerfacc.OccGridEstimator(roi_aabb=aabb, resolution=GRID_RES, levels=1).to(DEVICE)
    est.binaries.copy_(grid.occupied.view(1, GRID_RES, GRID_RES, GRID_RES))
    return est


# --- marching ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("provider", ["fastdream", "nerfacc"])
def test_peer_march(benchmark, provider):
    nerfacc = _peer("nerfacc")
    rays_o, rays_d, grid = _scene()
    est = _nerfacc_estimator(nerfacc, grid)

    def ours():
        return march_rays(rays_o, rays_d, grid, step=STEP, bound=1.0)

    def theirs():
        return est.sampling(rays_o, rays_d, render_step_size=STEP, near_plane=0.0, far_plane=1e10)

    benchmark.group = f"peers: occupancy-grid marching {rays_o.shape[0]} rays, grid {GRID_RES}^3"
    s_ours, s_theirs = ours().n_samples, theirs()[1].shape[0]
    benchmark.extra_info.update(samples=s_ours if provider == "fastdream" else s_theirs)
    # Same occupancy, same step: the sample counts differ only at cell borders and by the sphere vs box clip.
    assert abs(s_ours - s_theirs) <= 0.1 * max(s_ours, s_theirs)
    if provider == "nerfacc":
        _record(benchmark, ours, theirs, "marching")
    run_timed(benchmark, ours if provider == "fastdream" else theirs)


# --- rendering (compositing) -------------------------------------------------------------------------------------


@pytest.mark.parametrize("provider", ["fastdream", "nerfacc"])
def test_peer_render_forward_backward(benchmark, provider):
    nerfacc = _peer("nerfacc")
    rays_o, rays_d, grid = _scene()
    samples = march_rays(rays_o, rays_d, grid, step=STEP, bound=1.0)
    n_rays, s = rays_o.shape[0], samples.n_samples
    g = torch.Generator(device=DEVICE).manual_seed(0)
    sigmas = (torch.rand(s, device=DEVICE, generator=g) * 20).requires_grad_()
    rgbs = torch.rand(s, 3, device=DEVICE, generator=g).requires_grad_()
    bg = torch.ones(n_rays, 3, device=DEVICE)
    grad = torch.rand(n_rays, 3, device=DEVICE, generator=g)

    def ours():
        sigmas.grad = rgbs.grad = None
        out = composite(sigmas, rgbs, samples, n_rays, background=bg)
        out.image.backward(grad)
        return out.image

    def theirs():
        sigmas.grad = rgbs.grad = None
        color, _, _, _ = nerfacc.rendering(
            samples.t_starts,
            samples.t_ends,
            samples.ray_indices,
            n_rays=n_rays,
            rgb_sigma_fn=lambda t0, t1, ri: (rgbs, sigmas),
            render_bkgd=bg,
        )
        color.backward(grad)
        return color

    benchmark.group = f"peers: rendering forward+backward {s} samples"
    # Same maths (nerfacc has no early stop by default; fastdream stops below T = 1e-4): same image.
    torch.testing.assert_close(ours().detach(), theirs().detach(), atol=2e-3, rtol=0)
    if provider == "nerfacc":
        _record(benchmark, ours, theirs, "rendering fwd+bwd")
    run_timed(benchmark, ours if provider == "fastdream" else theirs)


# --- hash grid ---------------------------------------------------------------------------------------------------


def _tcnn_encoding(tcnn):
    return tcnn.Encoding(
        3,
        {
            "otype": "HashGrid",
            "n_levels": HASH.levels,
            "n_features_per_level": HASH.features,
            "log2_hashmap_size": HASH.log2_table_size,
            "base_resolution": HASH.base_resolution,
            "per_level_scale": HASH.growth,
        },
    )


@pytest.mark.parametrize("provider", ["fastdream", "fastdream-reference", "tinycudann"])
def test_peer_hash_grid_forward_backward(benchmark, provider):
    tcnn = _peer("tinycudann")
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.rand(N_POINTS, 3, device=DEVICE, generator=g) * 2 - 1  # world coordinates in [-1, 1]
    x01 = (x + 1) / 2  # tiny-cuda-nn's input domain
    table = torch.rand(HASH.levels, HASH.table_size, HASH.features, device=DEVICE, generator=g) * 2e-4 - 1e-4
    table.requires_grad_()
    grad = torch.randn(N_POINTS, HASH.out_dim, device=DEVICE, generator=g)
    enc = _tcnn_encoding(tcnn).to(DEVICE)

    def ours(backend=None):
        def run():
            table.grad = None
            with use_backend(backend):
                hash_encode(x, table, HASH).backward(grad)
            return table.grad

        return run

    def theirs():
        enc.zero_grad(set_to_none=True)
        out = enc(x01)  # fp16 out by default: tiny-cuda-nn's fast path
        out.backward(grad.to(out.dtype))
        return enc.params.grad

    benchmark.group = f"peers: hash grid forward+backward N={N_POINTS} L={HASH.levels} T={HASH.log2_table_size}"
    fn = {"fastdream": ours(), "fastdream-reference": ours("reference"), "tinycudann": theirs}[provider]
    if provider == "tinycudann":
        _record(benchmark, ours(), theirs, "hash grid fwd+bwd")
    run_timed(benchmark, fn)
