# SPDX-License-Identifier: Apache-2.0
"""``fastdream bench``: time one SDS step in parts (see :mod:`fastdream.bench`).

Examples::

    fastdream bench                                   # builtin prior on the CPU (CUDA when visible)
    fastdream bench --model sd --device cuda          # SD-2.1-base-shaped UNet + VAE, random weights, fp16
    fastdream bench --model sd --cuda-graphs --json sd.json
    fastdream bench --model sd --reference            # the field with the pure-PyTorch ops
    fastdream bench --model if --compile              # IF-I-XL-shaped pixel-space UNet, torch.compile
    fastdream bench --model sd --profile prof.txt     # and where the time goes: kernels by self time
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fastdream.backends import warn_if_extension_missing
from fastdream.bench import MODELS, SCENES, BenchConfig, resolve_device, run_bench
from fastdream.checkpoint import unwritable_reason
from fastdream.errors import UserError


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "bench",
        help="time one SDS step in parts (medians, peak memory)",
        description="Time one SDS step part by part (marching, field, shading and compositing, the guidance's "
        "encode and denoise, backward, optimizer, grid update), with the builtin prior or a random-weight model of "
        "Stable Diffusion's or DeepFloyd IF's size: medians over --steps after --warmup, and the peak memory.",
    )
    d = BenchConfig()
    p.add_argument("--model", choices=MODELS, default=d.model, help="guidance: builtin | sd | if (default builtin)")
    p.add_argument("--device", default=d.device, help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--steps", type=int, default=d.steps, help=f"timed steps (default {d.steps})")
    p.add_argument("--warmup", type=int, default=d.warmup, help=f"untimed steps first (default {d.warmup})")
    p.add_argument("--resolution", type=int, default=None, help="render size (default: the guidance's, 64)")
    p.add_argument("--batch", type=int, default=d.batch, help=f"cameras per step (default {d.batch})")
    ops = p.add_mutually_exclusive_group()
    ops.add_argument(
        "--fused", dest="ops", action="store_const", const="fused", help="the fastest ops available (default)"
    )
    ops.add_argument(
        "--reference", dest="ops", action="store_const", const="reference", help="pure-PyTorch ops everywhere"
    )
    p.set_defaults(ops=d.ops)
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet call")
    p.add_argument(
        "--compile-vae",
        action="store_true",
        help="torch.compile the SD VAE encoder's forward and backward (--model sd; with --cuda-graphs, inductor's "
        "reduce-overhead mode instead of the VAE's own CUDA graphs)",
    )
    p.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="replay the UNet call, and the VAE encoder's forward and backward (sd), from CUDA graphs (CUDA only)",
    )
    p.add_argument(
        "--cudnn-benchmark",
        action="store_true",
        help="let cuDNN time its convolution algorithms on each shape's first call and keep the fastest "
        "(torch.backends.cudnn.benchmark; CUDA only; the UNet's and VAE's shapes are fixed, so only the warm-up pays)",
    )
    p.add_argument(
        "--host-checks",
        action="store_true",
        help="read the loss and gradient checks on the host inside each step (two waits for the GPU, as the trainer "
        "did before 2026-11-27), to time what leaving them on the device saves",
    )
    p.add_argument(
        "--field-graphs",
        action="store_true",
        help="replay the field's forward and backward (hash grid, MLP, normals) from CUDA graphs, one per "
        "sample-count bucket (fastdream.field_graphs; CUDA only, any model)",
    )
    p.add_argument(
        "--render-graphs",
        action="store_true",
        help="replay the whole render (rays, marching, field, normals, shading, environment map, compositing), "
        "forward and backward, from CUDA graphs, as generate --cuda-graphs does (fastdream.render_graphs; CUDA only)",
    )
    p.add_argument("--tiny", action="store_true", help="tiny field and tiny random models (a smoke run)")
    p.add_argument(
        "--shading", choices=("shaded", "textureless", "albedo"), default=d.shading, help="shading mode of the step"
    )
    p.add_argument("--seed", type=int, default=d.seed, help="weights, cameras and noise")
    p.add_argument(
        "--scene",
        choices=SCENES,
        default=d.scene,
        help="the field rendered: object (occupied like a trained object, 20-30k samples a 64x64 step) or fresh "
        f"(the initial blob, ~10k; what bench timed before 2026-11-27) (default {d.scene})",
    )
    p.add_argument(
        "--unet-layout",
        choices=("channels_last", "contiguous"),
        default=d.unet_layout,
        help=f"memory format of the UNet on CUDA (default {d.unet_layout})",
    )
    p.add_argument(
        "--vae-layout",
        choices=("channels_last", "contiguous"),
        default=d.vae_layout,
        help=f"memory format of the SD VAE on CUDA (default {d.vae_layout})",
    )
    p.add_argument(
        "--vae-groupnorm",
        choices=("native", "split"),
        default=d.vae_groupnorm,
        help=f"the SD VAE encoder's GroupNorm: PyTorch's, or split reductions (default {d.vae_groupnorm})",
    )
    p.add_argument(
        "--vae-attention",
        choices=("sdpa", "classic"),
        default=d.vae_attention,
        help=f"the SD VAE's attention: PyTorch's SDPA or diffusers' classic AttnProcessor (default {d.vae_attention})",
    )
    p.add_argument("--json", metavar="OUT", default=None, help="also write the results as JSON to OUT ('-': stdout)")
    p.add_argument(
        "--profile",
        metavar="OUT",
        default=None,
        help="after the timed steps, profile up to 5 more with torch.profiler: ops and kernels by self time to OUT, "
        "a Chrome trace to OUT.trace.json",
    )
    return p


def check_output_file(option: str, path: Path, *more: Path) -> None:
    """Refuse an output file (and the files written beside it) that cannot be written, before anything runs.

    Raises:
        UserError: naming ``option``: a folder given as the file, a missing or read-only folder.
    """
    if path.is_dir():
        example = path / ("bench.json" if option == "--json" else "profile.txt")
        raise UserError(f"{option} {path} is a folder; give a file name, e.g. {example}")
    for p in more:
        if p.is_dir():
            raise UserError(f"{option} {path}: {p}, written beside it, is a folder; pick another path")
    if not path.parent.exists():
        raise UserError(f"{option} {path}: folder {path.parent} does not exist; create it or pick another path")
    reason = unwritable_reason(path.parent)
    if reason is not None:
        raise UserError(f"{option} {path}: cannot write there ({reason}); pick another path")


def run(args: argparse.Namespace) -> int:
    cfg = BenchConfig(
        model=args.model,
        device=args.device,
        steps=args.steps,
        warmup=args.warmup,
        resolution=args.resolution,
        batch=args.batch,
        ops=args.ops,
        compile=args.compile,
        compile_vae=args.compile_vae,
        cuda_graphs=args.cuda_graphs,
        field_graphs=args.field_graphs,
        render_graphs=args.render_graphs,
        tiny=args.tiny,
        shading=args.shading,
        seed=args.seed,
        vae_layout=args.vae_layout,
        vae_attention=args.vae_attention,
        unet_layout=args.unet_layout,
        vae_groupnorm=args.vae_groupnorm,
        cudnn_benchmark=args.cudnn_benchmark,
        host_checks=args.host_checks,
        scene=args.scene,
    )
    # the output files are checked before the benchmark runs: a bad path must not cost a whole run
    for option, value in (("--json", args.json), ("--profile", args.profile)):
        if value is not None and not value.strip():  # "" was silently no profile, "." a folder
            raise UserError(f"{option} is empty; give a file name or leave the option out")
    out = Path(args.json) if args.json not in (None, "-") else None
    if out is not None:
        check_output_file("--json", out)
    prof = Path(args.profile) if args.profile is not None else None
    if prof is not None:
        trace = Path(f"{prof}.trace.json")
        check_output_file("--profile", prof, trace)
        for written, what in ((prof, "--profile"), (trace, "--profile's trace")):
            if out is not None and out.resolve() == written.resolve():
                raise UserError(f"--json and {what} both name {out}; give them different files")
    warn_if_extension_missing(resolve_device(cfg.device))  # a bad --device: its one line
    result = run_bench(cfg, profile=prof)
    doc = json.dumps(result.to_dict(), indent=2)
    if args.json == "-":
        print(doc)
        return 0
    print(result.format_table())
    if out is not None:
        try:
            out.write_text(doc + "\n")
        except OSError as e:
            raise UserError(f"--json {args.json}: cannot write ({e.strerror}); pick a writable path") from e
    return 0
