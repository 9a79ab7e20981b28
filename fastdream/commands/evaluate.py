# SPDX-License-Identifier: Apache-2.0
"""``fastdream evaluate DIR``: score a run whose prompt the builtin prior knows (a builtin run, or a diffusion
model's run of such a prompt, with a note) against its true primitive, from the run's exported mesh.obj (JSON; a
note says when the mesh is older than the last checkpoint)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "evaluate",
        help="score a run whose prompt the builtin prior knows: Chamfer to the true primitive, silhouette IoU, "
        "albedo error (JSON)",
        description="Score a run whose prompt the builtin prior knows ('[a|an|the] COLOUR SHAPE'): Chamfer "
        "distance of DIR/mesh.obj to the true primitive (and to the others), silhouette IoU from novel views, and "
        "the mean albedo against the named colour. Prints JSON.",
    )
    p.add_argument("dir", metavar="DIR", help="the run folder (config.json and mesh.obj)")
    p.add_argument("--seed", type=int, default=0, help="seed of the surface samples, 0 to 2**32-1 (default: 0)")
    return p


def _saved_model(run_dir: Path) -> str | None:
    """``guidance.model`` of the run's config.json; None when unreadable (evaluate_run then says what is wrong)."""
    try:
        model = json.loads((run_dir / "config.json").read_text())["guidance"]["model"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return model if isinstance(model, str) else None


def run(args: argparse.Namespace) -> int:
    from fastdream.builtin.evaluate import SEED_MAX, evaluate_run, read_prompt
    from fastdream.builtin.vocabulary import parse_prompt
    from fastdream.config import is_builtin
    from fastdream.errors import UserError

    if not 0 <= args.seed <= SEED_MAX:
        raise UserError(f"--seed must be an integer in [0, {SEED_MAX}], got {args.seed}")
    run_dir = Path(args.dir)
    model = _saved_model(run_dir) if run_dir.is_dir() else None
    diffusion = model is not None and not is_builtin(model)
    if diffusion:  # scored only when its prompt names a builtin primitive, and said so
        prompt = read_prompt(run_dir)
        try:
            parse_prompt(prompt)
        except UserError:
            raise UserError(
                f"{run_dir} is a run of --model {model} with prompt {prompt!r}: evaluate scores only prompts the "
                f"builtin prior knows ('[a|an|the] COLOUR SHAPE', e.g. 'a red cube'), against the true primitive"
            ) from None
    result = evaluate_run(run_dir, seed=args.seed)
    stale = _stale_mesh_note(run_dir)
    if stale:
        print(stale, file=sys.stderr)
    if diffusion:
        print(
            f"note: {run_dir} was made with --model {model}, not builtin; scored against a {result['colour']} "
            f"{result['shape']} all the same",
            file=sys.stderr,
        )
    print(json.dumps(result, indent=2))
    return 0


def _stale_mesh_note(run_dir: Path) -> str | None:
    """A note when mesh.obj is older than the run's last checkpoint (a run resumed with --no-export): the scores
    are those of an earlier field."""
    from fastdream.checkpoint import latest_checkpoint

    try:
        last = latest_checkpoint(run_dir)
        if last is None or last.stat().st_mtime_ns <= (run_dir / "mesh.obj").stat().st_mtime_ns:
            return None
    except OSError:
        return None
    return (
        f"note: {run_dir / 'mesh.obj'} is older than the last checkpoint ({last.name}): these are the scores of an "
        f"earlier field; re-export it with: fastdream export {run_dir}"
    )
