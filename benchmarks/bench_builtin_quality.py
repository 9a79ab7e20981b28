# SPDX-License-Identifier: Apache-2.0
"""Quality and time of default ``--model builtin`` runs: the README's main command, scored.

Ten prompts, five shapes in two colours each, every colour of the palette at least once. Each is a default
``fastdream generate PROMPT --model builtin`` (exports included), timed end to end, then scored by
``fastdream evaluate``: Chamfer to the true primitive (goal <= 0.05, and the smallest of the five), silhouette
IoU from novel views (goal >= 0.87), albedo error of the mean colour and mean over the surface (goals <= 0.15).

Run all ten (about 10 x 2.5 min on a 2-core CPU, 72-274 s each at the current defaults)::

    python benchmarks/bench_builtin_quality.py --out /tmp/fd-bench [--prompts "a red cube" ...] [--seed N]

or through pytest-benchmark (one round per prompt; ``FASTDREAM_BENCH_PROMPTS="a red cube;a blue torus"``
selects a subset). It is opt-in, so that ``pytest benchmarks/ --benchmark-only`` stays minutes long: set
``FASTDREAM_BENCH_QUALITY=1`` or ``FASTDREAM_BENCH_PROMPTS``::

    FASTDREAM_BENCH_QUALITY=1 pytest benchmarks/bench_builtin_quality.py --benchmark-only

The script prints a markdown table for benchmarks/RESULTS.md and writes ``results.json`` next to the runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

PROMPTS = (
    "a red cube",
    "a blue cube",
    "a green sphere",
    "a yellow sphere",
    "an orange cylinder",
    "a purple cylinder",
    "a white cone",
    "a gray cone",
    "a yellow torus",
    "a red torus",
)


def run_prompt(prompt: str, out_root: Path, device: str = "cpu", extra: list[str] | None = None) -> dict:
    """One default run of ``prompt`` in ``out_root/<slug>`` (a fresh folder), timed, then evaluated."""
    slug = prompt.replace(" ", "_")
    out = out_root / slug
    cmd = [sys.executable, "-m", "fastdream", "generate", prompt, "--model", "builtin", "--out", str(out)]
    cmd += ["--device", device, "--overwrite", "--quiet", *(extra or [])]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"prompt": prompt, "seconds": seconds, "error": proc.stderr.strip().splitlines()[-1:]}
    ev = subprocess.run([sys.executable, "-m", "fastdream", "evaluate", str(out)], capture_output=True, text=True)
    if ev.returncode != 0:
        return {"prompt": prompt, "seconds": seconds, "error": ev.stderr.strip().splitlines()[-1:]}
    result = json.loads(ev.stdout)
    result["seconds"] = seconds
    result["passed"] = passes(result)
    return result


# The goals. Chamfer alone cannot tell the shapes apart (a perfect cylinder is 0.035 from the cube, a perfect sphere
# 0.050), so the shape must also be the nearest one. Since 2026-11-27 (session 16) also a silhouette IoU of 0.87:
# the exact cube moved by 0.1 along x scores 0.850-0.855 (two meshings; Chamfer 0.038, nearest the cube) and scaled
# by 1.1 0.825-0.842, and both passed the other goals; the lowest IoU of any recorded run is 0.880 (the blue cube,
# seeds 0 and 2). And a surface colour error of 0.15 (half red and half cyan has a grey mean colour). Earlier
# sessions' runs were judged by Chamfer, nearest shape and mean colour alone.
GOALS = {"chamfer": 0.05, "silhouette_iou": 0.87, "albedo_error": 0.15, "albedo_error_surface": 0.15}


def passes(r: dict) -> bool:
    return bool(
        r["chamfer"] <= GOALS["chamfer"]
        and r["correct_shape"]
        and r["silhouette_iou"] >= GOALS["silhouette_iou"]
        and r["albedo_error"] is not None
        and r["albedo_error"] <= GOALS["albedo_error"]
        and r.get("albedo_error_surface") is not None
        and r["albedo_error_surface"] <= GOALS["albedo_error_surface"]
    )


def table(results: list[dict]) -> str:
    rows = [
        "| prompt | Chamfer | nearest other | IoU | albedo error (mean, surface) | time (s) | pass |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['prompt']} | error: {r['error']} | | | | {r['seconds']:.0f} | no |")
            continue
        others = {k: v for k, v in r["chamfer_to"].items() if k != r["shape"]}
        near = min(others, key=others.get)
        alb = "n/a" if r["albedo_error"] is None else f"{r['albedo_error']:.3f}, {r['albedo_error_surface']:.3f}"
        rows.append(
            f"| {r['prompt']} | {r['chamfer']:.4f} | {near} {others[near]:.4f} | {r['silhouette_iou']:.3f} | "
            f"{alb} | {r['seconds']:.0f} | {'yes' if r['passed'] else 'no'} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/fastdream-bench-builtin", help="folder of the runs")
    ap.add_argument("--prompts", nargs="*", default=list(PROMPTS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=None, help="fastdream generate --seed (default: its own, 0)")
    a = ap.parse_args(argv)
    extra = [] if a.seed is None else ["--seed", str(a.seed)]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for p in a.prompts:
        results.append(run_prompt(p, out, a.device, extra))
        print(json.dumps(results[-1]), flush=True)
    meta = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "device": a.device}
    meta["seed"] = a.seed
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(table(results))
    return 0 if all(r.get("passed") for r in results) else 1


try:
    import pytest

    _SELECTED = [p for p in os.environ.get("FASTDREAM_BENCH_PROMPTS", ";".join(PROMPTS)).split(";") if p.strip()]

    _OPT_IN = bool(os.environ.get("FASTDREAM_BENCH_PROMPTS")) or os.environ.get("FASTDREAM_BENCH_QUALITY") == "1"

    @pytest.mark.skipif(not _OPT_IN, reason="ten runs of a few minutes: set FASTDREAM_BENCH_QUALITY=1 to run them")
    @pytest.mark.parametrize("prompt", _SELECTED)
    def test_builtin_quality(benchmark, prompt, tmp_path):
        pytest.importorskip("pytest_benchmark")
        result = benchmark.pedantic(run_prompt, args=(prompt, tmp_path), rounds=1, iterations=1)
        benchmark.extra_info.update({k: result.get(k) for k in ("chamfer", "silhouette_iou", "albedo_error")})
        assert "error" not in result, result
        assert result["passed"], result
except ImportError:  # plain-script use without pytest
    pass


if __name__ == "__main__":
    sys.exit(main())
