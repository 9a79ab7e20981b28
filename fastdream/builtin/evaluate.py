# SPDX-License-Identifier: Apache-2.0
"""Scoring a builtin run against its known answer: the exported mesh against the true primitive.

- Chamfer: symmetric Chamfer distance, the mean of both directions' mean nearest-neighbour distances
  (world units) between 20k area-uniform samples of each surface (scipy cKDTree), to the asked primitive and
  to every other one.
- Silhouette IoU from 8 novel views (elevation 20°, azimuths offset from the training's view-word centres,
  distance 2.2, fov 45°, 64×64): each surface's 200k area-uniform samples are splatted into the images
  (a point rasteriser; the samples cover every pixel of a solid's projection at this size), and the masks
  are compared. Mesh and primitive go through the same rasteriser, so its approximations cancel.
- Colour: the area-weighted mean vertex colour of the mesh (the exporter bakes the field's albedo into the
  vertices) against the named colour: Euclidean distance in RGB 0..1 (``albedo_error``); and the area-weighted
  mean of each face's distance to the named colour (``albedo_error_surface``), which a surface of mixed wrong
  colours cannot pass (half red and half cyan has a grey mean).

Every score is of the exported mesh (the surface at ``export.iso_level``, floaters dropped), not of the renders:
a haze below the iso level, or a floater the export dropped, is not seen. A perfect mesh does not score 0: with
20k samples a side, the Chamfer distance of a primitive to itself is about 0.0065 (the samples' spacing).

Example:
    >>> from fastdream.builtin.evaluate import chamfer
    >>> from fastdream.builtin.primitives import sample_surface
    >>> chamfer(sample_surface("cube", 5000), sample_surface("cube", 5000)) < 0.02
    True
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastdream.builtin.primitives import sample_surface
from fastdream.builtin.vocabulary import COLOURS, SHAPES, parse_prompt
from fastdream.cameras import make_cameras
from fastdream.errors import UserError

CHAMFER_SAMPLES = 20_000
SILHOUETTE_SAMPLES = 200_000
SILHOUETTE_SIZE = 64


def chamfer(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """Symmetric Chamfer distance between point sets a [N, 3] and b [M, 3]: (mean d(a→b) + mean d(b→a)) / 2."""
    from scipy.spatial import cKDTree

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    da, _ = cKDTree(b).query(a)
    db, _ = cKDTree(a).query(b)
    return float(0.5 * (da.mean() + db.mean()))


def novel_cameras(n: int = 8):
    """``n`` evaluation cameras at elevation 20°, azimuths 22.5° + k·360°/n (off the view-word centres)."""
    az = torch.tensor([22.5 + k * 360.0 / n for k in range(n)])
    az = torch.remainder(az + 180.0, 360.0) - 180.0
    full = torch.ones(n)
    return make_cameras(20.0 * full, az, 2.2 * full, 45.0 * full)


def splat_silhouettes(points: torch.Tensor, cameras, size: int = SILHOUETTE_SIZE) -> torch.Tensor:
    """Boolean masks [B, size, size] of the pixels that surface samples ``points`` [N, 3] project into."""
    masks = torch.zeros(len(cameras), size * size, dtype=torch.bool)
    p_h = torch.cat([points.float(), torch.ones(points.shape[0], 1)], -1)  # [N, 4]
    for i in range(len(cameras)):
        w2c = torch.linalg.inv(cameras.c2w[i].float())
        pc = p_h @ w2c.T  # camera space: looks down -Z
        focal = 0.5 * size / math.tan(0.5 * float(cameras.fov[i]))
        depth = -pc[:, 2]
        x = pc[:, 0] / depth * focal + 0.5 * size
        y = -pc[:, 1] / depth * focal + 0.5 * size
        ok = (depth > 0) & (x >= 0) & (x < size) & (y >= 0) & (y < size)
        idx = y[ok].long() * size + x[ok].long()
        masks[i, idx] = True
    return masks.reshape(len(cameras), size, size)


def silhouette_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over views of |a ∧ b| / |a ∨ b| for boolean masks [B, H, W]."""
    inter = (a & b).flatten(1).sum(-1).float()
    union = (a | b).flatten(1).sum(-1).float().clamp_min(1)
    return float((inter / union).mean())


def _load_mesh(path: Path):
    import trimesh

    try:
        mesh = trimesh.load(str(path), force="mesh", process=False)
    except Exception as e:  # a broken file is bad input, not a crash
        raise UserError(f"cannot read {path}: {e}; re-export it with `fastdream export DIR`") from None
    if not isinstance(mesh, trimesh.Trimesh) or len(mesh.faces) == 0:
        raise UserError(f"{path} holds no triangles; the run produced an empty mesh (re-run or re-export it)")
    v = np.asarray(mesh.vertices, dtype=np.float64)
    if v.ndim != 2 or v.shape[1] != 3:  # e.g. an OBJ with `v x y` lines: trimesh keeps them, sampling fails
        raise UserError(
            f"{path} holds vertices that are not x y z triples (shape {v.shape}, not (N, 3)); it is not a mesh "
            f"fastdream exported: re-export it with `fastdream export DIR`"
        )
    if not (np.isfinite(v).all() and np.abs(v).max() <= 1e3):  # exported meshes lie in [-1, 1]^3
        n_bad = int((~np.isfinite(v).all(axis=1) | (np.abs(v) > 1e3).any(axis=1)).sum())
        raise UserError(
            f"{path} holds vertices that are not finite or lie far outside the bounding sphere ({n_bad} of "
            f"{len(v)}); it is not a mesh fastdream exported: re-export it with `fastdream export DIR`"
        )
    return mesh


def _sample_mesh(mesh, n: int, seed: int) -> np.ndarray:
    import trimesh

    pts, _ = trimesh.sample.sample_surface(mesh, n, seed=seed)
    return np.asarray(pts)


def face_colours(mesh) -> tuple[np.ndarray, np.ndarray] | None:
    """Each face's colour (the mean of its vertices', RGB 0..1) [F, 3] and its area [F], or None when ``mesh``
    has no vertex colours."""
    colours = getattr(mesh.visual, "vertex_colors", None)
    if getattr(mesh.visual, "kind", None) != "vertex" or colours is None or len(colours) != len(mesh.vertices):
        return None
    rgb = np.asarray(colours, dtype=np.float64)[:, :3] / 255.0
    return rgb[mesh.faces].mean(axis=1), np.asarray(mesh.area_faces, dtype=np.float64)


def mean_vertex_colour(mesh) -> np.ndarray | None:
    """Area-weighted mean vertex colour (RGB 0..1) of ``mesh``, or None when it has no vertex colours."""
    fc = face_colours(mesh)
    if fc is None:
        return None
    face_rgb, area = fc
    return (face_rgb * area[:, None]).sum(0) / max(area.sum(), 1e-12)


def surface_colour_error(mesh, target: np.ndarray) -> float | None:
    """Area-weighted mean over the faces of the distance of each face's colour to ``target`` (RGB 0..1)."""
    fc = face_colours(mesh)
    if fc is None:
        return None
    face_rgb, area = fc
    return float((np.linalg.norm(face_rgb - target, axis=1) * area).sum() / max(area.sum(), 1e-12))


def read_prompt(run_dir: Path) -> str:
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"{run_dir} has no config.json; give the folder of a `fastdream generate` run")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {cfg_path}: {e}") from None
    prompt = cfg.get("prompt") if isinstance(cfg, dict) else None
    if not isinstance(prompt, str):
        raise UserError(f"{cfg_path} has no prompt; give the folder of a `fastdream generate` run")
    return prompt


SEED_MAX = 2**32 - 1  # the seeds numpy's and torch's generators both take


def evaluate_mesh(mesh, prompt: str, seed: int = 0) -> dict[str, Any]:
    """Scores of ``mesh`` (a trimesh.Trimesh in world units) for the builtin ``prompt``; ``seed`` in
    [0, SEED_MAX] picks the surface samples."""
    colour, shape = parse_prompt(prompt)
    g = torch.Generator().manual_seed(seed)
    mesh_pts = _sample_mesh(mesh, CHAMFER_SAMPLES, seed)
    distances = {s: chamfer(mesh_pts, sample_surface(s, CHAMFER_SAMPLES, g).numpy()) for s in SHAPES}
    cams = novel_cameras()
    sil_seed = (seed + 1) % (SEED_MAX + 1)  # numpy takes seeds up to SEED_MAX
    sil_mesh = splat_silhouettes(torch.from_numpy(_sample_mesh(mesh, SILHOUETTE_SAMPLES, sil_seed)), cams)
    sil_true = splat_silhouettes(sample_surface(shape, SILHOUETTE_SAMPLES, g), cams)
    mean_rgb = mean_vertex_colour(mesh)
    target = np.asarray(COLOURS[colour])
    nearest = min(distances, key=distances.get)
    others = [d for s, d in distances.items() if s != shape]
    return {
        "prompt": prompt,
        "colour": colour,
        "shape": shape,
        "chamfer": distances[shape],
        "chamfer_to": distances,
        "nearest_shape": nearest,
        "correct_shape": nearest == shape,
        "shape_margin": min(others) - distances[shape],  # > 0: nearest the asked primitive, by this much
        "silhouette_iou": silhouette_iou(sil_mesh, sil_true),
        "mean_albedo": None if mean_rgb is None else [round(float(c), 4) for c in mean_rgb],
        "target_albedo": list(COLOURS[colour]),
        "albedo_error": None if mean_rgb is None else float(np.linalg.norm(mean_rgb - target)),
        "albedo_error_surface": surface_colour_error(mesh, target),
        "vertices": int(len(mesh.vertices)),
        "faces": int(len(mesh.faces)),
    }


def evaluate_run(run_dir: str | Path, seed: int = 0) -> dict[str, Any]:
    """Scores of the run folder ``run_dir`` (its config.json prompt and mesh.obj).

    Raises:
        UserError: not a run folder, no mesh, or a prompt outside the builtin vocabulary.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a folder; give the output folder of `fastdream generate`")
    prompt = read_prompt(run_dir)
    parse_prompt(prompt)  # fail on a non-builtin prompt before reading the mesh
    mesh_path = run_dir / "mesh.obj"
    if not mesh_path.is_file():
        raise UserError(f"{run_dir} has no mesh.obj; finish the run or run `fastdream export {run_dir}`")
    result = evaluate_mesh(_load_mesh(mesh_path), prompt, seed)
    result["run"] = str(run_dir)
    return result
