# SPDX-License-Identifier: Apache-2.0
"""The optimisation loop: SDS on random views, regularisers, occupancy-grid updates, checkpoints, previews.

One step: a random camera and light (``fastdream.cameras.sample_cameras``), a shading mode (albedo during the
warm-up, then shaded or textureless at random), a render at the guidance's resolution, the SDS loss for the
view word of the camera, plus ``lambda_orient * L_orient + lambda_opacity * L_opacity``, and an Adam step
(field and background groups; on CUDA under fp16 autocast with a gradient scaler).

Reliability: a step whose loss or gradients hold NaN/inf is skipped and counted (``max_bad_steps`` in a row
stop the run with a UserError); checkpoints are atomic and never hold NaN (:mod:`fastdream.checkpoint`);
SIGINT (Ctrl-C) finishes the current step, saves a checkpoint and returns with ``interrupted=True``.
Every random draw comes from generators saved in the checkpoint, so on the CPU a resumed run ends with the
same parameters as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastdream import checkpoint as ckpt
from fastdream.cameras import make_cameras, sample_cameras, view_word
from fastdream.config import RunConfig
from fastdream.errors import UserError
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


def scaled_backward(loss: torch.Tensor, scaler: torch.amp.GradScaler | None) -> bool:
    """``loss.backward()``, scaled under a gradient scaler. False, with no backward, when the loss is not finite."""
    if not bool(torch.isfinite(loss)):
        return False
    if scaler is not None:
        scaler.scale(loss).backward()
    else:
        loss.backward()
    return True


def apply_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> bool:
    """After :func:`scaled_backward`: unscale, then step if every gradient is finite, else skip. Under a scaler the
    scale is updated either way (lowered after an overflow); without that the next ``unscale_`` raises. Returns
    whether the step was taken."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    # One multi-tensor norm launch instead of two reductions per parameter (the step is launch-bound on CUDA): a
    # gradient with an inf or a NaN has a non-finite norm (so has one whose norm overflows fp32, above ~1e19:
    # skipping such a step is no loss).
    ok = not grads or bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all())
    if ok:
        if scaler is not None:
            scaler.step(optimizer)
        else:
            optimizer.step()
    if scaler is not None:
        scaler.update()
    return ok


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
        self._stop = False

    # -- state ------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": 1,
            "step": self.step,
            "field": self.field.state_dict(),
            "background": self.background.state_dict() if self.background is not None else {},
            "grid": self.grid.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "rng": {
                "schedule": self.schedule_gen.get_state(),
                "noise": self.noise_gen.get_state().cpu(),
                "torch": torch.get_rng_state(),
            },
            "stats": {"skipped": self.skipped, "skipped_loss": self.skipped_loss, "bad_in_a_row": self.bad_in_a_row},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            self.field.load_state_dict(state["field"])
            if self.background is not None:
                self.background.load_state_dict(state["background"])
            self.grid.load_state_dict(state["grid"])
            self.optimizer.load_state_dict(state["optimizer"])
            if self.scaler is not None and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            # RNG states are CPU ByteTensors even for a CUDA generator; map_location=cuda moved them.
            self.schedule_gen.set_state(state["rng"]["schedule"].cpu())
            self.noise_gen.set_state(state["rng"]["noise"].cpu())
            torch.set_rng_state(state["rng"]["torch"].cpu())
            self.step = int(state["step"])
            self.skipped = int(state["stats"]["skipped"])
            self.skipped_loss = int(state["stats"].get("skipped_loss", 0))  # absent before 2026-11-26
            self.bad_in_a_row = int(state["stats"]["bad_in_a_row"])
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            raise UserError(
                f"the checkpoint does not match this run's settings ({type(e).__name__}: {str(e)[:120]}); "
                f"start over with --overwrite"
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

    def train_step(self) -> bool:
        """One optimisation step. Returns False when it was skipped (non-finite loss or gradients)."""
        o = self.cfg.optim
        if self.step % o.grid_update_every == 0:
            self._update_grid()
        self.optimizer.zero_grad(set_to_none=True)
        loss, info = self.compute_loss()
        finite_loss = scaled_backward(loss, self.scaler)
        ok = finite_loss and apply_step(self.optimizer, self.scaler)
        if ok:
            self.bad_in_a_row = 0
            self.last_loss = float(loss.detach())
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped += 1
            self.skipped_loss += not finite_loss
            self.bad_in_a_row += 1
        self.last_info = info
        self.step += 1
        if self.bad_in_a_row >= o.max_bad_steps:
            raise UserError(
                f"{self.bad_in_a_row} steps in a row had a NaN/inf loss or gradient (step {self.step}); the run "
                f"diverged: lower --lr or --guidance-scale and resume from the last checkpoint with --resume"
            )
        return ok

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
        last_ckpt = None
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=o.steps, initial=self.step, unit="step", dynamic_ncols=True, leave=True)
        try:
            with self._sigint_saves():
                while self.step < o.steps and not self._stop:
                    self.train_step()
                    self.checkpoints.poll()
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{self.last_loss:.4g}", mode=self.last_info["mode"], skipped=self.skipped)
                    # and the last step's, so a run shorter than preview_every has one too
                    if o.preview_every and (self.step % o.preview_every == 0 or self.step == o.steps):
                        self.preview()
                    if self.step % o.save_every == 0 or self.step == o.steps:
                        last_ckpt = self.save(wait=False)  # written while the next steps train
                if self._stop and (last_ckpt is None or self.step % o.save_every):
                    last_ckpt = self.save(wait=False)
        except BaseException:
            # The error in flight is the one to report; a background write still finishes (it loses nothing).
            with contextlib.suppress(Exception):
                self.checkpoints.wait()
            raise
        else:
            self.checkpoints.wait()  # every checkpoint is on disk when train() returns (or its error is raised)
        finally:
            if bar is not None:
                bar.close()
        if last_ckpt is None:  # nothing to do (already at the end): the latest one
            last_ckpt = ckpt.latest_checkpoint(self.run_dir)
        seconds = time.perf_counter() - start
        return TrainResult(self.step, self.skipped, self._stop, last_ckpt, seconds, self.last_loss, self.skipped_loss)


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
        torch.cat([(o["normals_image"][0] + 1) / 2 * o["opacity"][0] + (1 - o["opacity"][0]) for o in colour], 2),
        torch.cat([o["image"][0] for o in plain], dim=2),
    ]
    img = torch.cat(rows, dim=1).clamp(0, 1)
    return (img.permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8)


def write_png(path: str | Path, img: np.ndarray) -> None:
    import imageio.v3 as iio

    data = iio.imwrite("<bytes>", img, extension=".png")
    ckpt.atomic_write(path, data)
