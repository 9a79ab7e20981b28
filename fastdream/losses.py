# SPDX-License-Identifier: Apache-2.0
"""DreamFusion's regularisers, on packed samples.

- Orientation: ``sum_i stopgrad(w_i) * max(0, n_i . v_i)^2`` per ray, mean over rays; ``v`` is the viewing
  direction from the camera to the point, so it penalises visible normals that face away from the camera.
- Opacity: ``sqrt(opacity^2 + 0.01)`` per ray, mean over rays; it discourages filling empty space.

Example:
    >>> import torch
    >>> w = torch.tensor([0.5]); n = torch.tensor([[0.0, 0.0, 1.0]]); v = torch.tensor([[0.0, 0.0, 1.0]])
    >>> float(orientation_loss(w, n, v, torch.tensor([0]), n_rays=1))
    0.5
    >>> round(float(opacity_loss(torch.tensor([0.0, 1.0]))), 4)
    0.5525
"""

from __future__ import annotations

import torch


def orientation_loss(
    weights: torch.Tensor,  # [S] compositing weights
    normals: torch.Tensor,  # [S, 3] unit normals
    directions: torch.Tensor,  # [S, 3] unit view directions, camera -> point
    ray_indices: torch.Tensor,  # [S] int64
    n_rays: int,
) -> torch.Tensor:  # scalar
    """Mean over rays of ``sum stopgrad(w) * relu(n . v)^2``; gradients reach only the normals."""
    facing_away = torch.relu((normals.float() * directions.float()).sum(-1)).square()
    per_sample = weights.detach().float() * facing_away
    per_ray = torch.zeros(n_rays, dtype=per_sample.dtype, device=per_sample.device)
    per_ray = per_ray.index_add(0, ray_indices, per_sample)
    return per_ray.mean()


def opacity_loss(opacity: torch.Tensor) -> torch.Tensor:  # [R] accumulated opacity per ray -> scalar
    """Mean over rays of ``sqrt(opacity^2 + 0.01)``."""
    return torch.sqrt(opacity.float().square() + 0.01).mean()
