# SPDX-License-Identifier: Apache-2.0
"""Volume rendering of the field: rays -> marched samples -> field -> shading -> compositing.

Used by the trainer, the previews, the turntable and the CUDA-graph render (``render_graphs``); every step goes
through the public ops (``march_rays``, ``shade``, ``composite``).

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


def render_samples(
    field: NeuralField,
    background: Background | torch.Tensor | None,
    samples: Any,
    rays_d: torch.Tensor,
    lights: torch.Tensor,
    *,
    pixels_per_camera: int,
    mode: ShadeMode,
    ambient: torch.Tensor,
    diffuse: torch.Tensor,
    need_normals: bool,
    normals_method: str | None = None,
    density_and_normals: Any = None,
    textureless: torch.Tensor | None = None,
) -> dict[str, torch.Tensor | None]:
    """Everything :func:`render` does after marching: the field (and its normals), shading, the background and
    compositing, per ray (not yet images).

    Args:
        samples: packed samples (``positions``, ``ray_indices``, ``t_starts``, ``t_ends``, ``offsets``) of the
            rays of ``B`` cameras, ``pixels_per_camera`` rays each, camera after camera.
        rays_d: [R, 3] ray directions (the environment map's input).
        lights: [B, 3] light positions, one per camera.
        ambient, diffuse: [3] light colours.
        need_normals: compute normals (the shaded and textureless modes need them).
        textureless: with ``mode`` shaded, a [1] tensor holding 0 (shaded) or 1 (textureless): the albedo is
            blended towards white by it before shading. Exactly the two modes' values and gradients, with the
            mode a tensor rather than a constant (one CUDA graph serves both, :mod:`fastdream.render_graphs`).

    Returns:
        ``image_rays`` [R, 3], ``opacity`` [R], ``depth`` [R], ``weights`` [S], ``normals`` [S, 3] or None,
        ``normals_rays`` [R, 3] (composited normals) or None.
    """
    positions = samples.positions
    n_rays = rays_d.shape[0]
    n_cams = lights.shape[0]
    if need_normals:
        fn = density_and_normals or field.density_and_normals
        sigma, albedo, normals = fn(positions, method=normals_method)
    else:
        sigma, albedo = field(positions)
        normals = None

    if textureless is not None:
        if mode != ShadeMode.SHADED:
            raise ValueError(f"textureless: only with the shaded mode, got {mode.name.lower()}")
        # 0: albedo * 1 + 0, the albedo exactly; 1: albedo * 0 + 1, white exactly, as the textureless mode has it
        # (rho = 1 in the shading, no gradient to the albedo).
        albedo = albedo * (1.0 - textureless) + textureless
    if mode == ShadeMode.ALBEDO:
        colors = albedo
    elif n_cams == 1:  # no host read of the camera's sample range (CUDA graphs)
        colors = shade(albedo, normals, positions, lights[0].float(), ambient, diffuse, mode)
    else:
        # Samples are packed ray by ray and rays camera by camera: each camera's samples are one slice.
        cam_starts = torch.arange(0, n_cams + 1, device=positions.device) * pixels_per_camera
        bounds = samples.offsets[cam_starts].tolist()
        parts = []
        for i in range(n_cams):
            s0, s1 = bounds[i], bounds[i + 1]
            parts.append(
                shade(albedo[s0:s1], normals[s0:s1], positions[s0:s1], lights[i].float(), ambient, diffuse, mode)
            )
        colors = torch.cat(parts) if parts else albedo
    bg = _background_colors(background, rays_d, n_cams)
    comp = composite(sigma, colors.float(), samples, n_rays, background=bg)
    normals_rays = None
    if normals is not None:
        nimg = torch.zeros(n_rays, 3, device=positions.device, dtype=torch.float32)
        normals_rays = nimg.index_add(0, samples.ray_indices, comp.weights[:, None] * normals.float())
    return {
        "image_rays": comp.image,
        "opacity": comp.opacity,
        "depth": comp.depth,
        "weights": comp.weights,
        "normals": normals,
        "normals_rays": normals_rays,
    }


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
    need_normals = bool(need_normals) or mode != ShadeMode.ALBEDO
    amb = torch.as_tensor(ambient, dtype=torch.float32, device=device)
    dif = torch.as_tensor(diffuse, dtype=torch.float32, device=device)
    res = render_samples(
        field,
        background,
        samples,
        rays_d,
        cameras.light,
        pixels_per_camera=height * width,
        mode=mode,
        ambient=amb,
        diffuse=dif,
        need_normals=need_normals,
        normals_method=normals_method,
        density_and_normals=density_and_normals,
    )
    normals_image = None
    if res["normals_rays"] is not None:
        normals_image = _to_image(res["normals_rays"], b, height, width)
    normals = res["normals"]
    positions = samples.positions

    return {
        "image": _to_image(res["image_rays"], b, height, width),
        "opacity": _to_image(res["opacity"][:, None], b, height, width),
        "depth": _to_image(res["depth"][:, None], b, height, width),
        "normals_image": normals_image,
        "weights": res["weights"],
        "normals": normals,
        "directions": samples.directions,
        "ray_indices": samples.ray_indices,
        "ray_opacity": res["opacity"],
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
