# SPDX-License-Identifier: Apache-2.0
"""Ray marching through the bounding sphere, skipping the cells an occupancy grid marks empty.

Each ray is intersected with the sphere of radius ``bound`` at the origin (a ray starting inside starts at
``t = 0``) and stepped from ``t_near``: the step is ``dt = clamp(t * cone_angle, step, max_step)`` (fixed when
``cone_angle = 0``), the last interval is cut at ``t_far`` so every sample lies inside the sphere, and an
interval becomes a sample when its midpoint falls in an occupied cell (every interval without a grid). At most
``max_samples_per_ray`` samples per ray, in front-to-back order. Directions are normalised first, so ``t`` is a
distance. Rays that miss the sphere, and rays with a zero, NaN or infinite direction or origin, get no samples.
The hit test does not lose precision with the origin's distance; the march itself needs ``t`` to resolve the
step in float32 (``|o| < step * 2^23``, about ``1e5 * bound`` at the default step): past that a ray stops where
``t + dt`` rounds back to ``t`` and keeps the samples it has (none, for a ray entering there).

With ``jitter`` each ray starts at ``t_near + u * dt`` with ``u ~ U[0, 1)`` drawn from ``generator``
(stratified sampling along the ray, as in instant-NGP).

Samples are packed (nerfacc style): ray ``r`` owns ``offsets[r]:offsets[r+1]`` of every per-sample tensor.

Implementations: ``reference`` (vectorised PyTorch, one iteration per step over the active rays) and the
compiled extension (``cpp`` on the CPU, ``cuda``: the per-ray code of ``csrc/include/fastdream/raymarch.h``,
run as two passes, count then fill, with one read of the total sample count to allocate the output).

``march_rays`` is a plain function rather than a ``torch.library`` custom op, excluded from ``torch.compile``
tracing: its output size depends on the data (the number of samples), there is nothing to differentiate
(positions are constants of the step), and the one host read of the sample count is a graph break anyway.

Example:
    >>> import torch
    >>> from fastdream.ops import march_rays
    >>> o = torch.tensor([[0.0, 0.0, 3.0], [0.0, 3.0, 3.0]]); d = torch.tensor([[0.0, 0.0, -1.0], [0.0, 0.0, -1.0]])
    >>> s = march_rays(o, d)
    >>> s.offsets.tolist()  # the first ray crosses the diameter in 128 steps, the second misses
    [0, 128, 128]
    >>> bool((s.positions.norm(dim=-1) <= 1.0).all())
    True
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from fastdream import backends
from fastdream.ops import _dispatch
from fastdream.ops._checks import check_tensor, same_device
from fastdream.ops.occupancy import OccupancyGrid, cell_indices, default_step

OP = "march_rays"


@dataclass
class RaySamples:
    """Packed samples of ``R`` rays (``S`` samples in all), front to back within each ray.

    Attributes:
        ray_indices: [S] int64 ray of each sample (non-decreasing).
        t_starts: [S] float32 start of each sample's interval along its ray.
        t_ends: [S] float32 end of each interval.
        positions: [S, 3] float32 midpoints ``o + d * (t_start + t_end) / 2``.
        directions: [S, 3] float32 unit direction of the sample's ray.
        offsets: [R + 1] int64; the samples of ray ``r`` are ``offsets[r]:offsets[r + 1]``.
    """

    ray_indices: torch.Tensor
    t_starts: torch.Tensor
    t_ends: torch.Tensor
    positions: torch.Tensor
    directions: torch.Tensor
    offsets: torch.Tensor

    @property
    def n_rays(self) -> int:
        return self.offsets.shape[0] - 1

    @property
    def n_samples(self) -> int:
        return self.t_starts.shape[0]

    def __len__(self) -> int:
        return self.n_samples

    @property
    def deltas(self) -> torch.Tensor:  # [S]
        return self.t_ends - self.t_starts

    @property
    def t_mids(self) -> torch.Tensor:  # [S]
        return (self.t_starts + self.t_ends) * 0.5


def _sqrt(x: torch.Tensor) -> torch.Tensor:
    # torch's vectorised float32 sqrt is not always correctly rounded (AVX-512 builds); through float64 it is,
    # like sqrtf in the compiled marcher, so both take the same steps.
    return torch.sqrt(x.double()).float()


def _normalize(d: torch.Tensor) -> torch.Tensor:
    # Written out component by component so that the float32 rounding matches the compiled marcher's.
    n = _sqrt(d[:, 0] * d[:, 0] + d[:, 1] * d[:, 1] + d[:, 2] * d[:, 2])
    return d / n[:, None]


def _ray_sphere_unit(o: torch.Tensor, d: torch.Tensor, radius: float) -> tuple[torch.Tensor, ...]:
    # radius^2 - |q|^2 with q = o - (o.d) d (the closest point to the centre), as the compiled marcher does: the
    # textbook (o.d)^2 - (|o|^2 - radius^2) loses every digit in float32 once |o| is ~1e3 x the radius.
    b = o[:, 0] * d[:, 0] + o[:, 1] * d[:, 1] + o[:, 2] * d[:, 2]
    q = o - b[:, None] * d
    disc = radius * radius - (q[:, 0] * q[:, 0] + q[:, 1] * q[:, 1] + q[:, 2] * q[:, 2])
    sq = _sqrt(disc.clamp_min(0))
    t_near = (-b - sq).clamp_min(0)
    t_far = -b + sq
    hit = (disc >= 0) & (t_far > t_near) & torch.isfinite(t_near) & torch.isfinite(t_far)
    return t_near, t_far, hit


def ray_sphere(
    rays_o: torch.Tensor,  # [R, 3]
    rays_d: torch.Tensor,  # [R, 3], any length
    radius: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # t_near [R], t_far [R], hit [R] bool
    """Entry and exit distances of each ray through the sphere of ``radius`` at the origin.

    ``t`` is measured along the normalised direction; ``t_near`` is clamped to 0 for rays starting inside.
    ``hit`` is False for rays that miss, graze, point away, or hold NaN/inf (their ``t`` values are undefined).
    """
    check_tensor("rays_o", rays_o, (None, 3))
    check_tensor("rays_d", rays_d, (rays_o.shape[0], 3))
    same_device(rays_o=rays_o, rays_d=rays_d)
    return _ray_sphere_unit(rays_o.float(), _normalize(rays_d.float()), float(radius))


@dataclass(frozen=True)
class _MarchArgs:
    o: torch.Tensor  # [R, 3] float32 contiguous
    d: torch.Tensor  # [R, 3] float32 contiguous (not normalised)
    u: torch.Tensor  # [R] float32 jitter in [0, 1) (zeros without jitter)
    occupied: torch.Tensor  # [res^3] bool, or [0] without a grid
    grid_resolution: int
    grid_bound: float
    step: float
    cone_angle: float
    max_step: float
    max_samples: int
    bound: float

    def extension_args(self) -> tuple:
        """The arguments of the extension's ``march_rays`` (``march_rays_padded`` adds the capacity)."""
        scale = self.grid_resolution / (2.0 * self.grid_bound)
        grid = (self.occupied, self.grid_resolution, scale, self.grid_bound)
        return (self.o, self.d, self.u, *grid, self.step, self.cone_angle, self.max_step, self.max_samples, self.bound)


def _prepare(rays_o, rays_d, grid, step, cone_angle, max_step, max_samples_per_ray, bound, jitter, generator):
    check_tensor("rays_o", rays_o, (None, 3))
    check_tensor("rays_d", rays_d, (rays_o.shape[0], 3))
    device = same_device(rays_o=rays_o, rays_d=rays_d)
    if not (isinstance(bound, (int, float)) and math.isfinite(bound) and bound > 0):
        raise ValueError(f"bound: expected a finite number > 0, got {bound!r}")
    step = default_step(bound) if step is None else step
    if not (isinstance(step, (int, float)) and math.isfinite(step) and step > 0):
        raise ValueError(f"step: expected a finite number > 0, got {step!r}")
    if 2.0 * bound / step > 1e7:
        raise ValueError(f"step: {step} puts more than 1e7 steps across the sphere; use a larger step")
    if not (isinstance(cone_angle, (int, float)) and math.isfinite(cone_angle) and cone_angle >= 0):
        raise ValueError(f"cone_angle: expected a finite number >= 0, got {cone_angle!r}")
    max_step = math.inf if max_step is None else max_step
    if not (isinstance(max_step, (int, float)) and max_step >= step):
        raise ValueError(f"max_step: expected a number >= step ({step}), got {max_step!r}")
    if not (isinstance(max_samples_per_ray, int) and max_samples_per_ray >= 0):
        raise ValueError(f"max_samples_per_ray: expected an int >= 0, got {max_samples_per_ray!r}")
    if grid is not None:
        if not isinstance(grid, OccupancyGrid):
            raise TypeError(f"grid: expected an OccupancyGrid or None, got {type(grid).__name__}")
        if grid.occupied.device != device:
            raise ValueError(f"grid: expected a grid on {device} like rays_o, got one on {grid.occupied.device}")
        occupied = grid.occupied.contiguous()
        res, gbound = grid.resolution, grid.bound
    else:
        occupied = torch.zeros(0, dtype=torch.bool, device=device)
        res, gbound = 1, float(bound)
    r = rays_o.shape[0]
    if jitter:
        u = torch.rand(r, device=device, generator=generator)
    else:
        u = torch.zeros(r, device=device)
    return _MarchArgs(
        o=rays_o.detach().float().contiguous(),
        d=rays_d.detach().float().contiguous(),
        u=u,
        occupied=occupied,
        grid_resolution=res,
        grid_bound=gbound,
        step=float(step),
        cone_angle=float(cone_angle),
        max_step=float(max_step),
        max_samples=max_samples_per_ray,
        bound=float(bound),
    )


def _march_reference(a: _MarchArgs) -> RaySamples:
    device = a.o.device
    r = a.o.shape[0]
    d = _normalize(a.d)
    t_near, t_far, hit = _ray_sphere_unit(a.o, d, a.bound)
    t_near = torch.where(hit, t_near, 0.0)
    t_far = torch.where(hit, t_far, 0.0)

    def dt_at(t: torch.Tensor) -> torch.Tensor:
        return torch.clamp(t * a.cone_angle, a.step, a.max_step)

    t = t_near + a.u * dt_at(t_near)
    counts = torch.zeros(r, dtype=torch.int64, device=device)
    active = (hit & (t < t_far)) if a.max_samples > 0 else torch.zeros_like(hit)
    chunks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    idx = active.nonzero().squeeze(-1)
    while idx.numel() > 0:
        t0 = t[idx]
        t1 = torch.minimum(t0 + dt_at(t0), t_far[idx])
        # Far from the origin t + dt can round back to t: such a ray stops (as in the compiled marcher).
        moving = t1 > t0
        idx, t0, t1 = idx[moving], t0[moving], t1[moving]
        mid = (t0 + t1) * 0.5
        pos = a.o[idx] + d[idx] * mid[:, None]
        if a.occupied.numel() > 0:
            flat, inside = cell_indices(pos, a.grid_resolution, a.grid_bound)
            keep = a.occupied[flat] & inside
            chunks.append((idx[keep], t0[keep], t1[keep], pos[keep]))
            counts.index_add_(0, idx, keep.long())
        else:
            chunks.append((idx, t0, t1, pos))
            counts[idx] += 1
        t[idx] = t1
        more = (t1 < t_far[idx]) & (counts[idx] < a.max_samples)
        idx = idx[more]
    if chunks:
        ray_indices, t_starts, t_ends, positions = (torch.cat(x) for x in zip(*chunks))
        order = torch.sort(ray_indices, stable=True).indices  # chunks are in step order: stable keeps t order
        ray_indices, t_starts, t_ends, positions = (x[order] for x in (ray_indices, t_starts, t_ends, positions))
    else:
        ray_indices = torch.zeros(0, dtype=torch.int64, device=device)
        t_starts = t_ends = torch.zeros(0, device=device)
        positions = torch.zeros(0, 3, device=device)
    offsets = torch.zeros(r + 1, dtype=torch.int64, device=device)
    offsets[1:] = torch.cumsum(counts, 0)
    return RaySamples(ray_indices, t_starts, t_ends, positions, d[ray_indices].contiguous(), offsets)


def _march_extension(a: _MarchArgs) -> RaySamples:
    out = backends.extension().march_rays(*a.extension_args())
    return RaySamples(*out)


_dispatch.register(OP, "reference", _march_reference)
if hasattr(backends.extension(), "march_rays"):  # an extension built before this op existed lacks it
    _dispatch.register(OP, "cpp", _march_extension)
    _dispatch.register(OP, "cuda", _march_extension)


# Not traced by torch.compile: the output size is data-dependent (one host read on CUDA) and the reference's
# loop runs a data-dependent number of steps; a compiled caller gets one clean graph break here.
@torch.compiler.disable
def _march(rays_o, rays_d, grid, step, cone_angle, max_step, max_samples_per_ray, bound, jitter, generator, backend):
    a = _prepare(rays_o, rays_d, grid, step, cone_angle, max_step, max_samples_per_ray, bound, jitter, generator)
    if backend is None:
        backend = _dispatch.select(OP, a.o.device)
    return _dispatch.get(OP, backend)(a)


def march_rays(
    rays_o: torch.Tensor,  # [R, 3]
    rays_d: torch.Tensor,  # [R, 3], normalised internally
    grid: OccupancyGrid | None = None,
    *,
    step: float | None = None,
    cone_angle: float = 0.0,
    max_step: float | None = None,
    max_samples_per_ray: int = 1024,
    bound: float = 1.0,
    jitter: bool = False,
    generator: torch.Generator | None = None,
) -> RaySamples:
    """March ``R`` rays through the sphere of radius ``bound``, skipping the cells ``grid`` marks empty.

    Args:
        rays_o, rays_d: ray origins and directions (float16/32/64; computed in float32).
        grid: occupancy grid on the rays' device, or None to sample the whole sphere.
        step: minimum step along the ray; default ``2 * bound / 128`` (128 samples across the diameter).
        cone_angle: the step grows as ``t * cone_angle`` (0: fixed step).
        max_step: largest step when ``cone_angle > 0`` (default: unbounded).
        max_samples_per_ray: samples past this many on one ray are dropped (the far end of the ray).
        bound: radius of the bounding sphere.
        jitter: start each ray at a random fraction of its first step (stratified sampling).
        generator: random source of the jitter.

    Returns:
        :class:`RaySamples`, float32, on the rays' device.

    Raises:
        TypeError / ValueError: an argument of the wrong type, dtype, shape, device or range (named).
    """
    return _march(rays_o, rays_d, grid, step, cone_angle, max_step, max_samples_per_ray, bound, jitter, generator, None)


def march_rays_reference(
    rays_o: torch.Tensor,
    rays_d: torch.Tensor,
    grid: OccupancyGrid | None = None,
    *,
    step: float | None = None,
    cone_angle: float = 0.0,
    max_step: float | None = None,
    max_samples_per_ray: int = 1024,
    bound: float = 1.0,
    jitter: bool = False,
    generator: torch.Generator | None = None,
) -> RaySamples:
    """Pure-PyTorch :func:`march_rays` (same arguments, same samples): the ground truth and the fallback."""
    return _march(
        rays_o, rays_d, grid, step, cone_angle, max_step, max_samples_per_ray, bound, jitter, generator, "reference"
    )


# --- a fixed output size (CUDA graphs) ------------------------------------------------------------------------------

OP_PADDED = "march_rays_padded"


def _pad_rows(x: torch.Tensor, capacity: int) -> torch.Tensor:
    out = x.new_zeros((capacity, *x.shape[1:]))
    k = min(capacity, x.shape[0])
    out[:k] = x[:k]
    return out


def _march_padded_reference(a: _MarchArgs, capacity: int) -> tuple[RaySamples, torch.Tensor]:
    full = _march_reference(a)
    total = full.offsets[-1:].clone()
    rows = (full.ray_indices, full.t_starts, full.t_ends, full.positions, full.directions)
    padded = [_pad_rows(x, capacity) for x in rows]
    return RaySamples(*padded, full.offsets.clamp_max(capacity)), total


def _march_padded_extension(a: _MarchArgs, capacity: int) -> tuple[RaySamples, torch.Tensor]:
    out = backends.extension().march_rays_padded(*a.extension_args(), capacity)
    return RaySamples(*out[:6]), out[6]


_dispatch.register(OP_PADDED, "reference", _march_padded_reference)
if hasattr(backends.extension(), "march_rays_padded"):  # an extension built before this op existed lacks it
    _dispatch.register(OP_PADDED, "cpp", _march_padded_extension)
    _dispatch.register(OP_PADDED, "cuda", _march_padded_extension)


def march_rays_padded(
    rays_o: torch.Tensor,  # [R, 3]
    rays_d: torch.Tensor,  # [R, 3], normalised internally
    grid: OccupancyGrid | None = None,
    *,
    capacity: int,
    step: float | None = None,
    cone_angle: float = 0.0,
    max_step: float | None = None,
    max_samples_per_ray: int = 1024,
    bound: float = 1.0,
    jitter: torch.Tensor | None = None,
) -> tuple[RaySamples, torch.Tensor]:
    """:func:`march_rays` into ``capacity`` rows, with no host round-trip (so it can be captured in a CUDA graph).

    The samples are :func:`march_rays`' own, in the same packed order. Every per-sample tensor has ``capacity``
    rows: zeros past the last sample (ray index 0, ``t`` 0, position 0). ``offsets`` is clamped to ``capacity``, so
    the padding rows belong to no ray. When the rays have more samples than that, the ones past ``capacity`` are
    dropped: the last rays lose theirs, and the ray at the cut keeps its first ones. ``total`` says whether that
    happened.

    Args:
        capacity: rows of the output (>= 0).
        jitter: [R] offsets in [0, 1) of each ray's first sample, as a fraction of its first step (what
            :func:`march_rays` draws from its generator with ``jitter=True``); None: no jitter.
        The others: as :func:`march_rays`.

    Returns:
        (samples with ``capacity`` rows, total [1] int64 on the rays' device: the samples the rays have, which may
        exceed ``capacity``).

    Raises:
        TypeError / ValueError: an argument of the wrong type, dtype, shape, device or range (named).
    """
    if not (isinstance(capacity, int) and capacity >= 0):
        raise ValueError(f"capacity: expected an int >= 0, got {capacity!r}")
    a = _prepare(rays_o, rays_d, grid, step, cone_angle, max_step, max_samples_per_ray, bound, False, None)
    if jitter is not None:
        check_tensor("jitter", jitter, (a.o.shape[0],))
        same_device(rays_o=rays_o, jitter=jitter)
        a = dataclasses.replace(a, u=jitter.detach().float().contiguous())
    backend = _dispatch.select(OP_PADDED, a.o.device)
    return _dispatch.get(OP_PADDED, backend)(a, capacity)


def prune_occluded(samples: RaySamples, sigmas: torch.Tensor, early_stop_eps: float = 1e-4) -> RaySamples:
    """The samples that compositing with ``early_stop_eps`` would visit: each ray's prefix with T_i >= eps.

    ``sigmas`` [S] are densities at ``samples`` (typically from a cheap no-grad pass of the field). Compositing
    gives weight 0, and no gradient, to every sample behind the first one whose transmittance ``T_i`` is below
    ``early_stop_eps`` (:mod:`fastdream.ops.composite`); dropping them before the expensive pass (field with
    normals, its backward and double backward) changes nothing in the image, the weights or any gradient, but
    skips the inside of opaque objects. Optical depths are summed in float64, so the cut is the compositor's up
    to ~1e-9. A NaN or infinite density keeps its own sample (a NaN still reaches the image) and drops the ones
    behind it.
    """
    check_tensor("sigmas", sigmas, (samples.n_samples,), device=samples.t_starts.device)
    if not 0.0 < early_stop_eps <= 1.0:
        raise ValueError(f"early_stop_eps: expected a number in (0, 1], got {early_stop_eps!r}")
    if samples.n_samples == 0:
        return samples
    tau = sigmas.detach().double() * (samples.t_ends - samples.t_starts).double()
    # NaN or inf: opaque from here on (the sample itself stays); bounded so one ray cannot spoil the running sum.
    tau = torch.nan_to_num(tau, nan=1e6, posinf=1e6).clamp(0.0, 1e6)
    before = torch.cumsum(tau, 0) - tau  # optical depth in front of each sample, all rays in one sum
    first = samples.offsets[:-1].clamp_max(samples.n_samples - 1)
    before = before - before[first][samples.ray_indices]  # ... minus that of the ray's first sample
    keep = before <= -math.log(early_stop_eps)  # T_i = exp(-before) >= eps; NaN compares False
    if bool(keep.all()):
        return samples
    ray_indices = samples.ray_indices[keep]
    counts = torch.bincount(ray_indices, minlength=samples.n_rays)
    offsets = torch.zeros_like(samples.offsets)
    torch.cumsum(counts, 0, out=offsets[1:])
    return RaySamples(
        ray_indices=ray_indices,
        t_starts=samples.t_starts[keep],
        t_ends=samples.t_ends[keep],
        positions=samples.positions[keep],
        directions=samples.directions[keep],
        offsets=offsets,
    )
