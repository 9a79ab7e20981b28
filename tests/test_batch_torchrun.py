# SPDX-License-Identifier: Apache-2.0
"""``torchrun --nproc-per-node 2 -m fastdream generate --prompts FILE`` on the CPU (gloo, builtin prior).

Five prompts, one outside the builtin vocabulary: every good prompt is done exactly once, by the two ranks
together, the bad one is reported as failed; killing a rank mid-way and rerunning completes the rest without
redoing finished prompts.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from clitools import ROOT, TINY, env

from fastdream import batch
from fastdream import checkpoint as ckpt

PROMPTS = ["a red cube", "a blue sphere", "a green cone", "a yellow torus", "a purple elephant"]
GOOD = PROMPTS[:4]

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="torchrun + fcntl test on Linux")


def torchrun_cmd(out: Path, prompts_file: Path, steps: int, save_every: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "fastdream",
        "generate",
        "--prompts",
        str(prompts_file),
        "--out",
        str(out),
        *TINY,
        "--steps",
        str(steps),
        "--save-every",
        str(save_every),
    ]


def prompt_file(tmp_path: Path) -> Path:
    f = tmp_path / "prompts.txt"
    f.write_text("# a small library\n\n" + "\n".join(PROMPTS) + "\n# the end\n")
    return f


def index(out: Path) -> dict[str, dict]:
    return {e["prompt"]: e for e in json.loads((out / "index.json").read_text())["prompts"]}


def started(log: str) -> list[str]:
    return re.findall(r"(?:starting|resuming) '([^']+)'", log)


def test_two_ranks_share_the_prompts(tmp_path: Path) -> None:
    out = tmp_path / "lib"
    res = subprocess.run(
        torchrun_cmd(out, prompt_file(tmp_path), 3, 2),
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = res.stdout + res.stderr
    assert res.returncode != 0, "a failed prompt must make the exit status non-zero"
    idx = index(out)
    assert list(idx) == PROMPTS
    for p in GOOD:
        assert idx[p]["status"] == "done" and idx[p]["step"] == 3, (p, idx[p], log[-3000:])
        assert ckpt.latest_checkpoint(out / idx[p]["folder"]).name == "step_000003.pt"
    bad = idx["a purple elephant"]
    assert bad["status"] == "failed" and "vocabulary" in bad["reason"]
    assert sorted(started(log)) == sorted(PROMPTS), "every prompt runs exactly once"
    assert {e["rank"] for e in idx.values()} == {0, 1}, "both ranks worked"
    assert "4 done, 1 failed" in res.stdout  # rank 0's summary table
    assert res.stdout.count("prompts: 4 done, 1 failed") == 1  # printed once, not per rank


def last_step(folder: Path) -> int:
    """The step of the newest checkpoint in ``folder`` (0: none yet)."""
    found = ckpt.list_checkpoints(folder)
    return found[-1][0] if found else 0


def test_killed_rank_then_rerun_completes_without_redoing(tmp_path: Path) -> None:
    out = tmp_path / "lib"
    pf = prompt_file(tmp_path)
    steps = 30
    proc = subprocess.Popen(
        torchrun_cmd(out, pf, steps, 5),
        cwd=ROOT,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    victim = None
    deadline = time.monotonic() + 400
    try:
        while time.monotonic() < deadline and victim is None:
            time.sleep(0.05)
            statuses = {p: batch.read_status(out / batch.folder_name(p)) for p in GOOD}
            done = [p for p, s in statuses.items() if s["status"] == "done"]
            # A victim in the first half of its steps: one nearer the end may finish (and write its last
            # checkpoint) between this look and the kill.
            running = [
                (p, s)
                for p, s in statuses.items()
                if s["status"] == "running" and 0 < last_step(out / batch.folder_name(p)) <= steps // 2
            ]
            if done and running:
                victim = running[0]
            assert proc.poll() is None, "the batch ended before it could be interrupted"
        assert victim is not None, "no moment with a finished prompt and a half-finished one"
        os.kill(victim[1]["pid"], signal.SIGKILL)  # one rank dies mid-prompt
        proc.communicate(timeout=300)  # torchrun stops the other rank and exits
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    before = {p: batch.read_status(out / batch.folder_name(p)) for p in GOOD}
    finished = {p for p, s in before.items() if s["status"] == "done"}
    assert finished and len(finished) < len(GOOD)
    half = victim[0]
    half_ckpt = ckpt.list_checkpoints(out / batch.folder_name(half))[-1][0]
    assert 0 < half_ckpt < steps

    res = subprocess.run(
        torchrun_cmd(out, pf, steps, 5), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600
    )
    log = res.stdout + res.stderr
    idx = index(out)
    for p in GOOD:
        assert idx[p]["status"] == "done" and idx[p]["step"] == steps, (p, idx[p], log[-3000:])
    assert not finished & set(started(log)), "finished prompts were run again"
    assert f"resuming '{half}'" in log, log[-3000:]
    for p in finished:  # untouched: same status record as before the rerun
        assert batch.read_status(out / batch.folder_name(p)) == before[p]
    assert idx["a purple elephant"]["status"] == "failed"
    assert res.returncode != 0  # the failed prompt still counts
