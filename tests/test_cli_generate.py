# SPDX-License-Identifier: Apache-2.0
"""``fastdream generate`` / ``fastdream export`` end to end through the CLI, on the CPU, with a tiny random
Stable Diffusion pipeline written with save_pretrained and loaded by the same loader as real checkpoints."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_guidance_diffusers import tiny_if_folder, tiny_sd_folder

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--resolution", "32", "--samples-per-ray", "32", "--save-every", "2", "--preview-every", "2",
    "--set", "field.levels=4", "--set", "field.log2_table_size=12", "--set", "field.finest_resolution=32",
    "--set", "field.hidden=16", "--set", "render.grid_resolution=16", "--set", "render.preview_resolution=16",
    "--set", "render.turntable_resolution=16", "--set", "render.turntable_frames=3",
    "--set", "export.mesh_resolution=24", "--set", "optim.grid_update_every=2", "--set", "optim.grid_warmup_steps=2",
    "--albedo-warmup", "1", "--quiet",
]  # fmt: skip


def fastdream(*args, check=None, gpu=False):
    # ROOT first, and whatever PYTHONPATH already holds after it (packages installed outside site-packages, as on
    # the GPU machine, where the carried wheels sit in PYTHONPATH)
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONPATH=path, HF_HUB_OFFLINE="1")
    if not gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run(
        [sys.executable, "-m", "fastdream", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    if check is not None:
        assert proc.returncode == check, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def sd_model(tmp_path_factory):
    return str(tiny_sd_folder(tmp_path_factory.mktemp("tiny_sd")))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def final_table(run: Path) -> torch.Tensor:
    path = sorted((run / "checkpoints").glob("step_*.pt"))[-1]
    return torch.load(path, weights_only=True)["field"]["table"]


def test_generate_writes_every_output_and_export_redoes_them(sd_model, tmp_path):
    out = tmp_path / "run"
    proc = fastdream("generate", "a red cube", "--model", sd_model, "--out", str(out), "--steps", "4", *TINY, check=0)
    assert "done: 4 steps" in proc.stdout
    # --quiet (in TINY): no progress bars, and none of the libraries' load-time advice, on the terminal
    for noise in ("Loading weights", "it/s]", "low_cpu_mem_usage", "Casting directly"):
        assert noise not in proc.stderr, proc.stderr[-2000:]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["prompt"] == "a red cube" and cfg["optim"]["steps"] == 4 and cfg["device"] == "cpu"
    assert cfg["guidance"]["guidance_scale"] == 100.0  # SD's default, recorded
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step_000002.pt", "step_000004.pt"]
    state = torch.load(out / "checkpoints" / "step_000004.pt", weights_only=True)
    assert state["step"] == 4 and all(torch.isfinite(t).all() for t in state["field"].values())
    assert sorted(p.name for p in (out / "previews").iterdir()) == ["step_000002.png", "step_000004.png"]
    assert (out / "turntable.mp4").stat().st_size > 0
    import trimesh

    scene = trimesh.load(out / "mesh.glb")
    mesh = next(iter(scene.geometry.values())) if hasattr(scene, "geometry") else scene
    assert len(mesh.faces) > 0 and abs(mesh.vertices).max() <= 1.0
    v_lines = [ln for ln in (out / "mesh.obj").read_text().splitlines() if ln.startswith("v ")]
    assert v_lines and len(v_lines[0].split()) == 7  # x y z r g b: vertex colours

    before = (out / "mesh.glb").stat().st_mtime_ns
    (out / "turntable.mp4").unlink()
    proc = fastdream("export", str(out), "--mesh-resolution", "20", check=0)
    assert "exported step 4" in proc.stdout
    assert (out / "turntable.mp4").stat().st_size > 0 and (out / "mesh.glb").stat().st_mtime_ns != before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("model", ["sd", "builtin"])
def test_generate_on_cuda_with_cuda_graphs(sd_model, tmp_path, model):
    """The GPU path end to end: fp16 UNet, the UNet call, SD's VAE encoder and the renderer replayed from CUDA
    graphs (the builtin prior: the renderer only), then every output."""
    out = tmp_path / "run"
    args = ["--model", sd_model if model == "sd" else "builtin", "--device", "cuda", "--cuda-graphs", "--steps", "6"]
    proc = fastdream("generate", "a red cube", *args, "--out", str(out), *TINY, check=0, gpu=True)
    assert "done: 6 steps" in proc.stdout
    # Every step either replayed a graph or ran eagerly (a bucket's first sight); no capture failed.
    graphs = re.search(r"renderer CUDA graphs: (\d+) captured, (\d+) steps replayed, (\d+) eager", proc.stderr)
    assert graphs and int(graphs.group(2)) + int(graphs.group(3)) == 6 and "turned off" not in proc.stderr, proc.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["device"].startswith("cuda") and cfg["guidance"]["cuda_graphs"] is True
    state = torch.load(out / "checkpoints" / "step_000006.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in state["field"].values())
    assert _turntable(out).stat().st_size > 0 and (out / "mesh.glb").stat().st_size > 0


def test_compile_vae_reaches_the_sd_encoder(sd_model, monkeypatch):
    """--compile-vae asks accelerate() for the compiled encoder (here without --cuda-graphs, which needs CUDA
    already in this function); off, accelerate() is not called."""
    import fastdream.guidance.graphs as graphs
    from fastdream.config import GuidanceConfig, RunConfig, resolve
    from fastdream.run import load_prepared_guidance

    seen = []
    monkeypatch.setattr(graphs, "accelerate", lambda g, **kw: seen.append((hasattr(g, "vae_mean"), kw)))
    cfg = resolve(
        RunConfig(prompt="a red cube", guidance=GuidanceConfig(model=sd_model, compile_vae=True), device="cpu")
    )
    load_prepared_guidance(cfg, torch.device("cpu"))  # the CUDA check of --compile-vae is the planner's
    assert seen == [(True, {"cuda_graphs": False, "compile_vae": True})]
    cfg.guidance.compile_vae = False
    seen.clear()
    load_prepared_guidance(cfg, torch.device("cpu"))
    assert seen == []


def test_compile_vae_refuses_a_model_without_a_vae(tmp_path, monkeypatch):
    """DeepFloyd IF denoises pixels: --compile-vae has nothing to compile, and says so in one line."""
    import fastdream.guidance.graphs as graphs
    from fastdream.config import GuidanceConfig, RunConfig, resolve
    from fastdream.errors import UserError
    from fastdream.run import load_prepared_guidance

    seen = []
    monkeypatch.setattr(graphs, "accelerate", lambda g, **kw: seen.append(kw))
    folder = str(tiny_if_folder(tmp_path / "tiny_if"))
    cfg = resolve(RunConfig(prompt="a red cube", guidance=GuidanceConfig(model=folder, compile_vae=True), device="cpu"))
    with pytest.raises(UserError, match="--compile-vae.*has none") as err:
        load_prepared_guidance(cfg, torch.device("cpu"))
    assert "\n" not in str(err.value) and seen == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_generate_on_cuda_with_the_compiled_vae(sd_model, tmp_path):
    """The SD path with the VAE encoder compiled in inductor's CUDA-graph mode, beside the render graphs."""
    out = tmp_path / "run"
    args = ["--model", sd_model, "--device", "cuda", "--cuda-graphs", "--compile-vae", "--steps", "6", "--no-export"]
    proc = fastdream("generate", "a red cube", *args, "--out", str(out), *TINY, check=0, gpu=True)
    assert "done: 6 steps" in proc.stdout and "first steps compile the VAE encoder" in proc.stderr, proc.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["guidance"]["compile_vae"] is True and cfg["guidance"]["cuda_graphs"] is True
    state = torch.load(out / "checkpoints" / "step_000006.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in state["field"].values())


def _turntable(out: Path) -> Path:
    """turntable.mp4, or where no ffmpeg plugin is installed (a machine with fastdream installed without its
    dependencies) the GIF written instead."""
    try:
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        return out / "turntable.gif"
    return out / "turntable.mp4"


def test_turntable_without_ffmpeg_is_a_gif_with_the_reason(tmp_path, monkeypatch):
    import imageio.v2 as imageio
    import numpy as np

    from fastdream.export import write_video

    real = imageio.mimwrite

    def no_ffmpeg(uri, frames, format=None, **kw):  # as imageio fails without the imageio-ffmpeg plugin
        if format == "FFMPEG":  # (hiding the module is not enough once an earlier test in this process loaded it)
            raise RuntimeError("No ffmpeg exe could be found. Install ffmpeg on your system")
        return real(uri, frames, format=format, **kw)

    monkeypatch.setattr(imageio, "mimwrite", no_ffmpeg)
    frames = [np.full((8, 8, 3), 40 * i, np.uint8) for i in range(3)]
    res = write_video(frames, tmp_path / "turntable.mp4", fps=10)
    assert res.path == tmp_path / "turntable.gif" and res.path.stat().st_size > 0
    assert not (tmp_path / "turntable.mp4").exists() and list(tmp_path.iterdir()) == [res.path]
    assert "could not write mp4" in res.note and "ffmpeg" in res.note.lower(), res.note
    from PIL import Image

    with Image.open(res.path) as gif:  # Pillow reads each frame's delay in milliseconds
        delays = []
        for i in range(gif.n_frames):
            gif.seek(i)
            delays.append(gif.info["duration"])
    assert delays == [100] * 3, delays  # 10 fps (imageio's GIF duration is in ms: 1 / fps gave 0, as fast as can be)


@pytest.mark.skipif(importlib.util.find_spec("imageio_ffmpeg") is None, reason="needs imageio-ffmpeg")
def test_an_odd_turntable_size_is_an_mp4_padded_to_even(tmp_path):
    """H.264 in yuv420p has no odd sizes: an odd turntable resolution failed the mp4 and fell back to a GIF."""
    import imageio.v3 as iio
    import numpy as np

    from fastdream.export import write_video

    frames = [np.full((97, 97, 3), 60 * i, np.uint8) for i in range(3)]
    res = write_video(frames, tmp_path / "turntable.mp4", fps=10)
    assert res.path == tmp_path / "turntable.mp4" and res.note == "", res.note
    video = iio.imread(res.path, plugin="FFMPEG")
    assert video.shape == (3, 98, 98, 3), video.shape
    assert abs(float(video[2].mean()) - 120) < 3  # the frames, not black


def test_resume_ends_like_an_uninterrupted_run(sd_model, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    common = ["--model", sd_model, "--seed", "3", "--no-export", "--negative-prompt", "blurry", *TINY]
    fastdream("generate", "a red cube", "--out", str(a), "--steps", "4", *common, check=0)
    fastdream("generate", "a red cube", "--out", str(b), "--steps", "2", *common, check=0)
    # another negative prompt would change the run: refused, and the run is left as it was
    res = fastdream("generate", "a red cube", "--out", b, "--resume", "--negative-prompt", "ugly", "--quiet")
    assert res.returncode == 2 and "--negative-prompt" in res.stderr, res.stderr
    fastdream("generate", "a red cube", "--out", str(b), "--steps", "4", "--resume", "--quiet", "--no-export", check=0)
    assert torch.equal(final_table(a), final_table(b))
    saved = json.loads((b / "config.json").read_text())
    assert saved["optim"]["steps"] == 4 and saved["guidance"]["negative_prompt"] == "blurry"


@pytest.mark.parametrize(
    "args, message",
    [
        (["   "], "prompt is empty"),
        (["a red cube", "--steps", "0"], "--steps"),
        (["a red cube", "--steps", "many"], "--steps"),
        (["a red cube", "--resolution", "8"], "--resolution"),
        (["a red cube", "--guidance-scale", "-1"], "--guidance-scale"),
        (["a red cube", "--resume"], "nothing to resume"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, message, tmp_path):
    out = tmp_path / "run"
    proc = fastdream("generate", *args, "--model", "builtin", "--out", str(out))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in proc.stderr
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_device_cuda_without_gpu(tmp_path):
    proc = fastdream("generate", "a red cube", "--model", "builtin", "--device", "cuda", "--out", str(tmp_path / "r"))
    assert proc.returncode == 2 and "no CUDA GPU" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_existing_run_is_refused_and_left_unchanged(sd_model, tmp_path):
    out = tmp_path / "run"
    fastdream("generate", "a red cube", "--model", sd_model, "--out", str(out), "--steps", "2", *TINY, "--no-export",
              check=0)  # fmt: skip
    before = snapshot(out)
    proc = fastdream("generate", "a blue cube", "--model", sd_model, "--out", str(out), "--steps", "2", *TINY)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    # A model that cannot be loaded with --overwrite: refused before anything is deleted.
    proc = fastdream("generate", "a blue cube", "--model", str(tmp_path / "nope"), "--out", str(out), "--overwrite")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert snapshot(out) == before
    # A truncated checkpoint: --resume says so in one line and leaves the folder alone.
    last = sorted((out / "checkpoints").glob("step_*.pt"))[-1]
    last.write_bytes(last.read_bytes()[:100])
    before = snapshot(out)
    proc = fastdream("generate", "a red cube", "--out", str(out), "--resume", "--steps", "3", "--quiet")
    assert proc.returncode == 2 and "corrupt or truncated" in proc.stderr, proc.stderr
    assert snapshot(out) == before


def test_help_documents_every_option_with_its_default():
    from fastdream.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name in ("generate", "export"):
        p = sub.choices[name]
        text = " ".join(p.format_help().split())
        for action in p._actions:
            if action.option_strings and action.default not in (None, False) and action.dest != "help":
                assert action.help and action.option_strings[0] in text
        assert "(default: sd2-community/stable-" in text or name == "export"
        assert "(default: auto)" in text


def test_a_prompt_library_loads_its_model_once_and_each_run_is_its_own(sd_model, tmp_path, monkeypatch):
    """generate --prompts loads the model once and prepares it for each prompt (it was loaded again for every
    prompt); the second prompt's run, on the model the first one used, is the run it would be alone: the same
    checkpoint, tensor for tensor (its own text embeddings, no state left by the first run)."""
    from fastdream import batch
    from fastdream import run as single
    from fastdream.cli import main

    loads = []
    real = single.load_guidance_for
    monkeypatch.setattr(single, "load_guidance_for", lambda cfg, dev: loads.append(cfg.prompt) or real(cfg, dev))
    args = ["--model", sd_model, "--device", "cpu", "--steps", "3", *TINY, "--no-export"]
    (tmp_path / "p.txt").write_text("a red cube\na blue ball\n")
    assert main(["generate", "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "lib"), *args]) == 0
    assert loads == ["a red cube"]
    assert main(["generate", "a blue ball", "--out", str(tmp_path / "alone"), *args]) == 0
    assert loads == ["a red cube", "a blue ball"]

    def final(run: Path) -> dict:
        return torch.load(sorted((run / "checkpoints").glob("step_*.pt"))[-1], weights_only=False)

    together, alone = final(tmp_path / "lib" / batch.folder_name("a blue ball")), final(tmp_path / "alone")
    first = final(tmp_path / "lib" / batch.folder_name("a red cube"))
    assert not torch.equal(first["field"]["table"], alone["field"]["table"])  # the prompts do differ
    for part in ("field", "background"):
        for k, v in alone[part].items():
            assert torch.equal(together[part][k], v), (part, k)
