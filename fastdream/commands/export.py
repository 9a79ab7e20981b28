# SPDX-License-Identifier: Apache-2.0
"""``fastdream export DIR``: re-render the turntable and re-export the meshes from a run's last checkpoint."""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from pathlib import Path

from fastdream.commands import HelpFormatter
from fastdream.config import EXPORT_MESH_RESOLUTION, TURNTABLE_FRAMES, TURNTABLE_RESOLUTION, ExportConfig


def add_parser(sub) -> argparse.ArgumentParser:
    e = ExportConfig()
    p = sub.add_parser(
        "export",
        help="re-export mesh.glb, mesh.obj and turntable.mp4 of a run from its last checkpoint",
        description="Re-render the turntable and re-extract the meshes of the run in DIR from its last checkpoint, "
        "with the run's settings unless given here. The new outputs replace the old ones only once all are written.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("run_dir", metavar="DIR", help="a run folder written by fastdream generate")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument(
        "--mesh-resolution",
        type=int,
        default=None,
        help=f"marching cubes' lattice points per axis (default: the run's, {e.mesh_resolution} unless it was set)",
    )
    p.add_argument(
        "--iso-level",
        type=float,
        default=None,
        help=f"density level of the surface (default: the run's, {e.iso_level:g} unless it was set)",
    )
    p.add_argument("--frames", type=int, default=None, help="turntable frames (default: the run's)")
    p.add_argument("--turntable-resolution", type=int, default=None, help="turntable size (default: the run's)")
    return p


def run(args: argparse.Namespace) -> int:
    from fastdream.checkpoint import unwritable_reason
    from fastdream.errors import UserError
    from fastdream.export import check_outputs, export_all
    from fastdream.run import load_run

    # The limits generate checks too, before training (fastdream.config.validate).
    for name, v, (lo, hi) in (
        ("--mesh-resolution", args.mesh_resolution, EXPORT_MESH_RESOLUTION),
        ("--frames", args.frames, TURNTABLE_FRAMES),
        ("--turntable-resolution", args.turntable_resolution, TURNTABLE_RESOLUTION),
    ):
        if v is not None and not lo <= v <= hi:
            raise UserError(f"{name} must be in [{lo}, {hi}], got {v}")
    if args.iso_level is not None and not 0 < args.iso_level < math.inf:
        raise UserError(f"--iso-level must be a finite number > 0, got {args.iso_level}")
    if Path(args.run_dir).is_dir():  # else load_run says what is wrong with it
        reason = unwritable_reason(args.run_dir)
        if reason is not None:
            raise UserError(
                f"{args.run_dir} is not writable ({reason}); export writes turntable.mp4, mesh.glb and mesh.obj "
                f"there: fix its permissions, or copy the run folder somewhere writable and export the copy"
            )
        check_outputs(args.run_dir)  # before loading the run; export_all checks again
    trainer = load_run(args.run_dir, args.device)
    cfg = trainer.cfg
    if args.mesh_resolution is not None:
        cfg.export.mesh_resolution = args.mesh_resolution
    if args.iso_level is not None:
        cfg.export.iso_level = args.iso_level
    if args.frames is not None:
        cfg.render.turntable_frames = args.frames
    if args.turntable_resolution is not None:
        cfg.render.turntable_resolution = args.turntable_resolution
    paths, note = export_all(trainer.field, trainer.background, trainer.grid, cfg, args.run_dir)
    if note:
        print(note, file=sys.stderr)
    print(f"exported step {trainer.step}: " + ", ".join(str(p) for p in paths))
    if trainer.step < cfg.optim.steps:  # an interrupted run: the meshes are of a half-trained field
        cmd = shlex.join(["fastdream", "generate", cfg.prompt, "--out", str(args.run_dir), "--resume"])
        print(
            f"note: the run stopped at step {trainer.step} of {cfg.optim.steps}; continue it with: {cmd}",
            file=sys.stderr,
        )
    return 0
