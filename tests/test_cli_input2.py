# SPDX-License-Identifier: Apache-2.0
"""Bad input and bad environments met by export, evaluate, bench and the shared CLI checks: one line on stderr,
exit status 2, no traceback, found before anything slow runs, and nothing already written lost.

Unwritable folders are simulated without permission bits (root writes through them): a path under a regular
file, a directory where a file must go, or a patched writer.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from clitools import TINY, assert_user_error, fastdream, tree_hash

from fastdream import backends
from fastdream import checkpoint as ckpt
from fastdream.cli import main
from fastdream.errors import UserError
from fastdream.ops import _dispatch


@pytest.fixture
def run_dir(exported_run_dir: Path) -> Path:  # the exported run, not conftest's run without exports
    return exported_run_dir


@pytest.fixture
def no_backend_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in list(os.environ):
        if k.startswith("FASTDREAM_BACKEND"):
            monkeypatch.delenv(k)


def _one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------------- 1. FASTDREAM_BACKEND* variables


@pytest.mark.parametrize("command", ["generate", "export", "bench"])
def test_unknown_backend_in_the_environment(command: str, run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "new-run"
    args = {
        "generate": ("generate", "a red cube", *TINY, "--out", out),
        "export": ("export", run_dir, "--device", "cpu"),
        "bench": ("bench", "--tiny", "--device", "cpu", "--steps", "1", "--warmup", "0"),
    }[command]
    before = tree_hash(run_dir)
    line = assert_user_error(
        fastdream(*args, extra_env={"FASTDREAM_BACKEND": "foo"}), "FASTDREAM_BACKEND=foo", "unknown backend"
    )
    assert all(b in line for b in backends.BACKENDS)  # the valid values are listed
    assert tree_hash(run_dir) == before and not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: the cuda backend is usable")
@pytest.mark.parametrize(
    "var, value, words",
    [
        ("FASTDREAM_BACKEND", "cuda", ("no CUDA GPU",)),
        ("FASTDREAM_BACKEND_SHADE", "CUDA", ("no CUDA GPU",)),
        ("FASTDREAM_BACKEND", "triton", ("TRITON_INTERPRET",)),
    ],
)
def test_backend_not_usable_here(var: str, value: str, words: tuple[str, ...], run_dir: Path) -> None:
    before = tree_hash(run_dir)
    env = {var: value, "TRITON_INTERPRET": "0"}
    res = fastdream("export", run_dir, "--device", "cpu", extra_env=env)
    assert_user_error(res, f"{var}={value}", "not usable here", *words)
    assert tree_hash(run_dir) == before


def test_per_op_variable_naming_no_op_or_a_missing_implementation(tmp_path: Path) -> None:
    res = fastdream(
        "generate", "a red cube", *TINY, "--out", tmp_path / "r", extra_env={"FASTDREAM_BACKEND_SHADING": "cpp"}
    )
    assert_user_error(res, "FASTDREAM_BACKEND_SHADING", "no op 'shading'", "shade")
    assert not (tmp_path / "r").exists()
    problems = _dispatch.env_problems(torch.device("cpu"))
    assert problems == [] or all("FASTDREAM_BACKEND" in p for p in problems)


def test_env_problems(monkeypatch: pytest.MonkeyPatch, no_backend_env: None) -> None:
    cpu = torch.device("cpu")
    assert _dispatch.env_problems(cpu) == []
    monkeypatch.setenv("FASTDREAM_BACKEND", " Reference ")
    monkeypatch.setenv("FASTDREAM_BACKEND_SHADE", "")  # empty: unset
    assert _dispatch.env_problems(cpu) == []
    _dispatch.check_env(cpu)
    monkeypatch.setenv("FASTDREAM_BACKEND_COMPOSITE", "triton")  # composite has no Triton kernel
    (problem,) = _dispatch.env_problems(cpu)
    assert "composite has no triton implementation" in problem
    monkeypatch.setenv("FASTDREAM_BACKEND", "bogus")
    with pytest.raises(UserError, match="FASTDREAM_BACKEND=bogus: unknown backend"):
        _dispatch.check_env(cpu)
    assert len(_dispatch.env_problems(cpu)) == 2


def test_why_unusable_names_the_reason() -> None:
    assert backends.why_unusable("reference", torch.device("cpu")) == ""
    if backends.extension() is not None:
        assert "CPU tensors only" in backends.why_unusable("cpp", torch.device("cuda"))
    if not torch.cuda.is_available():
        assert backends.why_unusable("cuda", torch.device("cpu"))


def test_info_reports_a_bad_override() -> None:
    res = fastdream("info", extra_env={"FASTDREAM_BACKEND": "foo"})
    assert res.returncode == 0, res.stderr
    line = next(ln for ln in res.stdout.splitlines() if "error:" in ln)
    assert "FASTDREAM_BACKEND=foo" in line and "unknown backend" in line
    doc = json.loads(fastdream("info", "--json", extra_env={"FASTDREAM_BACKEND": "foo"}).stdout)
    assert doc["backend_overrides"] == {"FASTDREAM_BACKEND": "foo"}
    assert "unknown backend" in doc["backend_override_problems"][0]


# ------------------------------------------------------------------------------ 2. unwritable destinations


def test_unwritable_reason(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    assert ckpt.unwritable_reason(tmp_path) is None
    assert ckpt.unwritable_reason(tmp_path / "new" / "deeper") is None  # created later: its parent is probed
    assert "is a file" in ckpt.unwritable_reason(f / "sub")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # the probe leaves nothing


def test_export_into_an_unwritable_folder_is_refused_before_loading(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture, no_backend_env: None
) -> None:
    import fastdream.run

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    def not_called(*args, **kwargs):
        raise AssertionError("the run was loaded before the folder was checked")

    before = tree_hash(run_dir)
    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    monkeypatch.setattr(fastdream.run, "load_run", not_called)
    assert main(["export", str(run_dir), "--device", "cpu"]) == 2
    line = _one_line(capfd.readouterr().err)
    assert str(run_dir) in line and "not writable" in line and "Permission denied" in line
    assert tree_hash(run_dir) == before


def test_export_write_failure_is_one_line_and_keeps_the_other_outputs(run_dir: Path) -> None:
    obj = (run_dir / "mesh.obj").read_bytes()
    (run_dir / "mesh.glb").unlink()
    (run_dir / "mesh.glb").mkdir()  # a folder where the file must go: its rename fails
    (run_dir / "mesh.glb" / "keep").write_text("x")
    res = fastdream("export", run_dir, "--device", "cpu")
    assert_user_error(res, f"cannot write {run_dir / 'mesh.glb'}", "earlier outputs are kept")
    assert (run_dir / "mesh.obj").read_bytes() == obj
    assert not [p.name for p in run_dir.iterdir() if ".tmp" in p.name]


def test_failed_video_write_keeps_ffmpeg_quiet(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    import numpy as np

    from fastdream.export import write_video

    (tmp_path / "file").write_text("x")
    frames = [np.zeros((16, 16, 3), np.uint8)] * 2
    with pytest.raises(OSError):  # the GIF fallback cannot be written either: the folder is a file
        write_video(frames, tmp_path / "file" / "turntable.mp4", fps=4)
    assert capfd.readouterr().err == ""  # no ffmpeg log lines


def test_failed_checkpoint_save_is_a_user_error_and_keeps_the_last(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = {"format": 1, "step": 2, "field": {"w": torch.arange(3.0)}}
    first = ckpt.save_checkpoint(tmp_path, 2, state)
    data = first.read_bytes()
    real = os.replace

    def read_only(src, dst):
        if "checkpoints" in str(dst):
            raise OSError(30, "Read-only file system", str(src))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", read_only)
    with pytest.raises(UserError) as info:
        ckpt.save_checkpoint(tmp_path, 4, state | {"step": 4})
    msg = str(info.value)
    assert "\n" not in msg and "step_000004.pt" in msg and "Read-only file system" in msg
    assert "step_000002.pt is kept" in msg and "--resume" in msg
    assert [p.name for p in first.parent.iterdir()] == ["step_000002.pt"] and first.read_bytes() == data


def test_resume_whose_checkpoint_cannot_be_saved(run_dir: Path) -> None:
    """The CLI: a checkpoint that cannot be renamed into place (a folder holds its name) is one line, and the
    earlier checkpoints are intact."""
    blocked = run_dir / "checkpoints" / "step_000006.pt"
    blocked.mkdir()
    (blocked / "x").write_text("x")
    last = run_dir / "checkpoints" / "step_000004.pt"
    data = last.read_bytes()
    res = fastdream("generate", "a red cube", "--device", "cpu", "--quiet", "--no-export", "--out", run_dir,
                    "--resume", "--steps", "6")  # fmt: skip
    assert_user_error(res, "cannot save checkpoint", "step_000006.pt", "step_000004.pt is kept")
    assert last.read_bytes() == data
    assert not [p.name for p in last.parent.iterdir() if ".tmp" in p.name]


def test_resume_into_unwritable_checkpoints_is_refused_before_training(run_dir: Path, monkeypatch, capsys) -> None:
    """--resume checks that checkpoints/ takes files before it loads anything or trains (as root os.access says
    yes to everything, so the probe is faked here)."""
    real = ckpt.unwritable_reason

    def fake(folder):
        return "Read-only file system" if Path(folder).name == ckpt.CHECKPOINT_DIR else real(folder)

    monkeypatch.setattr(ckpt, "unwritable_reason", fake)
    before = tree_hash(run_dir)
    argv = ["generate", "a red cube", "--device", "cpu", "--quiet", "--no-export", "--out", str(run_dir)]
    assert main([*argv, "--resume", "--steps", "6"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "cannot resume" in line and "Read-only file system" in line
    assert tree_hash(run_dir) == before


# ----------------------------------------------------------------------------------------- 3. evaluate --seed


@pytest.mark.parametrize("seed", ["-1", "99999999999999999999", str(2**32)])
def test_evaluate_seed_out_of_range(run_dir: Path, seed: str) -> None:
    assert_user_error(fastdream("evaluate", run_dir, "--seed", seed), "--seed", "4294967295", seed)


def test_evaluate_largest_seed() -> None:
    import trimesh

    from fastdream.builtin.evaluate import SEED_MAX, evaluate_mesh

    r = evaluate_mesh(trimesh.creation.box((0.8, 0.8, 0.8)), "a red cube", seed=SEED_MAX)
    assert r["correct_shape"]


# ------------------------------------------------------------------------- 4. checkpoint vs config.json


def test_state_mismatch_names_the_tensor_and_shapes() -> None:
    field = torch.nn.Linear(3, 4)
    state = {"field": {"weight": torch.zeros(4, 5), "bias": torch.zeros(4)}}
    assert ckpt.state_mismatch({"field": field}, state) == "field.weight: checkpoint [4, 5], config [4, 3]"
    assert ckpt.state_mismatch({"field": field, "background": None}, {"field": field.state_dict()}) is None
    extra = {"field": field.state_dict() | {"scale": torch.ones(1)}}
    assert ckpt.state_mismatch({"field": field}, extra) == "field.scale: in the checkpoint, not in config"
    with pytest.raises(UserError, match=r"^checkpoint \S+ does not match config.json \(field.weight: .*\); "):
        ckpt.check_state_matches("step_000002.pt", {"field": field}, state)


def _grow_table(run_dir: Path) -> None:
    path = run_dir / "config.json"
    cfg = json.loads(path.read_text())
    cfg["field"]["log2_table_size"] += 2
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize("command", ["export", "resume"])
def test_config_that_no_longer_matches_the_checkpoint(run_dir: Path, command: str) -> None:
    _grow_table(run_dir)
    before = tree_hash(run_dir)
    if command == "export":
        res = fastdream("export", run_dir, "--device", "cpu")
    else:
        res = fastdream("generate", "a red cube", "--device", "cpu", "--quiet", "--no-export", "--out", run_dir,
                        "--resume", "--steps", "6")  # fmt: skip
    line = assert_user_error(res, "step_000004.pt does not match", "field.table: checkpoint [4, 1024, 2]")
    assert "config [4, 4096, 2]" in line and "\t" not in line
    assert tree_hash(run_dir) == before


# ------------------------------------------------------------------------------ 5 and 7. diffusers folders


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("diffusers")
    from test_guidance_diffusers import tiny_sd_folder

    return tiny_sd_folder(tmp_path_factory.mktemp("sd") / "tiny-sd")


def _copy(src: Path, dst: Path, drop: str) -> Path:
    shutil.copytree(src, dst)
    for f in dst.glob(drop):
        f.unlink()
    return dst


def test_missing_unet_weights_print_only_fastdreams_line(
    sd_folder: Path, tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from fastdream.guidance import load_guidance

    broken = _copy(sd_folder, tmp_path / "broken", "unet/diffusion_pytorch_model*")
    levels = diffusers_logging.get_verbosity(), transformers_logging.get_verbosity()
    capfd.readouterr()
    with pytest.raises(UserError, match="cannot load the unet"):
        load_guidance(str(broken), "cpu")
    assert capfd.readouterr().err == ""  # diffusers' "An error occurred while trying to fetch" is not shown
    assert (diffusers_logging.get_verbosity(), transformers_logging.get_verbosity()) == levels
    args = [a if a != "builtin" else str(broken) for a in TINY]
    res = fastdream("generate", "a red cube", *args, "--out", tmp_path / "run")
    assert_user_error(res, "cannot load the unet")
    assert "An error occurred" not in res.stderr and not (tmp_path / "run").exists()


def test_clip_tokenizer_without_vocabulary_files(sd_folder: Path, tmp_path: Path) -> None:
    from fastdream.guidance import load_guidance

    empty = _copy(sd_folder, tmp_path / "empty", "tokenizer/*")
    with pytest.raises(UserError) as info:
        load_guidance(str(empty), "cpu")
    msg = str(info.value)
    assert "tokenizer" in msg and "vocab.json and merges.txt" in msg and "\n" not in msg
    assert "sentencepiece" not in msg  # a CLIP tokenizer never needs it
    # only tokenizer_config.json: transformers would build a tokenizer of the special tokens alone
    bare = _copy(sd_folder, tmp_path / "bare", "tokenizer/*")
    shutil.copy(sd_folder / "tokenizer" / "tokenizer_config.json", bare / "tokenizer")
    with pytest.raises(UserError, match="has no vocabulary"):
        load_guidance(str(bare), "cpu")


# ---------------------------------------------------------------------------------- 6. bench output files


@pytest.mark.parametrize(
    "option, target, words",
    [
        ("--json", "dir", ("is a folder",)),
        ("--json", "missing/x.json", ("does not exist",)),
        ("--json", "file/x.json", ("is a file",)),
        ("--profile", "dir", ("is a folder",)),
        ("--profile", "blocked.txt", ("blocked.txt.trace.json", "is a folder")),
        ("--profile", "file/p.txt", ("is a file",)),
    ],
)
def test_bench_output_files_checked_before_running(
    option: str,
    target: str,
    words: tuple[str, ...],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    no_backend_env: None,
) -> None:
    import fastdream.commands.bench as bench_command

    (tmp_path / "dir").mkdir()
    (tmp_path / "blocked.txt.trace.json").mkdir()
    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(bench_command, "run_bench", lambda *a, **k: pytest.fail("the benchmark ran"))
    assert main(["bench", "--tiny", "--device", "cpu", option, str(tmp_path / target)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert option in line and all(w in line for w in words), line


def test_bench_seed_out_of_range(capsys: pytest.CaptureFixture, no_backend_env: None) -> None:
    assert main(["bench", "--tiny", "--device", "cpu", "--seed", "99999999999999999999"]) == 2
    assert "--seed" in _one_line(capsys.readouterr().err)


# ----------------------------------------------------------------- 7. export and evaluate on unusual run folders


def test_export_of_an_interrupted_run_says_it_is_unfinished(
    run_dir: Path, capsys: pytest.CaptureFixture, no_backend_env: None
) -> None:
    """A run stopped at step 2 of 4 (its last checkpoint): the export works, and says how to finish the run."""
    import shlex

    (run_dir / "checkpoints" / "step_000004.pt").unlink()
    capsys.readouterr()
    args = ["--device", "cpu", "--frames", "2", "--turntable-resolution", "16", "--mesh-resolution", "16"]
    args += ["--iso-level", "1"]  # the tiny run's peak density is about 5: no note that it is faint
    assert main(["export", str(run_dir), *args]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("exported step 2:")
    line = _one_line(err)
    assert "stopped at step 2 of 4" in line
    command = shlex.split(line.split("continue it with: ", 1)[1])
    assert command == ["fastdream", "generate", "a red cube", "--out", str(run_dir), "--resume"]


def test_export_of_a_finished_run_adds_no_note(run_dir: Path, capsys: pytest.CaptureFixture, no_backend_env: None):
    capsys.readouterr()
    args = ["--device", "cpu", "--frames", "2", "--turntable-resolution", "16", "--mesh-resolution", "16"]
    args += ["--iso-level", "1"]  # the tiny run's peak density is about 5: no note that it is faint
    assert main(["export", str(run_dir), *args]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("exported step 4:") and err == ""


def test_export_keeps_the_runs_mesh_settings_unless_given(
    run_dir: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, no_backend_env: None
) -> None:
    """A run made with ``--set export.mesh_resolution=...`` is re-exported at its own settings (both were reset to
    128 and 10 before); an option given to export overrides only itself."""
    import fastdream.export

    cfg = json.loads((run_dir / "config.json").read_text())
    cfg["export"].update(mesh_resolution=20, iso_level=7.5)
    (run_dir / "config.json").write_text(json.dumps(cfg))
    seen = []
    monkeypatch.setattr(fastdream.export, "export_all", lambda f, b, g, c, d: seen.append(c.export) or ([], None))
    assert main(["export", str(run_dir), "--device", "cpu"]) == 0
    assert main(["export", str(run_dir), "--device", "cpu", "--mesh-resolution", "16"]) == 0
    assert main(["export", str(run_dir), "--device", "cpu", "--iso-level", "3"]) == 0
    assert [(e.mesh_resolution, e.iso_level) for e in seen] == [(20, 7.5), (16, 7.5), (20, 3.0)]


def _as_diffusion_run(run_dir: Path, prompt: str) -> None:
    cfg = json.loads((run_dir / "config.json").read_text())
    cfg["prompt"], cfg["guidance"]["model"] = prompt, "stabilityai/stable-diffusion-2-1-base"
    (run_dir / "config.json").write_text(json.dumps(cfg))


def test_evaluate_a_diffusion_run_of_a_builtin_prompt_says_so(run_dir: Path, capsys: pytest.CaptureFixture) -> None:
    _as_diffusion_run(run_dir, "a red cube")
    capsys.readouterr()
    assert main(["evaluate", str(run_dir)]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["shape"] == "cube"
    line = _one_line(err)
    assert line.startswith("note:") and "stabilityai/stable-diffusion-2-1-base" in line and "not builtin" in line


def test_evaluate_a_diffusion_run_of_another_prompt_names_the_model(run_dir: Path) -> None:
    """It said only "not in the builtin vocabulary", as if the user had made a builtin run with a bad prompt."""
    _as_diffusion_run(run_dir, "a DSLR photo of a hamburger")
    res = fastdream("evaluate", run_dir)
    assert_user_error(res, "--model stabilityai/stable-diffusion-2-1-base", "hamburger", "COLOUR SHAPE")
    assert res.stdout == ""


def test_evaluate_notes_a_mesh_older_than_the_last_checkpoint(run_dir: Path, capsys: pytest.CaptureFixture) -> None:
    """A run resumed with --no-export keeps the mesh of an earlier step: evaluate scores it, and says so."""
    import os

    from fastdream.checkpoint import latest_checkpoint

    capsys.readouterr()
    assert main(["evaluate", str(run_dir)]) == 0
    assert capsys.readouterr().err == ""  # a finished run: the mesh is newer than its checkpoints
    last = latest_checkpoint(run_dir)
    mesh_time = (run_dir / "mesh.obj").stat().st_mtime_ns
    os.utime(last, ns=(mesh_time + 10**9, mesh_time + 10**9))  # trained on after the export
    assert main(["evaluate", str(run_dir)]) == 0
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("note:") and "older than the last checkpoint" in line and "fastdream export" in line


def test_export_says_when_no_density_reaches_the_iso_level(
    run_dir: Path, capsys: pytest.CaptureFixture, no_backend_env: None
) -> None:
    """The mesh is then the surface at half the peak: exported, with a note on stderr (it was silent)."""
    assert main(["export", str(run_dir), "--device", "cpu", "--iso-level", "1e9", "--mesh-resolution", "24"]) == 0
    err = capsys.readouterr().err
    assert "note: no density reaches the iso level 1e+09" in err and "half the peak" in err, err
    assert (run_dir / "mesh.glb").stat().st_size > 0
