# SPDX-License-Identifier: Apache-2.0
"""export and evaluate against bad run folders and large settings: a folder where an output goes, a failure
half-way through the exports, a mesh resolution near the maximum, a mesh that is not x y z. One line on stderr,
exit status 2, and every output of the earlier export left as it was."""

from __future__ import annotations

import errno
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from clitools import TINY, assert_user_error, env, fastdream, tree_hash

from fastdream import export as fd_export
from fastdream.cli import main
from fastdream.errors import UserError

FAST = ["--device", "cpu", "--frames", "2", "--turntable-resolution", "16", "--mesh-resolution", "16"]


@pytest.fixture
def run_dir(exported_run_dir: Path) -> Path:  # the exported run, not conftest's run without exports
    return exported_run_dir


def _one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("name", ["turntable.mp4", "mesh.glb", "mesh.obj"])
def test_a_folder_where_an_output_goes_is_refused_and_nothing_changes(run_dir: Path, name: str) -> None:
    # mesh.glb used to fail only at its rename, after turntable.mp4 was replaced; turntable.mp4 used to end in
    # a GIF "because ffmpeg failed" and exit 0
    (run_dir / name).unlink()
    (run_dir / name).mkdir()
    (run_dir / name / "keep").write_text("x")
    before = tree_hash(run_dir)
    res = fastdream("export", run_dir, *FAST)
    assert_user_error(res, f"cannot write {run_dir / name}", "is a folder", "move it aside")
    assert tree_hash(run_dir) == before


@pytest.mark.parametrize(
    ("error", "said"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
        (MemoryError(), "out of memory on the CPU while exporting"),  # a traceback before
        (
            torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB."),
            "out of memory on the GPU (it asked for 4.00 GiB more) while exporting",
        ),
    ],
)
def test_a_failed_mesh_step_keeps_the_earlier_turntable(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture, error: BaseException, said: str
) -> None:
    def fail(*args, **kwargs):
        raise error

    before = tree_hash(run_dir)
    monkeypatch.setattr(fd_export, "extract_mesh", fail)  # after the turntable is rendered and written
    assert main(["export", str(run_dir), *FAST]) == 2
    line = _one_line(capfd.readouterr().err)
    assert said in line and "earlier outputs" in line and "are kept" in line, line
    if not isinstance(error, OSError):
        assert "lower --turntable-resolution (16) or --mesh-resolution (16)" in line, line
    assert tree_hash(run_dir) == before  # the turntable too, and no temporary left behind


def _without_ffmpeg(monkeypatch: pytest.MonkeyPatch) -> None:
    """No mp4 writer: the turntable becomes a GIF."""
    import imageio.v2 as imageio

    real = imageio.mimwrite

    def no_ffmpeg(uri, frames, format=None, **kwargs):
        if format == "FFMPEG":
            raise RuntimeError("no ffmpeg")
        return real(uri, frames, format=format, **kwargs)

    monkeypatch.setattr(imageio, "mimwrite", no_ffmpeg)


def test_a_folder_named_like_the_gif_fallback_is_refused(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    _without_ffmpeg(monkeypatch)
    (run_dir / "turntable.gif").mkdir()
    before = tree_hash(run_dir)
    assert main(["export", str(run_dir), *FAST]) == 2
    line = _one_line(capfd.readouterr().err)
    assert f"cannot write {run_dir / 'turntable.gif'}" in line and "is a folder" in line, line
    assert tree_hash(run_dir) == before


def test_the_turntable_of_the_other_format_is_not_left_beside_the_new_one(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An export that fell back to a GIF left the earlier export's mp4 (an older field) beside it, and back."""
    assert (run_dir / "turntable.mp4").is_file()
    with monkeypatch.context() as m:
        _without_ffmpeg(m)
        assert main(["export", str(run_dir), *FAST]) == 0
    assert (run_dir / "turntable.gif").is_file() and not (run_dir / "turntable.mp4").exists()
    assert main(["export", str(run_dir), *FAST]) == 0  # ffmpeg back
    assert (run_dir / "turntable.mp4").is_file() and not (run_dir / "turntable.gif").exists()


def test_export_replaces_all_outputs_and_leaves_no_temporary(run_dir: Path) -> None:
    old = {name: (run_dir / name).read_bytes() for name in fd_export.OUTPUTS}
    (run_dir / ".export.tmp-killed" / "sub").mkdir(parents=True)  # an export killed half-way: cleaned up now
    res = fastdream("export", run_dir, *FAST)
    assert res.returncode == 0, res.stderr
    for name in fd_export.OUTPUTS:  # mesh resolution 16, not the run's: every file is new
        assert (run_dir / name).read_bytes() != old[name], name
    assert not [p.name for p in run_dir.iterdir() if ".tmp" in p.name]


def test_video_writer_does_not_hide_a_folder_in_the_way_behind_a_gif(tmp_path: Path) -> None:
    from fastdream.export import write_video

    (tmp_path / "turntable.mp4").mkdir()
    frames = [np.full((16, 16, 3), 40 * i, np.uint8) for i in range(2)]
    with pytest.raises(IsADirectoryError):  # not a missing ffmpeg: no GIF
        write_video(frames, tmp_path / "turntable.mp4", fps=4)
    assert [p.name for p in tmp_path.iterdir()] == ["turntable.mp4"]


class _Ball(torch.nn.Module):
    """A field stand-in with a cheap density (a ball of radius 0.5) for sample_density."""

    bound = 1.0

    def __init__(self) -> None:
        super().__init__()
        self.table = torch.zeros(1)

    def density(self, p: torch.Tensor) -> torch.Tensor:
        return (0.5 - p.norm(dim=-1)).clamp_min(0) + 0.01 * p[:, 0] + 0.001 * p[:, 1] * p[:, 2]


def test_sample_density_in_chunks_matches_all_at_once() -> None:
    from fastdream.config import RunConfig, resolve
    from fastdream.export import sample_density
    from fastdream.field import NeuralField

    torch.manual_seed(0)
    field = NeuralField(resolve(RunConfig(prompt="x", device="cpu")).field)
    r = 16
    whole, spacing = sample_density(field, r, chunk=r**3)
    slab, _ = sample_density(field, r, chunk=r * r)  # one x slab at a time
    odd, _ = sample_density(field, r, chunk=1000)  # chunks across slabs
    assert whole.shape == (r, r, r) and whole.dtype == np.float32 and spacing == pytest.approx(2 / (r - 1))
    assert np.array_equal(whole, slab)
    np.testing.assert_allclose(odd, whole, rtol=1e-5, atol=1e-6)  # the MLP's sums may round per batch size
    assert whole[0, 0, 0] == 0 and whole[r // 2, r // 2, r // 2] > 0  # a corner lies outside the sphere
    # the cheap stand-in: every point where it belongs (x, y and z told apart)
    ball = _Ball()
    vol, _ = sample_density(ball, r, chunk=100)
    lin = torch.linspace(-1, 1, r)
    pts = torch.stack(torch.meshgrid(lin, lin, lin, indexing="ij"), -1).reshape(-1, 3)
    want = torch.where(pts.norm(dim=-1) <= 1, ball.density(pts), torch.zeros(len(pts)))
    assert np.array_equal(vol, want.reshape(r, r, r).numpy())


def test_sample_density_holds_the_volume_not_every_point() -> None:
    # at --mesh-resolution 1024 the points alone were 12 GiB beside the 4 GiB volume
    script = textwrap.dedent(
        """
        import resource, sys, torch
        sys.path.insert(0, sys.argv[1])
        from test_export_safety import _Ball
        from fastdream.export import sample_density
        ball = _Ball()
        sample_density(ball, 16)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        vol, _ = sample_density(ball, 256)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024 / vol.nbytes)
        """
    )
    res = subprocess.run(
        [sys.executable, "-c", script, str(Path(__file__).parent)], env=env(), capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    assert float(res.stdout) < 1.5, res.stdout  # the volume and a chunk (it was over 5 times the volume)


def test_a_mesh_resolution_that_cannot_fit_is_refused_before_rendering(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    import fastdream.run

    def not_called(*args, **kwargs):
        raise AssertionError("rendered before the memory check")

    monkeypatch.setattr(fastdream.run, "available_memory", lambda device: 2**30)
    monkeypatch.setattr(fd_export, "render_turntable", not_called)
    before = tree_hash(run_dir)
    assert main(["export", str(run_dir), *FAST[:-1], "1024"]) == 2
    line = _one_line(capfd.readouterr().err)
    assert "--mesh-resolution 1024" in line and "1.0 GiB is available" in line, line
    assert tree_hash(run_dir) == before


@pytest.mark.parametrize("obj", ["v 0 0\nv 1 0\nv 0 1\nf 1 2 3\n", "v 0\nv 1\nv 2\nf 1 2 3\n"])
def test_evaluate_refuses_vertices_that_are_not_xyz(exported_run: Path, tmp_path: Path, obj: str) -> None:
    # trimesh reads `v x y` lines as vertices of 2 coordinates; sampling the surface then failed in a reshape
    d = tmp_path / "v"
    d.mkdir()
    shutil.copy(exported_run / "config.json", d)
    (d / "mesh.obj").write_text(obj)
    res = fastdream("evaluate", d)
    assert_user_error(res, str(d / "mesh.obj"), "not x y z")


def test_generate_refuses_a_mesh_resolution_that_cannot_fit_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    """Else the run would train to its end and fail at the export."""
    import fastdream.run

    monkeypatch.setattr(fastdream.run, "available_memory", lambda device: 2**30)
    out = tmp_path / "run"
    assert main(["generate", "a red cube", *TINY, "--out", str(out), "--set", "export.mesh_resolution=1024"]) == 2
    line = _one_line(capfd.readouterr().err)
    assert "--set export.mesh_resolution 1024" in line and "1.0 GiB is available" in line, line
    assert not out.exists()


class _ColouredBall(torch.nn.Module):
    """A ball of radius 0.4 off the centre, density 100 (0.5 - r) (level 10 on its surface), albedo varying with
    x, y and z apart: where the mesh lies and what colour each vertex has are known exactly."""

    bound = 1.0
    centre = torch.tensor([0.2, -0.1, 0.05])

    def __init__(self) -> None:
        super().__init__()
        self.table = torch.zeros(1)

    def density(self, p: torch.Tensor) -> torch.Tensor:
        return 100 * (0.5 - (p - self.centre).norm(dim=-1)).clamp_min(0)

    @staticmethod
    def albedo(p: torch.Tensor) -> torch.Tensor:
        return torch.stack([0.5 + 0.4 * p[:, 0], 0.3 + 0.2 * p[:, 1], 0.8 - 0.3 * p[:, 2]], -1)

    def forward(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.density(p), self.albedo(p)


def test_extract_mesh_puts_the_surface_and_its_colours_where_the_field_has_them() -> None:
    """Unit check of the mesh export (an offset, a flipped axis or swapped colour channels were only seen by the
    slow trained-run scores before)."""
    from fastdream.config import RunConfig, resolve
    from fastdream.export import extract_mesh

    cfg = resolve(RunConfig(prompt="x", device="cpu"), "cpu")
    cfg.export.mesh_resolution, cfg.export.iso_level = 48, 10.0
    ball = _ColouredBall()
    mesh = extract_mesh(ball, cfg)
    v = torch.as_tensor(mesh.vertices, dtype=torch.float32)
    assert len(v) > 500 and mesh.metadata["iso_level"] == 10.0
    r = (v - ball.centre).norm(dim=-1)  # the density is linear in r: marching cubes' interpolation is near exact
    assert (r - 0.4).abs().max() < 0.1 * 2 / 47, (r.min(), r.max())
    torch.testing.assert_close(v.mean(0), ball.centre, atol=2e-3, rtol=0)
    rgb = torch.as_tensor(np.asarray(mesh.visual.vertex_colors)[:, :3], dtype=torch.float32) / 255
    torch.testing.assert_close(rgb, ball.albedo(v), atol=0.5 / 255 + 1e-6, rtol=0)


def test_exported_meshes_face_outward_in_the_mesh_and_in_both_files(tmp_path: Path) -> None:
    """Triangles wind counter-clockwise seen from outside (glTF's front faces; viewers cull the back ones): a
    positive enclosed volume and face normals pointing away from the ball's centre, in the mesh and as the
    written glb and obj read it back. skimage's default gradient direction made every exported mesh inside-out."""
    import trimesh

    from fastdream.config import RunConfig, resolve
    from fastdream.export import extract_mesh, write_meshes

    cfg = resolve(RunConfig(prompt="x", device="cpu"), "cpu")
    cfg.export.mesh_resolution, cfg.export.iso_level = 40, 10.0
    ball = _ColouredBall()
    mesh = extract_mesh(ball, cfg)
    glb, obj = write_meshes(mesh, tmp_path)
    read = {
        "mesh": mesh,
        "glb": trimesh.load(glb, force="mesh"),
        "obj": trimesh.load(obj, force="mesh", process=False),
    }
    for name, m in read.items():
        assert m.is_watertight and m.is_winding_consistent, name
        assert m.volume == pytest.approx(4 / 3 * np.pi * 0.4**3, rel=0.05), (name, m.volume)
        out = m.triangles_center - ball.centre.numpy()
        assert (np.einsum("ij,ij->i", m.face_normals, out) > 0).all(), name


def _glb_json_and_bin(data: bytes) -> tuple[dict, bytes]:
    """The two chunks of a binary glTF (the container format, glTF 2.0 section 4.4)."""
    import json
    import struct

    (json_len,) = struct.unpack_from("<I", data, 12)
    header = json.loads(data[20 : 20 + json_len])
    (bin_len,) = struct.unpack_from("<I", data, 20 + json_len)
    return header, data[28 + json_len : 28 + json_len + bin_len]


def _accessor(header: dict, blob: bytes, index: int, dtype, width: int) -> np.ndarray:
    acc = header["accessors"][index]
    view = header["bufferViews"][acc["bufferView"]]
    start = view.get("byteOffset", 0) + acc.get("byteOffset", 0)
    n = acc["count"] * width
    return np.frombuffer(blob, dtype=dtype, count=n, offset=start).reshape(acc["count"], width)


def test_the_glb_holds_linear_colours_a_matte_material_and_normals(tmp_path: Path) -> None:
    """glTF's COLOR_0 is linear light, the albedo a display (sRGB) colour: written unconverted, a viewer showed a
    mid grey of 128 as 188 and the turntable's colours washed out. No material meant glTF's default, a fully
    metallic surface; no normals meant faceted shading. The OBJ keeps the displayed (sRGB) values."""
    from fastdream.config import RunConfig, resolve
    from fastdream.export import extract_mesh, write_meshes

    cfg = resolve(RunConfig(prompt="x", device="cpu"), "cpu")
    cfg.export.mesh_resolution, cfg.export.iso_level = 32, 10.0
    ball = _ColouredBall()
    mesh = extract_mesh(ball, cfg)
    glb, obj = write_meshes(mesh, tmp_path)
    header, blob = _glb_json_and_bin(glb.read_bytes())
    (prim,) = header["meshes"][0]["primitives"]
    material = header["materials"][prim["material"]]["pbrMetallicRoughness"]
    assert material["metallicFactor"] == 0 and material["roughnessFactor"] == 1, material
    assert material.get("baseColorFactor", [1, 1, 1, 1]) == [1, 1, 1, 1], material
    colour = header["accessors"][prim["attributes"]["COLOR_0"]]
    assert (colour["componentType"], colour["type"], colour.get("normalized")) == (5123, "VEC4", True)  # unorm16
    assert not [k for k in prim["attributes"] if k.startswith("_")], prim["attributes"]  # no leftover attribute
    pos = _accessor(header, blob, prim["attributes"]["POSITION"], np.float32, 3)
    col = _accessor(header, blob, prim["attributes"]["COLOR_0"], np.uint16, 4).astype(np.float64) / 65535
    # exactly the mesh's displayed colours, linearised: every one of the 256 display levels stays distinct
    shown = np.asarray(mesh.visual.vertex_colors)[:, :3] / 255
    np.testing.assert_allclose(
        col[:, :3],
        np.where(shown <= 0.04045, shown / 12.92, ((shown + 0.055) / 1.055) ** 2.4),
        atol=0.5 / 65535 + 1e-12,
    )
    nrm = _accessor(header, blob, prim["attributes"]["NORMAL"], np.float32, 3)
    srgb = ball.albedo(torch.as_tensor(pos.copy())).numpy()
    linear = np.where(srgb <= 0.04045, srgb / 12.92, ((srgb + 0.055) / 1.055) ** 2.4)
    np.testing.assert_allclose(col[:, :3], linear, atol=1.5 / 255)
    assert (col[:, 3] == 1).all()
    out = pos - ball.centre.numpy()
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    assert np.einsum("ij,ij->i", nrm, out).min() > 0.9  # smooth, outward, unit
    rows = [ln.split()[1:] for ln in obj.read_text().splitlines() if ln.startswith("v ")]
    v = np.array(rows, dtype=np.float64)
    np.testing.assert_allclose(
        v[:, 3:6], ball.albedo(torch.as_tensor(v[:, :3], dtype=torch.float32)).numpy(), atol=1 / 255
    )


class _Haze(torch.nn.Module):
    """A field dense everywhere inside the bounding sphere, at a chosen level (NaN inside radius 0.1 if asked)."""

    bound = 1.0

    def __init__(self, level: float, nan_core: bool = False) -> None:
        super().__init__()
        self.table, self.level, self.nan_core = torch.zeros(1), level, nan_core

    def density(self, p: torch.Tensor) -> torch.Tensor:
        d = torch.full(p.shape[:1], self.level)
        return torch.where(p.norm(dim=-1) < 0.1, float("nan"), d) if self.nan_core else d

    def forward(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.density(p), torch.full((p.shape[0], 3), 0.5)


@pytest.mark.parametrize("resolution", [33, 48])
def test_a_field_dense_up_to_the_bound_gives_a_closed_mesh_and_a_faint_one_a_note(resolution: int) -> None:
    """At odd resolutions the lattice holds the axis poles of the bounding sphere, on the lattice's faces: marching
    cubes left a hole at each of the six. A field whose peak is below the iso level was meshed at half its peak
    without a word."""
    from fastdream.config import RunConfig, resolve
    from fastdream.export import extract_mesh

    cfg = resolve(RunConfig(prompt="x", device="cpu"), "cpu")
    cfg.export.mesh_resolution, cfg.export.iso_level = resolution, 10.0
    mesh = extract_mesh(_Haze(50.0), cfg)
    assert mesh.is_watertight and mesh.volume > 0, (mesh.is_watertight, mesh.volume)
    assert np.abs(mesh.vertices).max() <= 1.0 + 1e-6 and "note" not in mesh.metadata
    faint = extract_mesh(_Haze(0.02), cfg)
    assert faint.metadata["iso_level"] == pytest.approx(0.01) and faint.is_watertight
    note = faint.metadata["note"]
    assert "no density reaches the iso level 10" in note and "peak is 0.02" in note and "haze" in note, note


def test_nan_densities_are_named_not_taken_for_an_empty_field() -> None:
    from fastdream.config import RunConfig, resolve
    from fastdream.export import extract_mesh

    cfg = resolve(RunConfig(prompt="x", device="cpu"), "cpu")
    cfg.export.mesh_resolution = 24
    with pytest.raises(UserError, match=r"NaN or infinite at \d+ of 13824 lattice points: the field is damaged"):
        extract_mesh(_Haze(50.0, nan_core=True), cfg)


def test_the_glb_keeps_the_darkest_display_levels_apart() -> None:
    """In 8 bits of linear light only 183 of the 256 display levels stayed apart (0-6 became 0, 7-17 became 1, ...):
    the 16-bit colours keep each of the 256 levels its own value, increasing."""
    import trimesh

    from fastdream.export import glb_bytes

    m = trimesh.creation.icosphere(subdivisions=3)  # 642 vertices
    levels = np.arange(len(m.vertices)) % 256
    m.visual.vertex_colors = np.stack([levels, levels, levels, np.full_like(levels, 255)], 1).astype(np.uint8)
    header, blob = _glb_json_and_bin(glb_bytes(m))
    (prim,) = header["meshes"][0]["primitives"]
    col = _accessor(header, blob, prim["attributes"]["COLOR_0"], np.uint16, 4)
    by_level = [int(col[levels == v, 0][0]) for v in range(256)]
    assert (np.diff(by_level) > 0).all(), by_level[:10]
    assert by_level[0] == 0 and by_level[255] == 65535
