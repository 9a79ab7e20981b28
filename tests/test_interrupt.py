# SPDX-License-Identifier: Apache-2.0
"""Interrupted runs lose nothing (subprocess tests of ``python -m fastdream generate`` on the CPU).

- ``kill -9`` after a checkpoint, then ``--resume``: the final checkpoint equals an uninterrupted run's.
- Ctrl-C (SIGINT) or SIGTERM: a checkpoint at the interrupted step, exit status 130, and ``--resume`` ends identically.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from clitools import ROOT, TINY, env, fastdream

from fastdream import checkpoint as ckpt

STEPS, SAVE_EVERY = 40, 5
RUN = ("generate", "a red cube", *TINY, "--steps", str(STEPS), "--save-every", str(SAVE_EVERY))
RESUME = ("generate", "a red cube", "--device", "cpu", "--quiet", "--no-export", "--resume")


def start(out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "fastdream", *RUN, "--out", str(out)],
        cwd=ROOT,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_checkpoint(proc: subprocess.Popen, out: Path, timeout: float = 300) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = ckpt.list_checkpoints(out)
        if found:
            return found[-1][0]
        if proc.poll() is not None:
            pytest.fail(f"the run ended before its first checkpoint: {proc.stderr.read()}")
        time.sleep(0.01)
    proc.kill()
    pytest.fail("no checkpoint within the timeout")


def assert_same_final_state(a_dir: Path, b_dir: Path) -> None:
    a = ckpt.load_checkpoint(ckpt.latest_checkpoint(a_dir))
    b = ckpt.load_checkpoint(ckpt.latest_checkpoint(b_dir))
    assert a["step"] == b["step"] == STEPS
    assert a["stats"] == b["stats"]
    for part in ("field", "background", "grid"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs from the uninterrupted run"
    for k, v in a["optimizer"]["state"].items():
        for name, t in v.items():
            assert torch.equal(t, b["optimizer"]["state"][k][name]), f"optimizer state {k}.{name} differs"
    for k in a["rng"]:
        assert torch.equal(a["rng"][k], b["rng"][k]), f"random state {k} differs"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("full") / "run"
    res = fastdream(*RUN, "--out", out)
    assert res.returncode == 0, res.stderr
    return out


def test_sigkill_then_resume_equals_uninterrupted(uninterrupted: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = start(out)
    at = wait_for_checkpoint(proc, out)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(60) == -signal.SIGKILL
    found = ckpt.list_checkpoints(out)
    assert found and found[-1][0] < STEPS, "the run finished before it was killed: nothing was tested"
    assert at <= found[-1][0]
    for _, p in found:  # whatever moment the kill hit, every checkpoint under its final name is whole
        ckpt.load_checkpoint(p)
    res = fastdream(*RESUME, "--out", out)
    assert res.returncode == 0, res.stderr
    assert_same_final_state(uninterrupted, out)
    assert not list((out / "checkpoints").glob(".*")), "temporary files of the killed write were left behind"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl_c", "sigterm"])
def test_ctrl_c_saves_a_checkpoint_and_resume_equals_uninterrupted(
    uninterrupted: Path, tmp_path: Path, sig: signal.Signals
) -> None:
    """Ctrl-C, or SIGTERM (a scheduler ending the job, ``kill``): the step finishes and is saved."""
    out = tmp_path / "run"
    proc = start(out)
    wait_for_checkpoint(proc, out)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, f"exit {proc.returncode}: {stderr}"
    assert "Traceback" not in stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "interrupted at step" in lines[0] and "--resume" in lines[0], stderr
    step = int(lines[0].split("interrupted at step ")[1].split(";")[0])
    assert 0 < step < STEPS
    # the checkpoint is at the interrupted step itself, not at the last multiple of --save-every
    assert ckpt.list_checkpoints(out)[-1][0] == step
    res = fastdream(*RESUME, "--out", out)
    assert res.returncode == 0, res.stderr
    assert_same_final_state(uninterrupted, out)
