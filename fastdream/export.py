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
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastdream.cameras import orbit_cameras
from fastdream.checkpoint import atomic_write, fsync_dir
from fastdream.config import RunConfig
from fastdream.errors import UserError, out_of_memory
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
def sample_density(field: NeuralField, resolution: int, chunk: int = 1 << 16) -> tuple[np.ndarray, float]:
    """Density on a ``resolution^3`` lattice over ``[-bound, bound]^3`` (0 outside the bounding sphere).

    The lattice points are made ``chunk`` at a time, in the volume's flat order, and their densities written
    into the volume: only the volume itself (4 GiB at resolution 1024) and one chunk are held, not every point's
    coordinates (12 GiB more at 1024). Returns the volume indexed ``[x, y, z]`` and the lattice spacing."""
    b = field.bound
    lin = torch.linspace(-b, b, resolution)
    n = resolution**3
    vol = torch.empty(n, dtype=torch.float32)
    was = field.training
    field.eval()
    try:
        for s in range(0, n, chunk):
            idx = torch.arange(s, min(s + chunk, n))
            x, yz = idx.div(resolution * resolution, rounding_mode="floor"), idx % (resolution * resolution)
            pts = torch.stack([lin[x], lin[yz.div(resolution, rounding_mode="floor")], lin[yz % resolution]], -1)
            (sigma,) = _query(field.density, pts, field.table.device, chunk)
            vol[s : s + len(idx)] = torch.where(pts.norm(dim=-1) < b, sigma, torch.zeros_like(sigma))
    finally:
        field.train(was)
    return vol.reshape(resolution, resolution, resolution).numpy(), 2 * b / (resolution - 1)


def extract_mesh(field: NeuralField, cfg: RunConfig):
    """Marching cubes at ``cfg.export.iso_level`` (half the maximum density when nothing reaches it, noted in
    ``mesh.metadata["note"]``), small connected components dropped, vertex colours from the albedo. Returns a
    ``trimesh.Trimesh`` whose triangles face outward (counter-clockwise seen from outside).

    Raises:
        UserError: the field is empty (no density anywhere), or its density is NaN or infinite somewhere.
    """
    import trimesh
    from skimage.measure import marching_cubes

    e = cfg.export
    vol, spacing = sample_density(field, e.mesh_resolution)
    bad = int(np.count_nonzero(~np.isfinite(vol)))
    if bad:
        raise UserError(
            f"the field's density is NaN or infinite at {bad} of {vol.size} lattice points: the field is damaged "
            "and cannot be meshed; export an earlier checkpoint's run or train again"
        )
    peak = float(vol.max())
    if peak <= 1e-6:
        raise UserError("the field is empty (zero density everywhere): nothing to export; train longer")
    level = e.iso_level if peak > e.iso_level else 0.5 * peak
    # No surface reaches the lattice's faces, so none is left open there: sample_density zeroes every point not
    # strictly inside the bounding sphere, and the sphere's six axis poles are the only points of those faces that
    # are not strictly outside (an odd resolution had a hole at each pole before). Density rises into the object:
    # "ascent" winds the triangles counter-clockwise seen from outside (outward normals, glTF's front faces);
    # skimage's default, "descent", made every mesh inside-out.
    verts, faces, _, _ = marching_cubes(vol, level=level, spacing=(spacing,) * 3, gradient_direction="ascent")
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
    if level != e.iso_level:
        mesh.metadata["note"] = (
            f"note: no density reaches the iso level {e.iso_level:g} (the peak is {peak:.3g}): the mesh is the "
            f"surface at half the peak, {level:.3g}; a field this faint may be a haze rather than an object (train "
            "longer, or fastdream export with a lower --iso-level)"
        )
    return mesh


def _srgb_to_linear(c: np.ndarray) -> np.ndarray:
    """sRGB-encoded values in [0, 1] to linear light (IEC 61966-2-1)."""
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


_GLB_COLOUR = "_COLOR_0_UNORM16"  # the colours' attribute in trimesh's export, renamed COLOR_0 in the written file


def gltf_mesh(mesh):
    """The mesh as ``mesh.glb`` holds it (written by :func:`glb_bytes`). The albedo is a display (sRGB-encoded)
    colour, as the renders show it, but glTF's COLOR_0 is linear: the colours are converted, so that a viewer shows
    the turntable's colours (written unconverted, a mid grey of 128 showed as 188). They are kept in 16 bits a
    channel (normalised unsigned shorts, which glTF allows for COLOR_0): in 8 bits of linear light only 183 of the
    256 display levels stayed apart (0-6 all became 0, 7-17 became 1, and so on up the dark end). A material of
    metallic 0 and roughness 1 (a matte surface: the Lambertian albedo; without one, glTF's default is a fully
    metallic surface, dark in most viewers) multiplies COLOR_0 by white; vertex normals give smooth shading."""
    import trimesh

    srgb = np.asarray(mesh.visual.vertex_colors)[:, :3].astype(np.float64) / 255
    linear = (_srgb_to_linear(srgb) * 65535 + 0.5).astype(np.uint16)
    material = trimesh.visual.material.PBRMaterial(
        name="albedo", baseColorFactor=[255, 255, 255, 255], metallicFactor=0.0, roughnessFactor=1.0
    )
    out = trimesh.Trimesh(mesh.vertices, mesh.faces, process=False)
    out.visual = trimesh.visual.TextureVisuals(material=material)
    # trimesh writes its own COLOR_0 only in 8 bits: the colours go out as an application attribute instead, which
    # _name_colour_attribute makes the file's COLOR_0
    out.vertex_attributes[_GLB_COLOUR] = np.concatenate([linear, np.full_like(linear[:, :1], 65535)], 1)
    return out


def _name_colour_attribute(tree: dict) -> None:
    """trimesh's glTF tree, before it is written: the 16-bit colour attribute becomes COLOR_0 (normalised)."""
    for m in tree.get("meshes", []):
        for prim in m["primitives"]:
            attrs = prim["attributes"]
            if _GLB_COLOUR in attrs:
                index = attrs.pop(_GLB_COLOUR)
                accessor = tree["accessors"][index]
                if accessor["componentType"] != 5123 or accessor["type"] != "VEC4":  # unsigned short, RGBA
                    raise RuntimeError(f"unexpected accessor for the vertex colours: {accessor}")
                accessor["normalized"] = True
                attrs["COLOR_0"] = index


def glb_bytes(mesh) -> bytes:
    """``mesh.glb``'s bytes: :func:`gltf_mesh` as binary glTF."""
    from trimesh.exchange.gltf import export_glb

    return export_glb(gltf_mesh(mesh), include_normals=True, tree_postprocessor=_name_colour_attribute)


def write_meshes(mesh, run_dir: str | Path) -> list[Path]:
    """``mesh.glb`` (:func:`gltf_mesh`: 16-bit linear vertex colours, a matte material, vertex normals) and
    ``mesh.obj`` (vertex colours as displayed, sRGB: OBJ has no colour space, and viewers show them as they are),
    written atomically."""
    run_dir = Path(run_dir)
    glb = glb_bytes(mesh)
    obj = mesh.export(file_type="obj", include_color=True)
    paths = [run_dir / "mesh.glb", run_dir / "mesh.obj"]
    atomic_write(paths[0], glb)
    atomic_write(paths[1], obj if isinstance(obj, bytes) else obj.encode())
    return paths


_TMP_NAME = re.compile(r"^\.(.+)\.tmp-\d+$")
_STAGE = ".export.tmp-"  # export_all's temporary folder in the run folder


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
    """mp4 through imageio-ffmpeg; when that fails, a GIF beside it (and the reason). H.264 in yuv420p needs even
    sizes: an odd height or width is padded by one row or column (repeating the edge) rather than failing."""
    import imageio.v2 as imageio

    h, w = frames[0].shape[:2]
    if h % 2 or w % 2:
        frames = [np.pad(f, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge") for f in frames]

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
    except Exception as e:  # no ffmpeg binary, no codec, ...
        gif = path.with_suffix(".gif")
        buf = io.BytesIO()
        imageio.mimwrite(buf, frames, format="GIF", duration=1000 / fps, loop=0)  # milliseconds (imageio >= 2.28)
        atomic_write(gif, buf.getvalue())
        why = " ".join(str(e).split())[:100]
        return TurntableResult(gif, f"could not write mp4 ({type(e).__name__}: {why}); wrote a GIF")
    finally:
        with contextlib.suppress(OSError):  # a read-only folder: the write's own error is the one to report
            tmp.unlink(missing_ok=True)
    # Outside the fallback: a destination that cannot be written (a folder in the way, a full disk) is an error
    # to report, not a reason to write a GIF beside it.
    atomic_write(path, data)
    return TurntableResult(path, "")


OUTPUTS = ("turntable.mp4", "mesh.glb", "mesh.obj")  # turntable.gif instead of the mp4 when no mp4 writer works


def check_outputs(run_dir: str | Path, names=OUTPUTS) -> None:
    """Refuse a folder (not a link) where an output of ``run_dir`` goes: its rename would fail only after the
    slow work, and the fallback to a GIF must not hide it.

    Raises:
        UserError: naming the first such folder.
    """
    for name in names:
        path = Path(run_dir) / name
        if path.is_dir() and not path.is_symlink():  # a link is replaced, not written through
            raise UserError(
                f"cannot write {path}: it is a folder where fastdream export writes a file; move it aside and run "
                f"fastdream export {run_dir} again (the earlier outputs are kept)"
            )


# Peak memory of extract_mesh as a multiple of the density volume (4 bytes a lattice point): the volume (which
# marching cubes takes without a copy), its pass over it, and the surface (which grows with the resolution's
# square, not its cube). Measured with /usr/bin/time -f %M on `fastdream export --device cpu` of a 2-step builtin
# "a red cube" run, against 889 MiB at --mesh-resolution 16: +74 MiB at 256 (volume 64 MiB: 1.15x), +234 MiB at
# 384 (volume 216 MiB: 1.08x). 1.5 leaves room for a busier surface than that blob's.
MESH_MEMORY_FACTOR = 1.5


def check_mesh_memory(resolution: int, option: str = "--mesh-resolution") -> None:
    """Refuse a mesh resolution whose marching cubes cannot fit in the memory available now (the OOM killer
    would end the export with no message). The volume is sampled and meshed in host memory whatever the device.

    Raises:
        UserError: saying how much is needed and what is available.
    """
    from fastdream.run import available_memory

    need = MESH_MEMORY_FACTOR * 4 * resolution**3
    have = available_memory(torch.device("cpu"))
    if have is not None and need > have:
        gib = 2**30
        raise UserError(
            f"{option} {resolution} needs about {need / gib:.1f} GiB of memory for marching cubes "
            f"({resolution}^3 densities) but {have / gib:.1f} GiB is available; lower {option} (memory "
            f"grows with its cube)"
        )


def export_all(
    field: NeuralField, background: Background | None, grid, cfg: RunConfig, run_dir: str | Path
) -> tuple[list[Path], str]:
    """Turntable and meshes into ``run_dir``; returns (paths written, a note for the user or '').

    Every output is first written into a temporary folder in ``run_dir``, and renamed over its final name only
    once all are written: a failure leaves every earlier output as it was.

    Raises:
        UserError: the field is empty, the mesh resolution cannot fit in memory, a folder stands where an output
            goes, or a file cannot be written (the earlier outputs are then kept).
    """
    run_dir = Path(run_dir)
    check_outputs(run_dir)
    check_mesh_memory(cfg.export.mesh_resolution)
    staged = None
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in run_dir.glob(_STAGE + "*"):  # left by an export killed (kill -9) half-way
            shutil.rmtree(stale, ignore_errors=True)
        staged = Path(tempfile.mkdtemp(prefix=_STAGE, dir=run_dir))
        tt = render_turntable(field, background, grid, cfg, staged)
        mesh = extract_mesh(field, cfg)
        names = [tt.path.name, *(p.name for p in write_meshes(mesh, staged))]
        note = "\n".join(n for n in (tt.note, mesh.metadata.get("note", "")) if n)
        check_outputs(run_dir, names)  # the GIF's name too, and a folder made since the first check
        for name in names:
            os.replace(staged / name, run_dir / name)
        # the other format's turntable, from an earlier export, would show an older field beside the new one
        other = run_dir / ("turntable.gif" if tt.path.suffix == ".mp4" else "turntable.mp4")
        if other.is_file() or other.is_symlink():
            with contextlib.suppress(OSError):  # the new outputs are in place: not worth an error
                other.unlink()
        fsync_dir(run_dir)
        return [run_dir / name for name in names], note
    except OSError as e:
        where = Path(e.filename2 or e.filename or run_dir)  # os.replace(tmp, final): filename2 is the final name
        where = where.with_name(_TMP_NAME.sub(r"\1", where.name))  # atomic_write's temporary: its final name
        if where.parent.name.startswith(_STAGE):  # a staged file: its final name
            where = run_dir / where.name
        elif where.name.startswith(_STAGE):  # the staging folder could not be made
            where = run_dir
        raise UserError(
            f"cannot write {where} ({e.strerror or type(e).__name__}); the earlier outputs are kept; fix the "
            f"folder (permissions, disk space) and run fastdream export {run_dir} again"
        ) from e
    except (RuntimeError, MemoryError) as e:
        oom = out_of_memory(e)
        if oom is None:
            raise
        raise UserError(
            f"{oom} while exporting; the earlier outputs and the checkpoints are kept; run fastdream export "
            f"{run_dir} with a lower --turntable-resolution ({cfg.render.turntable_resolution}) or --mesh-resolution "
            f"({cfg.export.mesh_resolution})"
        ) from e
    finally:
        if staged is not None:
            shutil.rmtree(staged, ignore_errors=True)
