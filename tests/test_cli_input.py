# SPDX-License-Identifier: Apache-2.0
"""Bad input to ``fastdream generate`` is refused up front: one line on stderr, exit status 2, no traceback, and
nothing on disk changed (no old run deleted, no folder or ``config.json`` left behind).

Most cases call :func:`fastdream.cli.main` in this process (a crash surfaces as the exception itself, and no
interpreter start per case keeps them fast); a few go through ``python -m fastdream`` as the user does.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import re
from pathlib import Path

import pytest
from clitools import ROOT, TINY, assert_user_error, fastdream, tree_hash

from fastdream import config as config_mod
from fastdream import run as runs
from fastdream.cli import build_parser, main
from fastdream.config import CLI_OPTIONS, RunConfig, option_name, validate
from fastdream.errors import UserError

PROMPT = "a red cube"


def cli_error(capsys: pytest.CaptureFixture, *args: object, needles: tuple[str, ...] = ()) -> str:
    """``fastdream ARGS`` in this process: exit status 2 and one stderr line holding every needle (any case)."""
    capsys.readouterr()
    rc = main([str(a) for a in args])
    _, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, f"exit {rc}, stderr:\n{err}"
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert "Traceback" not in err
    for n in needles:
        assert n.lower() in lines[0].lower(), f"{n!r} not in {lines[0]!r}"
    return lines[0]


# Settings that validate() did not check and that crashed after the model loaded (or wrote a wrong run), each
# with the words its one line must hold.
BAD_SETTINGS = [
    ('guidance.t_range=["a","b"]', ("--set guidance.t_range",)),
    ("guidance.t_range=[0.5,0.5]", ("--set guidance.t_range", "lo < hi")),
    ("optim.betas=[2,3]", ("--set optim.betas", "[0, 1)")),
    ("optim.eps=-1", ("--set optim.eps", "> 0")),
    ("optim.grid_warmup_steps=-1", ("--set optim.grid_warmup_steps",)),
    ("optim.keep_checkpoints=-1", ("--set optim.keep_checkpoints",)),
    ("field.hidden=0", ("--set field.hidden",)),
    ("field.features=0", ("--set field.features",)),
    ("field.hidden_layers=-1", ("--set field.hidden_layers",)),
    ("field.base_resolution=0", ("--set field.base_resolution",)),
    ("field.finest_resolution=1", ("--set field.finest_resolution", "field.base_resolution")),
    ("field.blob_radius=0", ("--set field.blob_radius",)),
    ("render.turntable_frames=0", ("--set render.turntable_frames", "[1, 3600]")),
    ("render.turntable_resolution=0", ("--set render.turntable_resolution", "[16, 2048]")),
    ("render.turntable_fps=0", ("--set render.turntable_fps",)),
    ("render.grid_threshold=-1", ("--set render.grid_threshold", ">= 0")),
    ("render.grid_decay=2", ("--set render.grid_decay",)),
    ("render.preview_resolution=2", ("--set render.preview_resolution",)),  # was "--preview-resolution"
    ("export.mesh_resolution=0", ("--set export.mesh_resolution", "[16, 1024]")),
    ("export.iso_level=-1", ("--set export.iso_level", "> 0")),
    ("export.min_component_ratio=2", ("--set export.min_component_ratio",)),
    ("camera.elevation_range=[100,-100]", ("--set camera.elevation_range", "[-90, 90]")),
    ("camera.elevation_range=[-10,100]", ("--set camera.elevation_range",)),
    ("camera.azimuth_range=[180,-180]", ("--set camera.azimuth_range",)),
    ("camera.light_jitter=-1", ("--set camera.light_jitter",)),
    ('shading.ambient=["a",1,1]', ("--ambient",)),
    ("optim.lr=1e300", ("--lr", "float32")),  # overflowed inside Adam, after --overwrite had deleted the old run
    ("optim.eps=1e-300", ("--set optim.eps", "float32")),  # 0 in float32: NaN at the first step
    ("optim.mlp_lr_scale=1e300", ("--set optim.mlp_lr_scale", "float32")),
    ("out=null", ("--out",)),
]


@pytest.mark.parametrize("setting, needles", BAD_SETTINGS, ids=[s for s, _ in BAD_SETTINGS])
def test_bad_setting_is_refused_before_overwrite_deletes_anything(
    capsys: pytest.CaptureFixture, run_dir: Path, setting: str, needles: tuple[str, ...]
) -> None:
    before = tree_hash(run_dir)
    cli_error(capsys, "generate", PROMPT, *TINY, "--out", run_dir, "--overwrite", "--set", setting, needles=needles)
    assert tree_hash(run_dir) == before, "the old run changed"


@pytest.mark.parametrize("setting, needles", BAD_SETTINGS[:4], ids=[s for s, _ in BAD_SETTINGS[:4]])
def test_bad_setting_leaves_no_folder(
    capsys: pytest.CaptureFixture, tmp_path: Path, setting: str, needles: tuple[str, ...]
) -> None:
    out = tmp_path / "new" / "run"
    cli_error(capsys, "generate", PROMPT, *TINY, "--out", out, "--set", setting, needles=needles)
    assert not (tmp_path / "new").exists()


def test_overwrite_with_a_bad_setting_keeps_the_old_run_as_the_user_meets_it(run_dir: Path) -> None:
    before = tree_hash(run_dir)
    res = fastdream("generate", PROMPT, *TINY, "--out", run_dir, "--overwrite", "--set", "field.hidden_layers=-1")
    assert_user_error(res, "--set field.hidden_layers")
    assert tree_hash(run_dir) == before


def test_every_setting_of_the_config_is_checked() -> None:
    """Go through the whole RunConfig tree: a value of the wrong kind anywhere is refused by validate(), in a
    message naming how the user sets it (so no setting can reach the trainer unchecked)."""
    free_text = {"prompt", "out", "device", "guidance.model", "guidance.negative_prompt"}  # any text

    def keys(obj: object, prefix: str = "") -> list[str]:
        found = []
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            found += keys(v, f"{prefix}{f.name}.") if dataclasses.is_dataclass(v) else [prefix + f.name]
        return found

    all_keys = keys(RunConfig())
    assert len(all_keys) > 60
    for key in all_keys:
        if key in free_text:
            continue
        cfg = config_mod.resolve(RunConfig(prompt=PROMPT, device="cpu"), "cpu")
        *path, last = key.split(".")
        node = cfg
        for p in path:
            node = getattr(node, p)
        setattr(node, last, "x!")
        with pytest.raises(UserError, match=re.escape(option_name(key))):
            validate(cfg)


def test_option_names_in_messages_are_real_options() -> None:
    """Every ``--option`` these modules name (in messages and help) exists: a user can type what they read."""
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    options = {s for a in parser._actions for s in a.option_strings}
    options |= {s for a in sub.choices["generate"]._actions for s in a.option_strings}
    for key, opt in CLI_OPTIONS.items():
        assert opt in options, f"{key} -> {opt}: no such option"
    for rel in ("fastdream/config.py", "fastdream/run.py", "fastdream/commands/generate.py"):
        named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", (ROOT / rel).read_text()))
        assert named - options == set(), f"{rel} names options that do not exist: {sorted(named - options)}"


@pytest.mark.parametrize("out", ["/proc/fastdream-test", "/sys/fastdream-test/run"])
def test_output_folder_that_cannot_be_created(capsys: pytest.CaptureFixture, out: str) -> None:
    if not Path("/" + out.split("/")[1]).is_dir():
        pytest.skip("no such pseudo-filesystem here")
    cli_error(capsys, "generate", PROMPT, *TINY, "--out", out, needles=("--out", out))
    cli_error(capsys, "generate", PROMPT, *TINY, "--set", f"out={out}", needles=("--out", out))
    assert not Path(out).exists()


def test_output_folder_probe_runs_before_the_model_loads(
    capsys: pytest.CaptureFixture, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder os.access calls writable but that refuses files (as /proc does to root, or a read-only mount):
    refused in one line naming --out before any model loads, and the folders the probe made are gone again."""

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(runs.tempfile, "mkstemp", read_only)
    monkeypatch.setattr(runs, "load_prepared_guidance", no_loading)
    out = tmp_path / "a" / "b"
    cli_error(capsys, "generate", PROMPT, *TINY, "--out", out, needles=("--out", "Read-only"))
    assert not (tmp_path / "a").exists()


def test_plan_leaves_no_trace_on_disk(tmp_path: Path) -> None:
    cfg = RunConfig(prompt=PROMPT, out=str(tmp_path / "a" / "b" / "run"), device="cpu")
    cfg.guidance.model = "builtin"
    plan = runs.plan_generate(cfg, set(), resume=False, overwrite=False)
    assert plan.run_dir == tmp_path / "a" / "b" / "run"
    assert list(tmp_path.iterdir()) == []


def test_default_folder_of_a_prompt_in_another_script(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for prompt, folder in [("赤い立方体", "赤い立方体"), ("Crème brûlée", "creme_brulee"), ("🙂", "run")]:
        cfg = RunConfig(prompt=prompt, device="cpu")  # a hub id: the builtin prior knows English prompts only
        cfg.guidance.model = "stabilityai/stable-diffusion-2-1-base"
        assert runs.plan_generate(cfg, set(), resume=False, overwrite=False).run_dir == Path("runs", folder)
    assert list(tmp_path.iterdir()) == []


def test_a_new_run_that_fails_before_its_first_checkpoint_leaves_no_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A leftover config.json would make the next plain run refuse the folder with nothing in it to resume."""
    from fastdream.train import Trainer

    def crash(self, progress=True):
        if self.wrote_preview:  # as if a preview came out before the failure
            (self.run_dir / "previews").mkdir()
            (self.run_dir / "previews" / "step_000001.png").write_bytes(b"png")
        raise RuntimeError("boom")

    monkeypatch.setattr(Trainer, "train", crash)
    monkeypatch.setattr(Trainer, "wrote_preview", False, raising=False)
    out = tmp_path / "runs" / "run"
    with pytest.raises(RuntimeError, match="boom"):
        main(["generate", PROMPT, *TINY, "--out", str(out)])
    assert list(tmp_path.iterdir()) == []  # no config.json, nor the empty folders it made
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "mine.txt").write_text("the user's")
    with pytest.raises(RuntimeError, match="boom"):
        main(["generate", PROMPT, *TINY, "--out", str(out)])
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["mine.txt"]  # a folder it did not make stays
    monkeypatch.setattr(Trainer, "wrote_preview", True, raising=False)
    with pytest.raises(RuntimeError, match="boom"):
        main(["generate", PROMPT, *TINY, "--out", str(out)])
    assert sorted(p.name for p in out.iterdir()) == ["previews"]  # what it wrote stays, with its folder


@pytest.mark.parametrize("args", [("--out", ""), ("--out", "  "), ("--set", "out="), ("--set", 'out=""')])
def test_empty_out_is_refused(
    capsys: pytest.CaptureFixture, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: tuple[str, str]
) -> None:
    monkeypatch.chdir(tmp_path)  # where runs/<prompt slug> would have gone
    cli_error(capsys, "generate", PROMPT, *TINY, *args, needles=("--out is empty",))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("model", ["Builtin", " BUILTIN "])
def test_builtin_model_in_any_case(capsys: pytest.CaptureFixture, tmp_path: Path, model: str) -> None:
    args = [a if a != "builtin" else model for a in TINY]
    out = tmp_path / "run"
    assert main(["generate", PROMPT, *args, "--steps", "1", "--out", str(out)]) == 0, capsys.readouterr().err
    saved = json.loads((out / "config.json").read_text())
    assert saved["guidance"]["model"] == "builtin"
    assert saved["optim"]["steps"] == 1
    # the same spelling again with --resume is not a change of the run's model
    assert main(["generate", PROMPT, "--model", model, "--device", "cpu", "--quiet", "--no-export", "--out",
                 str(out), "--resume", "--steps", "2"]) == 0  # fmt: skip


@pytest.mark.parametrize(
    "args, needles",
    [
        (("a purple elephant",), ("vocabulary",)),
        # the builtin prior has no text encoder: a negative prompt would be silently ignored
        ((PROMPT, "--negative-prompt", "blurry"), ("--negative-prompt", "diffusion model")),
    ],
    ids=["prompt", "negative-prompt"],
)
def test_what_the_builtin_prior_cannot_take_is_refused_before_loading(
    capsys: pytest.CaptureFixture, run_dir: Path, monkeypatch: pytest.MonkeyPatch, args: tuple, needles: tuple
) -> None:
    def no_loading(*a, **k):
        raise AssertionError("the model was loaded to refuse the input")

    monkeypatch.setattr(runs, "load_prepared_guidance", no_loading)
    before = tree_hash(run_dir)
    cli_error(capsys, "generate", *args, *TINY, "--out", run_dir, "--overwrite", needles=needles)
    assert tree_hash(run_dir) == before


@pytest.mark.parametrize("model", ["./no-such-model", "{tmp}/not-a-model"])
def test_missing_model_folder_is_refused_before_loading(
    capsys: pytest.CaptureFixture, run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model: str
) -> None:
    """A --model folder that does not exist, or holds no model_index.json, is refused while planning."""
    (tmp_path / "not-a-model").mkdir()

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded to refuse its folder")

    monkeypatch.setattr(runs, "load_prepared_guidance", no_loading)
    before = tree_hash(run_dir)
    args = ("generate", PROMPT, *TINY, "--model", model.format(tmp=tmp_path), "--out", run_dir, "--overwrite")
    cli_error(capsys, *args, needles=("model",))
    assert tree_hash(run_dir) == before


def test_resume_with_fewer_steps_than_done_is_refused(capsys: pytest.CaptureFixture, run_dir: Path) -> None:
    """The run is at step 4: --steps 2 cannot undo steps, and config.json must keep saying 4."""
    before = tree_hash(run_dir)
    cli_error(
        capsys,
        "generate",
        PROMPT,
        "--device",
        "cpu",
        "--quiet",
        "--no-export",
        "--out",
        run_dir,
        "--resume",
        "--steps",
        "2",
        needles=("--steps 2", "4 steps", "--steps 4 or more"),
    )
    assert tree_hash(run_dir) == before
    assert json.loads((run_dir / "config.json").read_text())["optim"]["steps"] == 4


# ------------------------------------------------------------------------------- Ctrl-C: what the user is told


def _continue_command(line: str) -> list[str]:
    """The command after "Continue with: ", as a POSIX shell splits it."""
    import shlex

    assert "Continue with: " in line, line
    return shlex.split(line.split("Continue with: ", 1)[1])


@pytest.mark.parametrize("prompt", ["a red cube", 'it\'s a "$HOME" cube; `rm -rf x`'])
def test_interrupted_run_prints_a_command_the_shell_gives_back_unchanged(
    capsys: pytest.CaptureFixture, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prompt: str
) -> None:
    """The continue command used repr() and an unquoted --out: quotes, ``$`` and spaces broke it in the shell."""

    def interrupted(plan: runs.Plan, **kw) -> runs.RunResult:
        return runs.RunResult(7, 0, True, plan.run_dir / "checkpoints" / "step_000007.pt", 1.0, [], [])

    monkeypatch.setattr(runs, "execute", interrupted)
    out = tmp_path / "my runs" / "cube"
    capsys.readouterr()
    rc = main(["generate", prompt, *TINY, "--model", "someone/some-model", "--out", str(out)])
    _, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 130 and len(lines) == 1, err
    assert "interrupted at step 7" in lines[0]
    assert _continue_command(lines[0]) == ["fastdream", "generate", prompt, "--out", str(out), "--resume"]


def test_ctrl_c_during_the_export_points_to_resume_which_finishes_the_exports(
    capsys: pytest.CaptureFixture, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Training finished and its checkpoint is saved; the interrupted export said only "interrupted"."""
    import fastdream.export

    real_export = fastdream.export.export_all

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(fastdream.export, "export_all", ctrl_c)
    out = tmp_path / "run"
    tiny = [a for a in TINY if a != "--no-export"]
    capsys.readouterr()
    rc = main(["generate", PROMPT, *tiny, "--out", str(out), "--set", "render.turntable_frames=2"])
    _, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 130 and len(lines) == 1, err
    assert "step_000002.pt" in lines[0]
    command = _continue_command(lines[0])
    assert command[:2] == ["fastdream", "generate"] and command[-1] == "--resume"
    assert not (out / "mesh.obj").exists()

    monkeypatch.setattr(fastdream.export, "export_all", real_export)
    assert main([*command[1:], "--quiet"]) == 0, capsys.readouterr().err
    assert (out / "mesh.obj").is_file() and (out / "mesh.glb").is_file()


def test_ctrl_c_before_this_run_saved_anything_gives_no_resume_hint(
    capsys: pytest.CaptureFixture, run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--overwrite, interrupted while the model loads: the folder still holds the old run, untouched, and
    "continue with --resume" would continue that old run, not this one."""

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(runs, "load_prepared_guidance", ctrl_c)
    before = tree_hash(run_dir)
    capsys.readouterr()
    rc = main(["generate", PROMPT, *TINY, "--out", str(run_dir), "--overwrite"])
    _, err = capsys.readouterr()
    assert rc == 130 and err.strip() == "fastdream generate: interrupted", err
    assert tree_hash(run_dir) == before


def test_overwrite_that_cannot_remove_an_output_keeps_the_old_run_whole(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint folder that cannot be moved (an immutable folder, a permission): --overwrite deleted the outputs
    one by one before, so config.json was gone and the run dead when the checkpoints refused. Now nothing is
    deleted unless every output could be moved aside first."""
    before = tree_hash(run_dir)
    real_rename = Path.rename

    def rename(self: Path, target):
        if self.name == "checkpoints":
            raise PermissionError(1, "Operation not permitted", str(self))
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(UserError, match="nothing was deleted"):
        runs.clear_outputs(run_dir, [run_dir / n for n in runs.OUTPUTS if (run_dir / n).exists()])
    assert tree_hash(run_dir) == before  # the outputs moved before the failure are back, no hidden folder left


def test_overwrite_that_cannot_delete_the_moved_run_says_where_it_is(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    def rmtree(path, *a, **k):
        raise PermissionError(1, "Operation not permitted", str(path))

    monkeypatch.setattr(shutil, "rmtree", rmtree)
    with pytest.raises(UserError, match=r"\.overwritten-\d+ but cannot delete it") as info:
        runs.clear_outputs(run_dir, [run_dir / n for n in runs.OUTPUTS if (run_dir / n).exists()])
    trash = Path(str(info.value).split(" into ", 1)[1].split(" but ", 1)[0])
    assert (trash / "config.json").is_file() and (trash / "checkpoints").is_dir()  # the old run is still there
    assert (run_dir / "notes.txt").is_file()  # the user's file was never touched


def test_guidance_notes_come_after_the_setup_checks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A note of the loaded model (a prompt cut short) is printed just before training: an error in the setup
    before it (here, outputs that cannot be moved aside) stays the only line; a run that trains prints it."""
    load = runs.load_prepared_guidance

    def with_note(cfg, device):
        g = load(cfg, device)
        g.notes = ["note: the prompt was cut short"]
        return g

    monkeypatch.setattr(runs, "load_prepared_guidance", with_note)
    out = tmp_path / "run"
    assert main(["generate", PROMPT, *TINY, "--out", str(out), "--no-export", "--quiet"]) == 0
    assert "cut short" in capsys.readouterr().err

    def cannot_clear(run_dir, paths):
        raise UserError(f"--overwrite: cannot move {run_dir} aside")

    monkeypatch.setattr(runs, "clear_outputs", cannot_clear)
    cli_error(capsys, "generate", PROMPT, *TINY, "--out", str(out), "--overwrite", needles=("cannot move",))


def test_out_under_an_unknown_users_home(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    """``--out ~nosuchuser/x``: pathlib's RuntimeError was a traceback."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cube\n")
    for args in ([PROMPT], ["--prompts", prompts]):
        cli_error(capsys, "generate", *args, *TINY, "--out", "~fastdream_no_such_user/x", needles=("--out", "no user"))


def test_resume_removes_the_temporaries_of_a_killed_preview_write(run_dir: Path) -> None:
    """A kill -9 while a preview was written left a hidden previews/.step_*.png.tmp-PID for good (the checkpoints'
    were removed, the previews' not)."""
    stale = run_dir / "previews" / ".step_000004.png.tmp-12345"
    stale.parent.mkdir(exist_ok=True)
    stale.write_bytes(b"half a png")
    keep = run_dir / "previews" / "notes.png"  # not a temporary of ours
    keep.write_bytes(b"the user's")
    assert main(["generate", PROMPT, "--device", "cpu", "--quiet", "--no-export", "--out", str(run_dir),
                 "--resume", "--steps", "5"]) == 0  # fmt: skip
    assert not stale.exists() and keep.read_bytes() == b"the user's"
    assert (run_dir / "checkpoints" / "step_000005.pt").is_file()
