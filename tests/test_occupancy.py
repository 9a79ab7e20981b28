# SPDX-License-Identifier: Apache-2.0
"""Occupancy grid: update rule, thresholding, cell lookup, checkpoints."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastdream.ops import OccupancyGrid
from fastdream.ops.occupancy import cell_indices


def _ball(radius: float = 0.5, value: float = 100.0):
    return lambda x: value * (x.norm(dim=-1) < radius).float()


def test_starts_fully_occupied():
    grid = OccupancyGrid(resolution=8)
    assert grid.occupied.all() and grid.occupied.dtype == torch.bool and grid.occupied.shape == (512,)
    assert grid.density.shape == (512,) and int(grid.updates) == 0


def test_warmup_visits_every_cell_and_thresholds_on_opacity():
    res = 8
    grid = OccupancyGrid(resolution=res, threshold=0.01, step=0.02)
    seen = []

    def fn(x):
        seen.append(x)
        return torch.full((x.shape[0],), 0.6)  # 0.6 * 0.02 = 0.012 > 0.01

    grid.update(fn, warmup=True, generator=torch.Generator().manual_seed(0))
    pts = torch.cat(seen)
    flat, inside = cell_indices(pts, res, 1.0)
    assert inside.all() and torch.equal(torch.sort(flat).values, torch.arange(res**3))  # one point per cell
    assert grid.occupied.all()
    grid.update(lambda x: torch.full((x.shape[0],), 0.4), warmup=True)  # 0.4*0.02 < thr, but the max keeps 0.57
    torch.testing.assert_close(grid.density, torch.full((res**3,), 0.6 * 0.95))
    assert grid.occupied.all()
    for _ in range(2):
        grid.update(lambda x: torch.zeros(x.shape[0]), warmup=True)
    # 0.6 * 0.95^3 = 0.514 -> opacity 0.0103 still > 0.01; one more decay crosses it
    assert grid.occupied.all()
    grid.update(lambda x: torch.zeros(x.shape[0]), warmup=True)
    assert not grid.occupied.any()
    assert int(grid.updates) == 5


def test_ball_is_found_and_lookup_matches():
    grid = OccupancyGrid(resolution=32)
    grid.update(_ball(), warmup=True, generator=torch.Generator().manual_seed(0))
    frac = grid.fraction_occupied()
    # cells with a random point inside the ball: about the ball's volume fraction (4/3 pi 0.5^3 / 8 = 0.065)
    assert 0.04 < frac < 0.09
    pts = torch.tensor([[0.0, 0.0, 0.0], [0.1, -0.2, 0.1], [0.9, 0.9, -0.9], [2.0, 0.0, 0.0], [float("nan")] * 3])
    assert grid.occupied_at(pts).tolist() == [True, True, False, False, False]


def test_after_warmup_visits_occupied_cells_and_a_random_subset():
    grid = OccupancyGrid(resolution=16)
    grid.update(_ball(), warmup=True)
    occupied_before = grid.occupied.clone()
    seen = []

    def fn(x):
        seen.append(x)
        return _ball()(x)

    grid.update(fn, warmup=False, generator=torch.Generator().manual_seed(1))
    flat, _ = cell_indices(torch.cat(seen), 16, 1.0)
    visited = torch.zeros(16**3, dtype=torch.bool)
    visited[flat] = True
    assert visited[occupied_before].all()
    assert flat.numel() == int(visited.sum())  # each visited cell evaluated once (drawn twice or drawn and occupied)
    # n / 4 cells drawn with repeats reach 1 - (1 - 1/n)^(n/4) ~ 1 - e^(-1/4) of the others (0.2 of them), plus the
    # ball's: a bound of (0.15, 0.35) let an eighth (0.18 in all) through.
    occ = occupied_before.float().mean()
    want = occ + (1 - occ) * (1 - (1 - 1 / 16**3) ** (16**3 // 4))
    assert abs(visited.float().mean() - want) < 0.03


def test_outside_points_and_cube_corners():
    res, bound = 4, 2.0
    pts = torch.tensor([[-2.0, -2.0, -2.0], [2.0, 2.0, 2.0], [1.999, 0.0, -1.999], [2.01, 0.0, 0.0]])
    flat, inside = cell_indices(pts, res, bound)
    assert inside.tolist() == [True, True, True, False]
    assert flat[:3].tolist() == [0, res**3 - 1, (3 * res + 2) * res + 0]
    assert (flat >= 0).all() and (flat < res**3).all()


def test_state_dict_round_trip():
    grid = OccupancyGrid(resolution=8)
    grid.update(_ball(), warmup=True)
    other = OccupancyGrid(resolution=8)
    other.load_state_dict(grid.state_dict())
    assert torch.equal(other.occupied, grid.occupied) and torch.equal(other.density, grid.density)
    assert int(other.updates) == 1
    assert set(grid.state_dict()) == {"density", "occupied", "updates"}


def test_nan_density_counts_as_empty_and_bad_output_is_named():
    grid = OccupancyGrid(resolution=4)
    grid.update(lambda x: torch.full((x.shape[0],), float("nan")), warmup=True)
    assert not grid.occupied.any() and torch.isfinite(grid.density).all()
    grid.update(lambda x: torch.full((x.shape[0],), float("inf")), warmup=True)  # infinite: occupied, finite
    assert grid.occupied.all() and torch.isfinite(grid.density).all()
    with pytest.raises(ValueError, match="density_fn"):
        grid.update(lambda x: torch.zeros(3), warmup=True)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="resolution"):
        OccupancyGrid(resolution=0)
    with pytest.raises(ValueError, match="bound"):
        OccupancyGrid(bound=-1.0)
    with pytest.raises(ValueError, match="decay"):
        OccupancyGrid(decay=1.5)
    with pytest.raises(ValueError, match="^resolution:"):
        OccupancyGrid(resolution=True)
    with pytest.raises(ValueError, match="^bound:"):
        OccupancyGrid(bound=float("inf"))
    with pytest.raises(ValueError, match="^bound:"):
        OccupancyGrid(bound="1")
    with pytest.raises(ValueError, match="^threshold:"):
        OccupancyGrid(threshold=float("nan"))
    for step in (0.0, -0.1, float("inf")):  # 0 or less: no cell is ever occupied, silently
        with pytest.raises(ValueError, match="^step:"):
            OccupancyGrid(step=step)
    with pytest.raises(ValueError, match="^chunk_size:"):
        OccupancyGrid(resolution=4).update(lambda x: torch.ones(x.shape[0]), warmup=True, chunk_size=0)
    with pytest.raises(ValueError, match="positions"):
        OccupancyGrid(resolution=4).occupied_at(torch.zeros(3))


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), res=st.integers(1, 12), bound=st.floats(0.1, 3.0))
def test_property_cell_of_a_cell_point_is_that_cell(seed, res, bound):
    grid = OccupancyGrid(resolution=res, bound=bound)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, res**3, (50,), generator=g)
    frac = torch.rand(50, 3, generator=g) * 0.98 + 0.01
    flat, inside = cell_indices(grid._cell_points(idx, frac), res, bound)
    assert inside.all() and torch.equal(flat, idx)


# --- audit additions --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("warmup", [True, False])
def test_update_in_chunks_equals_one_chunk(warmup):
    """chunk_size smaller than the visited cells (and not dividing them): the same densities as one call."""
    fn = _ball(0.5)
    a, b = OccupancyGrid(resolution=7), OccupancyGrid(resolution=7)
    a.update(fn, warmup=True, generator=torch.Generator().manual_seed(0))
    b.update(fn, warmup=True, generator=torch.Generator().manual_seed(0))
    a.update(fn, warmup=warmup, generator=torch.Generator().manual_seed(1))
    b.update(fn, warmup=warmup, generator=torch.Generator().manual_seed(1), chunk_size=13)
    assert torch.equal(a.density, b.density) and torch.equal(a.occupied, b.occupied)


def test_occupied_at_empty_infinite_and_other_dtypes():
    grid = OccupancyGrid(resolution=8)
    grid.update(_ball(), warmup=True, generator=torch.Generator().manual_seed(0))
    assert grid.occupied_at(torch.zeros(0, 3)).shape == (0,)
    inf = float("inf")
    pts = torch.tensor([[inf, 0.0, 0.0], [-inf, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    assert grid.occupied_at(pts).tolist() == [False, False, True]
    assert grid.occupied_at(pts.half()).tolist() == [False, False, True]
    flat, inside = cell_indices(torch.tensor([[inf, 0.0, 0.0], [-inf, -inf, -inf]]), 4, 1.0)
    assert not inside.any() and (flat >= 0).all() and (flat < 64).all()
