# SPDX-License-Identifier: Apache-2.0
"""Hash-grid microbenchmarks: every usable backend against the reference, forward, forward+backward (to the
table), and the fused encoding+Jacobian forward+backward (the normals path), at the default config
(L=16, F=2, T=19).

Sizes: 2**18 points on the CPU, 2**20 on CUDA; ``FASTDREAM_BENCH_HASH_N`` overrides. Run with
``pytest benchmarks/bench_hash_grid.py`` (the CPU default run takes under a minute on 2 cores).

Two point sets: ``uniform`` (independent uniform points in the cube: every gather a cache miss, the worst
case) and, on CUDA, ``rays`` (what the renderer feeds the grid: N / 256 rays of a pinhole camera at distance
2.5 looking at the origin, 256 evenly spaced samples each in [1.5, 3.5], ray after ray; for 2^20 points a 64x64
image). ``rays`` is not quite what the renderer sends: its samples are 2.7x closer than the march's default step
and 17% of them lie outside the cube (clamped onto its faces), so neighbouring lanes share cells more often than in
training, which favours the warp-aggregated table gradient. ``march`` (CUDA, since 2026-11-27) is what training
sends: the renderer's own samples (march_rays with jitter through the occupancy grid, CUDA's defaults) of 64x64
renders from the trainer's random cameras, camera after camera, of ``fastdream bench``'s object scene (the initial
blob widened to a trained object's size). On CUDA the ``cuda`` backend runs four times: ``cuda`` (its default,
fp16 table reads), ``cuda-fp32`` (``CUDA_FP16_TABLE_READS = False``: fp32 reads), ``cuda-plain``
(``FASTDREAM_HASH_BACKWARD=plain``: one thread per point and level with paired float4 atomics, instead of the
default "hybrid" table gradient, which aggregates where a warp has runs and pairs atomics everywhere) and
``cuda-warp`` (``FASTDREAM_HASH_BACKWARD=warp``: aggregation in every warp, the default until 2026-11-28, when
``cuda-hybrid`` was timed beside it; csrc/cuda/hash_grid.cu).
"""

from __future__ import annotations

import contextlib
import math
import os

import pytest
import torch

import fastdream.ops.hash_grid as hash_grid_module
from fastdream.ops import HashGridConfig, _dispatch, hash_encode, hash_encode_with_jacobian, use_backend

pytest.importorskip("pytest_benchmark")

OP = "hash_encode"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
N = int(os.environ.get("FASTDREAM_BENCH_HASH_N", 2**20 if DEVICE.type == "cuda" else 2**18))
CFG = HashGridConfig()
BACKENDS = [b for b in ("reference", "cpp", "cuda", "triton") if b in _dispatch.usable_backends(OP, DEVICE)]
if DEVICE.type == "cpu":  # the Triton interpreter is a correctness tool, not a contender
    BACKENDS = [b for b in BACKENDS if b != "triton"]
if "cuda" in BACKENDS:
    BACKENDS += ["cuda-fp32", "cuda-plain", "cuda-warp"]
LAYOUTS = ["uniform", "rays", "march"] if DEVICE.type == "cuda" else ["uniform"]
if os.environ.get("FASTDREAM_BENCH_HASH_LAYOUTS"):  # e.g. "march" (a CPU check of the point sets)
    LAYOUTS = os.environ["FASTDREAM_BENCH_HASH_LAYOUTS"].split(",")


@contextlib.contextmanager
def _backend(name: str):
    """``use_backend``, with ``cuda-fp32`` = the cuda backend reading the table in fp32, and ``cuda-plain`` /
    ``cuda-warp`` = the cuda backend with another table-gradient kernel. Entered inside every timed call."""
    if name == "triton":  # its fp16 copy of the table is cached while the table is unchanged; training changes
        # the table every step (so the copy is made every step, as the cuda backend casts on every call)
        import fastdream.kernels.hash_grid as triton_hash_grid

        triton_hash_grid._half_cache.clear()
    prev = hash_grid_module.CUDA_FP16_TABLE_READS, os.environ.get("FASTDREAM_HASH_BACKWARD")
    hash_grid_module.CUDA_FP16_TABLE_READS = name != "cuda-fp32"
    if name in ("cuda-plain", "cuda-warp"):
        os.environ["FASTDREAM_HASH_BACKWARD"] = name.removeprefix("cuda-")
    try:
        with use_backend("cuda" if name.startswith("cuda") else name):
            yield
    finally:
        hash_grid_module.CUDA_FP16_TABLE_READS = prev[0]
        if prev[1] is None:
            os.environ.pop("FASTDREAM_HASH_BACKWARD", None)
        else:
            os.environ["FASTDREAM_HASH_BACKWARD"] = prev[1]


def ray_points(n: int, generator: torch.Generator, samples: int = 256) -> torch.Tensor:
    """n points along n / samples camera rays, ray after ray (see the module docstring)."""
    rays = max(1, n // samples)
    side = math.isqrt(rays)
    eye = torch.nn.functional.normalize(torch.randn(3, generator=generator), dim=0) * 2.5
    fwd = -eye / eye.norm()
    right = torch.nn.functional.normalize(torch.linalg.cross(fwd, torch.tensor([0.0, 1.0, 0.0])), dim=0)
    up = torch.linalg.cross(right, fwd)
    k = torch.arange(rays)
    px = ((k % side).float() + 0.5) / side * 2 - 1
    py = ((k // side).float() + 0.5) / max(1, (rays + side - 1) // side) * 2 - 1
    half = math.tan(math.radians(45) / 2)  # a 45-degree field of view: the unit sphere fills the image
    d = torch.nn.functional.normalize(fwd + half * (px[:, None] * right + py[:, None] * up), dim=1)
    t = torch.linspace(1.5, 3.5, samples)
    pts = (eye + d[:, None, :] * t[None, :, None]).reshape(-1, 3)
    if pts.shape[0] < n:  # n not a multiple of samples: pad with the first points
        pts = torch.cat([pts, pts[: n - pts.shape[0]]])
    return pts[:n].contiguous()


@torch.no_grad()
def march_points(n: int, seed: int = 0) -> torch.Tensor:
    """n sample positions as training produces them (see the module docstring), camera after camera."""
    from fastdream.bench import OBJECT_BLOB_RADIUS
    from fastdream.cameras import sample_cameras
    from fastdream.config import RunConfig, resolve
    from fastdream.renderer import render
    from fastdream.train import build_models

    rc = resolve(RunConfig(prompt="x", device=DEVICE.type), "cuda")  # CUDA's field, grid and march step
    rc.field.blob_radius = OBJECT_BLOB_RADIUS
    torch.manual_seed(seed)
    field, _, grid = build_models(rc, DEVICE)
    field.eval()
    gen = torch.Generator().manual_seed(seed)
    grid.update(field.density, warmup=True, generator=torch.Generator(device=DEVICE).manual_seed(seed))
    parts, total = [], 0
    while total < n:
        cams = sample_cameras(rc.camera, 1, gen)
        out = render(field, None, cams, 64, 64, grid=grid, samples_per_ray=rc.render.samples_per_ray, jitter=True)
        parts.append(out["samples"].positions.float())
        total += parts[-1].shape[0]
    return torch.cat(parts)[:n].contiguous().cpu()


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(scope="module", params=LAYOUTS)
def data(request):
    g = torch.Generator().manual_seed(0)
    if request.param == "march":
        x = march_points(N)
    else:
        x = (torch.rand(N, 3, generator=g) * 2 - 1) if request.param == "uniform" else ray_points(N, g)
    table = ((torch.rand(CFG.levels, CFG.table_size, CFG.features, generator=g) * 2 - 1) * 1e-2).to(DEVICE)
    grad = torch.randn(N, CFG.out_dim, generator=g).to(DEVICE)
    return x.to(DEVICE), table, grad, request.param


def _pedantic(backend: str) -> dict:
    # On the CPU a call takes up to seconds: few rounds keep the default run short. Every side gets a warm-up
    # round, and as many timed rounds as the other (a single reference round on a shared 2-core machine made the
    # ratio swing by 2x from one run to the next).
    if DEVICE.type == "cpu":
        return {"rounds": 3, "warmup_rounds": 1}
    return {"rounds": 20, "warmup_rounds": 3}


@pytest.mark.parametrize("backend", BACKENDS)
def test_hash_encode_forward(benchmark, data, backend):
    x, table, _, layout = data
    benchmark.group = f"hash_encode forward N={N} {layout} {DEVICE.type}"

    def run():
        with _backend(backend), torch.no_grad():
            out = hash_encode(x, table, CFG)
        _sync()
        return out

    out = benchmark.pedantic(run, iterations=1, **_pedantic(backend))
    assert out.shape == (N, CFG.out_dim)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hash_encode_forward_backward(benchmark, data, backend):
    x, table, grad, layout = data
    benchmark.group = f"hash_encode forward+backward N={N} {layout} {DEVICE.type}"
    t = table.clone().requires_grad_(True)

    def run():
        t.grad = None
        with _backend(backend):
            hash_encode(x, t, CFG).backward(grad)
        _sync()
        return t.grad

    g = benchmark.pedantic(run, iterations=1, **_pedantic(backend))
    assert g.shape == table.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_hash_encode_jacobian_forward_backward(benchmark, data, backend):
    x, table, grad, layout = data
    benchmark.group = f"hash_encode_with_jacobian forward+backward N={N} {layout} {DEVICE.type}"
    t = table.clone().requires_grad_(True)
    grad_jac = grad[:, :, None].expand(N, CFG.out_dim, 3).contiguous()  # a copy made outside the timed calls

    def run():
        t.grad = None
        with _backend(backend):
            enc, jac = hash_encode_with_jacobian(x, t, CFG)
            torch.autograd.backward([enc, jac], [grad, grad_jac])
        _sync()
        return t.grad

    g = benchmark.pedantic(run, iterations=1, **_pedantic(backend))
    assert g.shape == table.shape
