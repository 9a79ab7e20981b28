# SPDX-License-Identifier: Apache-2.0
"""``fastdream generate "PROMPT"``: optimise a 3D asset by SDS and write the run folder.

The command is a thin layer over :class:`fastdream.config.RunConfig`, :mod:`fastdream.run` and
:class:`fastdream.train.Trainer`. The settings are checked before anything is loaded or written: each value in
:func:`fastdream.config.validate`, a ``--set`` that contradicts an option beside it in :func:`config_from_args`,
what needs the model or the machine (the prompt's vocabulary, memory, CUDA-only options) in
:func:`fastdream.run._check_cheap`, and the output folder in :func:`fastdream.run.plan_generate`.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from fastdream.commands import HelpFormatter
from fastdream.config import (
    BACKGROUNDS,
    DEFAULT_MODEL,
    NORMAL_METHODS,
    FieldConfig,
    OptimConfig,
    RenderConfig,
    ShadingConfig,
)


class _Store(argparse.Action):
    """``store`` that also records the option as given explicitly (``--resume`` keeps the saved settings
    except those given on the command line)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        explicit = set(getattr(namespace, "_explicit", set()))
        explicit.add(self.dest)
        namespace._explicit = explicit


class _Flag(_Store):
    """An on/off switch and its negation (``--cuda-graphs``, ``--no-cuda-graphs``), off by default, that records
    the option as given explicitly, like :class:`_Store`: ``--resume`` keeps a run's saved switch unless one of the
    two is given (the negation turns off one the run was saved with, which ``--set`` cannot do on ``--resume``)."""

    def __init__(self, option_strings, dest, **kw):
        negated = ["--" + "no-" + o[2:] for o in option_strings if o.startswith("--")]
        super().__init__([*option_strings, *negated], dest, nargs=0, default=False, **kw)
        self.negations = frozenset(negated)

    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, option_string not in self.negations, option_string)


def _auto(kind: type):
    def parse(text: str):
        if text.strip().lower() == "auto":
            return "auto"
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__} or 'auto', got {text!r}") from None

    return parse


def add_parser(sub) -> argparse.ArgumentParser:
    o, r, s, f = OptimConfig(), RenderConfig(), ShadingConfig(), FieldConfig()
    p = sub.add_parser(
        "generate",
        help="text to 3D: optimise a field by SDS and export mesh + turntable",
        description="Optimise a neural field so that its renders match PROMPT under a frozen diffusion model "
        "(Score Distillation Sampling), then export mesh.glb, mesh.obj and turntable.mp4 into --out.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("prompt", metavar="PROMPT", nargs="?", help="what to make, e.g. 'a red cube'")
    p.add_argument(
        "--prompts",
        metavar="FILE",
        help="a prompt list (UTF-8, one per line; blank lines and lines whose first non-space character is # are "
        "skipped; runs of spaces count as one; duplicates run once): one run "
        "folder per prompt under --out (required), plus index.json; sharded over ranks under torchrun; rerun to "
        "resume (see fastdream.batch)",
    )
    p.add_argument("--retry-failed", action="store_true", help="with --prompts: run failed prompts again")
    p.add_argument(
        "--model",
        action=_Store,
        default=DEFAULT_MODEL,
        help="guidance model: a hub id, a local diffusers folder (Stable Diffusion 1.x/2.x or DeepFloyd IF "
        "stage I), or 'builtin' (the bundled prior of primitive shapes, needs no download)",
    )
    p.add_argument(
        "--out",
        action=_Store,
        default="runs/<prompt slug>",
        help="run folder (with --prompts: the folder that holds one run folder per prompt)",
    )
    p.add_argument(
        "--steps",
        type=_auto(int),
        action=_Store,
        default="auto",
        help="optimisation steps (auto: 800 with --model builtin, 5000 otherwise)",
    )
    p.add_argument("--seed", type=int, action=_Store, default=o.seed, help="random seed")
    p.add_argument("--device", action=_Store, default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--save-every", type=int, action=_Store, default=o.save_every, help="checkpoint every N steps")
    p.add_argument(
        "--preview-every",
        type=int,
        action=_Store,
        default=o.preview_every,
        help="preview grid every N steps (0: never)",
    )
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument(
        "--overwrite", action="store_true", help="replace the run already in --out (its outputs are deleted)"
    )
    p.add_argument("--resolution", type=int, action=_Store, default=r.resolution, help="training render size")
    p.add_argument(
        "--samples-per-ray",
        type=int,
        action=_Store,
        default=r.samples_per_ray,
        help="march samples across the bounding sphere's diameter",
    )
    p.add_argument(
        "--guidance-scale",
        type=_auto(float),
        action=_Store,
        default="auto",
        help="classifier-free guidance weight (auto: 100 for Stable Diffusion, 20 for IF, 2 for builtin)",
    )
    p.add_argument(
        "--negative-prompt",
        metavar="TEXT",
        action=_Store,
        default="",
        help="what the object should not look like: classifier-free guidance pushes away from this text instead "
        "of the empty prompt (default: none; diffusion models only)",
    )
    p.add_argument(
        "--lr",
        type=float,
        action=_Store,
        default=o.lr,
        help="Adam learning rate of the hash grid (the field's MLP: lr * optim.mlp_lr_scale, 0.1)",
    )
    p.add_argument(
        "--background",
        action=_Store,
        default="auto",
        choices=("auto", *BACKGROUNDS),
        help="mlp: a learned environment map; random: a random colour per step; white, black: that colour; auto: "
        "black with --model builtin (its images' background), mlp otherwise",
    )
    p.add_argument(
        "--albedo-warmup",
        type=_auto(int),
        action=_Store,
        default="auto",
        help="albedo-only steps at the start (auto: 10%% of --steps)",
    )
    p.add_argument(
        "--textureless-ratio",
        type=float,
        action=_Store,
        default=s.textureless_ratio,
        help="after the warm-up, probability of a textureless render (else shaded)",
    )
    p.add_argument("--ambient", type=float, nargs=3, action=_Store, default=list(s.ambient), help="ambient RGB")
    p.add_argument("--diffuse", type=float, nargs=3, action=_Store, default=list(s.diffuse), help="diffuse RGB")
    p.add_argument("--normals", action=_Store, default=f.normals, choices=NORMAL_METHODS, help="normal estimate")
    p.add_argument(
        "--lambda-orient", type=float, action=_Store, default=o.lambda_orient, help="orientation-loss weight"
    )
    p.add_argument("--lambda-opacity", type=float, action=_Store, default=o.lambda_opacity, help="opacity-loss weight")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="any other setting of config.json, e.g. --set render.turntable_frames=12 (repeatable)",
    )
    p.add_argument(
        "--cuda-graphs",
        action=_Flag,
        help="CUDA: replay the training render (rays, marching, field with normals, shading, background, "
        "compositing; forward and backward) and, for diffusion models, the UNet call and SD's VAE encoder "
        "(forward and backward) from CUDA graphs: fewer kernel launches per step",
    )
    p.add_argument(
        "--compile-vae",
        action=_Flag,
        help="CUDA, Stable Diffusion: compile the VAE encoder's forward and backward with inductor "
        "(torch.compile; with --cuda-graphs in its CUDA-graph mode). Its forward ~1.4x faster on an H100, after a "
        "compile at the start of the run",
    )
    p.add_argument("--no-export", action="store_true", help="skip the turntable and mesh export at the end")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def config_from_args(args: argparse.Namespace):
    """The RunConfig the arguments describe (unresolved: device and auto fields not filled in yet).

    Raises:
        UserError: ``--out ""`` (or ``--set out=``): an empty folder name is a mistake, not the default folder.
    """
    from fastdream.config import CLI_OPTIONS, GuidanceConfig, RunConfig, apply_overrides, is_builtin
    from fastdream.errors import UserError

    explicit = getattr(args, "_explicit", set())
    for item in args.set or []:  # a --set that contradicts an option given beside it won silently
        key = item.partition("=")[0].strip()
        flag = "PROMPT" if key == "prompt" and args.prompt is not None else CLI_OPTIONS.get(key)
        if flag == "PROMPT" or (flag is not None and flag[2:].replace("-", "_") in explicit):
            raise UserError(f"--set {key} and {flag} both give {key}; keep one of them")
    cfg = RunConfig(prompt=args.prompt, out=args.out, device=args.device)
    cfg.guidance = GuidanceConfig(
        model=args.model,
        guidance_scale=None if args.guidance_scale == "auto" else args.guidance_scale,
        negative_prompt=args.negative_prompt,
        cuda_graphs=bool(getattr(args, "cuda_graphs", False)),
        compile_vae=bool(getattr(args, "compile_vae", False)),
    )
    o, r, s, f = cfg.optim, cfg.render, cfg.shading, cfg.field
    o.steps = None if args.steps == "auto" else args.steps
    o.seed, o.save_every, o.preview_every, o.lr = args.seed, args.save_every, args.preview_every, args.lr
    o.lambda_orient, o.lambda_opacity = args.lambda_orient, args.lambda_opacity
    r.resolution, r.samples_per_ray = args.resolution, args.samples_per_ray
    r.background = None if args.background == "auto" else args.background
    s.albedo_warmup_steps = None if args.albedo_warmup == "auto" else args.albedo_warmup
    s.textureless_ratio, s.ambient, s.diffuse = args.textureless_ratio, tuple(args.ambient), tuple(args.diffuse)
    f.normals = args.normals
    cfg = apply_overrides(cfg, args.set) if args.set else cfg
    if not isinstance(cfg.out, str):  # --set out=null
        raise UserError(f"--out must be a folder path, got {cfg.out!r}")
    if not cfg.out.strip():
        raise UserError("--out is empty; give a run folder, or leave --out out to use runs/<prompt slug>")
    if is_builtin(cfg.guidance.model):  # "Builtin", " builtin": the builtin prior, spelt as config.json keeps it
        cfg.guidance.model = "builtin"
    return cfg


def run(args: argparse.Namespace) -> int:
    if args.prompts is not None:
        from fastdream.batch import run_prompts_command

        return run_prompts_command(args)
    if args.prompt is None or args.retry_failed:
        from fastdream.errors import UserError

        if args.retry_failed:
            raise UserError("--retry-failed applies to a prompt list; add --prompts FILE")
        raise UserError('give a PROMPT (fastdream generate "a red cube") or --prompts FILE')
    from fastdream import run as runs
    from fastdream.batch import sigterm_as_interrupt

    explicit = set(getattr(args, "_explicit", set())) | ({"set"} if args.set else set())
    plan = runs.plan_generate(config_from_args(args), explicit, resume=args.resume, overwrite=args.overwrite)
    out = plan.run_dir
    before = None if plan.resume else _last_checkpoint(out)  # an old run's, until --overwrite clears it
    try:
        with sigterm_as_interrupt():  # a scheduler's or `kill`'s SIGTERM saves like Ctrl-C
            result = runs.execute(plan, progress=not args.quiet, export=not args.no_export)
    except KeyboardInterrupt:
        # A second Ctrl-C during training, or one while loading or exporting: say what the folder holds now.
        last = _last_checkpoint(out)
        if last is None or last == before:
            raise
        print(f"interrupted; the last checkpoint is {last[0]}. {_continue_hint(args.prompt, out)}", file=sys.stderr)
        return 130
    if result.interrupted:
        print(
            f"interrupted at step {result.step}; checkpoint saved to {result.checkpoint}. "
            f"{_continue_hint(args.prompt, out)}",
            file=sys.stderr,
        )
        return 130
    rate = ""
    if result.steady_step_seconds is not None:  # what a longer run would take a step, warm-up left out
        rate = f"; {result.steady_step_seconds * 1e3:.1f} ms a step from step {result.steady_from + 1} on"
    print(f"done: {result.step} steps in {result.seconds:.0f} s ({result.skipped} skipped{rate}) -> {out}")
    for note in result.notes:
        print(note, file=sys.stderr)
    return 0


def _last_checkpoint(run_dir: Path) -> tuple[Path, int] | None:
    """The run folder's latest checkpoint and its mtime (which tells a new one from an old run's of the same name)."""
    from fastdream.checkpoint import latest_checkpoint

    try:
        path = latest_checkpoint(run_dir)
        return None if path is None else (path, path.stat().st_mtime_ns)
    except OSError:
        return None


def _continue_hint(prompt: str, run_dir: Path) -> str:
    """The command that continues the run, quoted for a POSIX shell (prompts hold quotes, ``$``, spaces)."""
    cmd = shlex.join(["fastdream", "generate", prompt, "--out", str(run_dir), "--resume"])
    return f"Continue with: {cmd}"
