# SPDX-License-Identifier: Apache-2.0
"""Occupancy grid: which cells of the cube ``[-bound, bound]^3`` may hold density, so the ray marcher skips the rest.

The grid keeps a running density per cell and a bool "bitfield" (one byte per cell, read directly by the C++ and
CUDA marchers). An update evaluates the field at one random point in each visited cell and keeps
``density = max(decay * old, new)``; a cell is occupied while its opacity over one marching step,
``density * step``, exceeds ``threshold`` (instant-NGP / nerfacc). During warm-up every cell is visited; after it,
a random quarter of the cells plus every occupied cell (so an occupied cell never goes stale). Cells that are not
visited decay too, so a cell the field has emptied is released after a few updates.

The update is vectorised PyTorch (one field evaluation per visited cell, in chunks): it runs every N steps and
costs one forward pass of the field, so a kernel would not pay.

Cell ``(i, j, k)`` (along x, y, z) covers ``[-bound, -bound + h)^3 + h * (i, j, k)`` with ``h = 2 bound / res``
and has flat index ``(i * res + j) * res + k``. Points outside the cube (or NaN) are never occupied.

Example:
    >>> import torch
    >>> from fastdream.ops import OccupancyGrid
    >>> grid = OccupancyGrid(resolution=16)
    >>> grid.update(lambda x: 100.0 * (x.norm(dim=-1) < 0.5).float(), warmup=True)
    >>> grid.occupied_at(torch.tensor([[0.0, 0.0, 0.0], [0.9, 0.9, 0.9]])).tolist()
    [True, False]
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import torch

from fastdream.ops._checks import check_tensor


def _is_number(v: object) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def default_step(bound: float) -> float:
    """The marching step that puts 128 samples across the bounding sphere's diameter."""
    return 2.0 * bound / 128.0


def cell_indices(
    positions: torch.Tensor,  # [M, 3] float32
    resolution: int,
    bound: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # ([M] int64 flat cell index, [M] bool inside the cube)
    """Flat cell index of each point and whether it lies inside the grid's cube.

    The arithmetic (``(p + bound) * (res / (2 bound))``, floor, clamp) is exactly what the C++/CUDA marcher does
    in float32, so both agree on every sample. Indices of points outside are clamped (safe to gather with).
    """
    scale = resolution / (2.0 * bound)
    f = (positions + bound) * scale
    inside = ((f >= 0) & (f <= resolution)).all(dim=-1)  # NaN compares false: outside
    ijk = torch.nan_to_num(f, nan=0.0).floor().clamp(0, resolution - 1).long()
    flat = (ijk[:, 0] * resolution + ijk[:, 1]) * resolution + ijk[:, 2]
    return flat, inside


class OccupancyGrid(torch.nn.Module):
    """A ``resolution^3`` occupancy grid over the cube ``[-bound, bound]^3``.

    Args:
        resolution: cells per side (64 to 128 is typical).
        bound: half side of the cube (the scene's bounding sphere radius).
        threshold: a cell is occupied while ``density * step > threshold`` (opacity over one step).
        decay: factor applied to the stored density at every update before taking the max with the new one.
        step: the marching step the opacity refers to; default :func:`default_step` (128 steps across).

    Buffers (saved in ``state_dict``):
        density: [res^3] float32 running density per cell.
        occupied: [res^3] bool, True where rays must be sampled. All True before the first update.
        updates: [] int64, how many updates ran.
    """

    density: torch.Tensor
    occupied: torch.Tensor
    updates: torch.Tensor

    def __init__(
        self,
        resolution: int = 64,
        bound: float = 1.0,
        threshold: float = 0.01,
        decay: float = 0.95,
        step: float | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(resolution, int) or isinstance(resolution, bool) or not 1 <= resolution <= 1024:
            raise ValueError(f"resolution: expected an int in [1, 1024], got {resolution!r}")
        if not (_is_number(bound) and math.isfinite(bound) and bound > 0):
            raise ValueError(f"bound: expected a finite number > 0, got {bound!r}")
        if not (_is_number(threshold) and math.isfinite(threshold) and threshold >= 0):
            raise ValueError(f"threshold: expected a finite number >= 0, got {threshold!r}")
        if not (_is_number(decay) and 0.0 <= decay <= 1.0):
            raise ValueError(f"decay: expected in [0, 1], got {decay!r}")
        if step is not None and not (_is_number(step) and math.isfinite(step) and step > 0):
            raise ValueError(f"step: expected a finite number > 0 (or None), got {step!r}")
        self.resolution = resolution
        self.bound = float(bound)
        self.threshold = float(threshold)
        self.decay = float(decay)
        self.step = float(step) if step is not None else default_step(self.bound)
        n = resolution**3
        self.register_buffer("density", torch.zeros(n))
        self.register_buffer("occupied", torch.ones(n, dtype=torch.bool))
        self.register_buffer("updates", torch.zeros((), dtype=torch.int64))

    @property
    def n_cells(self) -> int:
        return self.resolution**3

    def extra_repr(self) -> str:
        return (
            f"resolution={self.resolution}, bound={self.bound}, threshold={self.threshold}, "
            f"decay={self.decay}, step={self.step:.4g}"
        )

    def occupied_at(self, positions: torch.Tensor) -> torch.Tensor:  # [M, 3] -> [M] bool
        """Whether each point falls in an occupied cell (False outside the cube and for NaN)."""
        check_tensor("positions", positions, (None, 3))
        flat, inside = cell_indices(positions.float(), self.resolution, self.bound)
        return self.occupied.to(positions.device)[flat] & inside

    def fraction_occupied(self) -> float:
        return float(self.occupied.float().mean())

    def cell_centers(self, indices: torch.Tensor) -> torch.Tensor:  # [M] int64 -> [M, 3]
        return self._cell_points(indices, torch.full((indices.numel(), 3), 0.5, device=indices.device))

    def _cell_points(self, indices: torch.Tensor, frac: torch.Tensor) -> torch.Tensor:
        r = self.resolution
        ijk = torch.stack([indices // (r * r), (indices // r) % r, indices % r], dim=-1).to(frac.dtype)
        return (ijk + frac) * (2.0 * self.bound / r) - self.bound

    @torch.no_grad()
    def update(
        self,
        density_fn: Callable[[torch.Tensor], torch.Tensor],
        *,
        warmup: bool,
        generator: torch.Generator | None = None,
        chunk_size: int | None = None,
    ) -> None:
        """Re-evaluate the density and threshold it.

        Args:
            density_fn: [M, 3] world positions -> [M] non-negative densities (called under no_grad, in chunks).
            warmup: visit every cell (the first few hundred steps of a run); else a random quarter of the cells
                plus every occupied cell.
            generator: for the cell choice and the point inside each cell (on the grid's device).
            chunk_size: points per call of ``density_fn``; default 2^16 on the CPU, 2^19 on a GPU (a regular update
                of a 128^3 grid visits over half a million cells: two calls rather than nine or more, each some
                dozens of kernel launches).
        """
        if chunk_size is None:
            chunk_size = 1 << (16 if self.density.device.type == "cpu" else 19)
        if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
            raise ValueError(f"chunk_size: expected an int >= 1, got {chunk_size!r}")
        device = self.density.device
        n = self.n_cells
        if warmup:
            indices = torch.arange(n, device=device)
        else:
            rand = torch.randint(0, n, (n // 4,), device=device, generator=generator)
            # The sorted union of the drawn cells and the occupied ones, as a mask: the same indices as
            # unique(cat(...)) without sorting them (one pass over the cells, one host read of the count).
            visit = self.occupied.clone()
            visit[rand] = True
            indices = visit.nonzero().squeeze(-1)
        frac = torch.rand(indices.numel(), 3, device=device, generator=generator)
        points = self._cell_points(indices, frac)
        new = torch.empty(indices.numel(), device=device)
        for s in range(0, indices.numel(), chunk_size):
            chunk = points[s : s + chunk_size]
            d = density_fn(chunk)
            if not isinstance(d, torch.Tensor) or d.numel() != chunk.shape[0]:
                got = list(d.shape) if isinstance(d, torch.Tensor) else type(d).__name__
                raise ValueError(f"density_fn: expected a [{chunk.shape[0]}] tensor of densities, got {got}")
            new[s : s + chunk_size] = d.reshape(-1).float()
        # A NaN density would poison the running max forever: count it as empty (the field's problem, reported
        # by its own checks), an infinite one as occupied.
        new = torch.nan_to_num(new, nan=0.0, posinf=torch.finfo(torch.float32).max)
        self.density.mul_(self.decay)
        self.density.scatter_reduce_(0, indices, new, reduce="amax")
        self.occupied.copy_(self.density * self.step > self.threshold)
        self.updates += 1
