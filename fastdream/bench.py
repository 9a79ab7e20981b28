# SPDX-License-Identifier: Apache-2.0
"""The step benchmark behind ``fastdream bench``: one SDS step timed in parts.

A step is the trainer's (:mod:`fastdream.train`) written out with the same public functions, with a clock mark
between the parts. One difference: the background is the learned environment map for every model, the costliest
one, where a builtin ``generate`` run defaults to black (no background MLP), so a builtin bench step is slightly
dearer than a builtin training step:

========================  ====================================================================================
``rays_march``            camera draw, ``get_rays``, ``march_rays`` through the occupancy grid
``field``                 ``NeuralField.density_and_normals`` (hash grid + its Jacobian, MLP)
``shade_composite``       ``shade``, the background MLP, ``composite`` and the two regularisers
``guidance_encode``       SD: resize to 512 + VAE encode (with gradient); IF: resize + scale (builtin: none)
``guidance_denoise``      noise, one batched [uncond; cond] UNet call, CFG, the SDS gradient (builtin: the
                          closed-form denoiser)
``backward``              ``loss.backward()`` (through the VAE encoder for SD, then the renderer and the field)
``optimizer``             Adam step (with the trainer's GradScaler unscale and finiteness check on CUDA)
``grid_update``           ``OccupancyGrid.update`` (steady state, not warm-up); timed every step, counted once
                          every ``grid_update_every`` steps in the step total
========================  ====================================================================================

With ``render_graphs`` the render is one graph replay: ``field`` is then the whole render (rays, marching, field,
shading, environment map, compositing) and ``rays_march`` only the host's work before it (the camera draw, the
view words, ``zero_grad``). ``field_side_ms`` (builtin only) sums the parts the field-side goal lists.

Medians over ``steps`` timed steps after ``warmup`` untimed ones. On CUDA each part is timed with CUDA events
(one synchronisation per step) and peak memory is ``torch.cuda.max_memory_allocated`` over the timed steps (with
``max_memory_reserved`` beside it: CUDA graphs' private pools are reserved, not counted as allocated); on
the CPU parts are wall time and peak memory is the process's maximum resident set size (``ru_maxrss``, whole
process lifetime, so it includes setup).

Models: ``builtin`` (the closed-form prior), ``sd`` (a Stable-Diffusion-2.1-base-shaped UNet and VAE built from
the configs below with RANDOM weights: no download) and ``if`` (a DeepFloyd-IF-I-XL-sized pixel-space UNet,
random weights). The diffusers models run in fp16 on CUDA, the UNet channels_last and the SD VAE contiguous by
default (as the guidance backends do; --unet-layout, --vae-layout);
``compile`` wraps the UNet in ``torch.compile``, ``cuda_graphs`` replays it from a CUDA graph (both: inductor's
``reduce-overhead`` mode). ``tiny`` swaps in tiny configs so every path runs on a CPU in seconds (tests).

Example:
    >>> from fastdream.bench import BenchConfig, run_bench
    >>> result = run_bench(BenchConfig(model="builtin", device="cpu", steps=2, warmup=1, tiny=True))
    >>> sorted(result.parts) == sorted(p for p in PARTS if p != "guidance_encode")
    True
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastdream.cameras import get_rays, sample_cameras, view_word
from fastdream.config import FieldConfig, RunConfig, resolve
from fastdream.errors import UserError
from fastdream.guidance.graphs import accelerate
from fastdream.losses import opacity_loss, orientation_loss
from fastdream.ops import _dispatch, composite, march_rays, shade, use_backend
from fastdream.sds import add_noise, sample_timesteps, sds_grad, sds_loss_from_grad
from fastdream.train import apply_step, build_models, build_optimizer, scaled_backward

MODELS = ("builtin", "sd", "if")
# --scene: the field the step renders. "fresh": the trainer's initial density blob (about 9.7k samples a 64x64 step
# on CUDA's defaults: the sessions up to 15 timed this). "object" (the default since 2026-11-27): the blob widened
# to an occupied ball of about 0.5 (blob radius 0.4): 20-30k samples a 64x64 step on CUDA's and the CPU's
# defaults, as the builtin prior's trained primitives give (15-30k, measured on four 800-step runs, one per shape
# but the cube), 2-3x the fresh field.
SCENES = ("object", "fresh")
OBJECT_BLOB_RADIUS = 0.4
OPS_CHOICES = ("fused", "reference")
PARTS = (
    "rays_march",
    "field",
    "shade_composite",
    "guidance_encode",
    "guidance_denoise",
    "backward",
    "optimizer",
    "grid_update",
)
PART_LABELS = {
    "rays_march": "rays + marching",
    "field": "field forward (+ normals)",
    "shade_composite": "shading + compositing (+ reg.)",
    "guidance_encode": "guidance: encode",
    "guidance_denoise": "guidance: denoiser",
    "backward": "backward",
    "optimizer": "optimizer",
    "grid_update": "grid update",
}
FIELD_OPS = ("march_rays", "hash_encode", "shade", "composite")
PROMPT = "a red cube"

# --- model configs (random weights; shapes of the published checkpoints) ----------------------------------------

# stabilityai/stable-diffusion-2-1-base: unet/config.json, vae/config.json, scheduler/scheduler_config.json.
SD21_BASE_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "cross_attention_dim": 1024,
    "attention_head_dim": (5, 10, 20, 20),
    "use_linear_projection": True,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}
SD21_BASE_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
SD21_BASE_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "steps_offset": 1,
}
SD21_TEXT_SHAPE = (77, 1024)  # OpenCLIP ViT-H/14 hidden states

# DeepFloyd IF stage I, XL size: the published block layout of IF-I (ResNet down/up blocks at 64x64, simple
# cross-attention blocks with 64-channel heads at 32, 16 and 8, 3 res blocks per level, T5-XXL 4096-d text
# projected into the UNet, eps + learned variance out, pixel space 64x64) with widths chosen so the parameter
# count matches the published 4.3B (this config: 4.43B; 11 x 64 base channels). The checkpoint's own
# config.json could not be checked offline, so this is "IF-I-XL-sized", not a copy. ~8.9 GB in fp16.
IF_I_XL_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 3,
    "out_channels": 6,
    "down_block_types": (
        "ResnetDownsampleBlock2D",
        "SimpleCrossAttnDownBlock2D",
        "SimpleCrossAttnDownBlock2D",
        "SimpleCrossAttnDownBlock2D",
    ),
    "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
    "up_block_types": (
        "SimpleCrossAttnUpBlock2D",
        "SimpleCrossAttnUpBlock2D",
        "SimpleCrossAttnUpBlock2D",
        "ResnetUpsampleBlock2D",
    ),
    "block_out_channels": (704, 1408, 2112, 2816),
    "layers_per_block": 3,
    "attention_head_dim": 64,
    "cross_attention_dim": 4096,
    "encoder_hid_dim": 4096,
    "encoder_hid_dim_type": "text_proj",
    "addition_embed_type": "text",
    "addition_embed_type_num_heads": 64,
    "cross_attention_norm": "group_norm",
    "resnet_time_scale_shift": "scale_shift",
    "act_fn": "gelu",
}
IF_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "variance_type": "learned_range",
    "prediction_type": "epsilon",
    "thresholding": True,
}
IF_TEXT_SHAPE = (77, 4096)  # T5-XXL hidden states

# Tiny twins: the same block types at toy widths, for CPU tests of every code path.
TINY_SD_UNET: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "attention_head_dim": (2, 4),
    "use_linear_projection": True,
}
TINY_SD_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 2,
    "up_block_types": ("UpDecoderBlock2D",) * 2,
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "latent_channels": 4,
    "sample_size": 16,
}
TINY_IF_UNET: dict[str, Any] = {
    **{k: v for k, v in IF_I_XL_UNET.items() if not k.startswith("block") and k != "layers_per_block"},
    "sample_size": 16,
    "down_block_types": ("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
    "up_block_types": ("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "attention_head_dim": 8,
    "cross_attention_dim": 32,
    "encoder_hid_dim": 32,
    "addition_embed_type_num_heads": 2,
}
TINY_TEXT_SHAPE = (8, 32)


@dataclass
class BenchConfig:
    """What ``fastdream bench`` measures.

    Attributes:
        model: "builtin" | "sd" | "if".
        device: "auto" (CUDA when visible) | "cpu" | "cuda" | "cuda:N".
        steps: timed steps (medians over these). warmup: untimed steps first (compilation, allocator, graphs).
        resolution: render size; None: the guidance's (64; 16 with ``tiny``).
        batch: cameras per step (the trainer uses 1).
        ops: "fused" (the dispatcher's fastest implementations) | "reference" (pure PyTorch everywhere).
        compile: ``torch.compile`` the UNet call. compile_vae: ``torch.compile`` the SD VAE encoder's forward and
            backward (:func:`fastdream.guidance.graphs.accelerate`). cuda_graphs: replay the UNet call from a CUDA
            graph, and the VAE encoder's forward and backward (SD) from two.
        field_graphs: replay the field's forward and backward from CUDA graphs (:mod:`fastdream.field_graphs`).
        render_graphs: replay the whole render (rays, marching, field, normals, shading, environment map,
            compositing), forward and backward, from CUDA graphs (:mod:`fastdream.render_graphs`, as
            ``generate --cuda-graphs``). The "field" part then holds all of it.
        tiny: tiny field and tiny random models (CPU tests of every path).
        shading: "shaded" | "textureless" (both need normals) | "albedo".
        grid_update_every: the trainer's period, used to amortise the grid update in the step total.
        seed: weights, cameras and noise.
        vae_layout: "channels_last" | "contiguous": memory format of the SD VAE on CUDA.
        vae_attention: "sdpa" | "classic": the SD VAE's attention (fastdream.guidance.stable_diffusion).
        unet_layout: "channels_last" | "contiguous": memory format of the UNet on CUDA.
        vae_groupnorm: "native" | "split": the SD VAE encoder's GroupNorm (fastdream.guidance.groupnorm).
        cudnn_benchmark: set ``torch.backends.cudnn.benchmark`` for the run (CUDA only): cuDNN times its
            convolution algorithms on the first call of each shape and keeps the fastest, instead of its
            heuristic choice. The UNet's and the VAE's shapes are fixed, so only the warm-up pays; the CUDA
            graphs are captured after their own eager warm-up calls. Restored afterwards.
        scene: "object" (a field of a trained object's size, the default) | "fresh" (the initial blob): see SCENES.
        host_checks: read the loss check and the gradient check on the host inside the step (two
            synchronisations, as the trainer did before 2026-11-27), instead of leaving them on the device as the
            trainer does now (:func:`fastdream.train.apply_step`): an A/B of what those waits cost.
    """

    model: str = "builtin"
    device: str = "auto"
    steps: int = 20
    warmup: int = 3
    resolution: int | None = None
    batch: int = 1
    ops: str = "fused"
    compile: bool = False
    compile_vae: bool = False
    cuda_graphs: bool = False
    field_graphs: bool = False
    render_graphs: bool = False
    tiny: bool = False
    shading: str = "shaded"
    grid_update_every: int = 16
    seed: int = 0
    vae_layout: str = "contiguous"
    vae_attention: str = "classic"
    vae_groupnorm: str = "split"
    unet_layout: str = "channels_last"
    cudnn_benchmark: bool = False
    host_checks: bool = False
    scene: str = "object"


@dataclass
class PartStats:
    median_ms: float
    min_ms: float
    max_ms: float


@dataclass
class BenchResult:
    """Medians per part, the step total and peak memory. ``to_dict`` is the ``--json`` document."""

    config: dict[str, Any]
    device: str
    device_name: str
    parts: dict[str, PartStats]
    step_ms: float  # sum of the part medians, the grid update divided by grid_update_every
    wall_ms: float  # median measured wall time of a whole step (grid update every step)
    peak_memory_bytes: int
    peak_memory_kind: str
    samples_per_step: float  # median packed samples per step
    backends: dict[str, str]
    versions: dict[str, str]
    notes: list[str] = dataclasses.field(default_factory=list)
    # CUDA: torch.cuda.max_memory_reserved over the timed steps (the caching allocator's segments, CUDA graphs'
    # private pools included, which max_memory_allocated does not count once captured); None on the CPU.
    peak_reserved_bytes: int | None = None

    @property
    def field_side_ms(self) -> float | None:
        """The field side of a step, as the goal lists it (march, encode, MLP, normals, shade, composite and their
        backward): the sum of those parts' medians. Builtin prior only: its backward is the field's alone, where
        Stable Diffusion's and IF's also run through the model (None for them). With ``render_graphs``,
        ``rays_march`` holds only the host's work before the graph's replay (cameras, view words, ``zero_grad``;
        the rays and the march are in the replay, the ``field`` part), so it is left out; without, it holds the
        rays and the march and is counted (with the camera draw, a few small host operations)."""
        if self.config.get("model") != "builtin":
            return None
        names = ["field", "shade_composite", "backward"]
        if not self.config.get("render_graphs"):
            names.insert(0, "rays_march")
        if any(n not in self.parts for n in names):
            return None
        return sum(self.parts[n].median_ms for n in names)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["parts"] = {k: dataclasses.asdict(v) for k, v in self.parts.items()}
        d["field_side_ms"] = self.field_side_ms
        return d

    def format_table(self) -> str:
        c = self.config
        mode = [c["model"] + (" (tiny)" if c["tiny"] else ""), f"ops={c['ops']}", f"scene {c.get('scene', 'fresh')}"]
        if c["compile"]:
            mode.append("torch.compile")
        if c.get("compile_vae"):
            mode.append("VAE torch.compile")
        if c["cuda_graphs"]:
            mode.append("CUDA graphs")
        if c.get("cudnn_benchmark"):
            mode.append("cuDNN benchmark")
        if c.get("host_checks"):
            mode.append("host checks")
        if c.get("field_graphs"):
            mode.append("field in CUDA graphs")
        if c.get("render_graphs"):
            mode.append("renderer in CUDA graphs")
        if c["model"] != "builtin":
            mode.append(f"UNet {c['unet_layout']}")
        if c["model"] == "sd":
            mode.append(f"VAE {c['vae_layout']}, {c['vae_attention']} attention, {c['vae_groupnorm']} GroupNorm")
        lines = [
            f"fastdream bench: {', '.join(mode)} on {self.device} ({self.device_name}); {c['resolution']}x"
            f"{c['resolution']} x{c['batch']}, {c['steps']} steps after {c['warmup']} warm-up",
            f"{'part':<32}{'median ms':>11}{'min ms':>10}{'max ms':>10}{'share':>8}",
        ]
        every = max(1, int(c["grid_update_every"]))
        for name, s in self.parts.items():
            per_step = s.median_ms / every if name == "grid_update" else s.median_ms
            share = 100.0 * per_step / self.step_ms if self.step_ms > 0 else float("nan")
            label = PART_LABELS[name] + (f" (1 step in {every})" if name == "grid_update" else "")
            lines.append(f"{label:<32}{s.median_ms:>11.2f}{s.min_ms:>10.2f}{s.max_ms:>10.2f}{share:>7.1f}%")
        lines.append(f"{'step (sum of medians)':<32}{self.step_ms:>11.2f}")
        lines.append(f"{'step wall (grid every step)':<32}{self.wall_ms:>11.2f}")
        if self.field_side_ms is not None:
            first = "render" if c.get("render_graphs") else "rays + marching, field"
            what = f"{first}, shading + compositing, backward"
            lines.append(f"{'field side':<32}{self.field_side_ms:>11.2f}  ({what})")
        mem = self.peak_memory_bytes / 2**20
        lines.append(f"peak memory: {mem:.0f} MiB ({self.peak_memory_kind}); samples/step: {self.samples_per_step:.0f}")
        if self.peak_reserved_bytes is not None:
            lines.append(
                f"peak reserved: {self.peak_reserved_bytes / 2**20:.0f} MiB (torch.cuda.max_memory_reserved: the "
                "allocator's segments, CUDA graphs' pools included)"
            )
        lines.append("backends: " + ", ".join(f"{k}={v}" for k, v in self.backends.items()))
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


# --- setup -------------------------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """The same rules as ``fastdream generate --device`` (one resolver for every command)."""
    from fastdream.run import resolve_device as resolve_run_device

    return resolve_run_device(name)


MAX_BATCH = 64  # cameras a step
MAX_RAYS = 1 << 22  # rays a step (batch x resolution^2): about 4 M


def validate(cfg: BenchConfig, device: torch.device) -> None:
    """Every check of the settings, as UserErrors naming the option."""
    if cfg.model not in MODELS:
        raise UserError(f"--model must be one of {', '.join(MODELS)}, got {cfg.model!r}")
    if cfg.ops not in OPS_CHOICES:
        raise UserError(f"ops must be one of {', '.join(OPS_CHOICES)}, got {cfg.ops!r}")
    for name, v, lo in (("--steps", cfg.steps, 1), ("--warmup", cfg.warmup, 0), ("--batch", cfg.batch, 1)):
        if not isinstance(v, int) or v < lo:
            raise UserError(f"{name} must be an integer >= {lo}, got {v!r}")
    if not isinstance(cfg.seed, int) or not 0 <= cfg.seed <= 2**63 - 1:  # generate's range
        raise UserError(f"--seed must be an integer in [0, {2**63 - 1}], got {cfg.seed!r}")
    if cfg.resolution is not None and not (isinstance(cfg.resolution, int) and 8 <= cfg.resolution <= 1024):
        raise UserError(f"--resolution must be an integer in [8, 1024], got {cfg.resolution!r}")
    rays = cfg.batch * (cfg.resolution or 64) ** 2
    if cfg.batch > MAX_BATCH or rays > MAX_RAYS:  # --batch 100000 allocated until the memory ran out
        raise UserError(
            f"--batch {cfg.batch} at {cfg.resolution or 64}x{cfg.resolution or 64} is {rays} rays a step; bench takes "
            f"at most {MAX_BATCH} cameras and {MAX_RAYS} rays (e.g. 16 at 512x512)"
        )
    if cfg.scene not in SCENES:
        raise UserError(f"--scene must be one of {', '.join(SCENES)}, got {cfg.scene!r}")
    if cfg.shading not in ("shaded", "textureless", "albedo"):
        raise UserError(f"--shading must be shaded, textureless or albedo, got {cfg.shading!r}")
    if (cfg.compile or cfg.cuda_graphs) and cfg.model == "builtin":
        raise UserError("--compile and --cuda-graphs speed up the UNet call; use them with --model sd or --model if")
    if cfg.compile_vae and cfg.model != "sd":
        raise UserError("--compile-vae compiles Stable Diffusion's VAE encoder; use it with --model sd")
    if cfg.cuda_graphs and device.type != "cuda":
        raise UserError("--cuda-graphs needs a CUDA device; drop it or use --device cuda")
    if cfg.field_graphs and device.type != "cuda":
        raise UserError("--field-graphs needs a CUDA device; drop it or use --device cuda")
    if cfg.cudnn_benchmark and device.type != "cuda":
        raise UserError("--cudnn-benchmark tunes cuDNN's convolutions; use it with --device cuda")
    if cfg.render_graphs and device.type != "cuda":
        raise UserError("--render-graphs needs a CUDA device; drop it or use --device cuda")
    if cfg.render_graphs and cfg.field_graphs:
        raise UserError("--render-graphs already replays the field; use one of --render-graphs and --field-graphs")
    if cfg.field_graphs and cfg.shading == "albedo":
        raise UserError(
            "--field-graphs replays the field with its normals; use it with --shading shaded or textureless"
        )
    if cfg.unet_layout not in ("channels_last", "contiguous"):
        raise UserError(f"--unet-layout must be channels_last or contiguous, got {cfg.unet_layout!r}")
    if cfg.vae_layout not in ("channels_last", "contiguous"):
        raise UserError(f"--vae-layout must be channels_last or contiguous, got {cfg.vae_layout!r}")
    if cfg.vae_groupnorm not in ("native", "split"):
        raise UserError(f"--vae-groupnorm must be native or split, got {cfg.vae_groupnorm!r}")
    if cfg.vae_attention not in ("sdpa", "classic"):
        raise UserError(f"--vae-attention must be sdpa or classic, got {cfg.vae_attention!r}")
    if cfg.model in ("sd", "if") and device.type == "cpu" and not cfg.tiny:
        raise UserError(
            f"--model {cfg.model} builds the full-size UNet, far too slow on a CPU; add --tiny for a smoke run "
            "or use --device cuda"
        )


def run_config(cfg: BenchConfig, device: torch.device, resolution: int) -> RunConfig:
    """The trainer's resolved configuration for this device (tiny: a toy field, grid and sample count)."""
    rc = RunConfig(prompt=PROMPT, device=device.type)
    rc.guidance.model = "builtin" if cfg.model == "builtin" else cfg.model
    rc.render.resolution = resolution
    rc.render.background = "mlp"  # the environment map: the costliest background, timed in every model
    rc.optim.seed = cfg.seed
    if cfg.tiny:
        rc.field = FieldConfig(levels=4, log2_table_size=10, finest_resolution=64, hidden=16)
        rc.render.grid_resolution = 16
        rc.render.samples_per_ray = 32
    if cfg.scene == "object":
        rc.field.blob_radius = OBJECT_BLOB_RADIUS
    return resolve(rc, device.type)


def _diffusers_models(cfg: BenchConfig, device: torch.device) -> dict[str, Any]:
    try:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    except ImportError as e:
        raise UserError(f"--model {cfg.model} needs diffusers ({e}); pip install diffusers, or --model builtin") from e
    sd = cfg.model == "sd"
    unet_cfg = (TINY_SD_UNET if sd else TINY_IF_UNET) if cfg.tiny else (SD21_BASE_UNET if sd else IF_I_XL_UNET)
    from diffusers.utils import logging as diffusers_logging

    # Casting a freshly built model with .to(dtype) logs a warning meant for from_pretrained users.
    diffusers_logging.set_verbosity_error()
    torch.manual_seed(cfg.seed)
    # Built on the device: random init of ~1-4 B parameters is seconds there, minutes on the host.
    with torch.device(device):
        out: dict[str, Any] = {"unet": UNet2DConditionModel(**unet_cfg)}
        if sd:
            out["vae"] = AutoencoderKL(**(TINY_SD_VAE if cfg.tiny else SD21_BASE_VAE))
    out["scheduler"] = DDPMScheduler(**(SD21_BASE_SCHEDULER if sd else IF_SCHEDULER))
    return out


def build_guidance(cfg: BenchConfig, device: torch.device) -> Any:
    """The guidance backend of ``cfg.model`` on ``device``, prepared (random text embeddings for sd/if)."""
    if cfg.model == "builtin":
        from fastdream.builtin.dataset import DatasetConfig
        from fastdream.guidance.builtin import BuiltinGuidance

        data = DatasetConfig(resolution=16, cameras_per_view=2) if cfg.tiny else None
        g = BuiltinGuidance(device, data_config=data)
        g.prepare(PROMPT)
        return g
    from fastdream.guidance.base import VIEW_WORDS

    models = _diffusers_models(cfg, device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    common = {
        "scheduler": models["scheduler"],
        "text_encoder": None,
        "tokenizer": None,
        "device": device,
        "unet_channels_last": cfg.unet_layout == "channels_last",
    }
    if cfg.model == "sd":
        from fastdream.guidance.stable_diffusion import StableDiffusionGuidance

        g = StableDiffusionGuidance(
            unet=models["unet"],
            vae=models["vae"],
            dtype=dtype,
            render_resolution=16 if cfg.tiny else 64,
            vae_channels_last=cfg.vae_layout == "channels_last",
            vae_attention=cfg.vae_attention,
            vae_groupnorm=cfg.vae_groupnorm,
            name="sd-2.1-base-shaped (random weights)",
            **common,
        )
        length, dim = TINY_TEXT_SHAPE if cfg.tiny else SD21_TEXT_SHAPE
    else:
        from fastdream.guidance.deepfloyd_if import DeepFloydIFGuidance

        g = DeepFloydIFGuidance(unet=models["unet"], dtype=dtype, name="if-i-xl-sized (random weights)", **common)
        length, dim = TINY_TEXT_SHAPE if cfg.tiny else IF_TEXT_SHAPE
    gen = torch.Generator().manual_seed(cfg.seed)
    # Unit-variance random embeddings: the shapes and dtypes of real ones, which is all the timing depends on.
    cond = torch.randn(len(VIEW_WORDS), length, dim, generator=gen)
    uncond = torch.randn(1, length, dim, generator=gen)
    g.set_text_embeddings(cond, uncond, PROMPT)
    if cfg.compile or cfg.cuda_graphs or cfg.compile_vae:
        accelerate(g, compile=cfg.compile, cuda_graphs=cfg.cuda_graphs, compile_vae=cfg.compile_vae)
    return g


# --- the step ----------------------------------------------------------------------------------------------------


class _Clock:
    """Marks between parts: CUDA events on CUDA (no synchronisation inside the step), else perf_counter."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.marks: list[tuple[str, Any]] = []

    def start(self) -> None:
        self.sync()
        self.t0 = time.perf_counter()
        self.marks = [("", self._now())]

    def _now(self) -> Any:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def mark(self, part: str) -> None:
        self.marks.append((part, self._now()))

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def finish(self) -> tuple[dict[str, float], float]:
        """(ms per part, wall ms of the whole step)."""
        self.sync()
        wall = (time.perf_counter() - self.t0) * 1e3
        out: dict[str, float] = {}
        for (_, a), (name, b) in zip(self.marks[:-1], self.marks[1:]):
            out[name] = out.get(name, 0.0) + (a.elapsed_time(b) if self.cuda else (b - a) * 1e3)
        return out, wall


class _NoClock:
    def mark(self, part: str) -> None:
        pass


class StepRunner:
    """The models, optimiser and random streams of a run, and one trainer step in timed parts."""

    def __init__(self, cfg: BenchConfig, device: torch.device, guidance: Any, resolution: int) -> None:
        from fastdream.guidance.base import SDSConfig

        self.cfg, self.device, self.guidance, self.resolution = cfg, device, guidance, resolution
        self.run = run_config(cfg, device, resolution)
        self.field, self.background, self.grid = build_models(self.run, device)
        self.density_and_normals = self.field.density_and_normals
        if cfg.field_graphs:
            from fastdream.field_graphs import GraphedDensityAndNormals

            self.density_and_normals = GraphedDensityAndNormals(self.field)
        self.render_graphs = None
        if cfg.render_graphs:
            from fastdream.render_graphs import GraphedRender

            self.render_graphs = GraphedRender(self.field, self.background, self.grid)
        self.optimizer = build_optimizer(self.run, self.field, self.background)
        self.amp = device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if self.amp else None
        self.camera_gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.noise_gen = torch.Generator(device=device).manual_seed(cfg.seed + 2)
        self.sds_cfg = SDSConfig(t_range=tuple(self.run.guidance.t_range), weighting=self.run.guidance.weighting)
        self.n_samples = 0
        self._skipped = torch.zeros((), dtype=torch.int64)  # steps with a non-finite loss or gradient, skipped

    @property
    def skipped(self) -> int:
        """Steps skipped for a non-finite loss or gradient (as the trainer does); read once, at the end."""
        return int(self._skipped)

    def warm_grid(self) -> None:
        """One warm-up grid update (every cell), as in the first steps of a run: empty space is skipped after."""
        self._grid_update(warmup=True)

    def _grid_update(self, warmup: bool) -> None:
        self.field.eval()
        try:
            with torch.autocast("cuda", dtype=torch.float16, enabled=self.amp):
                self.grid.update(self.field.density, warmup=warmup, generator=self.noise_gen)
        finally:
            self.field.train()

    def render(self, cams: Any, clock: Any = None) -> dict[str, Any]:
        """fastdream.renderer.render written out in parts: returns image [B, 3, H, W] and the regulariser terms."""
        clock = clock or _NoClock()
        if self.render_graphs is not None:
            return self._render_graphed(cams, clock)
        h = w = self.resolution
        r, s = self.run.render, self.run.shading
        cams = cams.to(self.device)
        b = len(cams)
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.amp):
            rays_o, rays_d = get_rays(cams, h, w)
            n_rays = rays_o.shape[0]
            samples = march_rays(
                rays_o,
                rays_d,
                self.grid,
                step=2.0 * r.bound / r.samples_per_ray,
                bound=r.bound,
                jitter=r.jitter,
                generator=self.noise_gen,
            )
            clock.mark("rays_march")
            positions = samples.positions
            if self.cfg.shading == "albedo":
                sigma, albedo = self.field(positions)
                normals = None
            else:
                sigma, albedo, normals = self.density_and_normals(positions)
            clock.mark("field")
            if normals is None:
                colors = albedo
            else:
                amb = torch.as_tensor(s.ambient, dtype=torch.float32, device=self.device)
                dif = torch.as_tensor(s.diffuse, dtype=torch.float32, device=self.device)
                bounds = samples.offsets[torch.arange(0, b + 1, device=self.device) * (h * w)].tolist()
                colors = torch.cat(
                    [
                        shade(
                            albedo[a:e],
                            normals[a:e],
                            positions[a:e],
                            cams.light[i].float(),
                            amb,
                            dif,
                            self.cfg.shading,
                        )
                        for i, (a, e) in enumerate(zip(bounds[:-1], bounds[1:]))
                    ]
                )
            bg = self.background(rays_d)
            comp = composite(sigma, colors.float(), samples, n_rays, background=bg)
            image = comp.image.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous()
            reg = self.run.optim.lambda_opacity * opacity_loss(comp.opacity)
            if normals is not None:
                orient = orientation_loss(comp.weights, normals, samples.directions, samples.ray_indices, n_rays)
                reg = reg + self.run.optim.lambda_orient * orient
        self.n_samples = int(positions.shape[0])
        return {"image": image, "reg": reg, "opacity": comp.opacity}

    def _render_graphed(self, cams: Any, clock: Any) -> dict[str, Any]:
        """:meth:`render` through :class:`fastdream.render_graphs.GraphedRender`: its "field" part is rays,
        marching, field, shading, background and compositing (the "rays + marching" part is empty)."""
        h = w = self.resolution
        r, s = self.run.render, self.run.shading
        clock.mark("rays_march")  # the cameras stay on the host, as the trainer's: one packed copy in the graph call
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.amp):
            out = self.render_graphs(
                self.field,
                self.background,
                cams,
                h,
                w,
                shading_mode=self.cfg.shading,
                grid=self.grid,
                samples_per_ray=r.samples_per_ray,
                bound=r.bound,
                ambient=s.ambient,
                diffuse=s.diffuse,
                jitter=r.jitter,
                generator=self.noise_gen,
            )
            clock.mark("field")
            reg = self.run.optim.lambda_opacity * out["opacity_loss"]  # the regularisers come from the graph
            if out["orientation_loss"] is not None:
                reg = reg + self.run.optim.lambda_orient * out["orientation_loss"]
        self.n_samples = out["n_samples"]
        return {"image": out["image"], "reg": reg, "opacity": out["ray_opacity"]}

    def sds_loss(self, images: torch.Tensor, words: list[str], clock: Any = None) -> torch.Tensor:
        """The guidance's ``sds_loss`` with a mark between the encoder and the denoiser (diffusers backends);
        the builtin prior's ``sds_loss`` is one part."""
        clock = clock or _NoClock()
        g = self.guidance
        if not hasattr(g, "encode_images"):
            loss, _ = g.sds_loss(images, words, self.sds_cfg, generator=self.noise_gen)
            clock.mark("guidance_denoise")
            return loss
        # DiffusersGuidance.sds_loss, written out with the same public pieces.
        z = g.encode_images(images.to(g.device))
        clock.mark("guidance_encode")
        b = z.shape[0]
        t = sample_timesteps(b, g.num_train_timesteps, self.sds_cfg.t_range, self.noise_gen, g.device)
        eps = torch.randn(z.shape, generator=self.noise_gen, device=self.noise_gen.device, dtype=torch.float32)
        eps = eps.to(g.device)
        with torch.no_grad():
            z_t = add_noise(z.detach().float(), eps, t, g.alphas_cumprod)
            eps_u, eps_c = g.predict_eps(z_t, t, words)
            scale = g.default_guidance_scale
            grad = sds_grad(eps_u, eps_c, eps, t, g.alphas_cumprod, scale, self.sds_cfg.weighting)
        loss = sds_loss_from_grad(z, grad)
        clock.mark("guidance_denoise")
        return loss

    def step(self, clock: Any = None, grid_update: bool = True) -> torch.Tensor:
        """One trainer step; returns the (detached) loss. grid_update: end with an occupancy-grid update (the
        trainer's every 16th step; the part medians time one every step and amortise it)."""
        clock = clock or _NoClock()
        if self.cfg.cuda_graphs and (self.cfg.compile or self.cfg.compile_vae):
            torch.compiler.cudagraph_mark_step_begin()
        cams = sample_cameras(self.run.camera, self.cfg.batch, self.camera_gen)
        words = [view_word(float(e), float(a)) for e, a in zip(cams.elevation, cams.azimuth)]
        if hasattr(self.guidance, "set_shading_mode"):  # as the trainer: a prior that conditions on it (builtin)
            self.guidance.set_shading_mode(self.cfg.shading)
        if hasattr(self.guidance, "set_cameras"):  # and on the pose
            self.guidance.set_cameras(cams.elevation, cams.azimuth)
        self.optimizer.zero_grad(set_to_none=True)
        out = self.render(cams, clock)
        clock.mark("shade_composite")
        loss = self.sds_loss(out["image"].float(), words, clock) + out["reg"]
        # As Trainer.train_step: a non-finite loss or gradient skips the step, decided on the device (no host
        # synchronisation under the CUDA gradient scaler); host_checks reads both checks where they are made.
        finite = scaled_backward(loss, self.scaler)
        if self.cfg.host_checks:
            bool(finite)
        clock.mark("backward")
        ok = apply_step(self.optimizer, self.scaler, finite)
        if self.cfg.host_checks:
            bool(ok)
        self._skipped = self._skipped.to(ok.device) + (~ok).long()
        clock.mark("optimizer")
        if grid_update:
            self._grid_update(warmup=False)
            clock.mark("grid_update")
        return loss.detach()


# --- the benchmark -----------------------------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    def version(pkg: str) -> str:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("triton", "diffusers"):
        out[pkg] = version(pkg)
    try:
        root = Path(__file__).resolve().parent.parent
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
        if commit:
            out["commit"] = commit
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


# libkineto's own log lines (written by C++ to file descriptor 2, past Python): "USDT:... profiler_start", and on a
# machine without a GPU "ERROR:... gpuGetDeviceCount failed with code 35", which reads like a failure but is none.
_KINETO_LOG = re.compile(rb"^(USDT|INFO|WARNING|ERROR):\d{4}-\d\d-\d\d [^\]]*\.cpp:\d+\] ")


@contextlib.contextmanager
def _without_kineto_logs() -> Iterator[None]:
    """Collect what is written to stderr (the file descriptor) meanwhile, then pass on all but libkineto's logs."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            rest = [ln for ln in held.read().splitlines(keepends=True) if not _KINETO_LOG.match(ln)]
            if rest:
                sys.stderr.write(b"".join(rest).decode(errors="replace"))
                sys.stderr.flush()


def _profile(runner: StepRunner, device: torch.device, steps: int, path: Path) -> None:
    """``steps`` more steps under torch.profiler; write its table of ops and kernels by self time to ``path``
    (device time on CUDA, CPU time on the CPU), and a Chrome trace beside it (``path`` + ``.trace.json``)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with _without_kineto_logs(), profile(activities=acts) as prof:
        for _ in range(steps):
            runner.step()
        if cuda:
            torch.cuda.synchronize(device)
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    head = f"fastdream bench --profile: {steps} steps, {_device_name(device)}, sorted by {sort}\n"
    try:
        path.write_text(head + prof.key_averages().table(sort_by=sort, row_limit=60, max_name_column_width=90) + "\n")
        prof.export_chrome_trace(str(path) + ".trace.json")
    except OSError as e:  # the folder was checked before the run: a full disk, a mount gone away
        raise UserError(f"--profile {path}: cannot write ({e.strerror or type(e).__name__}); pick another path") from e


SCALER_SETTLE_STEPS = 40  # at most, after --warmup: PyTorch's scaler starts at 2**16 and halves on each overflow


def settle_gradient_scaler(runner: StepRunner, calm: int = 3) -> int:
    """Untimed steps (at most SCALER_SETTLE_STEPS) until the fp16 gradient scaler has found its scale: ``calm``
    steps in a row without a skip. Its first overflows (8-12 steps on SD-shaped weights, session 12) were inside
    the timed steps when --warmup was short, where a skipped step's optimizer is cheaper. Returns the steps run
    (0 without a scaler: the CPU)."""
    if runner.scaler is None:
        return 0
    quiet = 0
    for n in range(1, SCALER_SETTLE_STEPS + 1):
        before = runner.skipped
        runner.step()
        quiet = quiet + 1 if runner.skipped == before else 0
        if quiet >= calm:
            return n
    return SCALER_SETTLE_STEPS


def run_bench(cfg: BenchConfig, profile: Path | None = None) -> BenchResult:
    """Build everything for ``cfg``, run ``warmup`` + ``steps`` steps and return the medians.

    profile: also profile a few more steps (at most 5, after the timed ones, so the timings are not the
    profiler's) and write the table there (see :func:`_profile`)."""
    device = resolve_device(cfg.device)
    validate(cfg, device)
    forced = "reference" if cfg.ops == "reference" else None
    cudnn_benchmark = torch.backends.cudnn.benchmark
    if cfg.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    try:
        return _run_validated(cfg, device, forced, profile)
    finally:
        torch.backends.cudnn.benchmark = cudnn_benchmark


def _run_validated(cfg: BenchConfig, device: torch.device, forced: str | None, profile: Path | None) -> BenchResult:
    with use_backend(forced):
        guidance = build_guidance(cfg, device)
        resolution = cfg.resolution or int(guidance.resolution)
        runner = StepRunner(cfg, device, guidance, resolution)
        runner.warm_grid()
        for _ in range(cfg.warmup):
            runner.step()
        settled = settle_gradient_scaler(runner)
        skipped_before = runner.skipped
        clock = _Clock(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        per_part: dict[str, list[float]] = {}
        walls, samples = [], []
        for _ in range(cfg.steps):
            clock.start()
            runner.step(clock)
            parts, wall = clock.finish()
            for k, v in parts.items():
                per_part.setdefault(k, []).append(v)
            walls.append(wall)
            samples.append(runner.n_samples)
        # read before the profiled steps, which are not timed
        skipped_timed = runner.skipped - skipped_before
        if device.type == "cuda":
            peak, kind = int(torch.cuda.max_memory_allocated(device)), "torch.cuda.max_memory_allocated, timed steps"
            reserved = int(torch.cuda.max_memory_reserved(device))
        else:
            reserved = None
            peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "max RSS of the process"
        if profile is not None:
            _profile(runner, device, min(5, max(1, cfg.steps)), profile)
        backends = {op: forced or _dispatch.select(op, device) for op in FIELD_OPS}
    stats = {k: PartStats(statistics.median(v), min(v), max(v)) for k in PARTS if (v := per_part.get(k)) is not None}
    every = max(1, cfg.grid_update_every)
    step_ms = sum(s.median_ms / every if k == "grid_update" else s.median_ms for k, s in stats.items())
    notes = []
    if cfg.model in ("sd", "if"):
        notes.append("random weights: timings only (the SDS gradient is meaningless)")
    if settled:
        notes.append(f"{settled} more untimed steps after the warm-up while the fp16 gradient scaler found its scale")
    if skipped_before or skipped_timed:
        notes.append(
            f"{skipped_before + skipped_timed} steps had a non-finite loss or gradient (no optimizer update), "
            f"{skipped_timed} of them timed"
        )
    if device.type == "cpu":
        notes.append("CPU timings are wall time and depend on the machine's load")
    if cfg.field_graphs:
        fg = runner.density_and_normals
        notes.append(
            f"field CUDA graphs: {fg.captures} captured (sample-count buckets, ~25 ms each), {fg.replays} replays; "
            "a bucket's first call runs eagerly"
        )
    if cfg.render_graphs:
        rg = runner.render_graphs
        notes.append(
            f"renderer CUDA graphs: {rg.captures} captured, {rg.replays} replays, {rg.eager_calls} eager calls, "
            f"{rg.overflows} rendered again with more rows; 'field forward' is the whole render (rays, marching, "
            "field, shading, environment map, compositing)"
            + (f"; graphs turned off: {rg.disabled}" if rg.disabled else "")
        )
    config = dataclasses.asdict(cfg) | {"resolution": resolution, "device": str(device)}
    return BenchResult(
        config=config,
        device=str(device),
        device_name=_device_name(device),
        parts=stats,
        step_ms=step_ms,
        wall_ms=statistics.median(walls),
        peak_memory_bytes=peak,
        peak_memory_kind=kind,
        samples_per_step=statistics.median(samples) if samples else math.nan,
        backends=backends,
        versions=_versions(),
        notes=notes,
        peak_reserved_bytes=reserved,
    )
