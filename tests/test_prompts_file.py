# SPDX-License-Identifier: Apache-2.0
"""fastdream.batch in-process: prompt files, folder names, status/index bookkeeping, failures, restarts.

The torchrun test with the real builtin prior is in tests/test_batch_torchrun.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fastdream import batch
from fastdream import checkpoint as ckpt
from fastdream.errors import OutOfMemory, UserError


def test_read_prompts(tmp_path: Path) -> None:
    f = tmp_path / "p.txt"
    f.write_text("# library\n\na red cube\n   \n  a   blue sphere \n#a green cone\na red cube\n")
    assert batch.read_prompts(f) == ["a red cube", "a blue sphere"]
    f.write_bytes("\ufeffa red cube\r\na blue sphere\r\n".encode())  # as Windows Notepad saves it
    assert batch.read_prompts(f) == ["a red cube", "a blue sphere"]
    f.write_text("# nothing\n\n")
    with pytest.raises(UserError, match="holds no prompt"):
        batch.read_prompts(f)
    f.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(UserError, match="UTF-8"):
        batch.read_prompts(f)
    with pytest.raises(UserError, match="does not exist"):
        batch.read_prompts(tmp_path / "missing.txt")
    with pytest.raises(UserError, match="is a folder"):
        batch.read_prompts(tmp_path)


def test_folder_names_are_safe_unique_stable() -> None:
    prompts = ["a red cube", "A red cube!", "a/../../etc/passwd", "ünïcode 🙂 prompt", "x" * 500, "#!?"]
    names = [batch.folder_name(p) for p in prompts]
    assert len(set(names)) == len(names)
    for n in names:
        assert n == Path(n).name and n not in (".", "..") and len(n) <= 48
        assert all(c.isascii() and (c.isalnum() or c in "_-") for c in n)
    assert names == [batch.folder_name(p) for p in prompts]  # stable
    assert batch.folder_name("a red cube") == "a_red_cube-356cc2"  # across versions too
    assert batch.folder_name("Crème brûlée") == "cr_me_br_l_e-e8f7a3"  # single runs drop accents; libraries do not


def test_default_run_folder_keeps_letters_of_any_script() -> None:
    """Without --out the folder is the prompt's slug: accents dropped, other scripts kept (they all became
    ``runs/run`` before, so two such prompts shared one folder)."""
    from fastdream.config import slugify

    assert slugify("A red cube!") == "a_red_cube"
    assert slugify("Crème  brûlée, ﬂambée") == "creme_brulee_flambee"
    assert slugify("赤い立方体") == "赤い立方体" and slugify("빨간 큐브") == "빨간_큐브"
    assert slugify("красный куб") == "красный_куб"
    assert slugify("🙂 #!?") == "run" and slugify("__") == "run"
    long = slugify("立方体 " * 40)
    assert len(long) <= 48 and not long.endswith("_") and len(long.encode()) < 255


class FakeRunner:
    """run_one that records calls; fails for prompts containing 'bad'; 'boom' raises a bug-like error."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bool]] = []

    def __call__(self, prompt: str, run_dir: Path, resume: bool, device: str) -> dict:
        self.calls.append((prompt, resume))
        if "bad" in prompt:
            raise UserError(f"prompt {prompt!r} is not in the builtin vocabulary; use a COLOUR SHAPE")
        if "boom" in prompt:
            raise ZeroDivisionError("division by zero")
        ckpt.save_checkpoint(run_dir, 4, {"format": 1, "field": {"w": torch.ones(1)}})
        return {"step": 4}


def test_run_batch_statuses_failures_and_restart(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    prompts = ["a red cube", "a bad prompt", "a blue sphere", "boom"]
    run = FakeRunner()
    rc = batch.run_batch(prompts, tmp_path, run, dist=batch.Dist())
    assert rc == 1
    assert [p for p, _ in run.calls] == prompts  # a failure does not stop the others
    index = json.loads((tmp_path / "index.json").read_text())
    st = {e["prompt"]: e for e in index["prompts"]}
    assert [e["prompt"] for e in index["prompts"]] == prompts
    assert st["a red cube"]["status"] == "done" and st["a red cube"]["step"] == 4
    assert st["a bad prompt"]["status"] == "failed" and "vocabulary" in st["a bad prompt"]["reason"]
    assert st["boom"]["status"] == "failed" and st["boom"]["reason"].startswith("ZeroDivisionError")
    assert st["a blue sphere"]["folder"] == batch.folder_name("a blue sphere")
    out = capsys.readouterr().out
    assert "2 done, 2 failed" in out and "a bad prompt: prompt" in out

    # Restart: done ones skipped, failed ones skipped without --retry-failed.
    run2 = FakeRunner()
    assert batch.run_batch(prompts, tmp_path, run2, dist=batch.Dist()) == 1
    assert run2.calls == []
    # With --retry-failed: only the failed ones run again.
    run3 = FakeRunner()
    batch.run_batch(prompts, tmp_path, run3, retry_failed=True, dist=batch.Dist())
    assert sorted(run3.calls) == [("a bad prompt", False), ("boom", False)]


def test_retried_failure_starts_over(tmp_path: Path) -> None:
    d = tmp_path / batch.folder_name("a red cube")
    ckpt.save_checkpoint(d, 6, {"format": 1, "field": {"w": torch.ones(1)}})
    batch.write_status(d, "a red cube", batch.FAILED, reason="diverged")
    run = FakeRunner()
    assert batch.run_batch(["a red cube"], tmp_path, run, dist=batch.Dist()) == 1
    assert run.calls == []
    assert batch.run_batch(["a red cube"], tmp_path, run, retry_failed=True, dist=batch.Dist()) == 0
    assert run.calls == [("a red cube", False)]


def test_half_finished_prompt_resumes(tmp_path: Path) -> None:
    d = tmp_path / batch.folder_name("a red cube")
    ckpt.save_checkpoint(d, 2, {"format": 1, "field": {"w": torch.ones(1)}})
    batch.write_status(d, "a red cube", batch.RUNNING, rank=1)  # a rank died here
    run = FakeRunner()
    assert batch.run_batch(["a red cube", "a green cone"], tmp_path, run, dist=batch.Dist()) == 0
    assert run.calls == [("a red cube", True), ("a green cone", False)]


def test_interrupt_keeps_prompt_resumable(tmp_path: Path) -> None:
    def interrupted(prompt, run_dir, resume, device):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        batch.run_batch(["a red cube"], tmp_path, interrupted, dist=batch.Dist())
    assert batch.read_status(tmp_path / batch.folder_name("a red cube"))["status"] == "pending"


def test_a_prompt_stopped_by_out_of_memory_stays_resumable(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Its steps are saved (the trainer's OutOfMemory): pending, so the next run resumes it, where a failed prompt
    would wait for --retry-failed and then start over. Out of memory again with no step gained: failed (a rerun
    would fail the same way forever)."""
    steps = iter([3, 5, 5])

    def out_of_memory(prompt, run_dir, resume, device):
        step = next(steps)
        ckpt.save_checkpoint(run_dir, step, {"format": 1, "field": {"w": torch.ones(1)}})
        summary = f"out of memory on cuda:0 at step {step + 1}; step {step} is saved"
        advice = ". Free memory on the device and continue with fastdream generate ... --resume, or start over with "
        err = OutOfMemory(summary + advice + "--overwrite and a lower --resolution", summary)
        raise err from torch.OutOfMemoryError("CUDA out of memory.")

    status = lambda: batch.read_status(tmp_path / batch.folder_name("a red cube"))  # noqa: E731
    assert batch.run_batch(["a red cube"], tmp_path, out_of_memory, dist=batch.Dist()) != 0
    assert (
        status()["status"] == "pending" and status()["reason"] == "out of memory on cuda:0 at step 4; step 3 is saved"
    )
    err = capsys.readouterr().err
    assert "run the same command again to resume it" in err
    assert "--resume" not in err and "--overwrite" not in err  # the single run's advice: a library refuses both
    assert batch.run_batch(["a red cube"], tmp_path, out_of_memory, dist=batch.Dist()) != 0  # resumed: 3 -> 5
    assert status()["status"] == "pending" and status()["out_of_memory_at"] == 5
    assert batch.run_batch(["a red cube"], tmp_path, out_of_memory, dist=batch.Dist()) != 0  # 5 again
    assert status()["status"] == "failed" and "no step gained since (step 5)" in status()["reason"]
    run = FakeRunner()
    assert batch.run_batch(["a red cube"], tmp_path, run, dist=batch.Dist(), retry_failed=True) == 0
    assert run.calls == [("a red cube", False)]  # started over, with the settings given then


def test_out_of_memory_outside_the_training_loop(tmp_path: Path) -> None:
    """Loading the model, say: a raw torch error. With steps saved the prompt stays pending; with none, failed."""

    def load_fails(prompt, run_dir, resume, device):
        if prompt == "a red cube":
            ckpt.save_checkpoint(run_dir, 2, {"format": 1, "field": {"w": torch.ones(1)}})
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB. GPU 0 has 10 MiB free.")

    batch.run_batch(["a red cube", "a green cone"], tmp_path, load_fails, dist=batch.Dist())
    cube, cone = (batch.read_status(tmp_path / batch.folder_name(p)) for p in ("a red cube", "a green cone"))
    assert cube["status"] == "pending" and cube["reason"].startswith("out of memory on cuda:0 (it asked for 1.00 GiB")
    assert cone["status"] == "failed" and cone["reason"].startswith("out of memory on cuda:0")


def test_a_run_that_diverged_after_out_of_memory_fails(tmp_path: Path) -> None:
    def diverged(prompt, run_dir, resume, device):
        ckpt.save_checkpoint(run_dir, 2, {"format": 1, "field": {"w": torch.ones(1)}})
        raise UserError("the run diverged") from torch.OutOfMemoryError("CUDA out of memory.")

    batch.run_batch(["a red cube"], tmp_path, diverged, dist=batch.Dist())
    got = batch.read_status(tmp_path / batch.folder_name("a red cube"))
    assert got["status"] == "failed" and got["reason"] == "the run diverged"


def test_index_is_never_torn(tmp_path: Path) -> None:
    """Many concurrent rebuilds (threads here, ranks in real life): index.json always parses."""
    import threading

    prompts = [f"p{i}" for i in range(20)]
    for p in prompts:
        batch.write_status(tmp_path / batch.folder_name(p), p, batch.DONE)
    errors: list[Exception] = []

    def rebuild() -> None:
        try:
            for _ in range(10):
                batch.rebuild_index(tmp_path, prompts)
                json.loads((tmp_path / "index.json").read_text())
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=rebuild) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(json.loads((tmp_path / "index.json").read_text())["prompts"]) == 20


# ------------------------------------------------------------------------------------ the CLI, bad input


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--prompts", "{missing}"], "does not exist"),
        (["--prompts", "{empty}"], "holds no prompt"),
        (["--prompts", "/dev/zero"], "larger than 64 MiB"),  # read until the memory ran out
        (["a red cube", "--prompts", "{good}"], "not both"),
        (["--prompts", "{good}", "--resume"], "--retry-failed"),
        (["--prompts", "{good}", "--steps", "0"], "--steps"),
        (["--retry-failed"], "--prompts"),
        ([], "--prompts FILE"),
        (["--prompts", "{good}", "--set", "out=/tmp/x"], "--set out does not go with --prompts"),
        (["--prompts", "{good}", "--set", "device=cpu"], "--set device does not go with --prompts"),
        # once for the batch, not as each prompt's failure (exit 1, and the prompts then skipped as settled)
        (["--prompts", "{good}", "--cuda-graphs"], "--cuda-graphs needs a CUDA device"),
        (["--prompts", "{good}", "--model", "{missing}"], "does not exist"),
    ],
)
def test_prompts_cli_bad_input(tmp_path: Path, extra: list[str], needle: str) -> None:
    from clitools import TINY, assert_user_error, fastdream, tree_hash

    (tmp_path / "empty.txt").write_text("# nothing yet\n\n")
    (tmp_path / "good.txt").write_text("a red cube\n")
    names = {k: str(tmp_path / f"{k}.txt") for k in ("missing", "empty", "good")}
    out = tmp_path / "lib"
    before = tree_hash(tmp_path)
    res = fastdream("generate", *TINY, *[e.format(**names) for e in extra], "--out", out)
    assert_user_error(res, needle)
    assert tree_hash(tmp_path) == before


@pytest.mark.parametrize("damage", ["index_dir", "lock_dir", "status_dir", "prompt_file"])
def test_damaged_library_is_refused_in_one_line(tmp_path: Path, damage: str) -> None:
    """A folder where the library writes a file, or a file where a prompt's folder goes: refused before any prompt
    runs (the CLI), and in one line if it turns up while the batch runs (run_batch). Both were tracebacks."""
    from clitools import TINY, assert_user_error, fastdream, tree_hash

    (tmp_path / "good.txt").write_text("a red cube\n")
    out = tmp_path / "lib"
    assert fastdream("generate", *TINY, "--prompts", tmp_path / "good.txt", "--out", out).returncode == 0
    folder = out / batch.folder_name("a red cube")
    target = {
        "index_dir": out / "index.json",
        "lock_dir": out / ".index.lock",
        "status_dir": folder / "status.json",
        "prompt_file": folder,
    }[damage]
    if target.is_dir():
        import shutil

        shutil.rmtree(target)
        target.write_text("not a run folder")
    else:
        target.unlink()
        target.mkdir()
    if target.is_dir():
        (target / "keep.txt").write_text("the user's")
    before = tree_hash(tmp_path)
    res = fastdream("generate", *TINY, "--prompts", tmp_path / "good.txt", "--retry-failed", "--out", out)
    line = assert_user_error(res, str(target.relative_to(tmp_path)), "move it aside")
    assert "is not a file" in line or "is a file where" in line  # check_library's words: found up front
    assert tree_hash(tmp_path) == before
    with pytest.raises(UserError, match="move it aside") as e:  # met mid-batch, past the CLI's check
        batch.run_batch(["a red cube", "a blue sphere"], out, FakeRunner(), retry_failed=True, dist=batch.Dist())
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("rank, addr", [(1, "127.0.0.1"), (1, "no-such-host.invalid"), (0, "127.0.0.1")])
def test_a_rank_that_cannot_join_is_a_user_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rank: int, addr: str
) -> None:
    """A wrong MASTER_ADDR, or ranks that never start, waited 7 days at the rendezvous; now the usual bound (cut
    to 2 s here), one line naming the address, and no --out folder made."""
    import datetime
    import socket

    import torch.distributed as td

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"MASTER_ADDR": addr, "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(batch, "RENDEZVOUS_TIMEOUT", datetime.timedelta(seconds=2))
    out = tmp_path / "lib"
    with pytest.raises(UserError, match=f"rank {rank} of 2 could not join .*{addr}:{port} within 2 s") as e:
        batch.run_batch(["a red cube"], out, FakeRunner(), device="cpu")
    assert "\n" not in str(e.value) and not out.exists() and not td.is_initialized()


def test_negative_local_rank_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "-7")
    with pytest.raises(UserError, match="LOCAL_RANK=-7"):
        batch.Dist.from_env()


def test_a_prompts_notes_reach_the_log_and_its_status(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """generate's notes (skipped steps, a faint mesh, a GIF instead of the mp4) were dropped under --prompts."""

    def run(prompt: str, run_dir: Path, resume: bool, device: str) -> dict:
        ckpt.save_checkpoint(run_dir, 4, {"format": 1, "field": {"w": torch.ones(1)}})
        return {"step": 4, "notes": ["note: no density reaches the iso level 10"] if "red" in prompt else []}

    assert batch.run_batch(["a red cube", "a blue cube"], tmp_path, run, dist=batch.Dist()) == 0
    st = {e["prompt"]: e for e in json.loads((tmp_path / "index.json").read_text())["prompts"]}
    red = json.loads((tmp_path / st["a red cube"]["folder"] / "status.json").read_text())
    blue = json.loads((tmp_path / st["a blue cube"]["folder"] / "status.json").read_text())
    assert red["notes"] == ["note: no density reaches the iso level 10"] and "notes" not in blue
    out = capsys.readouterr()
    assert "'a red cube': note: no density reaches the iso level 10" in out.out + out.err


def test_generate_prompts_hands_each_runs_notes_to_the_library(tmp_path: Path) -> None:
    """The generate side of the notes' path (the test above fakes it): a run's note reaches its status.json."""
    from clitools import TINY

    from fastdream.cli import main

    (tmp_path / "p.txt").write_text("a red cube\n")
    args = [a for a in TINY if a != "--no-export"]
    args += ["--set", "export.iso_level=1e9", "--set", "export.mesh_resolution=16"]
    args += ["--set", "render.turntable_frames=2"]
    assert main(["generate", *args, "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "lib")]) == 0
    status = json.loads((tmp_path / "lib" / batch.folder_name("a red cube") / "status.json").read_text())
    assert any("no density reaches the iso level 1e+09" in n for n in status["notes"]), status
