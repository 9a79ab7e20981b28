# SPDX-License-Identifier: Apache-2.0
"""Volume rendering of the field: rays -> marched samples -> field -> shading -> compositing.

Used by the trainer, the previews, the turntable, the builtin prior's data and ``fastdream evaluate``; every
step goes through the public ops (``march_rays``, ``shade``, ``composite``).

Example:
    >>> import torch
    >>> from fastdream.config import RunConfig, resolve
    >>> from fastdream.cameras import orbit_cameras
    >>> from fastdream.field import NeuralField
    >>> cfg = resolve(RunConfig(prompt="x", device="cpu"))
    >>> out = render(NeuralField(cfg.field), torch.ones(3), orbit_cameras(2), 16, 16, shading_mode="albedo")
    >>> out["image"].shape, out["opacity"].shape
    (torch.Size([2, 3, 16, 16]), torch.Size([2, 1, 16, 16]))
"""

from __future__ import annotations

from typing import Any

import torch

from fastdream.cameras import Cameras, get_rays
from fastdream.field import Background, NeuralField
from fastdream.ops import ShadeMode, composite, march_rays, prune_occluded, shade

DEFAULT_AMBIENT = (0.3, 0.3, 0.3)
DEFAULT_DIFFUSE = (0.7, 0.7, 0.7)


def _background_colors(
    background: Background | torch.Tensor | None, rays_d: torch.Tensor, n_cams: int
) -> torch.Tensor:  # [R, 3]
    if background is None:
        return torch.ones_like(rays_d)
    if isinstance(background, torch.Tensor):
        col = background.to(rays_d.device, torch.float32)
        if col.dim() == 1:
            return col[None].expand(rays_d.shape[0], 3)
        return col.repeat_interleave(rays_d.shape[0] // n_cams, dim=0)  # [B, 3] -> per ray
    return background(rays_d)


def render(
    field: NeuralField,
    background: Background | torch.Tensor | None,
    cameras: Cameras,
    height: int,
    width: int,
    *,
    shading_mode: ShadeMode | str = "albedo",
    grid: Any = None,
    samples_per_ray: int = 96,
    bound: float | None = None,
    ambient: tuple[float, float, float] | torch.Tensor = DEFAULT_AMBIENT,
    diffuse: tuple[float, float, float] | torch.Tensor = DEFAULT_DIFFUSE,
    need_normals: bool | None = None,
    normals_method: str | None = None,
    jitter: bool = False,
    generator: torch.Generator | None = None,
    prune: bool = False,
    density_and_normals: Any = None,
) -> dict[str, Any]:
    """Render ``B`` cameras at ``height`` x ``width``.

    Args:
        background: an environment-map module, a colour [3] or per-camera colours [B, 3], or None (white).
        shading_mode: "albedo" | "shaded" | "textureless" (the latter two need normals).
        grid: an occupancy grid (skips empty space) or None.
        samples_per_ray: march step = 2 * bound / samples_per_ray.
        need_normals: also compute normals in albedo mode (shaded and textureless always do).
        jitter: random sample offsets along each ray (training).
        prune: evaluate the density first without gradients and drop the samples that compositing would skip
            (behind the point where a ray's transmittance falls below 1e-4: the inside of opaque objects).
            Exact: the image, the weights and every gradient are unchanged (:func:`fastdream.ops.prune_occluded`).
        density_and_normals: replaces ``field.density_and_normals`` (same signature), e.g. the CUDA-graph replay
            of :class:`fastdream.field_graphs.GraphedDensityAndNormals`.

    Returns:
        dict with ``image`` [B, 3, H, W], ``opacity`` [B, 1, H, W], ``depth`` [B, 1, H, W],
        ``normals_image`` [B, 3, H, W] (composited world normals in [-1, 1], or None), and per-sample tensors for
        the regularisers: ``weights`` [S], ``normals`` [S, 3] or None, ``directions`` [S, 3] (camera to point),
        ``ray_indices`` [S], ``ray_opacity`` [R], ``n_rays``, ``samples``.
    """
    mode = ShadeMode.parse(shading_mode)
    bound = field.bound if bound is None else bound
    device = field.table.device
    cameras = cameras.to(device)
    b = len(cameras)
    rays_o, rays_d = get_rays(cameras, height, width)
    n_rays = rays_o.shape[0]
    samples = march_rays(
        rays_o,
        rays_d,
        grid,
        step=2.0 * bound / samples_per_ray,
        bound=bound,
        jitter=jitter,
        generator=generator,
    )
    if prune and samples.n_samples > 0:
        with torch.no_grad():
            samples = prune_occluded(samples, field.density(samples.positions))
    positions = samples.positions
    need_normals = bool(need_normals) or mode != ShadeMode.ALBEDO
    if need_normals:
        fn = density_and_normals or field.density_and_normals
        sigma, albedo, normals = fn(positions, method=normals_method)
    else:
        sigma, albedo = field(positions)
        normals = None

    if mode == ShadeMode.ALBEDO:
        colors = albedo
    else:
        amb = torch.as_tensor(ambient, dtype=torch.float32, device=device)
        dif = torch.as_tensor(diffuse, dtype=torch.float32, device=device)
        # Samples are packed ray by ray and rays camera by camera: each camera's samples are one slice.
        pix = height * width
        bounds = samples.offsets[torch.arange(0, b + 1, device=device) * pix].tolist()
        parts = []
        for i in range(b):
            s0, s1 = bounds[i], bounds[i + 1]
            parts.append(
                shade(
                    albedo[s0:s1],
                    normals[s0:s1],
                    positions[s0:s1],
                    cameras.light[i].float(),
                    amb,
                    dif,
                    mode,
                )
            )
        colors = torch.cat(parts) if parts else albedo
    bg = _background_colors(background, rays_d, b)
    comp = composite(sigma, colors.float(), samples, n_rays, background=bg)
    normals_image = None
    if normals is not None:
        nimg = torch.zeros(n_rays, 3, device=device, dtype=torch.float32)
        nimg = nimg.index_add(0, samples.ray_indices, comp.weights[:, None] * normals.float())
        normals_image = _to_image(nimg, b, height, width)

    return {
        "image": _to_image(comp.image, b, height, width),
        "opacity": _to_image(comp.opacity[:, None], b, height, width),
        "depth": _to_image(comp.depth[:, None], b, height, width),
        "normals_image": normals_image,
        "weights": comp.weights,
        "normals": normals,
        "directions": samples.directions,
        "ray_indices": samples.ray_indices,
        "ray_opacity": comp.opacity,
        "n_rays": n_rays,
        "samples": samples,
        "n_samples": int(positions.shape[0]),
    }


def _to_image(per_ray: torch.Tensor, b: int, height: int, width: int) -> torch.Tensor:  # [R, C] -> [B, C, H, W]
    return per_ray.reshape(b, height, width, -1).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def render_views(
    field: NeuralField,
    background: Background | torch.Tensor | None,
    cameras: Cameras,
    size: int,
    *,
    shading_mode: str = "albedo",
    need_normals: bool | None = None,
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """Render cameras one at a time without gradients (previews, turntables): bounded memory."""
    was_training = field.training
    field.eval()
    try:
        return [
            render(
                field,
                background,
                cameras[i],
                size,
                size,
                shading_mode=shading_mode,
                need_normals=need_normals,
                **kwargs,
            )
            for i in range(len(cameras))
        ]
    finally:
        field.train(was_training)
