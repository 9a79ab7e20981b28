# SPDX-License-Identifier: Apache-2.0
"""The builtin prior's data: every primitive, in every colour and shading mode, from the generator's cameras.

What the trainer renders, the data shows. The trainer draws cameras and point lights from
:func:`fastdream.cameras.sample_cameras` with the run's :class:`~fastdream.cameras.CameraConfig`, casts one
ray per pixel centre (:func:`fastdream.cameras.get_rays`) and shades with :func:`fastdream.ops.shade` in one
of three modes. So the data are, for each primitive and each of ``cameras_per_view`` cameras of every view
word (front, side, back, overhead: balanced, drawn from that same distribution with a fixed seed):

- ``shaded``: ``rho * S`` with ``S`` the Lambertian shade of a white surface (ambient + diffuse * cos);
- ``albedo``: ``rho * A`` with ``A`` the 0/1 silhouette (the renderer's opacity);
- ``textureless``: ``S`` (the shade op replaces the albedo by white light);

for every colour ``rho`` of the palette, composited over a background: ``x = rho * B + (1 - A) * background``.
Lambertian shading is linear in a uniform albedo, so each (primitive, camera) is rendered once (``S``, ``A``)
and coloured on the fly: the denoiser never materialises the ~30k images.

Background: the trainer's is a learned environment map (or a random or white solid colour). The prior takes
the background of each render as an input (read at its corners, which always miss the bounding sphere) and
composites its data over that same colour, so it judges the object only: it never asks the field to paint
the background or to fill space to hide it, and the environment map is free. ``config.background`` (black)
is only the default of :meth:`BuiltinDataset.image`.

The surface is found by sphere tracing the exact SDF (what the volume renderer shows of an opaque field, one
ray per pixel; volume-rendering ~1300 images through ``march_rays``/``composite`` would cost minutes of a
first run on a CPU, tracing costs seconds), normals are the SDF's analytic gradient, and shading is
fastdream's own shade op. The arrays are cached as uint8 under ``$FASTDREAM_CACHE`` (default
``~/.cache/fastdream``), written atomically, generated on first use (a few seconds).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fastdream.builtin.primitives import BOUNDING_RADIUS, normals, sdf
from fastdream.builtin.vocabulary import COLOURS, SHAPES
from fastdream.cameras import VIEW_WORDS, CameraConfig, Cameras, get_rays, sample_cameras, view_word
from fastdream.config import BUILTIN_DISTANCE, BUILTIN_FOV, ShadingConfig
from fastdream.ops import shade

DATA_VERSION = 1


@dataclass(frozen=True)
class DatasetConfig:
    """How the builtin data are made (all fields enter the cache key).

    Attributes:
        resolution: image size H = W (the guidance's resolution).
        cameras_per_view: cameras per view word; 4x this per primitive.
        seed: seed of the camera draw.
        ambient, diffuse: grey light intensities of the trainer's shading.
        background: RGB of the background, 0..1.
        distance_range, fov_range: the run's camera distance and vertical fov (degrees); fixed by default
            (``fastdream.config.BUILTIN_DISTANCE`` / ``BUILTIN_FOV``).
        elevation_range, azimuth_range, uniform_sphere_elevation, light_distance_range, light_jitter: the rest of
            the run's camera and light distribution (:class:`~fastdream.cameras.CameraConfig`'s defaults unless the
            run set them).
    """

    resolution: int = 64
    cameras_per_view: int = 64
    seed: int = 0
    ambient: float = ShadingConfig().ambient[0]  # the trainer's defaults (grey light)
    diffuse: float = ShadingConfig().diffuse[0]
    background: tuple[float, float, float] = (0.0, 0.0, 0.0)
    distance_range: tuple[float, float] = (BUILTIN_DISTANCE, BUILTIN_DISTANCE)  # the run's camera distribution
    fov_range: tuple[float, float] = (BUILTIN_FOV, BUILTIN_FOV)
    elevation_range: tuple[float, float] = CameraConfig().elevation_range
    azimuth_range: tuple[float, float] = CameraConfig().azimuth_range
    uniform_sphere_elevation: bool = CameraConfig().uniform_sphere_elevation
    light_distance_range: tuple[float, float] = CameraConfig().light_distance_range
    light_jitter: float = CameraConfig().light_jitter

    def camera(self) -> CameraConfig:
        """The run's camera distribution that the data are drawn from."""
        return CameraConfig(
            elevation_range=tuple(self.elevation_range),
            azimuth_range=tuple(self.azimuth_range),
            distance_range=tuple(self.distance_range),
            fov_range=tuple(self.fov_range),
            uniform_sphere_elevation=bool(self.uniform_sphere_elevation),
            light_distance_range=tuple(self.light_distance_range),
            light_jitter=float(self.light_jitter),
        )

    def key(self) -> str:
        blob = repr((DATA_VERSION, sorted(asdict(self).items()), SHAPES, self.camera()))
        return hashlib.sha1(blob.encode()).hexdigest()[:10]


@dataclass
class BuiltinDataset:
    """Shade and silhouette images of every (primitive, camera), and their labels.

    Attributes:
        shade: [P, J, H, W] float32 in [0, 1], the Lambertian shade S of a white surface (0 off the object).
        alpha: [P, J, H, W] float32 in {0, 1}, the silhouette A.
        views: [J] int64 index into :data:`fastdream.cameras.VIEW_WORDS` of each camera.
        elevation, azimuth: [J] degrees of each camera.
        shapes: the P primitive names; colours: name -> RGB.
        config: how it was made.
    """

    shade: torch.Tensor
    alpha: torch.Tensor
    views: torch.Tensor
    elevation: torch.Tensor
    azimuth: torch.Tensor
    shapes: tuple[str, ...]
    colours: dict[str, tuple[float, float, float]]
    config: DatasetConfig

    def image(self, shape: str, camera: int, colour: str, mode: str = "shaded") -> torch.Tensor:
        """One data image [3, H, W] in [0, 1] (``mode`` shaded, albedo or textureless)."""
        p = self.shapes.index(shape)
        rho = torch.tensor([1.0, 1.0, 1.0] if mode == "textureless" else self.colours[colour])
        base = self.alpha[p, camera] if mode == "albedo" else self.shade[p, camera]
        bg = torch.tensor(self.config.background)
        return rho[:, None, None] * base + bg[:, None, None] * (1 - self.alpha[p, camera])

    def label(self, camera: int) -> str:
        return VIEW_WORDS[int(self.views[camera])]


# balanced_cameras draws at most this many cameras at once from the run's distribution (a word it has not filled
# by then is all but unreachable there).
MAX_CAMERA_DRAW = 1 << 16


def _pick(cfg: CameraConfig, per_view: int, g: torch.Generator, words) -> tuple[Cameras, dict[str, list[int]]]:
    """Draws of ``cfg``, doubling from ``8 * per_view``, until each of ``words`` has ``per_view`` cameras or a draw
    of MAX_CAMERA_DRAW is done: (the last draw, the picked indices per word, maybe fewer than ``per_view``)."""
    n = 8 * per_view
    while True:
        pool = sample_cameras(cfg, n, g)
        picked: dict[str, list[int]] = {w: [] for w in words}
        for i in range(n):
            w = view_word(float(pool.elevation[i]), float(pool.azimuth[i]))
            if w in picked and len(picked[w]) < per_view:
                picked[w].append(i)
        if all(len(v) == per_view for v in picked.values()) or n >= MAX_CAMERA_DRAW:
            return pool, picked
        n *= 2


def balanced_cameras(per_view: int, seed: int, cfg: CameraConfig | None = None):
    """``per_view`` cameras of each view word, in order front.., side.., back.., overhead.., drawn from ``cfg``.

    A run's ranges may all but exclude a word (``--set camera.elevation_range=[0,30]``: no overhead views). The
    trainer then never asks the prior about it, but the prior still needs the word's images: what that word lacks
    is drawn from the default elevation and azimuth ranges (with the run's distance, lens and lights)."""
    cfg = cfg or CameraConfig()
    g = torch.Generator().manual_seed(seed)
    pool, picked = _pick(cfg, per_view, g, VIEW_WORDS)
    short = [w for w in VIEW_WORDS if len(picked[w]) < per_view]
    if short:
        wide = dataclasses.replace(
            cfg,
            elevation_range=CameraConfig().elevation_range,
            azimuth_range=CameraConfig().azimuth_range,
            uniform_sphere_elevation=False,
        )
        extra, more = _pick(wide, per_view, g, short)
        offset = len(pool)
        pool = Cameras(*(torch.cat([getattr(pool, f.name), getattr(extra, f.name)]) for f in dataclasses.fields(pool)))
        for w in short:
            picked[w] += [offset + i for i in more[w][: per_view - len(picked[w])]]
    order = torch.tensor([i for w in VIEW_WORDS for i in picked[w]])
    views = torch.arange(len(VIEW_WORDS)).repeat_interleave(per_view)
    return pool[order], views


def _trace(shape: str, rays_o: torch.Tensor, rays_d: torch.Tensor, iters: int = 40, eps: float = 1e-3):
    """First hit of each ray with the primitive by sphere tracing its exact SDF: (hit [R] bool, points [R, 3]).

    Only rays that meet the primitive's bounding sphere are traced, with dense iterations (index bookkeeping
    per iteration costs more than the SDF on a CPU).
    """
    r = BOUNDING_RADIUS[shape] + 1e-3
    b = (rays_o * rays_d).sum(-1)
    disc = b * b - (rays_o.square().sum(-1) - r * r)
    idx = torch.nonzero(disc > 0).squeeze(1)
    o, d = rays_o[idx], rays_d[idx]
    root = disc[idx].sqrt()
    t, t_far = (-b[idx] - root).clamp_min(0), -b[idx] + root
    for _ in range(iters):
        t = torch.minimum(t + sdf(shape, torch.addcmul(o, t[:, None], d)).clamp_min(0), t_far)
    p = torch.addcmul(o, t[:, None], d)
    hit = torch.zeros(rays_o.shape[0], dtype=torch.bool)
    hit[idx] = sdf(shape, p) < eps
    points = rays_o.clone()
    points[idx] = p
    return hit, points


@torch.no_grad()
def render_dataset(cfg: DatasetConfig = DatasetConfig()) -> BuiltinDataset:
    """Render the data (no cache). A few seconds on a CPU at the default size."""
    cams, views = balanced_cameras(cfg.cameras_per_view, cfg.seed, cfg.camera())
    j, res = len(cams), cfg.resolution
    shade_img = torch.zeros(len(SHAPES), j, res * res)
    alpha_img = torch.zeros(len(SHAPES), j, res * res)
    ambient, diffuse = torch.full((3,), cfg.ambient), torch.full((3,), cfg.diffuse)
    rays_o, rays_d = get_rays(cams, res, res)  # [J*H*W, 3]
    for p, shape in enumerate(SHAPES):
        hit, points = _trace(shape, rays_o, rays_d)
        hit = hit.reshape(j, res * res)
        points = points.reshape(j, res * res, 3)
        for k in range(j):
            pts = points[k][hit[k]]
            if pts.shape[0] == 0:
                continue
            n = normals(shape, pts)
            c = shade(torch.ones_like(pts), n, pts, cams.light[k].float(), ambient, diffuse, "shaded")
            shade_img[p, k, hit[k]] = c[:, 0].float()
        alpha_img[p] = hit.float()
    return BuiltinDataset(
        shade=shade_img.reshape(len(SHAPES), j, res, res).clamp(0, 1),
        alpha=alpha_img.reshape(len(SHAPES), j, res, res),
        views=views,
        elevation=cams.elevation.clone(),
        azimuth=cams.azimuth.clone(),
        shapes=SHAPES,
        colours=dict(COLOURS),
        config=cfg,
    )


def cache_dir() -> Path:
    return Path(os.environ.get("FASTDREAM_CACHE") or Path.home() / ".cache" / "fastdream")


def _blob_fits(blob: object, cfg: DatasetConfig) -> bool:
    """Whether a loaded cache file holds the arrays ``cfg`` makes (a damaged one that still loads failed later,
    inside the guidance, with a traceback)."""
    if not isinstance(blob, dict):
        return False
    j, res = len(VIEW_WORDS) * cfg.cameras_per_view, cfg.resolution
    shade, alpha, views = blob.get("shade"), blob.get("alpha"), blob.get("views")
    elevation, azimuth = blob.get("elevation"), blob.get("azimuth")
    images = (len(SHAPES), j, res, res)
    return (
        isinstance(shade, torch.Tensor)
        and shade.dtype == torch.uint8
        and tuple(shade.shape) == images
        and isinstance(alpha, torch.Tensor)
        and tuple(alpha.shape) == images
        and all(
            isinstance(t, torch.Tensor) and t.shape == (j,) and bool(t.isfinite().all()) for t in (elevation, azimuth)
        )
        and isinstance(views, torch.Tensor)
        and views.shape == (j,)
        and not views.is_floating_point()
        and bool(((views >= 0) & (views < len(VIEW_WORDS))).all())
    )


def load_dataset(cfg: DatasetConfig = DatasetConfig(), cache: bool = True) -> BuiltinDataset:
    """The data for ``cfg``: read from the cache, or rendered and cached (atomic write) on first use."""
    path = cache_dir() / f"builtin-v{DATA_VERSION}-{cfg.key()}.pt"
    if cache and path.exists():
        try:
            with warnings.catch_warnings():  # a foreign pickle's protocol warning: the file is rendered again
                warnings.simplefilter("ignore")
                blob = torch.load(path, map_location="cpu", weights_only=True)
            if not _blob_fits(blob, cfg):
                raise ValueError("a cache file of other shapes")
            return BuiltinDataset(
                shade=blob["shade"].float() / 255.0,
                alpha=blob["alpha"].float(),
                views=blob["views"],
                elevation=blob["elevation"],
                azimuth=blob["azimuth"],
                shapes=SHAPES,
                colours=dict(COLOURS),
                config=cfg,
            )
        except Exception:  # a corrupt or foreign file: render again and overwrite it
            pass
    ds = render_dataset(cfg)
    # Quantise like an 8-bit image, and use the quantised values now too, so a fresh and a cached
    # dataset are bit-identical.
    q = (ds.shade * 255.0).round().to(torch.uint8)
    ds.shade = q.float() / 255.0
    if cache:
        blob = {
            "shade": q,
            "alpha": ds.alpha.to(torch.bool),
            "views": ds.views,
            "elevation": ds.elevation,
            "azimuth": ds.azimuth,
        }
        from fastdream.checkpoint import atomic_write

        try:  # the umask's permissions (mkstemp's 0600 kept a shared cache to its first user)
            atomic_write(path, lambda f: torch.save(blob, f))
        except OSError:  # a read-only cache is not an error: the data are only re-rendered next time
            pass
    return ds


__all__ = ["BuiltinDataset", "DatasetConfig", "balanced_cameras", "load_dataset", "render_dataset"]
