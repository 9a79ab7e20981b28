# SPDX-License-Identifier: Apache-2.0
"""``fastdream evaluate DIR``: score a finished builtin run against its prompt's true primitive (JSON)."""

from __future__ import annotations

import argparse
import json


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "evaluate",
        help="score a --model builtin run: Chamfer to the true primitive, silhouette IoU, albedo error (JSON)",
    )
    p.add_argument("dir", metavar="DIR", help="the run folder (config.json and mesh.obj)")
    p.add_argument("--seed", type=int, default=0, help="seed of the surface samples, 0 to 2**32-1")
    return p


def run(args: argparse.Namespace) -> int:
    from fastdream.builtin.evaluate import SEED_MAX, evaluate_run
    from fastdream.errors import UserError

    if not 0 <= args.seed <= SEED_MAX:
        raise UserError(f"--seed must be an integer in [0, {SEED_MAX}], got {args.seed}")
    print(json.dumps(evaluate_run(args.dir, seed=args.seed), indent=2))
    return 0
