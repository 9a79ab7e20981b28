# SPDX-License-Identifier: Apache-2.0
"""The optimisation loop: SDS on random views, regularisers, occupancy-grid updates, checkpoints, previews.

One step: a random camera and light (``fastdream.cameras.sample_cameras``), a shading mode (albedo during the
warm-up, then shaded or textureless at random), a render at the guidance's resolution, the SDS loss for the
view word of the camera, plus ``lambda_orient * L_orient + lambda_opacity * L_opacity``, and an Adam step
(field and background groups; on CUDA under fp16 autocast with a gradient scaler).

Reliability: a step whose loss or gradients hold NaN/inf is skipped and counted (``max_bad_steps`` in a row
stop the run with a UserError). On CUDA the skip is decided on the GPU (the gradient scaler and the fused Adam),
and the loop reads each step's outcome during the next one, so the CPU prepares the next step while the GPU
finishes this one (:class:`StepOutcome`; a checkpoint reads it first). Checkpoints are atomic and never hold NaN
(:mod:`fastdream.checkpoint`);
SIGINT (Ctrl-C) finishes the current step, saves a checkpoint and returns with ``interrupted=True``.
Every random draw comes from generators saved in the checkpoint, so on the CPU a resumed run ends with the
same parameters as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import shlex
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastdream import checkpoint as ckpt
from fastdream.cameras import make_cameras, sample_cameras, view_word
from fastdream.config import RunConfig
from fastdream.errors import OutOfMemory, UserError, out_of_memory
from fastdream.field import Background, NeuralField
from fastdream.guidance.base import SDSConfig
from fastdream.losses import opacity_loss, orientation_loss
from fastdream.ops import OccupancyGrid
from fastdream.renderer import render, render_views


@dataclass
class TrainResult:
    step: int  # steps done in total
    skipped: int  # non-finite steps skipped in total
    interrupted: bool
    checkpoint: Path | None
    seconds: float
    last_loss: float
    skipped_loss: int = 0  # of ``skipped``: those whose loss was non-finite (the rest: their gradients)
    # Seconds a step after this call's first tenth of steps (at most 100: warm-up, CUDA graph captures, compiles),
    # previews and checkpoints included: the rate that extrapolates to longer runs. None under 10 steps after it.
    steady_step_seconds: float | None = None
    steady_from: int | None = None  # the step it was measured from (0-based: the steps after this many)


def warmup_steps(steps: int) -> int:
    """Steps of a train() call that :attr:`TrainResult.steady_step_seconds` leaves out: a tenth, 1 to 100."""
    return min(100, max(1, steps // 10))


def build_models(cfg: RunConfig, device: torch.device) -> tuple[NeuralField, Background | None, OccupancyGrid]:
    """The field, the background (None unless ``background == "mlp"``) and the occupancy grid, seeded."""
    gen = torch.Generator().manual_seed(cfg.optim.seed)
    r = cfg.render
    field = NeuralField(cfg.field, bound=r.bound, generator=gen).to(device)
    background = Background(generator=gen).to(device) if r.background == "mlp" else None
    grid = OccupancyGrid(
        r.grid_resolution,
        bound=r.bound,
        threshold=r.grid_threshold,
        decay=r.grid_decay,
        step=2.0 * r.bound / r.samples_per_ray,
    ).to(device)
    return field, background, grid


def build_optimizer(cfg: RunConfig, field: NeuralField, background: Background | None) -> torch.optim.Adam:
    """Adam over three groups: the hash table (``lr``), the field's MLP (``lr * mlp_lr_scale``), the background.

    On CUDA PyTorch's fused Adam (one kernel launch per step instead of one per operation and parameter list:
    the step is launch-bound at 64x64); elsewhere the default (``foreach``) implementation."""
    o = cfg.optim
    mlp = [p for name, p in field.named_parameters() if name != "table"]
    groups = [{"params": [field.table], "lr": o.lr}, {"params": mlp, "lr": o.lr * o.mlp_lr_scale}]
    if background is not None:
        groups.append({"params": list(background.parameters()), "lr": o.background_lr})
    fused = field.table.is_cuda or None  # None: PyTorch's default choice
    return torch.optim.Adam(groups, betas=tuple(o.betas), eps=o.eps, fused=fused)


def scaled_backward(loss: torch.Tensor, scaler: torch.amp.GradScaler | None) -> torch.Tensor:
    """``loss.backward()``, scaled under a gradient scaler, with no host synchronisation. Returns whether the loss
    is finite, a 0-d bool tensor on the loss' device, for :func:`apply_step`. A non-finite loss is backpropagated
    too (asking first would wait for the GPU to finish the forward); its step is then skipped."""
    finite = torch.isfinite(loss.detach())
    (scaler.scale(loss) if scaler is not None else loss).backward()
    return finite


def apply_step(
    optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None, finite_loss: torch.Tensor | None = None
) -> torch.Tensor:
    """After :func:`scaled_backward`: the optimiser step, taken only if the loss (``finite_loss``) and every
    gradient are finite. Returns that as a 0-d bool tensor.

    Under a gradient scaler nothing here waits for the GPU when the optimiser takes the scaler's verdict on the
    device (PyTorch's fused Adam, the trainer's on CUDA): the skip happens in the optimiser's kernel. The scaler
    finds non-finite gradients itself (``unscale_``); a non-finite loss can leave them finite, so one gradient is
    made NaN when the step must be skipped, and the scaler's verdict is exactly the returned one. The scale is
    updated either way: lowered after a skipped step, as after an overflow (without the update the next
    ``unscale_`` raises). Without a scaler the step is taken or not on the host (one synchronisation; on the CPU
    it costs nothing)."""
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    ok = torch.ones((), dtype=torch.bool) if finite_loss is None else finite_loss
    if grads:
        # One multi-tensor norm launch instead of two reductions per parameter (the step is launch-bound on CUDA):
        # a gradient with an inf or a NaN has a non-finite norm (so has one whose norm overflows fp32, above ~1e19;
        # under a scaler these are the scaled gradients: skipping such a step is no loss).
        ok = ok.to(grads[0].device) & torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()
    if scaler is not None:
        if grads:  # the smallest gradient: one small kernel
            g = min(grads, key=lambda t: t.numel())
            g.add_(torch.where(ok, 0.0, float("nan")).to(g.dtype))
        scaler.unscale_(optimizer)
        scaler.step(optimizer)  # skipped when unscale_ found a NaN/inf (in the kernel, for the fused Adam)
        scaler.update()
    elif bool(ok):
        optimizer.step()
    return ok


class StepOutcome:
    """The host's view of one step (its loss, whether the loss was finite, whether the step was taken), read
    without waiting for the GPU when it is read late enough: the values are copied into pinned memory behind the
    step's work, and :meth:`result` waits only for that copy. The trainer reads step N's after step N+1's render,
    which waits for the GPU anyway (the sample count sizes the render)."""

    def __init__(self, step: int, loss: torch.Tensor, finite_loss: torch.Tensor, ok: torch.Tensor, pinned=None):
        self.step = step
        values = torch.stack([loss.detach().float().reshape(()), finite_loss.float(), ok.float()])
        self._event = None
        if values.is_cuda:
            self._host = pinned if pinned is not None else torch.empty(3, pin_memory=True)
            self._host.copy_(values, non_blocking=True)
            self._event = torch.cuda.Event()
            # on the copy's stream, whatever the current device
            self._event.record(torch.cuda.current_stream(values.device))
        else:
            self._host = values

    def result(self) -> tuple[float, bool, bool]:
        """(loss, loss finite, step taken)."""
        if self._event is not None:
            self._event.synchronize()
        loss, finite, ok = self._host.tolist()
        return loss, bool(finite), bool(ok)


class Trainer:
    """Owns the models, the optimiser and the random state of a run in ``run_dir``.

    Args:
        cfg: a resolved (:func:`fastdream.config.resolve`) and validated config.
        guidance: a prepared :class:`fastdream.guidance.Guidance` (``prepare(prompt)`` already called).
        run_dir: the run folder (checkpoints/ and previews/ are written there).
        device: where the field lives.
    """

    def __init__(self, cfg: RunConfig, guidance: Any, run_dir: str | Path, device: torch.device | str):
        self.cfg = cfg
        self.guidance = guidance
        self.run_dir = Path(run_dir)
        self.device = torch.device(device)
        torch.manual_seed(cfg.optim.seed)
        self.field, self.background, self.grid = build_models(cfg, self.device)
        o = cfg.optim
        self.optimizer = build_optimizer(cfg, self.field, self.background)
        # The training render (rays, marching, field, normals, shading, environment map, compositing) replayed from
        # CUDA graphs with --cuda-graphs (fastdream.render_graphs); None: the eager renderer.
        self.render_graphs = None
        if cfg.guidance.cuda_graphs and self.device.type == "cuda":
            from fastdream.render_graphs import GraphedRender

            self.render_graphs = GraphedRender(self.field, self.background, self.grid)
        self.amp = self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if self.amp else None
        self.checkpoints = ckpt.CheckpointWriter()  # periodic checkpoints are written in the background
        # Separate streams: the view/mode schedule (CPU) and the noise of SDS, jitter and grid updates.
        self.schedule_gen = torch.Generator().manual_seed(o.seed + 1)
        self.noise_gen = torch.Generator(device=self.device).manual_seed(o.seed + 2)
        self.sds_cfg = SDSConfig(
            guidance_scale=cfg.guidance.guidance_scale,
            t_range=tuple(cfg.guidance.t_range),
            weighting=cfg.guidance.weighting,
        )
        self.step = 0
        self.skipped = 0
        self.skipped_loss = 0  # of those, with a non-finite loss (the others had non-finite gradients)
        self.bad_in_a_row = 0
        self.last_loss = float("nan")
        self._step_start: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None] | None = None
        self._updating = False
        self._stop = False
        self._pending: StepOutcome | None = None  # the last step's outcome, not read on the host yet
        self._pinned: torch.Tensor | None = None  # where it is copied on CUDA (one buffer: read before reused)

    # -- state ------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        self.settle()  # the counts of the last step
        return {
            "format": 1,
            "step": self.step,
            "field": self.field.state_dict(),
            "background": self.background.state_dict() if self.background is not None else {},
            "grid": self.grid.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "rng": self._rng_states(),
            "stats": {"skipped": self.skipped, "skipped_loss": self.skipped_loss, "bad_in_a_row": self.bad_in_a_row},
        }

    def _rng_states(self) -> dict[str, torch.Tensor]:
        return {
            "schedule": self.schedule_gen.get_state(),
            "noise": self.noise_gen.get_state().cpu(),
            "torch": torch.get_rng_state(),
        }

    def _set_rng_states(self, rng: dict[str, torch.Tensor]) -> None:
        # CPU ByteTensors even for a CUDA generator; a checkpoint loaded with map_location=cuda moved them.
        self.schedule_gen.set_state(rng["schedule"].cpu())
        self.noise_gen.set_state(rng["noise"].cpu())
        torch.set_rng_state(rng["torch"].cpu())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            self.field.load_state_dict(state["field"])
            if self.background is not None:
                self.background.load_state_dict(state["background"])
            self.grid.load_state_dict(state["grid"])
            self.optimizer.load_state_dict(state["optimizer"])
            for group in self.optimizer.param_groups:  # load_state_dict checks the counts, not the shapes
                for p in group["params"]:
                    for k, v in self.optimizer.state.get(p, {}).items():
                        if torch.is_tensor(v) and v.dim() > 0 and v.shape != p.shape:
                            raise ValueError(f"optimizer {k} of shape {tuple(v.shape)} for a {tuple(p.shape)} tensor")
            if self.scaler is not None and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            self._set_rng_states(state["rng"])
            self.step = int(state["step"])
            self.skipped = int(state["stats"]["skipped"])
            self.skipped_loss = int(state["stats"].get("skipped_loss", 0))  # absent before 2026-11-26
            self.bad_in_a_row = int(state["stats"]["bad_in_a_row"])
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            raise UserError(
                f"the checkpoint does not match this run's settings ({type(e).__name__}: {str(e)[:120]}); "
                f"start over (fastdream generate --overwrite)"
            ) from e

    def save(self, wait: bool = True) -> Path:
        """Checkpoint the current step. ``wait=False``: written in the background while training goes on
        (:class:`fastdream.checkpoint.CheckpointWriter`); :meth:`train` waits for it before it returns."""
        path = self.checkpoints.submit(self.run_dir, self.step, self.state_dict(), keep=self.cfg.optim.keep_checkpoints)
        if wait:
            self.checkpoints.wait()
        return path

    def resume(self, path: str | Path | None = None) -> Path:
        path = Path(path) if path is not None else ckpt.latest_checkpoint(self.run_dir)
        if path is None:
            raise UserError(f"nothing to resume in {self.run_dir} (no checkpoint); run without --resume")
        state = ckpt.load_checkpoint(path, map_location=self.device)
        modules = {"field": self.field, "background": self.background, "grid": self.grid}
        ckpt.check_state_finite(path, state)
        ckpt.check_state_matches(path, modules, state)  # one line naming the tensor, not load_state_dict's report
        self.load_state_dict(state)
        return path

    # -- one step ---------------------------------------------------------------------------------------

    def shading_mode(self) -> str:
        """Albedo during the warm-up; then textureless with probability ``textureless_ratio``, else shaded.
        Always draws one number so the schedule stream does not depend on the step."""
        u = float(torch.rand((), generator=self.schedule_gen))
        s = self.cfg.shading
        if self.step < s.albedo_warmup_steps:
            return "albedo"
        return "textureless" if u < s.textureless_ratio else "shaded"

    def _background_for_step(self) -> Background | torch.Tensor:
        col = torch.rand(3, generator=self.schedule_gen)  # drawn every step: a fixed stream
        bg = self.cfg.render.background
        if bg == "mlp":
            return self.background
        if bg == "random":
            return col
        return torch.zeros(3) if bg == "black" else torch.ones(3)

    def _update_grid(self) -> None:
        o = self.cfg.optim
        self.field.eval()
        try:
            with torch.autocast("cuda", dtype=torch.float16, enabled=self.amp):
                self.grid.update(self.field.density, warmup=self.step < o.grid_warmup_steps, generator=self.noise_gen)
        finally:
            self.field.train()

    def compute_loss(self) -> tuple[torch.Tensor, dict[str, Any]]:
        """Render one random view and return (total loss, info). Consumes the step's random numbers."""
        cfg = self.cfg
        cams = sample_cameras(cfg.camera, 1, self.schedule_gen)
        mode = self.shading_mode()
        if hasattr(self.guidance, "set_shading_mode"):  # a prior that conditions on it (builtin)
            self.guidance.set_shading_mode(mode)
        if hasattr(self.guidance, "set_cameras"):  # a prior that conditions on the pose (builtin)
            self.guidance.set_cameras(cams.elevation, cams.azimuth)
        background = self._background_for_step()
        res = cfg.render.resolution
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.amp):
            out = (self.render_graphs or render)(
                self.field,
                background,
                cams,
                res,
                res,
                shading_mode=mode,
                grid=self.grid,
                samples_per_ray=cfg.render.samples_per_ray,
                ambient=cfg.shading.ambient,
                diffuse=cfg.shading.diffuse,
                jitter=cfg.render.jitter,
                prune=cfg.render.prune_occluded,
                generator=self.noise_gen,
            )
        words = [view_word(float(cams.elevation[0]), float(cams.azimuth[0]))]
        sds, info = self.guidance.sds_loss(
            out["image"].float(), words, self.step_sds_config(), generator=self.noise_gen
        )
        loss = sds
        o = cfg.optim
        # GraphedRender computes the regularisers in its graph (out["orientation_loss"], out["opacity_loss"]).
        if o.lambda_orient > 0 and out["normals"] is not None:
            orient = out.get("orientation_loss")
            if orient is None:
                orient = orientation_loss(
                    out["weights"], out["normals"], out["directions"], out["ray_indices"], out["n_rays"]
                )
            loss = loss + o.lambda_orient * orient
        if o.lambda_opacity > 0:
            opac = out.get("opacity_loss")
            loss = loss + o.lambda_opacity * (opacity_loss(out["ray_opacity"]) if opac is None else opac)
        info = dict(info)
        info.update(mode=mode, view=words[0], samples=out["n_samples"])
        return loss, info

    def step_sds_config(self) -> SDSConfig:
        """The SDS settings of this step: ``t_range``, its upper end annealed linearly to ``t_max_end`` (if set)
        from the first step to the last."""
        g = self.cfg.guidance
        if g.t_max_end is None:
            return self.sds_cfg
        lo, hi = g.t_range
        frac = min(1.0, self.step / max(1, self.cfg.optim.steps - 1))
        return dataclasses.replace(self.sds_cfg, t_range=(lo, max(lo, hi + (g.t_max_end - hi) * frac)))

    def train_step(self, settle: bool = True) -> bool | None:
        """One optimisation step. Returns False when it was skipped (non-finite loss or gradients).

        ``settle=False`` (the training loop): the step's outcome is read on the host later, by the next step or by
        :meth:`settle`, so the CPU does not wait for the GPU to finish the step (the counts, ``last_loss`` and the
        divergence check lag by one step); returns None."""
        o = self.cfg.optim
        # What an allocation failing in this step must undo before the run is saved (_save_after_out_of_memory):
        # the random streams the step draws from, and the grid it updates in place (a copy, every few steps).
        grid_due = self.step % o.grid_update_every == 0
        grid_before = {k: v.clone() for k, v in self.grid.state_dict().items()} if grid_due else None
        self._step_start = (self._rng_states(), grid_before)
        if grid_due:
            self._update_grid()
        self.optimizer.zero_grad(set_to_none=True)
        loss, info = self.compute_loss()
        self.settle()  # the previous step's outcome: its work is done by now (this step's render waited for it)
        finite_loss = scaled_backward(loss, self.scaler)
        self._updating = True  # the parameters change from here: a failure cannot be undone
        ok = apply_step(self.optimizer, self.scaler, finite_loss)
        if ok.is_cuda and self._pinned is None:
            self._pinned = torch.empty(3, pin_memory=True)
        self._pending = StepOutcome(self.step + 1, loss, finite_loss, ok, self._pinned)
        self.last_info = info
        self.step += 1
        self._step_start, self._updating = None, False  # a whole step again
        return self.settle() if settle else None

    def settle(self) -> bool | None:
        """Read the last step's outcome on the host, if not yet read: count it, keep its loss, and stop a run that
        diverged. Returns whether that step was taken (None: nothing to read).

        Raises:
            UserError: ``max_bad_steps`` steps in a row were skipped.
        """
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        loss, finite_loss, ok = pending.result()
        if ok:
            self.bad_in_a_row = 0
            self.last_loss = loss
        else:
            self.skipped += 1
            self.skipped_loss += not finite_loss
            self.bad_in_a_row += 1
        if self.bad_in_a_row >= self.cfg.optim.max_bad_steps:
            raise UserError(
                f"{self.bad_in_a_row} steps in a row had a NaN/inf loss or gradient (step {pending.step}); the run "
                f"diverged: start it over (--overwrite) with a lower --lr or --guidance-scale (--resume keeps the "
                f"saved settings, and from the same checkpoint and random state it would diverge again)"
            )
        return ok

    def _save_after_out_of_memory(self, oom: str) -> tuple[str, str]:
        """After an allocation failed mid-run: save the last whole step, undoing what the failing one began (its
        random draws, its grid update), unless it was changing the parameters. Returns (what happened and what was
        saved, that with the single run's advice: the line for the user)."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        where = f"at step {self.step + 1}" if self._step_start is not None else f"after step {self.step}"
        found = ckpt.list_checkpoints(self.run_dir)
        saved = found[-1][0] if found else 0
        if not self._updating and self.step > saved:
            if self._step_start is not None:
                rng, grid = self._step_start
                self._set_rng_states(rng)
                if grid is not None:
                    self.grid.load_state_dict(grid)
                self._step_start = None
            self.settle()  # the last step's outcome: a run it ends (diverged) is reported as that, not resumed
            try:
                self.save(wait=True)
                saved = self.step
            except Exception:  # (memory, disk): the earlier checkpoint stands
                pass
        lower = "a lower --resolution or --samples-per-ray"
        if not saved:  # nothing to resume (a new run's folder is cleared by fastdream.run.execute)
            summary = f"{oom} {where}; no step was saved"
            return summary, f"{summary}. Free memory on the device, or start over with {lower}"
        lower = f"--overwrite and {lower}"
        resume = shlex.join(
            [
                "fastdream",
                "generate",
                self.cfg.prompt,
                "--out",
                str(self.run_dir),
                "--resume",
                "--device",
                str(self.device),
            ]
        )
        summary = f"{oom} {where}; step {saved} is saved"
        return summary, f"{summary}. Free memory on the device and continue with {resume}, or start over with {lower}"

    # -- previews ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def preview(self) -> Path:
        """A 3 x 4 grid (rows: colour, normals, textureless; columns: front, right, back, left) as PNG."""
        img = preview_grid(self.field, self.background, self.grid, self.cfg)
        path = self.run_dir / "previews" / f"step_{self.step:06d}.png"
        write_png(path, img)
        return path

    # -- the loop ---------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _sigint_saves(self):
        """First Ctrl-C: stop after the current step (then save); a second one interrupts at once."""

        def handler(signum, frame):
            if self._stop:
                raise KeyboardInterrupt
            self._stop = True

        try:
            prev = signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread
            yield
            return
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, prev)

    def train(self, progress: bool = True) -> TrainResult:
        """Run until ``optim.steps``, writing previews and checkpoints; returns what happened."""
        o = self.cfg.optim
        start = time.perf_counter()
        steady_from = self.step + warmup_steps(o.steps - self.step)
        steady_start = None  # when step steady_from began (the host may run a step ahead of the GPU: ~1 step)
        last_ckpt = None
        bar = None
        previews_off = False
        failed = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=o.steps, initial=self.step, unit="step", dynamic_ncols=True, leave=True)
        try:
            with self._sigint_saves():
                while self.step < o.steps and not self._stop:
                    if self.step == steady_from:
                        steady_start = time.perf_counter()
                    self.train_step(settle=False)  # read by the next step: the CPU runs ahead of the GPU
                    self.checkpoints.poll()
                    if bar is not None:
                        bar.update(1)
                        # The loss lags by a step (settle=False): none is known before the first step is read.
                        loss = "-" if math.isnan(self.last_loss) else f"{self.last_loss:.4g}"
                        bar.set_postfix(loss=loss, mode=self.last_info["mode"], skipped=self.skipped)
                    # and the last step's, so a run shorter than preview_every has one too
                    due = o.preview_every and (self.step % o.preview_every == 0 or self.step == o.steps)
                    if due and not previews_off:
                        try:
                            self.preview()
                        except (OSError, RuntimeError, MemoryError) as e:  # not worth the run (or this step)
                            oom = out_of_memory(e)
                            if isinstance(e, OSError):  # previews/ unwritable or a file
                                why = f"cannot write a preview ({e.strerror or e}: {e.filename})"
                            elif oom is not None:  # a preview_resolution too large for what training left
                                why = f"{oom} rendering a preview at {self.cfg.render.preview_resolution} pixels"
                            else:
                                raise
                            previews_off = True
                            msg = f"warning: {why}; previews are off for the rest of this run, training goes on"
                            bar.write(msg, file=sys.stderr) if bar is not None else print(msg, file=sys.stderr)
                    if self.step % o.save_every == 0 or self.step == o.steps:
                        last_ckpt = self.save(wait=False)  # written while the next steps train
                if self._stop and (last_ckpt is None or self.step % o.save_every):
                    last_ckpt = self.save(wait=False)
                self.settle()  # the last step's counts and loss (save() settles too)
        except BaseException as e:
            # The error in flight is the one to report; a background write still finishes (it loses nothing).
            with contextlib.suppress(Exception):
                self.checkpoints.wait()
            if out_of_memory(e) is None:
                raise
            failed = e
            traceback.clear_frames(e.__traceback__)  # the step's tensors: freed before the save below
        else:
            self.checkpoints.wait()  # every checkpoint is on disk when train() returns (or its error is raised)
        finally:
            if bar is not None:
                bar.close()
        if failed is not None:
            oom = out_of_memory(failed)
            try:
                try:
                    summary, msg = self._save_after_out_of_memory(oom)
                except UserError as e:  # the last step's outcome, read now, ended the run (diverged)
                    raise e from failed
                except Exception:  # the save's own failure must not hide the out-of-memory error
                    summary = msg = f"{oom}; the steps since the last checkpoint could not be saved after it"
                raise OutOfMemory(msg, summary) from failed
            finally:
                failed = None  # this frame must not keep the error (and through it the trainer) alive
        if last_ckpt is None:  # nothing to do (already at the end): the latest one
            last_ckpt = ckpt.latest_checkpoint(self.run_dir)
        end = time.perf_counter()
        steady = None
        if steady_start is not None and self.step - steady_from >= 10:
            steady = (end - steady_start) / (self.step - steady_from)
        return TrainResult(
            self.step,
            self.skipped,
            self._stop,
            last_ckpt,
            end - start,
            self.last_loss,
            self.skipped_loss,
            steady,
            steady_from if steady is not None else None,
        )


def display_background(background: Background | None, cfg: RunConfig) -> Background | torch.Tensor:
    """The background of previews and turntables: the environment map, else black or white."""
    if background is not None:
        return background
    return torch.zeros(3) if cfg.render.background == "black" else torch.ones(3)


def preview_grid(
    field: NeuralField, background: Background | None, grid: OccupancyGrid | None, cfg: RunConfig
) -> np.ndarray:
    """[3*S, 4*S, 3] uint8: colour (albedo), normals and textureless renders from four azimuths."""
    s = cfg.render.preview_resolution
    n = 4
    az = torch.arange(n, dtype=torch.float32) * 90.0
    az = torch.remainder(az + 180.0, 360.0) - 180.0
    full = torch.ones(n)
    cams = make_cameras(full * 15.0, az, full * 2.2, full * 50.0)
    bg = display_background(background, cfg)
    kw = dict(
        grid=grid,
        samples_per_ray=cfg.render.samples_per_ray,
        ambient=cfg.shading.ambient,
        diffuse=cfg.shading.diffuse,
    )
    colour = render_views(field, bg, cams, s, shading_mode="albedo", need_normals=True, **kw)
    plain = render_views(field, torch.ones(3), cams, s, shading_mode="textureless", **kw)
    rows = [
        torch.cat([o["image"][0] for o in colour], dim=2),
        # normals_image is premultiplied (sum of w_i n_i): (n + 1) / 2 over white is (N + A) / 2 + 1 - A.
        torch.cat([(o["normals_image"][0] + o["opacity"][0]) / 2 + (1 - o["opacity"][0]) for o in colour], 2),
        torch.cat([o["image"][0] for o in plain], dim=2),
    ]
    img = torch.cat(rows, dim=1).clamp(0, 1)
    return (img.permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8)


def write_png(path: str | Path, img: np.ndarray) -> None:
    import imageio.v3 as iio

    data = iio.imwrite("<bytes>", img, extension=".png")
    ckpt.atomic_write(path, data)
