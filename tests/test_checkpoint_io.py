# SPDX-License-Identifier: Apache-2.0
"""Checkpoints and run files: atomic writes, clean and weights-only loading (fastdream.checkpoint)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastdream import checkpoint as ckpt
from fastdream.errors import UserError

# ------------------------------------------------------------------------------------------------- atomic IO


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    p = tmp_path / "a" / "f.json"
    ckpt.atomic_write(p, '{"x": 1}')
    ckpt.atomic_write(p, '{"x": 2}')
    assert p.read_text().strip().endswith("}") and '"x": 2' in p.read_text()
    assert sorted(x.name for x in p.parent.iterdir()) == ["f.json"]


def test_atomic_write_failure_keeps_old_file(tmp_path: Path) -> None:
    p = tmp_path / "f.bin"
    ckpt.atomic_write(p, b"old")

    def boom(f) -> None:
        f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        ckpt.atomic_write(p, boom)
    assert p.read_bytes() == b"old"
    assert [x.name for x in tmp_path.iterdir()] == ["f.bin"]


def test_atomic_write_uses_fsync_and_replace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append("replace"), real_replace(a, b))[1])
    ckpt.save_checkpoint(tmp_path, 1, _state(1))
    assert calls[:2] == ["fsync", "replace"]  # data on disk before the rename makes it visible


def test_sigkill_during_checkpoint_writes_never_leaves_a_truncated_file(tmp_path: Path) -> None:
    """A child saves big checkpoints in a loop; SIGKILL it at random moments; every final-name file loads."""
    root = str(Path(__file__).resolve().parents[1])
    script = "\n".join(
        [
            "import sys, torch",
            f"sys.path.insert(0, {root!r})",
            "from fastdream import checkpoint as ckpt",
            "step = 0",
            "while True:",
            "    step += 1",
            "    state = {'format': 1, 'step': step, 'field': {'w': torch.full((400_000,), float(step))}}",
            f"    ckpt.save_checkpoint({str(tmp_path)!r}, step, state, keep=3)",
        ]
    )
    for delay in (0.0, 0.05, 0.13):
        proc = subprocess.Popen([sys.executable, "-c", script])
        deadline = time.monotonic() + 120
        while not ckpt.list_checkpoints(tmp_path) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(delay)  # then kill at some moment of a later write
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
    ckpts = ckpt.list_checkpoints(tmp_path)
    assert ckpts, "the writer never finished a checkpoint"
    for step, p in ckpts:
        state = ckpt.load_checkpoint(p)
        assert state["step"] == step
        assert torch.equal(state["field"]["w"], torch.full((400_000,), float(step)))


# ------------------------------------------------------------------------------------------------ checkpoints


def _state(step: int, w: torch.Tensor | None = None) -> dict:
    return {"format": 1, "step": step, "field": {"w": torch.arange(3.0) if w is None else w}}


def test_checkpoint_roundtrip_and_rotation(tmp_path: Path) -> None:
    for step in (5, 10, 15):
        ckpt.save_checkpoint(tmp_path, step, _state(step), keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [10, 15]
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))["step"] == 15


def test_leftovers_of_killed_writes_are_removed(tmp_path: Path) -> None:
    stale = tmp_path / "checkpoints" / ".step_000004.pt.tmp-12345"
    stale.parent.mkdir()
    stale.write_bytes(b"half a checkpoint")
    ckpt.save_checkpoint(tmp_path, 5, _state(5))
    assert [p.name for p in stale.parent.iterdir()] == ["step_000005.pt"]


def test_checkpoint_refuses_nan(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="NaN"):
        ckpt.save_checkpoint(tmp_path, 1, _state(1, torch.tensor([1.0, float("nan")])))
    with pytest.raises(RuntimeError, match="NaN"):
        ckpt.save_checkpoint(tmp_path, 1, {"optimizer": {"state": {0: {"exp_avg": torch.tensor([float("inf")])}}}})
    assert ckpt.list_checkpoints(tmp_path) == []


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_checkpoint_is_a_user_error(tmp_path: Path, damage: str) -> None:
    p = ckpt.save_checkpoint(tmp_path, 1, _state(1, torch.ones(1000)))
    data = p.read_bytes()
    p.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x00junk" * 50, "empty": b""}[damage])
    with pytest.raises(UserError, match="corrupt or truncated"):
        ckpt.load_checkpoint(p)


def test_foreign_checkpoint_is_a_user_error(tmp_path: Path) -> None:
    p = tmp_path / "x.pt"
    torch.save({"w": torch.ones(2)}, p)
    with pytest.raises(UserError, match="not a fastdream checkpoint"):
        ckpt.load_checkpoint(p)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_checkpoint_loading_cannot_execute_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    p = tmp_path / "evil.pt"
    torch.save({"format": 1, "field": _Evil()}, p)
    with pytest.raises(UserError, match="corrupt or truncated"):
        ckpt.load_checkpoint(p)
    assert not (tmp_path / "pwned").exists()


# ------------------------------------------------------------------------------------------------ code safety


def test_package_never_loads_unsafely() -> None:
    """Nothing loaded from disk may execute code: no remote code, no pickle loads of untrusted files."""
    root = Path(__file__).resolve().parents[1] / "fastdream"
    offenders = []
    for py in root.rglob("*.py"):
        if "kernels" in py.parts:
            continue
        for i, line in enumerate(py.read_text().splitlines(), 1):
            code = line.split("#", 1)[0].replace(" ", "")
            if (
                "trust_remote_code=True" in code
                or "weights_only=False" in code
                or "pickle.load" in code
                or "allow_pickle=True" in code
            ):
                offenders.append(f"{py.relative_to(root.parent)}:{i}: {line.strip()}")
            if "torch.load(" in code and "weights_only=True" not in code:
                offenders.append(f"{py.relative_to(root.parent)}:{i}: torch.load without weights_only=True")
    assert not offenders, "\n".join(offenders)


# ------------------------------------------------------------------------------------------ background writes


def test_background_write_is_of_the_state_at_submit(tmp_path: Path) -> None:
    """The trainer changes its parameters and Adam moments in place right after submitting: the file holds the
    values of the submitted step, not later ones."""
    state = _state(3, torch.arange(100_000, dtype=torch.float32))
    expected = {k: v.clone() for k, v in state["field"].items()}
    writer = ckpt.CheckpointWriter()
    path = writer.submit(tmp_path, 3, state)
    for v in state["field"].values():  # the next optimiser step
        v.add_(1.0)
    assert writer.wait() == path == ckpt.checkpoint_path(tmp_path, 3)
    saved = ckpt.load_checkpoint(path)
    for k, v in expected.items():
        assert torch.equal(saved["field"][k], v)
    assert writer.wait() == path  # nothing pending: the last path again, no error


def test_background_write_errors_reach_the_caller(tmp_path: Path) -> None:
    writer = ckpt.CheckpointWriter()
    writer.submit(tmp_path, 1, _state(1, torch.tensor([1.0, float("nan")])))
    with pytest.raises(RuntimeError, match="NaN"):
        writer.wait()
    assert ckpt.list_checkpoints(tmp_path) == []
    (tmp_path / "checkpoints").write_text("a file where the folder should be")
    writer.submit(tmp_path, 2, _state(2))
    with pytest.raises(UserError, match="cannot save checkpoint"):
        writer.wait()
    assert writer.wait() is None  # the error was reported once; no write ever succeeded


def test_a_new_submit_waits_for_the_previous_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One write at a time, in order: the keep-last-N clean-up of one never races the next."""
    order: list[str] = []
    real = ckpt.save_checkpoint

    def slow(run_dir, step, state, keep=2):
        order.append(f"start {step}")
        time.sleep(0.2)
        path = real(run_dir, step, state, keep=keep)
        order.append(f"end {step}")
        return path

    monkeypatch.setattr(ckpt, "save_checkpoint", slow)
    writer = ckpt.CheckpointWriter()
    for step in (1, 2, 3):
        writer.submit(tmp_path, step, _state(step), keep=2)
    writer.wait()
    assert order == ["start 1", "end 1", "start 2", "end 2", "start 3", "end 3"]
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 3]


def test_poll_reports_a_failed_write_without_waiting_for_the_next_checkpoint(tmp_path: Path) -> None:
    """The trainer polls after every step: a write that failed (a full disk, here a file where the folder should
    be) stops the run at the next step."""
    (tmp_path / "checkpoints").write_text("not a folder")
    writer = ckpt.CheckpointWriter()
    writer.poll()  # nothing submitted: nothing to report
    writer.submit(tmp_path, 1, _state(1))
    deadline = time.monotonic() + 30
    with pytest.raises(UserError, match="cannot save checkpoint"):
        while time.monotonic() < deadline:
            writer.poll()
            time.sleep(0.01)
    writer.poll()  # reported once
