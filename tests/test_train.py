# SPDX-License-Identifier: Apache-2.0
"""The optimisation loop with a stand-in guidance: determinism, resume, NaN skipping, checkpoints."""

import math
import time

import pytest
import torch

from fastdream import checkpoint as ckpt
from fastdream.config import GuidanceConfig, RunConfig, resolve, validate
from fastdream.errors import UserError
from fastdream.train import Trainer, warmup_steps


class ColourGuidance:
    """Pulls renders towards a red image; returns NaN at the calls listed in ``nan_at``."""

    resolution = 16
    default_guidance_scale = 1.0
    device = torch.device("cpu")

    def __init__(self, nan_at=()):
        self.calls = 0
        self.nan_at = set(nan_at)
        self.words = []

    def sds_loss(self, images, view_words, cfg, generator=None):
        self.calls += 1
        self.words += view_words
        noise = 0.01 * torch.randn(images.shape, generator=generator)  # consumes the noise stream like SDS
        target = torch.tensor([1.0, 0.0, 0.0])[None, :, None, None] + noise
        loss = (images - target).square().sum()
        if self.calls in self.nan_at:
            loss = loss * float("nan")
        return loss, {}


def tiny_config(steps=6, **optim) -> RunConfig:
    cfg = RunConfig(prompt="a red cube", guidance=GuidanceConfig(model="builtin", guidance_scale=1.0), device="cpu")
    cfg.render.background = "mlp"  # train the environment map too
    f, r, o = cfg.field, cfg.render, cfg.optim
    f.levels, f.log2_table_size, f.finest_resolution, f.hidden = 4, 12, 32, 16
    r.resolution, r.samples_per_ray, r.grid_resolution, r.preview_resolution = 16, 32, 16, 16
    o.steps, o.save_every, o.preview_every, o.grid_update_every, o.grid_warmup_steps = steps, 3, 0, 2, 2
    cfg.shading.albedo_warmup_steps = 2
    for k, v in optim.items():
        setattr(o, k, v)
    cfg = resolve(cfg, "cpu")
    validate(cfg)
    return cfg


def params(tr: Trainer) -> torch.Tensor:
    bg = list(tr.background.parameters()) if tr.background is not None else []
    return torch.cat([p.detach().flatten() for p in list(tr.field.parameters()) + bg])


def test_training_lowers_the_loss_and_writes_checkpoints(tmp_path):
    cfg = tiny_config(steps=12, preview_every=6)
    tr = Trainer(cfg, ColourGuidance(), tmp_path, "cpu")
    first, _ = tr.compute_loss()
    res = tr.train(progress=False)
    assert res.step == 12 and res.skipped == 0 and not res.interrupted
    assert res.last_loss < float(first.detach())
    names = [p.name for _, p in ckpt.list_checkpoints(tmp_path)]
    assert names == ["step_000009.pt", "step_000012.pt"]  # keep_checkpoints = 2
    assert sorted(p.name for p in (tmp_path / "previews").iterdir()) == ["step_000006.png", "step_000012.png"]
    # A run shorter than preview_every, or not a multiple of it, previews its last step too.
    for steps, names in ((3, ["step_000003.png"]), (5, ["step_000004.png", "step_000005.png"])):
        run = tmp_path / f"short{steps}"
        Trainer(tiny_config(steps=steps, preview_every=4), ColourGuidance(), run, "cpu").train(progress=False)
        assert sorted(p.name for p in (run / "previews").iterdir()) == names
    # Random views: more than one view word over 12 steps (which word each step gets: the test below).
    assert len(set(tr.guidance.words)) > 1


def test_the_progress_bar_shows_no_loss_before_one_is_known(tmp_path, capsys, monkeypatch):
    """The bar's loss lags a step (the host does not wait for the step): after the first step none is known, and
    the bar said "loss=nan", which reads as a diverged run."""
    monkeypatch.delenv("TQDM_DISABLE", raising=False)  # a bar to read
    res = Trainer(tiny_config(steps=3), ColourGuidance(), tmp_path, "cpu").train(progress=True)
    assert res.step == 3 and res.skipped == 0
    err = capsys.readouterr().err
    assert "nan" not in err
    losses = [part.split(",")[0] for part in err.split("loss=")[1:]]
    known = [x for x in losses if x != "-"]  # tqdm redraws the bar on update() too, with the postfix it had
    assert losses[0] == "-" and losses == ["-"] * (len(losses) - len(known)) + known
    assert known and all(float(x) > 0 for x in known)


def test_a_preview_that_cannot_be_written_does_not_stop_the_run(tmp_path, capsys):
    """previews/ replaced by a file (or unwritable): a traceback that lost the step and its checkpoint before (found
    by a hunt for bad input). Now one warning, no more previews, and the run trains and saves to the end."""
    (tmp_path / "previews").write_text("not a folder")
    res = Trainer(tiny_config(steps=6, preview_every=2), ColourGuidance(), tmp_path, "cpu").train(progress=False)
    assert res.step == 6 and [p.name for _, p in ckpt.list_checkpoints(tmp_path)] == [
        "step_000003.pt",
        "step_000006.pt",
    ]
    err = capsys.readouterr().err
    assert err.count("cannot write a preview") == 1 and "training goes on" in err


def test_checkpoints_are_written_while_training_goes_on(tmp_path, monkeypatch):
    """A periodic checkpoint is written in the background: its write can only finish once the trainer has taken
    two more steps (it would wait forever if saving blocked the loop). train() returns with every file on disk,
    each holding the state of its own step."""
    import threading
    import time

    trainer_ref = {}
    real = ckpt.save_checkpoint
    overlapped = []

    def waits_for_training(run_dir, step, state, keep=2):
        tr = trainer_ref["tr"]
        deadline = time.monotonic() + 60
        while step < 6 and tr.step < step + 2 and time.monotonic() < deadline:  # the last one: nothing follows
            time.sleep(0.01)
        overlapped.append((step, tr.step, threading.current_thread() is not threading.main_thread()))
        return real(run_dir, step, state, keep=keep)

    monkeypatch.setattr(ckpt, "save_checkpoint", waits_for_training)
    cfg = tiny_config(steps=6, save_every=3, keep_checkpoints=0)
    tr = trainer_ref["tr"] = Trainer(cfg, ColourGuidance(), tmp_path, "cpu")
    res = tr.train(progress=False)
    assert res.step == 6 and res.checkpoint == ckpt.checkpoint_path(tmp_path, 6) and res.checkpoint.is_file()
    first = overlapped[0]
    assert first[0] == 3 and first[1] >= 5 and first[2], overlapped  # steps 4 and 5 ran during the write
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [3, 6]
    assert ckpt.load_checkpoint(ckpt.checkpoint_path(tmp_path, 3))["step"] == 3


def test_each_step_gets_the_view_word_and_shading_mode_of_its_own_camera(tmp_path):
    """The view word passed to the guidance is DreamFusion's word for the step's own camera (and the pose and the
    shading mode that a pose-conditioned prior is told are those of the same render)."""
    from fastdream.cameras import view_word

    class Recording(ColourGuidance):
        def __init__(self):
            super().__init__()
            self.poses, self.modes = [], []

        def set_cameras(self, elevation, azimuth):
            self.poses.append((float(elevation[0]), float(azimuth[0])))

        def set_shading_mode(self, mode):
            self.modes.append(mode)

    cfg = tiny_config(steps=40, save_every=100)
    cfg.shading.albedo_warmup_steps = 10
    guidance = Recording()
    Trainer(cfg, guidance, tmp_path, "cpu").train(progress=False)
    assert len(guidance.words) == len(guidance.poses) == len(guidance.modes) == 40
    assert guidance.words == [view_word(el, az) for el, az in guidance.poses]
    assert len(set(guidance.words)) >= 3
    assert set(guidance.modes[:10]) == {"albedo"} and set(guidance.modes[10:]) == {"shaded", "textureless"}


def test_shading_schedule():
    cfg = tiny_config()
    cfg.shading.albedo_warmup_steps, cfg.shading.textureless_ratio = 5, 0.5
    tr = Trainer(cfg, ColourGuidance(), "/nonexistent", "cpu")
    modes = []
    for step in range(200):
        tr.step = step
        modes.append(tr.shading_mode())
    assert set(modes[:5]) == {"albedo"}
    later = modes[5:]
    assert set(later) == {"shaded", "textureless"} and 0.3 < later.count("textureless") / len(later) < 0.7


def test_same_seed_same_result_and_resume_equals_uninterrupted(tmp_path):
    cfg = tiny_config(steps=6)
    a = Trainer(cfg, ColourGuidance(nan_at={3}), tmp_path / "a", "cpu")  # the checkpointed step is skipped
    a.train(progress=False)

    b = Trainer(tiny_config(steps=3), ColourGuidance(nan_at={3}), tmp_path / "b", "cpu")
    b.train(progress=False)
    c = Trainer(cfg, ColourGuidance(), tmp_path / "b", "cpu")  # a fresh process' view: rebuilt, then resumed
    c.resume()
    assert c.step == 3
    assert (c.skipped, c.skipped_loss, c.bad_in_a_row) == (1, 1, 1)  # the counts, and the skip streak
    c.train(progress=False)
    assert c.step == 6
    assert torch.equal(params(a), params(c))
    assert torch.equal(a.grid.density, c.grid.density)
    assert (c.skipped, c.skipped_loss, c.bad_in_a_row) == (a.skipped, a.skipped_loss, a.bad_in_a_row) == (1, 1, 0)


def test_the_loop_reads_each_outcome_a_step_late_to_the_same_result(tmp_path):
    """train() reads a step's outcome (loss, skip, counts) during the next step, so the CPU need not wait for the
    GPU; stepping with train_step() reads it at once. Both end with the same parameters, counts and loss."""
    cfg = tiny_config(steps=5)
    a = Trainer(cfg, ColourGuidance(nan_at={3}), tmp_path / "a", "cpu")
    res = a.train(progress=False)
    b = Trainer(cfg, ColourGuidance(nan_at={3}), tmp_path / "b", "cpu")
    assert [b.train_step() for _ in range(5)] == [True, True, False, True, True]
    assert torch.equal(params(a), params(b))
    assert (res.skipped, res.skipped_loss, res.step) == (b.skipped, b.skipped_loss, b.step) == (1, 1, 5)
    assert res.last_loss == b.last_loss and math.isfinite(res.last_loss)
    c = Trainer(cfg, ColourGuidance(nan_at={3}), tmp_path / "c", "cpu")
    assert [c.train_step(settle=False) for _ in range(3)] == [None] * 3
    assert c.skipped == 0  # the third step's skip is not read yet
    assert c.state_dict()["stats"]["skipped"] == 1 and c.skipped == 1  # a checkpoint reads it first
    assert c.settle() is None  # nothing left to read


class OutOfMemoryAt(ColourGuidance):
    """Fails to allocate at the calls listed in ``oom_at``, after the step drew its camera and (every other step)
    updated its grid, before the noise draw."""

    def __init__(self, oom_at=()):
        super().__init__()
        self.oom_at = set(oom_at)

    def sds_loss(self, images, view_words, cfg, generator=None):
        if self.calls + 1 in self.oom_at:
            self.calls += 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has 1 GiB free.")
        return super().sds_loss(images, view_words, cfg, generator)


def test_out_of_memory_mid_run_saves_the_last_whole_step_and_resumes_to_the_same_result(tmp_path):
    """A traceback before, and every step since the last checkpoint lost. Now the steps done are saved as they
    were before the failing step began (its random draws and its grid update undone), so that resuming gives the
    run that never failed."""
    cfg = tiny_config(steps=6)  # checkpoints every 3 steps, grid updates every 2
    a = Trainer(cfg, ColourGuidance(), tmp_path / "a", "cpu")
    a.train(progress=False)
    b = Trainer(cfg, OutOfMemoryAt(oom_at={5}), tmp_path / "b", "cpu")
    with pytest.raises(UserError) as e:
        b.train(progress=False)
    msg = str(e.value)
    assert "out of memory on cuda:0 (it asked for 2.00 GiB more) at step 5; step 4 is saved" in msg
    assert "--resume" in msg and "start over with --overwrite and a lower --resolution or --samples-per-ray" in msg
    # what a --prompts library records: no single-run advice (it refuses --resume and --overwrite)
    assert e.value.summary == "out of memory on cuda:0 (it asked for 2.00 GiB more) at step 5; step 4 is saved"
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "b")] == [3, 4]
    c = Trainer(cfg, ColourGuidance(), tmp_path / "b", "cpu")
    c.resume()
    assert c.step == 4
    c.train(progress=False)
    assert torch.equal(params(a), params(c))
    assert torch.equal(a.grid.density, c.grid.density)


def test_out_of_memory_at_the_first_step_offers_no_resume(tmp_path):
    tr = Trainer(tiny_config(steps=6), OutOfMemoryAt(oom_at={1}), tmp_path, "cpu")
    with pytest.raises(UserError) as e:
        tr.train(progress=False)
    assert "at step 1; no step was saved. Free memory on the device, or start over with a lower" in str(e.value)
    assert "--resume" not in str(e.value) and not ckpt.list_checkpoints(tmp_path)


@pytest.mark.parametrize("where", ["after the optimiser's step", "after the update, before the step is counted"])
def test_out_of_memory_once_the_parameters_changed_keeps_the_last_checkpoint(tmp_path, monkeypatch, where):
    """Parameters (and Adam's moments) of step 5 must not be saved as step 4: the checkpoint before them stands,
    and resuming from it gives the run that never failed."""
    import fastdream.train as fd_train

    cfg = tiny_config(steps=6)
    tr = Trainer(cfg, ColourGuidance(), tmp_path / "b", "cpu")
    oom = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1073741824 bytes.")
    if where == "after the optimiser's step":
        step = tr.optimizer.step

        def failing_step(*args, **kwargs):
            out = step(*args, **kwargs)
            if tr.step == 4:
                raise oom
            return out

        monkeypatch.setattr(tr.optimizer, "step", failing_step)
    else:
        outcome = fd_train.StepOutcome

        def failing_outcome(*args, **kwargs):
            if tr.step == 4:
                raise oom
            return outcome(*args, **kwargs)

        monkeypatch.setattr(fd_train, "StepOutcome", failing_outcome)
    with pytest.raises(
        UserError, match=r"out of memory on the CPU \(it asked for 1.00 GiB more\) at step 5; step 3 is"
    ):
        tr.train(progress=False)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "b")] == [3]
    monkeypatch.undo()
    a = Trainer(cfg, ColourGuidance(), tmp_path / "a", "cpu")
    a.train(progress=False)
    c = Trainer(cfg, ColourGuidance(), tmp_path / "b", "cpu")
    c.resume()
    c.train(progress=False)
    assert torch.equal(params(a), params(c))


def test_a_run_that_diverged_is_not_offered_a_resume_after_out_of_memory(tmp_path):
    """The step before the failing one is read only when the run is saved; when it was the last of
    max_bad_steps skipped steps in a row, the run diverged: that is the error, not "resume from here"."""
    cfg = tiny_config(steps=8, max_bad_steps=2)
    guidance = OutOfMemoryAt(oom_at={5})
    guidance.nan_at = {3, 4}
    with pytest.raises(UserError) as e:
        Trainer(cfg, guidance, tmp_path, "cpu").train(progress=False)
    assert "2 steps in a row" in str(e.value) and "out of memory" not in str(e.value)
    assert isinstance(e.value.__cause__, torch.OutOfMemoryError)


def test_out_of_memory_in_a_preview_turns_previews_off(tmp_path, capsys, monkeypatch):
    tr = Trainer(tiny_config(steps=6, preview_every=2), ColourGuidance(), tmp_path, "cpu")
    calls = []

    def preview():
        calls.append(tr.step)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB.")

    monkeypatch.setattr(tr, "preview", preview)
    res = tr.train(progress=False)
    assert res.step == 6 and calls == [2]
    err = capsys.readouterr().err
    assert "warning: out of memory on the GPU (it asked for 8.00 GiB more) rendering a preview at 16 pixels" in err
    assert "previews are off for the rest of this run, training goes on" in err


def test_other_runtime_errors_are_not_taken_for_out_of_memory(tmp_path, monkeypatch):
    tr = Trainer(tiny_config(steps=6), ColourGuidance(), tmp_path, "cpu")
    monkeypatch.setattr(tr, "compute_loss", lambda: (_ for _ in ()).throw(RuntimeError("a kernel failed")))
    with pytest.raises(RuntimeError, match="a kernel failed"):
        tr.train(progress=False)


def test_nan_step_is_skipped_and_checkpoint_is_clean(tmp_path):
    cfg = tiny_config(steps=6)
    tr = Trainer(cfg, ColourGuidance(nan_at={2}), tmp_path, "cpu")
    res = tr.train(progress=False)
    assert res.skipped == 1 and res.skipped_loss == 1 and res.step == 6
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))
    assert state["stats"]["skipped"] == 1 and state["stats"]["skipped_loss"] == 1
    assert ckpt._non_finite(state) is None
    assert all(torch.isfinite(p).all() for p in tr.field.parameters())


def test_the_note_tells_skipped_steps_apart_by_cause():
    """The end-of-run note (counts from tests/test_reliability.py's NaN-loss and NaN-gradient runs)."""
    from fastdream.run import skipped_note

    assert skipped_note(2, 0, fp16=False) == "2 step(s) skipped: 2 with NaN/inf gradients"
    note = skipped_note(11, 1, fp16=True)
    assert note.startswith("11 step(s) skipped: 1 with a NaN/inf loss, 10 with NaN/inf gradients (fp16: the gradient")
    assert skipped_note(1, 1, fp16=True) == "1 step(s) skipped: 1 with a NaN/inf loss"


def test_many_nan_steps_in_a_row_stop_with_a_user_error(tmp_path):
    cfg = tiny_config(steps=20, max_bad_steps=3)
    tr = Trainer(cfg, ColourGuidance(nan_at={2, 3, 4}), tmp_path, "cpu")
    with pytest.raises(UserError, match="3 steps in a row"):
        tr.train(progress=False)


def test_checkpoint_refuses_nan_and_corrupt_files_are_user_errors(tmp_path):
    with pytest.raises(RuntimeError, match="NaN"):
        ckpt.save_checkpoint(tmp_path, 1, {"format": 1, "field": {"w": torch.tensor([float("nan")])}})
    assert ckpt.latest_checkpoint(tmp_path) is None  # nothing written, no temporary left behind
    assert not list((tmp_path / "checkpoints").glob(".*")) if (tmp_path / "checkpoints").exists() else True
    path = ckpt.save_checkpoint(tmp_path, 2, {"format": 1, "field": {"w": torch.ones(1000)}})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="corrupt or truncated"):
        ckpt.load_checkpoint(path)
    # A pickle that would run code is refused by weights_only loading.
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path.write_bytes(pickle.dumps({"format": 1, "field": Evil()}))
    with pytest.raises(UserError):
        ckpt.load_checkpoint(path)


def test_ctrl_c_finishes_the_step_saves_and_returns(tmp_path):
    import os
    import signal

    class Interrupting(ColourGuidance):
        def sds_loss(self, images, view_words, cfg, generator=None):
            if self.calls == 3:  # during the 4th step
                os.kill(os.getpid(), signal.SIGINT)
            return super().sds_loss(images, view_words, cfg, generator)

    cfg = tiny_config(steps=50, save_every=100)
    tr = Trainer(cfg, Interrupting(), tmp_path, "cpu")
    res = tr.train(progress=False)
    assert res.interrupted and res.step == 4
    assert ckpt.latest_checkpoint(tmp_path).name == "step_000004.pt"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored


def test_apply_step_skips_an_overflow_and_lowers_the_scale():
    """An fp16-style overflow step is skipped, the scale is lowered, and the next step works (a scaler left
    without ``update()`` after ``unscale_`` raises on the next ``unscale_``: the step benchmark once did that)."""
    from fastdream.train import apply_step, scaled_backward

    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    finite = scaled_backward((w * 1e38).sum(), scaler)  # finite loss, inf gradient once scaled
    assert finite.dtype == torch.bool and bool(finite)
    assert not apply_step(opt, scaler, finite)
    assert torch.equal(w.detach(), torch.ones(3))  # skipped
    assert scaler.get_scale() == 2.0**15  # lowered
    opt.zero_grad(set_to_none=True)
    finite = scaled_backward(w.sum(), scaler)
    assert apply_step(opt, scaler, finite)  # no "unscale_() has already been called"
    torch.testing.assert_close(w.detach(), torch.full((3,), 0.9))


@pytest.mark.parametrize("fused", [False, True])
def test_apply_step_skips_a_nonfinite_loss_with_finite_gradients(fused):
    """A NaN loss whose gradients come out finite (SDS-style: the gradient does not flow through the loss' value)
    is skipped all the same, under the scaler too: there the skip is the scaler's own, in the fused Adam's kernel
    on CUDA, and it must agree with the returned verdict. Adam's step count and moments stay as they were."""
    from fastdream.train import apply_step, scaled_backward

    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.Adam([w], lr=0.1, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    finite = scaled_backward((w * torch.tensor([1.0, 2.0, 3.0])).sum(), scaler)
    assert apply_step(opt, scaler, finite)
    taken, moments = w.detach().clone(), opt.state[w]["exp_avg"].clone()
    step_count = float(opt.state[w]["step"])
    opt.zero_grad(set_to_none=True)
    # the value is NaN, the gradient (of w.sum()) finite: a surrogate loss, as SDS builds
    loss = w.sum() + (w.detach().sum() * float("nan"))
    finite = scaled_backward(loss, scaler)
    assert not bool(finite) and torch.isfinite(w.grad).all()
    assert not apply_step(opt, scaler, finite)
    assert torch.equal(w.detach(), taken) and torch.equal(opt.state[w]["exp_avg"], moments)
    assert float(opt.state[w]["step"]) == step_count
    assert scaler.get_scale() == 2.0  # lowered, as after an overflow
    opt.zero_grad(set_to_none=True)
    assert apply_step(opt, scaler, scaled_backward(w.sum(), scaler))  # and the next step is taken
    assert not torch.equal(w.detach(), taken)


def test_apply_step_without_a_scaler_checks_loss_and_gradients():
    from fastdream.train import apply_step, scaled_backward

    w = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([w], lr=0.5)
    assert apply_step(opt, None, scaled_backward((w * torch.tensor([1.0, 2.0])).sum(), None))
    torch.testing.assert_close(w.detach(), torch.tensor([0.5, 0.0]))
    opt.zero_grad(set_to_none=True)
    w.grad = torch.tensor([float("inf"), 0.0])
    assert not apply_step(opt, None)
    torch.testing.assert_close(w.detach(), torch.tensor([0.5, 0.0]))
    opt.zero_grad(set_to_none=True)
    assert not apply_step(opt, None, scaled_backward(w.sum() + w.detach().sum() * float("nan"), None))
    torch.testing.assert_close(w.detach(), torch.tensor([0.5, 0.0]))


def test_optimizer_groups_table_mlp_and_background(tmp_path):
    cfg = tiny_config(lr=0.02, mlp_lr_scale=0.25, background_lr=0.003)
    tr = Trainer(cfg, ColourGuidance(), tmp_path, "cpu")
    groups = tr.optimizer.param_groups
    assert [g["lr"] for g in groups] == [0.02, 0.005, 0.003]
    assert groups[0]["params"] == [tr.field.table]
    mlp = {id(p) for p in groups[1]["params"]}
    assert mlp == {id(p) for n, p in tr.field.named_parameters() if n != "table"} and mlp
    assert {id(p) for p in groups[2]["params"]} == {id(p) for p in tr.background.parameters()}
    cfg.optim.mlp_lr_scale = -1.0
    with pytest.raises(UserError, match="mlp_lr_scale"):
        validate(cfg)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_optimizer_is_fused_adam_on_cuda_only(tmp_path, device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no GPU")
    tr = Trainer(tiny_config(), ColourGuidance(), tmp_path, device)
    assert isinstance(tr.optimizer, torch.optim.Adam)
    assert bool(tr.optimizer.defaults["fused"]) == (device == "cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_skip_is_decided_on_the_gpu_with_the_same_counts(tmp_path):
    """On CUDA (fp16 autocast, gradient scaler, fused Adam) a NaN-loss step is skipped on the device: the loop,
    which reads each outcome a step late, and step-by-step reading agree, and no parameter is left non-finite."""

    class CudaColour(ColourGuidance):
        device = torch.device("cuda")

        def sds_loss(self, images, view_words, cfg, generator=None):
            self.calls += 1
            target = torch.tensor([1.0, 0.0, 0.0], device=images.device)[None, :, None, None]
            loss = (images - target).square().sum()
            return (loss * float("nan") if self.calls in self.nan_at else loss), {}

    def trainer(run_dir):
        tr = Trainer(cfg, CudaColour(nan_at={4}), run_dir, "cuda")
        # On an H200 at the default first scale (2^16) all six steps were skipped (one for the NaN loss), so no
        # loss was kept: most likely the scaled fp16 gradients of this loss overflowed while the scale came down,
        # as in every run's first steps. At scale 1 only the NaN step may be skipped, and the counts below say so.
        tr.scaler = torch.amp.GradScaler("cuda", init_scale=1.0)
        return tr

    cfg = tiny_config(steps=6)
    a = trainer(tmp_path / "a")
    res = a.train(progress=False)
    b = trainer(tmp_path / "b")
    oks = [b.train_step() for _ in range(3)]
    before = params(b)
    oks.append(b.train_step())
    assert oks[3] is False and torch.equal(params(b), before)  # skipped on the device: nothing moved
    oks += [b.train_step() for _ in range(2)]
    assert oks == [True, True, True, False, True, True]
    assert res.skipped == b.skipped == 1 and res.skipped_loss == b.skipped_loss == 1 and res.step == b.step == 6
    assert math.isfinite(res.last_loss) and all(torch.isfinite(p).all() for p in a.field.parameters())


def test_t_max_anneals_linearly_to_t_max_end(tmp_path):
    cfg = tiny_config(steps=11)
    tr = Trainer(cfg, ColourGuidance(), tmp_path / "plain", "cpu")
    assert tr.step_sds_config().t_range == (0.02, 0.98)
    cfg.guidance.t_max_end = 0.5
    validate(cfg)
    tr = Trainer(cfg, ColourGuidance(), tmp_path / "annealed", "cpu")
    his = []
    for step in (0, 5, 10):
        tr.step = step
        lo, hi = tr.step_sds_config().t_range
        assert lo == 0.02
        his.append(hi)
    assert his == pytest.approx([0.98, 0.74, 0.5])
    for bad in (0.01, 1.5):
        cfg.guidance.t_max_end = bad
        with pytest.raises(UserError, match="t_max_end"):
            validate(cfg)


def test_camera_ranges_auto_builtin_fixed_and_validated():
    cfg = resolve(RunConfig(prompt="a red cube", guidance=GuidanceConfig(model="builtin"), device="cpu"))
    assert cfg.camera.distance_range == (2.25, 2.25) and cfg.camera.fov_range == (50.0, 50.0)
    sd = resolve(RunConfig(prompt="a red cube", device="cpu"))
    assert sd.camera.distance_range == (2.0, 2.5) and sd.camera.fov_range == (40.0, 60.0)
    validate(cfg)
    for name, bad in (("distance_range", (0.5, 2.0)), ("distance_range", (3.0, 2.0)), ("fov_range", (10.0, 200.0))):
        setattr(cfg.camera, name, bad)
        with pytest.raises(UserError, match=name):
            validate(cfg)
        cfg = resolve(RunConfig(prompt="a red cube", guidance=GuidanceConfig(model="builtin"), device="cpu"))


def test_preview_normals_are_blended_over_white_once(monkeypatch):
    """The normals image is premultiplied by opacity (sum of w_i n_i): the preview multiplied it by the opacity a
    second time, washing out every edge pixel."""
    import fastdream.train as train_mod

    cfg = tiny_config(steps=1)
    s = cfg.render.preview_resolution
    a, n = 0.5, torch.tensor([1.0, -0.6, 0.0])

    def fake_render(field, bg, cams, size, shading_mode, need_normals=False, **kw):
        out = {"image": torch.zeros(1, 3, size, size), "opacity": torch.full((1, 1, size, size), a)}
        out["normals_image"] = (a * n)[None, :, None, None].expand(1, 3, size, size) if need_normals else None
        return [out] * len(cams)

    monkeypatch.setattr(train_mod, "render_views", fake_render)
    img = train_mod.preview_grid(None, None, None, cfg)
    expected = ((n + 1) / 2 * a + (1 - a)) * 255  # the unit normal's colour at opacity a over white
    torch.testing.assert_close(torch.from_numpy(img[s + s // 2, s // 2]).float(), expected, atol=0.6, rtol=0)


class SlowFirstStep(ColourGuidance):
    """0.3 s in the first step's guidance (a capture, a compile), 20 ms in every later one."""

    def sds_loss(self, images, view_words, cfg, generator=None):
        time.sleep(0.3 if self.calls == 0 else 0.02)
        return super().sds_loss(images, view_words, cfg, generator)


def test_the_steady_step_time_leaves_the_warm_up_out(tmp_path):
    assert [warmup_steps(n) for n in (1, 5, 14, 50, 999, 5000)] == [1, 1, 1, 5, 99, 100]
    res = Trainer(tiny_config(steps=14), SlowFirstStep(), tmp_path / "a", "cpu").train(progress=False)
    assert res.steady_from == 1
    # 13 steps of at least 20 ms each, timed after the first step's 0.3 s
    assert 0.02 <= res.steady_step_seconds and 13 * res.steady_step_seconds <= res.seconds - 0.3
    # Fewer than 10 steps after the warm-up: no rate.
    res = Trainer(tiny_config(steps=6), SlowFirstStep(), tmp_path / "b", "cpu").train(progress=False)
    assert res.steady_step_seconds is None and res.steady_from is None
    # A resumed call counts its warm-up from where it starts.
    tr = Trainer(tiny_config(steps=20), ColourGuidance(), tmp_path / "b", "cpu")
    tr.resume()
    assert tr.step == 6
    res = tr.train(progress=False)
    assert res.step == 20 and res.steady_from == 7 and res.steady_step_seconds > 0  # 6 + a tenth of 14, at least 1
