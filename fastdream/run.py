# SPDX-License-Identifier: Apache-2.0
"""A run folder from start to end: checks before anything is written, training, exports.

:func:`plan_generate` does every check (settings, device, output folder, resume) without touching the disk;
:func:`execute` loads the guidance (which may still refuse the model or the prompt), only then writes into the
folder, trains and exports. Bad input therefore never damages what a folder already holds.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastdream import checkpoint as ckpt
from fastdream.backends import warn_if_extension_missing
from fastdream.config import (
    WITHDRAWN_MODELS,
    RunConfig,
    check_builtin_light,
    field_state_bytes,
    is_builtin,
    option_name,
    resolve,
    slugify,
    validate,
)
from fastdream.errors import UserError

CONFIG = "config.json"
# What a run writes into its folder: --overwrite deletes these and nothing else.
OUTPUTS = (CONFIG, ckpt.CHECKPOINT_DIR, "previews", "turntable.mp4", "turntable.gif", "mesh.glb", "mesh.obj")
# Settings --resume takes from the command line; everything else comes from the saved config.json.
RESUME_OVERRIDES = {"steps": ("optim", "steps"), "save_every": ("optim", "save_every"),
                    "preview_every": ("optim", "preview_every"), "device": (None, "device"),
                    "cuda_graphs": ("guidance", "cuda_graphs"),
                    "compile_vae": ("guidance", "compile_vae")}  # fmt: skip


def expand_user(path: str, option: str) -> Path:
    """``~`` and ``~user`` expanded, or a UserError naming ``option`` (an unknown user was a traceback)."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        user = str(path).split("/", 1)[0]
        raise UserError(f"{option} {path}: {user} names no user's home folder here; give the path in full") from None


def resolve_device(name: str) -> torch.device:
    """ "auto" | "cpu" | "cuda" | "cuda:N" -> a usable device, or UserError. ``cuda:N`` also becomes the process'
    current CUDA device: the streams, events and CUDA-graph captures a run makes without naming a device (the
    trainer's step outcomes, the bench's timers, every graph capture) are the current device's, and on any GPU but
    the first they would otherwise wait on, time or capture GPU 0's idle stream (and open a context there)."""
    if not isinstance(name, str):
        raise UserError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda was asked but no CUDA GPU is visible; use --device cpu (or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) visible")
        if dev.index is not None:
            try:
                torch.cuda.set_device(dev)
            except RuntimeError as e:  # e.g. a GPU in exclusive-process mode that another process holds
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
                raise UserError(f"--device {name}: the GPU cannot be used ({first})") from None
    elif dev.type != "cpu" or dev.index not in (None, 0):
        # torch takes "cpu:5" and puts everything on the one CPU device; refuse it rather than pretend.
        raise UserError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    return dev


def read_config(run_dir: Path) -> RunConfig:
    path = run_dir / CONFIG
    try:
        return RunConfig.from_json(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{run_dir} holds no fastdream run ({CONFIG} missing)") from None
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"{path} is unreadable or not a fastdream config ({type(e).__name__}); fix or delete it") from e


@dataclass
class Plan:
    cfg: RunConfig  # resolved, validated
    run_dir: Path
    device: torch.device
    resume: bool
    clear: list[Path] = field(default_factory=list)  # old outputs to delete before starting (--overwrite)


def _check_writable(run_dir: Path) -> None:
    """A quick check of ``run_dir`` (or the folder that would hold it) before anything is read or loaded."""
    reason = ckpt.unwritable_reason(run_dir)
    if reason is not None:
        raise UserError(f"--out {run_dir} is not writable ({reason}); choose another --out or fix its permissions")


def _cannot_write(run_dir: Path, err: OSError) -> UserError:
    why = err.strerror or type(err).__name__
    return UserError(f"--out {run_dir}: cannot create or write the folder ({why}); choose another --out")


def missing_folders(path: Path) -> list[Path]:
    """``path`` and those of its parents that do not exist yet, deepest first: what ``mkdir(parents=True)`` makes."""
    found = []
    while not path.exists() and path != path.parent:
        found.append(path)
        path = path.parent
    return found


def probe_run_dir(run_dir: Path) -> None:
    """Create ``run_dir`` and a file in it, then remove both: the only sure test that the folder can be written
    (``os.access`` says yes to root under /proc and /sys, and on read-only mounts). Leaves the disk as it was.

    Raises:
        UserError: naming ``--out``, when the folder cannot be created or written.
    """
    created = []
    try:
        created = missing_folders(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".fastdream-probe-", dir=run_dir)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise _cannot_write(run_dir, e) from e
    finally:
        for d in created:  # deepest first; only folders this probe made, and only while empty
            try:
                d.rmdir()
            except OSError:
                break


def plan_generate(cfg: RunConfig, explicit: set[str], *, resume: bool, overwrite: bool) -> Plan:
    """Check everything about a ``generate`` call, leaving the disk as it was.

    Every check that needs no model runs here (all the settings, the device, the builtin prior's vocabulary, the
    output folder, which is created and written to once and then removed again), so that bad input is refused
    before anything slow runs and before ``--overwrite`` deletes anything.

    Args:
        cfg: the settings from the command line (unresolved). ``cfg.out`` "" or "runs/<prompt slug>" means
            the default folder.
        explicit: names of the options given on the command line (``--resume`` applies only those of
            :data:`RESUME_OVERRIDES`, and refuses others that contradict the saved run).
    """
    if not isinstance(cfg.prompt, str) or not cfg.prompt.strip():
        raise UserError('the prompt is empty; give a text prompt, e.g. fastdream generate "a red cube"')
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other; pass one of them")
    cfg = RunConfig.from_dict(cfg.to_dict())  # a copy
    if is_builtin(cfg.guidance.model):
        cfg.guidance.model = "builtin"
    if not isinstance(cfg.out, str):
        raise UserError(f"--out must be a folder name, got {cfg.out!r}")
    out = cfg.out if cfg.out and cfg.out != "runs/<prompt slug>" else os.path.join("runs", slugify(cfg.prompt))
    run_dir = expand_user(out, "--out")
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out {run_dir} is a file, not a folder; choose another --out")
    _check_writable(run_dir)
    has_config = (run_dir / CONFIG).exists()
    device = resolve_device(cfg.device)

    if resume:
        if not has_config:
            raise UserError(f"nothing to resume in {run_dir} (no {CONFIG}); run without --resume")
        saved = read_config(run_dir)
        if saved.prompt != cfg.prompt:
            raise UserError(
                f"{run_dir} holds the run of prompt {saved.prompt!r}, not {cfg.prompt!r}; pass the same prompt "
                f"to --resume, or choose another --out"
            )
        found = ckpt.list_checkpoints(run_dir)
        if not found:
            raise UserError(f"nothing to resume in {run_dir} (no checkpoint yet); start over with --overwrite")
        for name, (section, key) in RESUME_OVERRIDES.items():
            if name in explicit:
                target = getattr(saved, section) if section else saved
                src = getattr(cfg, section) if section else cfg
                setattr(target, key, getattr(src, key))
        # --model with the mirror of the withdrawn hub id the run began with: the same weights, so the same run
        if "model" in explicit and WITHDRAWN_MODELS.get(saved.guidance.model.strip().lower()) == cfg.guidance.model:
            saved.guidance.model = cfg.guidance.model
        # repeating the original command line with --resume is fine: only options that change the run are refused
        ignored = sorted(n for n in explicit - set(RESUME_OVERRIDES) - {"out"} if _changes_saved(n, cfg, saved))
        if ignored:
            names = ", ".join("--" + n.replace("_", "-") for n in ignored)
            raise UserError(
                f"--resume continues {run_dir} with its saved settings; only --steps, --save-every, "
                f"--preview-every, --device, --cuda-graphs and --compile-vae may change (got {names})"
            )
        saved.out = str(run_dir)
        saved.device = str(device)
        validate(saved)  # a hand-edited config.json: refused in one line, before resolve() reads it
        cfg = resolve(saved, device.type)
        validate(cfg)
        reached = found[-1][0]
        if cfg.optim.steps < reached:  # the run cannot go back; config.json must keep saying what it holds
            raise UserError(
                f"--steps {cfg.optim.steps} is below the {reached} steps {run_dir} already did; pass --steps "
                f"{reached} or more to continue it, or --overwrite (without --resume) to start over"
            )
        _check_cheap(cfg, device)
        probe_run_dir(run_dir)
        reason = ckpt.unwritable_reason(run_dir / ckpt.CHECKPOINT_DIR)  # else it fails at the first save
        if reason is not None:
            raise UserError(f"cannot resume {run_dir}: its checkpoints cannot be saved ({reason})")
        return Plan(cfg, run_dir, device, resume=True)

    cfg.out = str(run_dir)
    cfg.device = str(device)
    validate(cfg)
    cfg = resolve(cfg, device.type)
    validate(cfg)
    check_builtin_light(cfg)
    _check_cheap(cfg, device)
    clear = [run_dir / name for name in OUTPUTS if (run_dir / name).exists()]
    if clear and not overwrite:
        what = "a run" if has_config else "outputs of a run"
        if has_config:
            try:
                what = f"the run of prompt {read_config(run_dir).prompt!r}"
            except UserError:
                pass
        raise UserError(
            f"--out {run_dir} already holds {what}; pass --resume to continue it, --overwrite to replace it, "
            f"or choose another --out"
        )
    probe_run_dir(run_dir)
    return Plan(cfg, run_dir, device, resume=False, clear=clear)


def _check_cheap(cfg: RunConfig, device: torch.device, prompt: bool = True) -> None:
    """The checks of the model settings that need no model loaded (``prompt``: the builtin prior's vocabulary
    too; a --prompts batch checks each prompt as it comes)."""
    if cfg.guidance.cuda_graphs and device.type != "cuda":
        raise UserError(
            f"{option_name('guidance.cuda_graphs')} needs a CUDA device; use --device cuda, or drop it "
            "(--no-cuda-graphs on --resume of a run saved with it)"
        )
    if cfg.guidance.compile_vae and device.type != "cuda":
        raise UserError(
            f"{option_name('guidance.compile_vae')} needs a CUDA device; use --device cuda, or drop it "
            "(--no-compile-vae on --resume of a run saved with it)"
        )
    check_memory(cfg, device)
    if is_builtin(cfg.guidance.model):
        if not prompt:
            return
        from fastdream.builtin.vocabulary import parse_prompt

        parse_prompt(cfg.prompt)  # UserError: outside the vocabulary (the message lists it)
    else:
        from fastdream.guidance.loading import check_model_name

        check_model_name(cfg.guidance.model)  # a missing local folder, before --overwrite deletes anything


def available_memory(device: torch.device) -> int | None:
    """Bytes a new allocation can take on ``device`` now (free GPU memory; on the CPU the smaller of the kernel's
    MemAvailable and what the cgroup limit leaves), or None when it cannot be told."""
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except RuntimeError:
            return None
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:  # cgroup v2: a container's limit, which the OOM killer enforces whatever MemAvailable says
        cg = Path("/sys/fs/cgroup")
        limit = (cg / "memory.max").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int((cg / "memory.current").read_text().strip()))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def check_memory(cfg: RunConfig, device: torch.device) -> None:
    """Refuse field settings whose training state alone cannot fit, and a mesh resolution whose export cannot
    (the OOM killer ends such a run with no message, the mesh only at the very end). ``cfg`` resolved. Renders
    need more on top; this only catches the settings that cannot work."""
    from fastdream.export import check_mesh_memory

    check_mesh_memory(cfg.export.mesh_resolution, option_name("export.mesh_resolution"))  # else at the very end
    need = field_state_bytes(cfg.field, device.type)
    have = available_memory(device)
    if have is not None and need > have:
        f, gib = cfg.field, 2**30
        where = "free on the GPU" if device.type == "cuda" else "available"
        raise UserError(
            f"the field's training state needs about {need / gib:.1f} GiB (hash table {f.levels} levels x "
            f"2^{f.log2_table_size} entries x {f.features} features, float32, with gradients and Adam moments) but "
            f"{have / gib:.1f} GiB is {where}; lower --set field.log2_table_size, field.levels or field.features"
        )


_OPTION_FIELDS = {"model": ("guidance", "model"), "albedo_warmup": ("shading", "albedo_warmup_steps")}


def _changes_saved(option: str, cfg: RunConfig, saved: RunConfig) -> bool:
    """Whether the command-line option ``option`` (its argparse dest) sets a value other than the saved run's.
    Unknown mappings (e.g. ``--set``) count as changes; "auto" (None) never does."""
    given, kept = cfg.to_dict(), saved.to_dict()
    section, key = _OPTION_FIELDS.get(option, (None, option))
    if section is None:
        section = next((s for s, v in given.items() if isinstance(v, dict) and option in v), None)
    if section is None or not isinstance(given.get(section), dict) or key not in given[section]:
        return True
    value = given[section][key]
    as_json = lambda v: json.dumps(v, sort_keys=True)  # noqa: E731 (tuples and lists compare equal)
    return value is not None and as_json(value) != as_json(kept.get(section, {}).get(key))


@dataclass
class RunResult:
    step: int
    skipped: int
    interrupted: bool
    checkpoint: Path | None
    seconds: float
    outputs: list[Path]
    notes: list[str]
    steady_step_seconds: float | None = None  # see fastdream.train.TrainResult
    steady_from: int | None = None


def _guidance_kwargs(cfg: RunConfig) -> dict:
    """``load_guidance``'s settings for this run, beyond the model and the device."""
    kw = {}
    if is_builtin(cfg.guidance.model):  # its data are drawn from this run's camera distribution
        from fastdream.builtin.dataset import DatasetConfig

        cam = cfg.camera
        kw["data_config"] = DatasetConfig(
            distance_range=tuple(cam.distance_range),
            fov_range=tuple(cam.fov_range),
            cameras_per_view=cfg.guidance.builtin_cameras_per_view,
            # grey: a new run with coloured light is refused (config.check_builtin_light); one saved before that
            # check resumes with each colour's mean
            ambient=float(sum(cfg.shading.ambient) / 3),
            diffuse=float(sum(cfg.shading.diffuse) / 3),
            elevation_range=tuple(map(float, cam.elevation_range)),  # floats: 30 and 30.0 are one cache key
            azimuth_range=tuple(map(float, cam.azimuth_range)),
            uniform_sphere_elevation=bool(cam.uniform_sphere_elevation),
            light_distance_range=tuple(map(float, cam.light_distance_range)),
            light_jitter=float(cam.light_jitter),
        )
        kw["gamut_clip"] = bool(cfg.guidance.builtin_gamut_clip)
        kw["pose_width"] = cfg.guidance.builtin_pose_width
    return kw


def guidance_key(cfg: RunConfig, device: torch.device | str) -> str:
    """What :func:`load_guidance_for` builds depends on, and nothing else: two runs with the same key can share one
    loaded guidance (``fastdream generate --prompts`` loads its model once), each with its own
    :func:`prepare_guidance`."""
    g = cfg.guidance
    model = "builtin" if is_builtin(g.model) else g.model
    return repr((model, str(torch.device(device)), sorted(_guidance_kwargs(cfg).items()), g.cuda_graphs, g.compile_vae))


def load_guidance_for(cfg: RunConfig, device: torch.device):
    """The run's guidance model, loaded and (``--cuda-graphs``, ``--compile-vae``) accelerated, not yet prepared
    for a prompt (:func:`prepare_guidance`)."""
    from fastdream.guidance import load_guidance

    if cfg.guidance.cuda_graphs and torch.device(device).type != "cuda":
        raise UserError(
            "--cuda-graphs needs a CUDA device; use --device cuda, or drop it (--no-cuda-graphs on --resume of a "
            "run saved with it)"
        )
    model = "builtin" if is_builtin(cfg.guidance.model) else cfg.guidance.model
    guidance = load_guidance(model, device, **_guidance_kwargs(cfg))
    if cfg.guidance.compile_vae and not hasattr(guidance, "vae_mean"):
        raise UserError(
            f"{option_name('guidance.compile_vae')} compiles Stable Diffusion's VAE encoder; {cfg.guidance.model} "
            "has none (DeepFloyd IF denoises pixels): drop it (--no-compile-vae on --resume of a run saved with it)"
        )
    g = cfg.guidance
    if (g.cuda_graphs or g.compile_vae) and not is_builtin(g.model):  # the field: fastdream.train.Trainer
        from fastdream.guidance.graphs import accelerate

        accelerate(guidance, cuda_graphs=g.cuda_graphs, compile_vae=g.compile_vae)
    return guidance


def prepare_guidance(guidance, cfg: RunConfig) -> None:
    """``guidance.prepare`` for the run's prompt; a prompt the model refuses is a UserError."""
    try:
        guidance.prepare(cfg.prompt, negative_prompt=cfg.guidance.negative_prompt)
    except ValueError as e:  # e.g. a prompt outside the builtin vocabulary
        raise UserError(str(e).splitlines()[0] if str(e) else "the prompt was refused by the model") from e


def load_prepared_guidance(cfg: RunConfig, device: torch.device):
    """:func:`load_guidance_for`, then :func:`prepare_guidance`."""
    guidance = load_guidance_for(cfg, device)
    prepare_guidance(guidance, cfg)
    return guidance


def skipped_note(skipped: int, skipped_loss: int, fp16: bool) -> str:
    """What the skipped steps were. Under fp16 a step whose scaled gradients overflow is skipped and the gradient
    scaler lowers its scale: from PyTorch's start of 2**16, a few such steps early in a run are usual."""
    parts = []
    if skipped_loss:
        parts.append(f"{skipped_loss} with a NaN/inf loss")
    if skipped > skipped_loss:
        why = " (fp16: the gradient scaler lowered its scale after each, usual in the first steps)" if fp16 else ""
        parts.append(f"{skipped - skipped_loss} with NaN/inf gradients{why}")
    return f"{skipped} step(s) skipped: " + ", ".join(parts)


def clear_outputs(run_dir: Path, paths: list[Path]) -> None:
    """--overwrite: move the old run's outputs into one hidden folder of ``run_dir``, then delete that folder.

    Renames either all succeed or are undone, so a file that cannot be removed (permissions, an immutable file)
    stops the run with the old one intact, where deleting item by item left it half deleted.
    """
    if not paths:
        return
    trash = run_dir / f".overwritten-{os.getpid()}"
    moved: list[tuple[Path, Path]] = []
    try:
        trash.mkdir()
        for p in paths:
            moved.append((p, trash / p.name))
            p.rename(trash / p.name)
    except OSError as e:
        moved = moved[:-1] if moved and not moved[-1][1].exists() and not moved[-1][1].is_symlink() else moved
        for p, dest in reversed(moved):
            dest.rename(p)
        if trash.is_dir():
            trash.rmdir()
        raise UserError(
            f"--overwrite cannot move the old run's {e.filename or run_dir} aside ({e.strerror or e}); nothing "
            f"was deleted: fix the permissions of {run_dir}, or pick another --out"
        ) from e
    try:
        shutil.rmtree(trash)
    except OSError as e:
        raise UserError(
            f"--overwrite moved the old run into {trash} but cannot delete it ({e.strerror or e}); delete that "
            f"folder, then run again"
        ) from e


def execute(plan: Plan, *, progress: bool = True, export: bool = True, guidance=None) -> RunResult:
    """Load the guidance, then (only then) write into the folder, train, and export."""
    from fastdream.export import export_all
    from fastdream.train import Trainer

    cfg = plan.cfg
    if guidance is None:
        from fastdream.guidance.loading import library_progress_bars

        with library_progress_bars(progress):
            guidance = load_prepared_guidance(cfg, plan.device)
    if cfg.guidance.guidance_scale is None:  # the model's own default, recorded in config.json
        cfg.guidance.guidance_scale = float(getattr(guidance, "default_guidance_scale", 100.0))
    trainer = Trainer(cfg, guidance, plan.run_dir, plan.device)
    for folder in (ckpt.CHECKPOINT_DIR, "previews"):  # temporaries left by a kill -9 mid-write
        for stale in (plan.run_dir / folder).glob(".step_*.tmp-*"):
            stale.unlink(missing_ok=True)
    if plan.resume:
        trainer.resume()
    else:
        clear_outputs(plan.run_dir, plan.clear)
    created = missing_folders(plan.run_dir)  # a new run that fails before its first checkpoint removes them
    try:  # resumed: keep config.json in step with what the run does (steps may have grown)
        plan.run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write(plan.run_dir / CONFIG, cfg.to_json() + "\n")
    except OSError as e:  # the folder passed probe_run_dir moments ago: a full disk, a mount gone away
        raise _cannot_write(plan.run_dir, e) from e
    # Before training, not after (e.g. a prompt cut short), but after the setup's own checks, so that an error
    # there is the only line printed.
    for note in getattr(guidance, "notes", ()):
        print(note, file=sys.stderr)
    warn_if_extension_missing(plan.device)
    # else the first steps would look hung (not said again when a --prompts library's earlier run compiled it)
    if cfg.guidance.compile_vae and not getattr(getattr(guidance, "vae_mean", None), "compiled", False):
        print("note: --compile-vae: the first steps compile the VAE encoder (tens of seconds)", file=sys.stderr)
    try:
        result = trainer.train(progress=progress)
    except BaseException:
        # A new run that failed before its first checkpoint leaves no config.json behind: one would make the next
        # plain run refuse the folder ("already holds a run") with nothing in it to resume.
        if not plan.resume and ckpt.latest_checkpoint(plan.run_dir) is None:
            (plan.run_dir / CONFIG).unlink(missing_ok=True)
            # and no empty folders; previews, a partial checkpoint or anything else keeps its folder
            for d in [plan.run_dir / ckpt.CHECKPOINT_DIR, *created]:
                try:
                    d.rmdir()
                except OSError:
                    if d in created:
                        break
        raise
    outputs, notes = [], []
    if result.skipped:
        notes.append(skipped_note(result.skipped, result.skipped_loss, trainer.scaler is not None))
    rg = trainer.render_graphs
    if rg is not None:  # --cuda-graphs: say what the graphs did (a bucket's first calls run eagerly)
        off = f"; turned off after a failed capture ({rg.disabled})" if rg.disabled else ""
        notes.append(
            f"renderer CUDA graphs: {rg.captures} captured, {rg.replays} steps replayed, {rg.eager_calls} eager, "
            f"{rg.overflows} rendered again with more rows{off}"
        )
    if export and not result.interrupted:
        outputs, note = export_all(trainer.field, trainer.background, trainer.grid, cfg, plan.run_dir)
        if note:
            notes.append(note)
    return RunResult(
        result.step,
        result.skipped,
        result.interrupted,
        result.checkpoint,
        result.seconds,
        outputs,
        notes,
        result.steady_step_seconds,
        result.steady_from,
    )


def load_run(run_dir: str | Path, device: str = "auto"):
    """A finished or interrupted run's trainer (models restored from the last checkpoint), for export."""
    from fastdream.train import Trainer

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a folder; pass a run folder written by fastdream generate")
    cfg = read_config(run_dir)
    dev = resolve_device(device)
    cfg.out, cfg.device = str(run_dir), str(dev)
    try:  # a hand-edited config.json, in one line as --resume refuses it (turntable_frames=0 divided by zero)
        validate(cfg)
        cfg = resolve(cfg, dev.type)
        validate(cfg)
    except UserError as e:
        raise UserError(f"{run_dir / CONFIG} holds a setting fastdream refuses ({e}); fix or delete it") from None
    check_memory(cfg, dev)  # a run trained on a big GPU, exported on a small machine
    path = ckpt.latest_checkpoint(run_dir)
    if path is None:
        raise UserError(f"{run_dir} has no checkpoint to export from; run fastdream generate first")
    trainer = Trainer(cfg, None, run_dir, dev)
    trainer.resume(path)
    return trainer
