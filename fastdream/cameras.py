# SPDX-License-Identifier: Apache-2.0
"""Cameras, rays, lights and view words.

World frame: right-handed, +Y up, the object inside the bounding sphere of radius 1 at the origin.
Azimuth 0 puts the camera on +Z looking at the object's front; elevation 90° is overhead. Cameras follow the
OpenGL convention: in camera space the camera looks down -Z with +Y up and +X right; image row 0 is the top.

Example:
    >>> import torch
    >>> from fastdream.cameras import CameraConfig, sample_cameras, get_rays
    >>> cams = sample_cameras(CameraConfig(), n=1, generator=torch.Generator().manual_seed(0))
    >>> rays_o, rays_d = get_rays(cams, 64, 64)
    >>> rays_o.shape, rays_d.shape
    (torch.Size([4096, 3]), torch.Size([4096, 3]))
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DEFAULT_DISTANCE_RANGE = (2.0, 2.5)
DEFAULT_FOV_RANGE = (40.0, 60.0)


@dataclass
class CameraConfig:
    """Random camera and light distribution of the optimisation (DreamFusion's, scaled to a bound of 1).

    Angles in degrees, distances in world units.
    """

    elevation_range: tuple[float, float] = (-10.0, 90.0)
    azimuth_range: tuple[float, float] = (-180.0, 180.0)
    # None: DreamFusion's (2.0, 2.5) and (40, 60) for diffusion models; for --model builtin, fastdream.config.resolve
    # fixes them at BUILTIN_DISTANCE and BUILTIN_FOV (see there).
    distance_range: tuple[float, float] | None = None  # camera outside the bounding sphere of radius 1
    fov_range: tuple[float, float] | None = None  # vertical field of view
    # DreamFusion samples the elevation uniformly on the sphere rather than in angle when True.
    uniform_sphere_elevation: bool = False
    light_distance_range: tuple[float, float] = (0.8, 1.5)  # light = camera position * U(range) + noise
    light_jitter: float = 0.5  # std of the Gaussian offset of the light around the scaled camera position


@dataclass
class Cameras:
    """A batch of B pinhole cameras with their point lights.

    Attributes:
        c2w: [B, 4, 4] camera-to-world matrices (OpenGL convention).
        fov: [B] vertical field of view in radians.
        elevation, azimuth, distance: [B] in degrees, degrees, world units.
        light: [B, 3] point-light positions in world space.
    """

    c2w: torch.Tensor
    fov: torch.Tensor
    elevation: torch.Tensor
    azimuth: torch.Tensor
    distance: torch.Tensor
    light: torch.Tensor

    def __len__(self) -> int:
        return self.c2w.shape[0]

    @property
    def position(self) -> torch.Tensor:  # [B, 3]
        return self.c2w[:, :3, 3]

    def to(self, device: torch.device | str) -> Cameras:
        return Cameras(
            *(getattr(self, f).to(device) for f in ("c2w", "fov", "elevation", "azimuth", "distance", "light"))
        )

    def __getitem__(self, i: int | slice) -> Cameras:
        idx = slice(i, i + 1) if isinstance(i, int) else i
        return Cameras(*(getattr(self, f)[idx] for f in ("c2w", "fov", "elevation", "azimuth", "distance", "light")))


def look_at(position: torch.Tensor) -> torch.Tensor:
    """[B, 3] camera positions -> [B, 4, 4] camera-to-world matrices looking at the origin, +Y up.

    Overhead cameras (looking straight down) take -Z as image up, so the object's front is at the bottom.
    """
    forward = torch.nn.functional.normalize(-position, dim=-1)  # camera looks along -Z_cam = forward
    up = torch.tensor([0.0, 1.0, 0.0], dtype=position.dtype, device=position.device).expand_as(position)
    alt = torch.tensor([0.0, 0.0, -1.0], dtype=position.dtype, device=position.device).expand_as(position)
    degenerate = torch.linalg.cross(forward, up).norm(dim=-1, keepdim=True) < 1e-6
    up = torch.where(degenerate, alt, up)
    right = torch.nn.functional.normalize(torch.linalg.cross(forward, up), dim=-1)
    true_up = torch.linalg.cross(right, forward)
    c2w = torch.eye(4, dtype=position.dtype, device=position.device).repeat(position.shape[0], 1, 1)
    c2w[:, :3, 0] = right
    c2w[:, :3, 1] = true_up
    c2w[:, :3, 2] = -forward
    c2w[:, :3, 3] = position
    return c2w


def spherical_to_position(elevation: torch.Tensor, azimuth: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
    """Degrees, degrees, units -> [B, 3]; azimuth 0 is +Z, azimuth 90 is +X, elevation 90 is +Y."""
    el, az = torch.deg2rad(elevation), torch.deg2rad(azimuth)
    return torch.stack(
        [distance * torch.cos(el) * torch.sin(az), distance * torch.sin(el), distance * torch.cos(el) * torch.cos(az)],
        dim=-1,
    )


def make_cameras(
    elevation: torch.Tensor,  # [B] degrees
    azimuth: torch.Tensor,  # [B] degrees
    distance: torch.Tensor,  # [B]
    fov: torch.Tensor,  # [B] degrees
    light: torch.Tensor | None = None,  # [B, 3]; default: at the camera
) -> Cameras:
    position = spherical_to_position(elevation, azimuth, distance)
    return Cameras(
        c2w=look_at(position),
        fov=torch.deg2rad(fov),
        elevation=elevation,
        azimuth=azimuth,
        distance=distance,
        light=position.clone() if light is None else light,
    )


def _uniform(lo_hi: tuple[float, float], n: int, g: torch.Generator | None) -> torch.Tensor:
    lo, hi = lo_hi
    return lo + (hi - lo) * torch.rand(n, generator=g)


def sample_cameras(cfg: CameraConfig, n: int = 1, generator: torch.Generator | None = None) -> Cameras:
    """Random cameras and lights of one optimisation step (on the CPU; move with ``.to``)."""
    if cfg.uniform_sphere_elevation:
        lo, hi = (math.sin(math.radians(a)) for a in cfg.elevation_range)
        elevation = torch.rad2deg(torch.asin(_uniform((lo, hi), n, generator)))
    else:
        elevation = _uniform(cfg.elevation_range, n, generator)
    azimuth = _uniform(cfg.azimuth_range, n, generator)
    distance = _uniform(cfg.distance_range or DEFAULT_DISTANCE_RANGE, n, generator)
    fov = _uniform(cfg.fov_range or DEFAULT_FOV_RANGE, n, generator)
    position = spherical_to_position(elevation, azimuth, distance)
    scale = _uniform(cfg.light_distance_range, n, generator)[:, None]
    light = position * scale + cfg.light_jitter * torch.randn(n, 3, generator=generator)
    return make_cameras(elevation, azimuth, distance, fov, light)


def orbit_cameras(
    n: int, elevation: float = 15.0, distance: float = 2.2, fov: float = 50.0, start_azimuth: float = 0.0
) -> Cameras:
    """``n`` cameras evenly spaced in azimuth (a turntable), light at each camera."""
    az = start_azimuth + torch.arange(n, dtype=torch.float32) * (360.0 / n)
    az = torch.remainder(az + 180.0, 360.0) - 180.0
    full = torch.full((n,), 1.0)
    return make_cameras(full * elevation, az, full * distance, full * fov)


def get_rays(cameras: Cameras, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rays through the pixel centres of every camera.

    Returns:
        rays_o: [B*H*W, 3] origins (the camera positions); rays_d: [B*H*W, 3] unit directions. Pixels are
        in row-major order per camera, row 0 at the top of the image.
    """
    device, dtype = cameras.c2w.device, cameras.c2w.dtype
    b = len(cameras)
    j, i = torch.meshgrid(
        torch.arange(height, device=device, dtype=dtype) + 0.5,
        torch.arange(width, device=device, dtype=dtype) + 0.5,
        indexing="ij",
    )
    focal = 0.5 * height / torch.tan(0.5 * cameras.fov)  # [B] in pixels
    x = (i[None] - 0.5 * width) / focal[:, None, None]
    y = -(j[None] - 0.5 * height) / focal[:, None, None]
    dirs_cam = torch.stack([x, y, -torch.ones_like(x)], dim=-1)  # [B, H, W, 3]
    dirs = torch.einsum("bhwc,brc->bhwr", dirs_cam, cameras.c2w[:, :3, :3])
    dirs = torch.nn.functional.normalize(dirs, dim=-1).reshape(b * height * width, 3)
    origins = cameras.position[:, None, :].expand(b, height * width, 3).reshape(-1, 3)
    return origins.contiguous(), dirs.contiguous()


VIEW_WORDS = ("front", "side", "back", "overhead")


def view_word(elevation: float, azimuth: float) -> str:
    """DreamFusion's view-dependent prompt word: overhead above 60° elevation, front within 45° of azimuth 0,
    back within 45° of azimuth 180, side otherwise. Thresholds are exclusive (60° itself is not overhead,
    45° itself is side)."""
    if elevation > 60.0:
        return "overhead"
    az = (azimuth + 180.0) % 360.0 - 180.0  # [-180, 180): 180 is -180, "back" either way
    if abs(az) < 45.0:
        return "front"
    if abs(az) > 135.0:
        return "back"
    return "side"
