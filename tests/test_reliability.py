# SPDX-License-Identifier: Apache-2.0
"""The trainer in-process: NaN/inf steps skipped and counted, divergence stops cleanly, checkpoints clean,
resume equals an uninterrupted run on the CPU. Tiny settings (builtin prior, 16x16 renders, a 4-level grid)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fastdream import checkpoint as ckpt
from fastdream.config import GuidanceConfig, RunConfig, resolve, validate
from fastdream.errors import UserError


def tiny_config(steps: int = 6, save_every: int = 3, prompt: str = "a red cube") -> RunConfig:
    cfg = resolve(RunConfig(prompt=prompt, guidance=GuidanceConfig(model="builtin"), device="cpu"))
    cfg.optim.steps, cfg.optim.save_every, cfg.optim.preview_every = steps, save_every, 0
    cfg.optim.grid_update_every, cfg.optim.grid_warmup_steps = 2, 2
    cfg.field.levels, cfg.field.log2_table_size, cfg.field.finest_resolution = 4, 10, 64
    cfg.render.resolution, cfg.render.samples_per_ray, cfg.render.grid_resolution = 16, 16, 16
    validate(cfg)
    return cfg


@pytest.fixture(scope="module")
def guidance():
    from fastdream.guidance import load_guidance

    g = load_guidance("builtin", "cpu")
    g.prepare("a red cube")
    return g


def make_trainer(cfg: RunConfig, guidance, run_dir: Path):
    from fastdream.train import Trainer

    return Trainer(cfg, guidance, run_dir, "cpu")


def params(tr) -> dict[str, torch.Tensor]:
    out = {f"field.{k}": v.detach().clone() for k, v in tr.field.state_dict().items()}
    if tr.background is not None:
        out.update({f"bg.{k}": v.detach().clone() for k, v in tr.background.state_dict().items()})
    return out


def assert_all_finite(state) -> None:
    from fastdream.checkpoint import _non_finite

    assert _non_finite(state) is None


def poison_loss(tr, bad_calls: set[int], value: float = float("nan")) -> list[int]:
    """Make compute_loss return ``value`` on the given (0-based) calls; returns the call log."""
    real = tr.compute_loss
    log: list[int] = []

    def wrapped():
        loss, info = real()
        n = len(log)
        log.append(n)
        if n in bad_calls:
            loss = loss * value  # keeps the graph: backward would spread NaN into every gradient
        return loss, info

    tr.compute_loss = wrapped
    return log


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_loss_step_is_skipped_and_counted(tmp_path: Path, guidance, value: float) -> None:
    tr = make_trainer(tiny_config(steps=6), guidance, tmp_path)
    poison_loss(tr, {2}, value)
    for _ in range(2):
        assert tr.train_step()
    before = params(tr)
    adam_before = {k: v["exp_avg"].clone() for k, v in tr.optimizer.state_dict()["state"].items()}
    assert not tr.train_step()  # the poisoned step
    after = params(tr)
    assert all(torch.equal(before[k], after[k]) for k in before), "a skipped step changed the parameters"
    for k, v in tr.optimizer.state_dict()["state"].items():
        assert torch.equal(adam_before[k], v["exp_avg"]), "a skipped step changed Adam's moments"
    assert tr.skipped == 1 and tr.step == 3
    res = tr.train(progress=False)
    assert res.step == 6 and res.skipped == 1 and res.skipped_loss == 1
    state = ckpt.load_checkpoint(res.checkpoint)
    assert state["stats"]["skipped"] == 1 and state["stats"]["skipped_loss"] == 1
    assert state["stats"]["bad_in_a_row"] == 0
    assert_all_finite(state)


def test_nonfinite_gradient_step_is_skipped(tmp_path: Path, guidance) -> None:
    """Finite loss, NaN gradient (e.g. an overflow inside the backward): skipped as well."""
    tr = make_trainer(tiny_config(steps=4), guidance, tmp_path)
    table = next(tr.field.parameters())
    calls = {"n": 0}

    def hook(grad: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return grad * float("nan") if calls["n"] == 2 else grad

    table.register_hook(hook)
    res = tr.train(progress=False)
    assert calls["n"] == 4 and res.skipped == 1 and res.skipped_loss == 0 and res.step == 4
    assert_all_finite(ckpt.load_checkpoint(res.checkpoint))


def test_many_nonfinite_steps_stop_the_run_cleanly(tmp_path: Path, guidance) -> None:
    cfg = tiny_config(steps=20, save_every=2)
    cfg.optim.max_bad_steps = 4
    tr = make_trainer(cfg, guidance, tmp_path)
    poison_loss(tr, set(range(3, 100)))
    with pytest.raises(UserError, match="4 steps in a row.*--overwrite.*--lr") as exc:
        tr.train(progress=False)
    assert "\n" not in str(exc.value)
    # the checkpoints written before the divergence are intact and clean
    found = ckpt.list_checkpoints(tmp_path)
    assert found and found[-1][0] <= 6
    for _, p in found:
        assert_all_finite(ckpt.load_checkpoint(p))


def test_checkpoint_never_holds_nan(tmp_path: Path, guidance) -> None:
    tr = make_trainer(tiny_config(steps=2), guidance, tmp_path)
    with torch.no_grad():
        next(tr.field.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(RuntimeError, match="NaN"):
        tr.save()
    assert ckpt.list_checkpoints(tmp_path) == []


def test_resume_matches_uninterrupted_run(tmp_path: Path, guidance) -> None:
    cfg = tiny_config(steps=6, save_every=3)
    full = make_trainer(cfg, guidance, tmp_path / "full")
    full.train(progress=False)

    half_cfg = tiny_config(steps=6, save_every=3)
    half_cfg.optim.steps = 3  # stops after the step-3 checkpoint, as an interrupted run would
    make_trainer(half_cfg, guidance, tmp_path / "resumed").train(progress=False)
    torch.manual_seed(12345)  # global RNG disturbed between the two processes' lives
    resumed = make_trainer(cfg, guidance, tmp_path / "resumed")
    assert resumed.resume().name == "step_000003.pt" and resumed.step == 3
    resumed.train(progress=False)

    a = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "full"))
    b = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "resumed"))
    assert a["step"] == b["step"] == 6
    for part in ("field", "background", "grid"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs after resume"
    for k, v in a["optimizer"]["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(v[name], b["optimizer"]["state"][k][name])


def test_resume_with_rng_states_on_another_device(tmp_path: Path, guidance, monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA the checkpoint loads with map_location=cuda, which moves the RNG ByteTensors there too;
    generators only accept CPU states. Simulated here by handing the trainer non-CPU-looking tensors."""
    cfg = tiny_config(steps=2, save_every=2)
    make_trainer(cfg, guidance, tmp_path).train(progress=False)
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))
    moved = []

    class Moved(torch.Tensor):
        def cpu(self, *a, **k):  # records that the trainer asked for a CPU copy
            moved.append(1)
            return torch.Tensor(self).clone()

    state["rng"] = {k: v.as_subclass(Moved) for k, v in state["rng"].items()}
    tr = make_trainer(cfg, guidance, tmp_path)
    tr.load_state_dict(state)
    assert len(moved) == 3


def test_cli_divergence_is_one_line_and_keeps_the_checkpoints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """``fastdream generate`` whose loss turns NaN for good after step 4: exit 2, one line, clean checkpoints."""
    from clitools import TINY

    from fastdream import cli
    from fastdream.train import Trainer

    real = Trainer.compute_loss

    def diverging(self):
        loss, info = real(self)
        return (loss * float("nan") if self.step >= 4 else loss), info

    monkeypatch.setattr(Trainer, "compute_loss", diverging)
    out = tmp_path / "run"
    args = ["generate", "a red cube", *TINY, "--steps", "50", "--save-every", "2", "--out", str(out)]
    rc = cli.main([*args, "--set", "optim.max_bad_steps=5"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1, err
    assert "5 steps in a row" in lines[0] and "--resume" in lines[0]
    found = ckpt.list_checkpoints(out)
    assert found
    for _, p in found:  # checkpoints written during the streak hold the last good parameters
        state = ckpt.load_checkpoint(p)
        assert_all_finite(state)
        assert state["stats"]["skipped"] == max(0, state["step"] - 4)


def test_cli_out_of_memory_is_one_line_and_the_run_resumes_to_the_same_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """``fastdream generate`` whose step 4 cannot allocate (after its random draws for the camera and the render):
    exit 2, one line saying step 3 is saved; then the command it names finishes the run as if nothing had happened.
    (The undone grid update: tests/test_train.py.)"""
    from clitools import TINY

    from fastdream import cli
    from fastdream.train import Trainer

    real = Trainer.compute_loss
    failed = []

    def out_of_memory_once(self):
        loss, info = real(self)
        if self.step == 3 and not failed:
            failed.append(self.step)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB. GPU 0 has 0 bytes free.")
        return loss, info

    common = [*TINY, "--steps", "6", "--save-every", "2", "--no-export"]
    assert cli.main(["generate", "a red cube", *common, "--out", str(tmp_path / "whole")]) == 0
    capsys.readouterr()
    monkeypatch.setattr(Trainer, "compute_loss", out_of_memory_once)
    out = tmp_path / "run"
    assert cli.main(["generate", "a red cube", *common, "--out", str(out)]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("fastdream generate: error: out of memory on cuda:0"), lines
    assert "at step 4; step 3 is saved" in lines[0] and f"--out {out} --resume" in lines[0]
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [2, 3]
    assert cli.main(["generate", "a red cube", "--out", str(out), "--resume", "--device", "cpu", "--no-export"]) == 0
    whole = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "whole"))
    resumed = ckpt.load_checkpoint(ckpt.latest_checkpoint(out))
    assert resumed["step"] == whole["step"] == 6
    for key, value in whole["field"].items():
        assert torch.equal(resumed["field"][key], value), key
    assert torch.equal(resumed["grid"]["density"], whole["grid"]["density"])
