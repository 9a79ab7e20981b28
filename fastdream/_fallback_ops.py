# SPDX-License-Identifier: Apache-2.0
"""Pure-PyTorch stand-ins for the ops of SPEC.md while their owners' branches are not merged yet.

The renderer and the field use ``fastdream.ops.<name>`` when it exists and these otherwise. Same signatures
and meaning as the spec; slow but correct. To be removed once every op is on main.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

_PRIMES = (1, 2654435761, 805459861)


@dataclass(frozen=True)
class HashGridConfig:
    levels: int = 16
    features: int = 2
    log2_table_size: int = 19
    base_resolution: int = 16
    finest_resolution: int = 2048
    bound: float = 1.0

    @property
    def out_dim(self) -> int:
        return self.levels * self.features


def init_hash_table(cfg: HashGridConfig, generator=None, dtype=torch.float32) -> torch.Tensor:
    t = torch.rand(cfg.levels, 2**cfg.log2_table_size, cfg.features, generator=generator, dtype=dtype)
    return (t * 2 - 1) * 1e-4


def hash_encode(x: torch.Tensor, table: torch.Tensor, cfg: HashGridConfig) -> torch.Tensor:
    """[N, 3] world points -> [N, L*F] features (trilinear interpolation on each level)."""
    n = x.shape[0]
    size = table.shape[1]
    x01 = ((x.float() + cfg.bound) / (2 * cfg.bound)).clamp(0.0, 1.0)
    growth = math.exp((math.log(cfg.finest_resolution) - math.log(cfg.base_resolution)) / max(cfg.levels - 1, 1))
    out = []
    for lvl in range(cfg.levels):
        res = int(math.floor(cfg.base_resolution * growth**lvl))
        pos = x01 * res
        p0 = pos.floor().clamp(max=res - 1)
        frac = pos - p0
        p0 = p0.long()
        dense = (res + 1) ** 3 <= size
        feat = 0.0
        for c in range(8):
            off = torch.tensor([(c >> 0) & 1, (c >> 1) & 1, (c >> 2) & 1], device=x.device)
            corner = p0 + off
            w = torch.where(off.bool(), frac, 1 - frac).prod(-1, keepdim=True)
            if dense:
                idx = corner[:, 0] + (res + 1) * (corner[:, 1] + (res + 1) * corner[:, 2])
            else:
                idx = (corner[:, 0] * _PRIMES[0]) ^ (corner[:, 1] * _PRIMES[1]) ^ (corner[:, 2] * _PRIMES[2])
            idx = idx % size
            feat = feat + w * table[lvl][idx]
        out.append(feat)
    return torch.cat(out, -1).reshape(n, cfg.levels * cfg.features)


@dataclass
class RaySamples:
    ray_indices: torch.Tensor  # [S] int64
    t_starts: torch.Tensor  # [S]
    t_ends: torch.Tensor  # [S]
    positions: torch.Tensor  # [S, 3]
    directions: torch.Tensor  # [S, 3]
    offsets: torch.Tensor  # [R+1] int64


def ray_sphere(rays_o, rays_d, radius=1.0):
    b = (rays_o * rays_d).sum(-1)
    c = (rays_o * rays_o).sum(-1) - radius * radius
    disc = b * b - c
    hit = disc > 0
    sq = disc.clamp_min(0).sqrt()
    t_near = (-b - sq).clamp_min(0)
    t_far = -b + sq
    return t_near, t_far, hit & (t_far > 0)


def march_rays(
    rays_o,
    rays_d,
    grid=None,
    *,
    step=2.0 / 96,
    cone_angle=0.0,
    max_samples_per_ray=1024,
    bound=1.0,
    jitter=False,
    generator=None,
) -> RaySamples:
    r = rays_o.shape[0]
    t_near, t_far, hit = ray_sphere(rays_o, rays_d, bound)
    m = min(int(math.ceil(2 * bound / step)) + 1, max_samples_per_ray)
    off = torch.rand(r, 1, generator=generator).to(rays_o.device) if jitter else torch.full((r, 1), 0.5)
    off = off.to(rays_o.device, rays_o.dtype)
    i = torch.arange(m, device=rays_o.device, dtype=rays_o.dtype)[None]
    t_mid = t_near[:, None] + (i + off) * step
    mask = (t_mid < t_far[:, None]) & hit[:, None]
    pos = rays_o[:, None] + rays_d[:, None] * t_mid[..., None]
    if grid is not None:
        occ = torch.zeros_like(mask)
        occ[mask] = grid.occupied_at(pos[mask])
        mask = occ
    ray_idx = torch.arange(r, device=rays_o.device)[:, None].expand(r, m)[mask]
    tm = t_mid[mask]
    counts = mask.sum(1)
    offsets = torch.zeros(r + 1, dtype=torch.long, device=rays_o.device)
    offsets[1:] = counts.cumsum(0)
    return RaySamples(ray_idx, tm - step / 2, tm + step / 2, pos[mask], rays_d[ray_idx], offsets)


class OccupancyGrid(torch.nn.Module):
    def __init__(self, resolution=64, bound=1.0, threshold=0.01, decay=0.95, step=2.0 / 96):
        super().__init__()
        self.resolution, self.bound, self.threshold, self.decay, self.step = resolution, bound, threshold, decay, step
        self.register_buffer("density", torch.zeros(resolution**3))
        self.register_buffer("occupied", torch.ones(resolution**3, dtype=torch.bool))

    def _cell_centres(self, idx, generator):
        r = self.resolution
        ijk = torch.stack([idx % r, (idx // r) % r, idx // (r * r)], -1).float()
        u = torch.rand(idx.shape[0], 3, generator=generator).to(idx.device)
        return ((ijk + u) / r * 2 - 1) * self.bound

    @torch.no_grad()
    def update(self, density_fn: Callable, *, warmup: bool, generator=None) -> None:
        n = self.resolution**3
        idx = torch.arange(n, device=self.density.device)
        if not warmup:
            pick = torch.randperm(n, generator=generator)[: n // 4].to(idx.device)
            idx = torch.unique(torch.cat([pick, idx[self.occupied]]))
        new = torch.cat([density_fn(p) for p in self._cell_centres(idx, generator).split(65536)])
        self.density.mul_(self.decay)
        self.density[idx] = torch.maximum(self.density[idx], new.float())
        self.occupied.copy_(self.density * self.step > self.threshold)

    def occupied_at(self, positions):
        r = self.resolution
        ijk = (((positions / self.bound) + 1) / 2 * r).long().clamp(0, r - 1)
        return self.occupied[ijk[:, 0] + r * (ijk[:, 1] + r * ijk[:, 2])]


@dataclass
class CompositeResult:
    image: torch.Tensor
    opacity: torch.Tensor
    depth: torch.Tensor
    weights: torch.Tensor


def composite(sigmas, colors, samples, n_rays, background=None, early_stop_eps=1e-4) -> CompositeResult:
    delta = samples.t_ends - samples.t_starts
    sd = sigmas * delta
    cs = sd.cumsum(0)
    start = samples.offsets[:-1]
    base = torch.where(start > 0, cs[(start - 1).clamp_min(0)], torch.zeros_like(start, dtype=cs.dtype))
    excl = cs - sd - base[samples.ray_indices]
    w = torch.exp(-excl) * (1 - torch.exp(-sd))
    opacity = torch.zeros(n_rays, dtype=w.dtype, device=w.device).index_add(0, samples.ray_indices, w)
    image = torch.zeros(n_rays, colors.shape[1], dtype=w.dtype, device=w.device)
    image = image.index_add(0, samples.ray_indices, w[:, None] * colors)
    mid = (samples.t_starts + samples.t_ends) / 2
    depth = torch.zeros(n_rays, dtype=w.dtype, device=w.device).index_add(0, samples.ray_indices, w * mid)
    if background is not None:
        image = image + (1 - opacity[:, None]) * background
    return CompositeResult(image, opacity, depth, w)
