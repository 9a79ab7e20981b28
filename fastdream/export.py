# SPDX-License-Identifier: Apache-2.0
"""Outputs of a run: the mesh (marching cubes on the density, floaters removed, vertex colours from the
albedo) as ``mesh.glb`` (+Y up, glTF's convention and fastdream's world frame) and ``mesh.obj``, and a 360°
``turntable.mp4`` (a GIF when no mp4 writer works).

Example:
    >>> import torch
    >>> from fastdream.config import RunConfig, resolve
    >>> from fastdream.field import NeuralField
    >>> cfg = resolve(RunConfig(prompt="x", device="cpu"))
    >>> cfg.export.mesh_resolution = 32
    >>> mesh = extract_mesh(NeuralField(cfg.field), cfg)  # the initial density blob
    >>> bool(len(mesh.faces) > 0 and abs(mesh.vertices).max() < 1.0)
    True
"""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastdream.cameras import orbit_cameras
from fastdream.checkpoint import atomic_write
from fastdream.config import RunConfig
from fastdream.errors import UserError
from fastdream.field import Background, NeuralField
from fastdream.renderer import render_views
from fastdream.train import display_background


@torch.no_grad()
def _query(fn, points: torch.Tensor, device: torch.device, chunk: int = 1 << 16) -> list[torch.Tensor]:
    outs = []
    for s in range(0, points.shape[0], chunk):
        out = fn(points[s : s + chunk].to(device))
        outs.append(out if isinstance(out, tuple) else (out,))
    return [torch.cat([o[i].float().cpu() for o in outs]) for i in range(len(outs[0]))]


@torch.no_grad()
def sample_density(field: NeuralField, resolution: int) -> tuple[np.ndarray, float]:
    """Density on a ``resolution^3`` lattice over ``[-bound, bound]^3`` (0 outside the bounding sphere).

    Returns the volume indexed ``[x, y, z]`` and the lattice spacing."""
    b = field.bound
    lin = torch.linspace(-b, b, resolution)
    pts = torch.stack(torch.meshgrid(lin, lin, lin, indexing="ij"), -1).reshape(-1, 3)
    was = field.training
    field.eval()
    try:
        (sigma,) = _query(field.density, pts, field.table.device)
    finally:
        field.train(was)
    sigma = torch.where(pts.norm(dim=-1) <= b, sigma, torch.zeros_like(sigma))
    return sigma.reshape(resolution, resolution, resolution).numpy(), 2 * b / (resolution - 1)


def extract_mesh(field: NeuralField, cfg: RunConfig):
    """Marching cubes at ``cfg.export.iso_level`` (half the maximum density when nothing reaches it), small
    connected components dropped, vertex colours from the albedo. Returns a ``trimesh.Trimesh``.

    Raises:
        UserError: the field is empty (no density anywhere): nothing to export.
    """
    import trimesh
    from skimage.measure import marching_cubes

    e = cfg.export
    vol, spacing = sample_density(field, e.mesh_resolution)
    peak = float(vol.max())
    if not np.isfinite(peak) or peak <= 1e-6:
        raise UserError("the field is empty (zero density everywhere): nothing to export; train longer")
    level = e.iso_level if peak > e.iso_level else 0.5 * peak
    verts, faces, _, _ = marching_cubes(vol, level=level, spacing=(spacing,) * 3)
    verts = verts - field.bound
    mesh = trimesh.Trimesh(vertices=verts, faces=faces, process=True)
    parts = mesh.split(only_watertight=False)
    if len(parts) > 1:
        largest = max(len(p.faces) for p in parts)
        keep = [p for p in parts if len(p.faces) >= e.min_component_ratio * largest]
        mesh = trimesh.util.concatenate(keep)
    was = field.training
    field.eval()
    try:
        _, albedo = _query(field, torch.as_tensor(mesh.vertices, dtype=torch.float32), field.table.device)
    finally:
        field.train(was)
    rgb = (albedo.clamp(0, 1).numpy() * 255 + 0.5).astype(np.uint8)
    mesh.visual = trimesh.visual.ColorVisuals(
        mesh, vertex_colors=np.concatenate([rgb, np.full_like(rgb[:, :1], 255)], 1)
    )
    mesh.metadata["iso_level"] = level
    return mesh


def write_meshes(mesh, run_dir: str | Path) -> list[Path]:
    """``mesh.glb`` and ``mesh.obj`` (with vertex colours), written atomically."""
    run_dir = Path(run_dir)
    glb = mesh.export(file_type="glb")
    obj = mesh.export(file_type="obj", include_color=True)
    paths = [run_dir / "mesh.glb", run_dir / "mesh.obj"]
    atomic_write(paths[0], glb)
    atomic_write(paths[1], obj if isinstance(obj, bytes) else obj.encode())
    return paths


_TMP_NAME = re.compile(r"^\.(.+)\.tmp-\d+$")


@dataclass
class TurntableResult:
    path: Path
    note: str  # "" or why it is a GIF


def render_turntable(
    field: NeuralField, background: Background | None, grid, cfg: RunConfig, run_dir: str | Path
) -> TurntableResult:
    """A 360° orbit at 15° elevation, shaded with the light at the camera, as ``turntable.mp4``."""
    r = cfg.render
    cams = orbit_cameras(r.turntable_frames, elevation=15.0, distance=2.2, fov=50.0)
    bg = display_background(background, cfg)
    outs = render_views(
        field,
        bg,
        cams,
        r.turntable_resolution,
        shading_mode=r.turntable_shading,
        grid=grid,
        samples_per_ray=r.samples_per_ray,
        ambient=cfg.shading.ambient,
        diffuse=cfg.shading.diffuse,
    )
    frames = [(o["image"][0].clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8) for o in outs]
    return write_video(frames, Path(run_dir) / "turntable.mp4", fps=r.turntable_fps)


def write_video(frames: list[np.ndarray], path: Path, fps: int) -> TurntableResult:
    """mp4 through imageio-ffmpeg; when that fails, a GIF beside it (and the reason)."""
    import imageio.v2 as imageio

    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # format named: without the ffmpeg plugin imageio would try another writer and fail obscurely.
            # ffmpeg writes straight to our stderr: quiet, as a failure is reported in the note below.
            imageio.mimwrite(
                tmp,
                frames,
                format="FFMPEG",
                fps=fps,
                codec="libx264",
                quality=8,
                macro_block_size=1,
                ffmpeg_log_level="quiet",
            )
        data = tmp.read_bytes()
        atomic_write(path, data)
        return TurntableResult(path, "")
    except Exception as e:  # no ffmpeg binary, no codec, ...
        gif = path.with_suffix(".gif")
        buf = io.BytesIO()
        imageio.mimwrite(buf, frames, format="GIF", duration=1.0 / fps, loop=0)
        atomic_write(gif, buf.getvalue())
        why = " ".join(str(e).split())[:100]
        return TurntableResult(gif, f"could not write mp4 ({type(e).__name__}: {why}); wrote a GIF")
    finally:
        with contextlib.suppress(OSError):  # a read-only folder: the write's own error is the one to report
            tmp.unlink(missing_ok=True)


def export_all(
    field: NeuralField, background: Background | None, grid, cfg: RunConfig, run_dir: str | Path
) -> tuple[list[Path], str]:
    """Turntable and meshes into ``run_dir``; returns (paths written, a note for the user or '').

    Raises:
        UserError: the field is empty, or a file cannot be written (the earlier outputs are then kept: every
            file is written beside its final name and renamed over it).
    """
    try:
        tt = render_turntable(field, background, grid, cfg, run_dir)
        mesh = extract_mesh(field, cfg)
        return [tt.path, *write_meshes(mesh, run_dir)], tt.note
    except OSError as e:
        where = Path(e.filename2 or e.filename or run_dir)  # os.replace(tmp, final): filename2 is the final name
        where = where.with_name(_TMP_NAME.sub(r"\1", where.name))  # atomic_write's temporary: its final name
        raise UserError(
            f"cannot write {where} ({e.strerror or type(e).__name__}); the earlier outputs are kept; fix the "
            f"folder (permissions, disk space) and run fastdream export {run_dir} again"
        ) from e
