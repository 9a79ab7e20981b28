# SPDX-License-Identifier: Apache-2.0
"""Bad input to the CLI, as a user meets it: ``python -m fastdream ...`` in a subprocess.

Every case: exit status 2, exactly one line on stderr naming the problem and the fix, no traceback, and the
output folder (a finished tiny run, or an empty or absent one) byte-for-byte unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from clitools import TINY, assert_user_error, fastdream, tree_hash

from fastdream import checkpoint as ckpt


def check(run_dir: Path, *args: str, needles: tuple[str, ...], env: dict[str, str] | None = None) -> str:
    before = tree_hash(run_dir)
    res = fastdream(*args, extra_env=env)
    line = assert_user_error(res, *needles)
    assert tree_hash(run_dir) == before, "the output folder changed"
    return line


GEN = ("generate",)
# --resume takes the saved settings; only these may be given with it
RESUME = ("--device", "cpu", "--quiet", "--no-export")


@pytest.mark.parametrize(
    "args, needles",
    [
        (("",), ("prompt is empty",)),
        (("   \t ",), ("prompt is empty",)),
        (("a red cube", "--steps", "abc"), ("--steps",)),
        (("a red cube", "--steps", "0"), ("--steps", ">= 1")),
        (("a red cube", "--steps", "-5"), ("--steps",)),
        (("a red cube", "--steps", "2.5"), ("--steps",)),
        (("a red cube", "--resolution", "0"), ("--resolution",)),
        (("a red cube", "--resolution", "100000"), ("--resolution",)),
        (("a red cube", "--guidance-scale", "-1"), ("--guidance-scale",)),
        (("a red cube", "--guidance-scale", "nan"), ("--guidance-scale",)),
        (("a red cube", "--guidance-scale", "many"), ("--guidance-scale",)),
        (("a red cube", "--save-every", "0"), ("--save-every",)),
        (("a red cube", "--lr", "-0.1"), ("--lr",)),
        (("a red cube", "--set", "render.nonsense=3"), ("--set", "unknown")),
        (("a red cube", "--device", "tpu"), ("--device",)),
        (("a red cube", "--device", "cpu:5"), ("--device", "cpu:5")),
        # 32 x 2^24 x 8 float32 entries with gradients and Adam moments (the OOM killer ended it silently before)
        (
            ("a red cube", *"--set field.log2_table_size=24 --set field.levels=32 --set field.features=8".split()),
            ("field.log2_table_size", "GiB"),
        ),
        (("a red cube", "--set", "guidance.builtin_cameras_per_view=0"), ("builtin_cameras_per_view",)),
        # a --set beside the option that sets the same thing: the --set won silently (the prompt, too)
        (("a red cube", "--set", "prompt=a blue sphere"), ("--set prompt", "PROMPT")),
        (("a red cube", "--set", "optim.steps=3"), ("--set optim.steps", "--steps")),
        (("a red cube", "--set", "out=elsewhere"), ("--set out", "--out")),
        (("a red cube", "--set", "guidance.model=builtin"), ("--set guidance.model", "--model")),
        # outside float32, or past where the march resolves its step: NaN cameras, and the run said "done"
        (("a red cube", "--set", "camera.distance_range=[1e300,1e300]"), ("camera.distance_range",)),
        # TINY's 16 samples across the diameter: a step of 1/8, resolved in float32 out to 2^20
        (("a red cube", "--set", "camera.distance_range=[3,2e6]"), ("camera.distance_range", "1.04858e+06")),
        (("a red cube", "--set", "camera.fov_range=[1e-300,1e-300]"), ("camera.fov_range",)),
        (("a red cube", "--set", "camera.light_distance_range=[1e300,1e300]"), ("light_distance_range", "1e6")),
        (("a red cube", "--compile-vae"), ("--compile-vae", "builtin")),  # the builtin prior has no VAE
    ],
)
def test_bad_settings(run_dir: Path, args: tuple[str, ...], needles: tuple[str, ...]) -> None:
    # --overwrite: even a command allowed to replace the run must not touch it when its settings are bad
    check(run_dir, *GEN, args[0], *TINY, *args[1:], "--out", run_dir, "--overwrite", needles=needles)


def test_prompt_outside_builtin_vocabulary(run_dir: Path) -> None:
    check(run_dir, *GEN, "a purple elephant", *TINY, "--out", run_dir, "--overwrite", needles=("vocabulary",))


def test_unknown_model_id_offline(run_dir: Path, tmp_path: Path) -> None:
    args = [a if a != "builtin" else "nobody-xyz/no-such-model" for a in TINY]
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub")}
    check(
        run_dir,
        *GEN,
        "a red cube",
        *args,
        "--out",
        run_dir,
        "--overwrite",
        needles=("nobody-xyz/no-such-model", "HF_HUB_OFFLINE"),
        env=env,
    )


def test_cuda_graphs_on_the_cpu(run_dir: Path, tmp_path: Path) -> None:
    """Refused before anything is loaded (the model folder does not even exist)."""
    args = [a if a != "builtin" else str(tmp_path / "no-model") for a in TINY]
    check(run_dir, *GEN, "a red cube", *args, "--device", "cpu", "--cuda-graphs", "--out", run_dir, "--overwrite",
          needles=("--cuda-graphs", "CUDA"))  # fmt: skip


def test_compile_vae_on_the_cpu(run_dir: Path, tmp_path: Path) -> None:
    """Refused before anything is loaded, like --cuda-graphs."""
    args = [a if a != "builtin" else str(tmp_path / "no-model") for a in TINY]
    check(run_dir, *GEN, "a red cube", *args, "--device", "cpu", "--compile-vae", "--out", run_dir, "--overwrite",
          needles=("--compile-vae", "CUDA"))  # fmt: skip


def test_resume_turns_off_the_cuda_graphs_the_run_was_saved_with(run_dir: Path) -> None:
    """A run saved with --cuda-graphs (on a GPU) resumed on the CPU: refused in one line that names the way out,
    --no-cuda-graphs, which then resumes it (--set is refused on --resume, and before --no-cuda-graphs the switch
    could be turned on there but never off). --compile-vae is the same switch (the builtin prior has no VAE)."""
    cfg_path = run_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["guidance"]["cuda_graphs"] = True
    cfg_path.write_text(json.dumps(cfg))
    resume = (*GEN, "a red cube", "--out", run_dir, "--resume", *RESUME)
    check(run_dir, *resume, needles=("--cuda-graphs", "--no-cuda-graphs"))
    res = fastdream(*resume, "--no-cuda-graphs", "--steps", str(cfg["optim"]["steps"] + 1))
    assert res.returncode == 0, res.stderr
    assert json.loads(cfg_path.read_text())["guidance"]["cuda_graphs"] is False


def test_the_cuda_switches_and_their_negations() -> None:
    """--x / --no-x, the last one given wins, each recorded as given (so --resume takes it)."""
    import argparse

    from fastdream.commands import generate

    parser = generate.add_parser(argparse.ArgumentParser().add_subparsers())
    for argv, want in [
        ([], (False, False, set())),
        (["--cuda-graphs", "--compile-vae"], (True, True, {"cuda_graphs", "compile_vae"})),
        (["--no-cuda-graphs", "--no-compile-vae"], (False, False, {"cuda_graphs", "compile_vae"})),
        (["--cuda-graphs", "--no-cuda-graphs"], (False, False, {"cuda_graphs"})),
        (["--no-compile-vae", "--compile-vae"], (False, True, {"compile_vae"})),
    ]:
        args = parser.parse_args(["a red cube", *argv])
        assert (args.cuda_graphs, args.compile_vae, set(getattr(args, "_explicit", set()))) == want, argv


def test_local_folder_that_is_not_a_diffusers_model(run_dir: Path, tmp_path: Path) -> None:
    fake = tmp_path / "my-model"
    fake.mkdir()
    (fake / "weights.bin").write_bytes(b"\0" * 64)
    args = [a if a != "builtin" else str(fake) for a in TINY]
    check(run_dir, *GEN, "a red cube", *args, "--out", run_dir, "--overwrite", needles=("not a diffusers",))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "pickle"])
def test_corrupt_checkpoint_with_resume(run_dir: Path, damage: str) -> None:
    last = run_dir / "checkpoints" / "step_000004.pt"
    data = last.read_bytes()
    if damage == "pickle":  # a plain pickle: torch warned about its protocol on stderr before our one line
        import pickle

        last.write_bytes(pickle.dumps({"a": 1}, protocol=4))
    else:
        last.write_bytes(data[: len(data) // 3] if damage == "truncate" else b"PK\x03\x04" + os.urandom(200))
    check(run_dir, *GEN, "a red cube", *RESUME, "--out", run_dir, "--resume", "--steps", "6", needles=("corrupt",))


def test_resume_with_nothing_to_resume(tmp_path: Path, run_dir: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    check(empty, *GEN, "a red cube", *RESUME, "--out", empty, "--resume", needles=("nothing to resume",))
    absent = tmp_path / "absent"
    check(absent, *GEN, "a red cube", *RESUME, "--out", absent, "--resume", needles=("nothing to resume",))
    assert not absent.exists()
    shutil.rmtree(run_dir / "checkpoints")  # a run killed before its first checkpoint
    check(run_dir, *GEN, "a red cube", *RESUME, "--out", run_dir, "--resume", needles=("no checkpoint",))


def test_output_folder_under_a_file(tmp_path: Path) -> None:
    f = tmp_path / "file.txt"
    f.write_text("keep me")
    check(tmp_path, *GEN, "a red cube", *TINY, "--out", f / "sub", needles=("--out", "file"))
    check(tmp_path, *GEN, "a red cube", *TINY, "--out", f, needles=("--out", "file"))
    assert f.read_text() == "keep me"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through any permission bits")
def test_output_folder_without_write_permission(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        check(locked, *GEN, "a red cube", *TINY, "--out", locked / "run", needles=("not writable",))
    finally:
        locked.chmod(0o700)


def test_folder_holding_a_different_run(run_dir: Path) -> None:
    check(run_dir, *GEN, "a blue sphere", *TINY, "--out", run_dir, needles=("a red cube", "--overwrite"))
    check(run_dir, *GEN, "a blue sphere", *RESUME, "--out", run_dir, "--resume", needles=("a red cube",))
    # the same run again without --resume is refused too (it would restart it)
    check(run_dir, *GEN, "a red cube", *TINY, "--out", run_dir, "--steps", "6", needles=("--resume",))


def test_overwrite_replaces_only_the_runs_files(run_dir: Path) -> None:
    res = fastdream(*GEN, "a blue sphere", *TINY, "--out", run_dir, "--steps", "2", "--overwrite")
    assert res.returncode == 0, res.stderr
    assert json.loads((run_dir / "config.json").read_text())["prompt"] == "a blue sphere"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_000002.pt"]
    assert (run_dir / "notes.txt").read_text() == "the user's own file\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_device_cuda_without_gpu(run_dir: Path) -> None:
    args = [a if a != "cpu" else "cuda" for a in TINY]
    check(run_dir, *GEN, "a red cube", *args, "--out", run_dir, "--overwrite", needles=("--device", "cuda"))


def test_device_cuda_n_becomes_the_current_device(monkeypatch) -> None:
    """--device cuda:1 makes GPU 1 current: the streams, events and graph captures made without naming a device
    (the trainer's step outcomes, the bench's timers, every capture) were GPU 0's. "cuda" and "cpu" change
    nothing. (Two GPUs pretended: only the resolver's wiring can be checked here.)"""
    from fastdream.errors import UserError
    from fastdream.run import resolve_device

    made_current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", made_current.append)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    assert made_current == [torch.device("cuda:1")]
    assert resolve_device("cuda") == torch.device("cuda") and resolve_device("cpu") == torch.device("cpu")
    assert made_current == [torch.device("cuda:1")]

    def busy(device):
        raise RuntimeError("CUDA error: all CUDA-capable devices are busy or unavailable\nCompile with ...")

    monkeypatch.setattr(torch.cuda, "set_device", busy)
    with pytest.raises(UserError, match=r"^--device cuda:1: the GPU cannot be used \(CUDA error: all CUDA-capable"):
        resolve_device("cuda:1")


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    res = fastdream("--debug", *GEN, "", *TINY, "--out", tmp_path / "x")
    assert "Traceback" in res.stderr and "UserError" in res.stderr
    # and then the same line and exit status as without --debug (it was 1, Python's, before)
    assert res.returncode == 2 and res.stderr.rstrip().splitlines()[-1].startswith("fastdream generate: error: ")


# ------------------------------------------------------------------------------------------------- export


def test_export_bad_inputs(run_dir: Path, tmp_path: Path) -> None:
    check(tmp_path, "export", tmp_path / "absent", needles=("not a folder",))
    check(tmp_path, "export", tmp_path, needles=("config.json",))
    check(run_dir, "export", run_dir, "--mesh-resolution", "4", needles=("--mesh-resolution",))
    check(run_dir, "export", run_dir, "--device", "cuda:7", needles=("--device",))
    for _, p in sorted((q.name, q) for q in (run_dir / "checkpoints").iterdir())[-1:]:
        p.write_bytes(p.read_bytes()[:100])
    check(run_dir, "export", run_dir, "--device", "cpu", needles=("corrupt",))


def test_export_inf_iso_level_and_a_hand_edited_config(run_dir: Path) -> None:
    check(run_dir, "export", run_dir, "--iso-level", "inf", needles=("--iso-level", "finite"))
    cfg = json.loads((run_dir / "config.json").read_text())
    for section, key, bad, needle in [
        ("render", "turntable_frames", 0, "turntable_frames"),  # ZeroDivisionError before
        ("field", "levels", "abc", "field.levels"),  # TypeError before
        ("render", "background", "pink", "background"),  # accepted before
    ]:
        edited = json.loads(json.dumps(cfg))
        edited[section][key] = bad
        (run_dir / "config.json").write_text(json.dumps(edited))
        line = check(run_dir, "export", run_dir, "--device", "cpu", needles=("config.json", needle))
        assert "fix or delete it" in line
    (run_dir / "config.json").write_text(json.dumps({**cfg, "prompt": 5}))  # it was called "empty"
    check(run_dir, "export", run_dir, "--device", "cpu", needles=("config.json", "prompt must be text, got 5"))


def test_names_too_long_for_the_file_system_are_one_line(run_dir: Path, tmp_path: Path) -> None:
    long = tmp_path / ("a" * 300)
    check(tmp_path, *GEN, "a red cube", *TINY, "--out", long, needles=("too long",))
    check(tmp_path, "export", long, needles=("too long",))
    check(tmp_path, "evaluate", long, needles=("too long",))


def test_a_prompt_of_undecodable_bytes_is_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    prompt = os.fsdecode(b"a red \xff\xfe cube")  # what Python makes of bytes the locale cannot decode
    args = ["generate", prompt, "--model", "stabilityai/stable-diffusion-2-1-base", "--out", str(tmp_path / "x")]
    res = subprocess.run([sys.executable, "-m", "fastdream", *args], capture_output=True, text=True, errors="replace")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "UTF-8" in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not (tmp_path / "x").exists()


def _edit_last_checkpoint(run_dir: Path, edit) -> None:
    path = ckpt.latest_checkpoint(run_dir)
    state = torch.load(path, map_location="cpu", weights_only=False)
    edit(state)
    torch.save(state, path)


def _first_adam_state(state: dict) -> dict:
    return next(iter(state["optimizer"]["state"].values()))


@pytest.mark.parametrize(
    "edit, needles",
    [
        (lambda s: s["field"]["table"].view(-1)[0].fill_(float("nan")), ("impossible value", "field")),
        (lambda s: s["optimizer"]["param_groups"][0].update(lr=float("nan")), ("impossible value", "lr")),
        (lambda s: s.update(step=-5), ("impossible value", "step -5")),
        (lambda s: _first_adam_state(s).update(exp_avg=torch.zeros(3)), ("exp_avg", "shape")),
        # step_000004.pt saying step 1000000: the run reported "done: 1000000 steps" after 4
        (lambda s: s.update(step=1000000), ("impossible value", "step 1000000", "name says 4")),
    ],
    ids=["nan-table", "nan-lr", "negative-step", "adam-shape", "step-not-its-name"],
)
def test_an_edited_checkpoint_is_refused_by_resume_and_export(run_dir: Path, edit, needles) -> None:
    """Tracebacks at the first save (NaN), at the first step (Adam's shapes), or a run 'at step -5' before."""
    _edit_last_checkpoint(run_dir, edit)
    check(run_dir, *GEN, "a red cube", *RESUME, "--steps", "6", "--out", run_dir, "--resume", needles=needles)
    check(run_dir, "export", run_dir, "--device", "cpu", needles=needles)


def test_resume_accepts_the_original_options_and_refuses_changed_ones(run_dir: Path) -> None:
    same = ("--model", "builtin", "--seed", "0", "--resolution", "16", "--samples-per-ray", "16")
    check(run_dir, *GEN, "a red cube", *RESUME, *same, "--lr", "0.5", "--out", run_dir, "--resume", needles=("--lr",))
    res = fastdream(*GEN, "a red cube", *RESUME, *same, "--steps", "6", "--out", run_dir, "--resume")
    assert res.returncode == 0, res.stderr
    assert ckpt.latest_checkpoint(run_dir).name == "step_000006.pt"


def test_evaluate_bad_inputs(run_dir: Path, tmp_path: Path) -> None:
    check(tmp_path, "evaluate", tmp_path / "absent", needles=("not a folder",))
    check(tmp_path, "evaluate", tmp_path, needles=("config.json",))
    check(run_dir, "evaluate", run_dir, needles=("mesh", "fastdream export"))
