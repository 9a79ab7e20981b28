# SPDX-License-Identifier: Apache-2.0
"""Many prompts, one folder each, on one process or sharded over ``torchrun`` ranks.

``fastdream generate --prompts FILE --out LIB ...`` writes ``LIB/<slug>-<hash>/`` per prompt and ``LIB/index.json``
(prompt -> folder -> status). The truth about a prompt is the ``status.json`` in its own folder, written
atomically and only by the rank that runs it; ``index.json`` is a view rebuilt from them (atomically, under an
``flock``), so two ranks can never corrupt it, and a stale one is repaired by the next rebuild.

Sharding: under torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set), rank 0 lists the prompts still to do
and broadcasts the list (gloo: it is a few bytes, and it works on every machine); rank ``r`` takes items
``r, r + W, r + 2W, ...`` on device ``cuda:LOCAL_RANK`` (or the CPU). Without torchrun, one process runs them all.

Restart safety: finished prompts are skipped, half-finished ones resume from their last checkpoint, failed
ones are run again (from the start, with the current settings) only with ``--retry-failed``. A failing prompt
(outside the vocabulary, diverged) is recorded with its one-line reason and the others go on; one stopped by
running out of memory saved its steps and stays pending, so the next run resumes it (failed instead when it runs
out again with no step gained). The exit status is 0 only when every prompt is done.

Example:
    >>> read_prompts_text("a red cube\\n# comment\\n\\n  a blue sphere  \\na red cube\\n")
    ['a red cube', 'a blue sphere']
    >>> folder_name("A red cube!")
    'a_red_cube-c3c34f'
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import json
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastdream.checkpoint import atomic_write, latest_checkpoint, list_checkpoints
from fastdream.errors import OutOfMemory, UserError, out_of_memory

INDEX_FILE = "index.json"
STATUS_FILE = "status.json"
LOCK_FILE = ".index.lock"
MAX_PROMPTS_BYTES = 64 << 20
RENDEZVOUS_TIMEOUT = datetime.timedelta(minutes=15)
BARRIER_TIMEOUT = datetime.timedelta(days=7)
DONE, FAILED, RUNNING, PENDING = "done", "failed", "running", "pending"


def _library_error(path: Path, err: OSError) -> UserError:
    why = err.strerror or type(err).__name__
    return UserError(f"cannot write {path} in the --prompts library ({why}); fix or move it aside, then run again")


def atomic_write_json(path: Path, obj: Any) -> None:
    try:
        atomic_write(path, json.dumps(obj, indent=2) + "\n")
    except OSError as err:  # a folder where the file goes, a full disk: one line, the library kept as it is
        raise _library_error(path, err) from err


def check_library(out: Path, prompts: list[str]) -> None:
    """Refuse a library folder whose files fastdream cannot write: a folder where ``index.json``, the lock or a
    prompt's ``status.json`` goes, a file where a prompt's folder goes (found before any prompt runs)."""
    files = [out / INDEX_FILE, out / LOCK_FILE]
    for p in prompts:
        run_dir = out / folder_name(p)
        if run_dir.exists() and not run_dir.is_dir():
            raise UserError(
                f"{run_dir} is a file where the --prompts library keeps the run of {p!r}; move it aside, then run again"
            )
        files.append(run_dir / STATUS_FILE)
    for f in files:
        if f.exists() and not f.is_file():
            raise UserError(f"{f} is not a file (the --prompts library writes it); move it aside, then run again")


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM (torchrun stopping its workers, schedulers) acts as Ctrl-C: it is re-raised as
    SIGINT, so the trainer's handler finishes the step and saves a checkpoint (and outside the trainer, Python
    raises KeyboardInterrupt). Only in the main thread; restored on exit."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        signal.raise_signal(signal.SIGINT)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


# ---------------------------------------------------------------------------------------------------- prompts


def read_prompts_text(text: str) -> list[str]:
    """One prompt per line; blank lines and lines starting with ``#`` are ignored; inner whitespace is
    collapsed and duplicates are dropped (first one kept)."""
    seen: dict[str, None] = {}
    for line in text.splitlines():
        p = " ".join(line.split())
        if p and not p.startswith("#"):
            seen.setdefault(p, None)
    return list(seen)


def read_prompts(path: str | Path) -> list[str]:
    """The prompts of a file (see :func:`read_prompts_text`).

    Raises:
        UserError: the file is missing, unreadable, not UTF-8 text, or holds no prompt.
    """
    path = Path(path)
    try:
        with path.open("rb") as f:  # a bounded read: /dev/zero or a wrong multi-GB file filled the memory
            data = f.read(MAX_PROMPTS_BYTES + 1)
        if len(data) > MAX_PROMPTS_BYTES:
            raise UserError(
                f"--prompts {path} is larger than {MAX_PROMPTS_BYTES >> 20} MiB; a prompt list is a text file with "
                "one prompt per line"
            )
        text = data.decode("utf-8-sig")  # -sig: a byte-order mark (Windows editors) is no prompt text
    except FileNotFoundError as err:
        raise UserError(f"--prompts {path} does not exist; give a text file with one prompt per line") from err
    except IsADirectoryError as err:
        raise UserError(f"--prompts {path} is a folder; give a text file with one prompt per line") from err
    except OSError as err:
        raise UserError(f"cannot read --prompts {path} ({err.strerror}); check the path and permissions") from err
    except UnicodeDecodeError as err:
        raise UserError(f"--prompts {path} is not UTF-8 text; save it as UTF-8, one prompt per line") from err
    prompts = read_prompts_text(text)
    if not prompts:
        raise UserError(f"--prompts {path} holds no prompt (only blank lines and # comments); add one per line")
    return prompts


def folder_name(prompt: str, max_len: int = 40) -> str:
    """A safe, unique and stable folder name: the prompt's slug and a hash of the prompt.

    The hash makes prompts with the same slug ("a red cube" and "A red cube!") distinct folders, and the name
    depends on nothing but the prompt, so it survives reordering the file and restarting.
    """
    from fastdream.config import slugify

    digest = hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:6]
    # ASCII as in 0.1.0: a library's folder names must not change under a later version (a resumed batch would
    # not find its finished prompts).
    return f"{slugify(prompt, max_len, ascii_only=True)}-{digest}"


# ----------------------------------------------------------------------------------------------------- status


def read_status(run_dir: Path) -> dict[str, Any]:
    """The status of one prompt's folder: its ``status.json``, or ``pending`` when absent or unreadable."""
    try:
        d = json.loads((run_dir / STATUS_FILE).read_text())
        if isinstance(d, dict) and d.get("status") in (DONE, FAILED, RUNNING, PENDING):
            return d
    except (OSError, ValueError):
        pass
    return {"status": PENDING}


def write_status(run_dir: Path, prompt: str, status: str, **extra: Any) -> None:
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    atomic_write_json(run_dir / STATUS_FILE, {"prompt": prompt, "status": status, "updated": now, **extra})


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``out/.index.lock`` (advisory; the atomic rename is what prevents corruption)."""
    try:
        f = open(out / LOCK_FILE, "a+")
    except OSError as err:
        raise _library_error(out / LOCK_FILE, err) from err
    with f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def rebuild_index(out: Path, prompts: list[str]) -> list[dict[str, Any]]:
    """Rebuild ``out/index.json`` from the folders' status files; returns its entries (file order)."""
    with _locked(out):
        entries = []
        for p in prompts:
            name = folder_name(p)
            st = read_status(out / name)
            ckpt = latest_checkpoint(out / name) if st["status"] != DONE else None
            entry = {"prompt": p, "folder": name, "status": st["status"]}
            for k in ("reason", "rank", "step", "seconds", "updated"):
                if k in st:
                    entry[k] = st[k]
            if ckpt is not None:
                entry["checkpoint"] = str(ckpt.relative_to(out))
            entries.append(entry)
        atomic_write_json(out / INDEX_FILE, {"version": 1, "prompts": entries})
    return entries


# ------------------------------------------------------------------------------------------------- sharding


@dataclass(frozen=True)
class Dist:
    """This process's place among torchrun's workers (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Dist:
        def num(name: str, default: int) -> int:
            v = os.environ.get(name, "")
            try:
                return int(v) if v.strip() else default
            except ValueError as err:
                raise UserError(f"environment variable {name}={v!r} is not an integer; launch with torchrun") from err

        d = cls(num("RANK", 0), num("WORLD_SIZE", 1), num("LOCAL_RANK", 0))
        if not 0 <= d.rank < d.world_size:
            raise UserError(f"RANK={d.rank} is outside WORLD_SIZE={d.world_size}; launch with torchrun")
        if d.local_rank < 0:
            raise UserError(f"LOCAL_RANK={d.local_rank} is negative; launch with torchrun")
        return d

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _init_group(dist: Dist) -> bool:
    """A gloo process group for the few collective steps (list broadcast, final barrier)."""
    if not dist.distributed or "MASTER_ADDR" not in os.environ:
        return False
    import torch.distributed as td

    if not td.is_initialized():
        # The rendezvous (and the prompt-list broadcast just after it) gets torch's usual bound, so that a wrong
        # MASTER_ADDR or a rank that never starts ends with a message (it waited 7 days before); the final barrier
        # has its own, long timeout.
        try:
            td.init_process_group("gloo", timeout=RENDEZVOUS_TIMEOUT)
        except (RuntimeError, ValueError) as err:  # DistNetworkError, DistStoreError; a bad MASTER_PORT
            where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT', '')}"
            why = " ".join(str(err).split())[:200]
            raise UserError(
                f"rank {dist.rank} of {dist.world_size} could not join the others at MASTER_ADDR:MASTER_PORT {where} "
                f"within {RENDEZVOUS_TIMEOUT.total_seconds():.0f} s ({why}); check the address and that every rank "
                "started (launch with torchrun)"
            ) from err
    return True


def _broadcast(obj: Any, grouped: bool) -> Any:
    if not grouped:
        return obj
    import torch.distributed as td

    box = [obj]
    td.broadcast_object_list(box, src=0)
    return box[0]


def _barrier(grouped: bool) -> None:
    if grouped:
        import torch.distributed as td

        # the slowest rank may still have its whole share of prompts to run
        td.monitored_barrier(timeout=BARRIER_TIMEOUT, wait_all_ranks=True)


def todo(out: Path, prompts: list[str], retry_failed: bool) -> list[str]:
    """The prompts still to run: not done, and not failed unless ``retry_failed``."""
    keep = []
    for p in prompts:
        s = read_status(out / folder_name(p))["status"]
        if s == DONE or (s == FAILED and not retry_failed):
            continue
        keep.append(p)
    return keep


# --------------------------------------------------------------------------------------------------- the loop

RunOne = Callable[[str, Path, bool, str], dict[str, Any] | None]
"""``run_one(prompt, run_dir, resume, device) -> info``: runs one prompt to its end in ``run_dir`` (resuming from
its last checkpoint when ``resume``); raises UserError for a prompt-level failure; returns optional info
(e.g. ``{"step": 800}``) stored in the status."""


def run_batch(
    prompts: list[str],
    out: str | Path,
    run_one: RunOne,
    *,
    device: str = "auto",
    retry_failed: bool = False,
    dist: Dist | None = None,
    log: Callable[[str], None] | None = None,
) -> int:
    """Run every prompt still to do (this rank's share), then print the summary (rank 0).

    Returns:
        0 when every prompt of the list is done, 1 otherwise (some failed, or were left to another rank that
        did not finish).
    """
    dist = dist or Dist.from_env()
    out = Path(out)
    tag = f"[rank {dist.rank}/{dist.world_size}] " if dist.distributed else ""
    log = log or (lambda msg: print(tag + msg, file=sys.stderr, flush=True))
    dev = _rank_device(device, dist)
    grouped = _init_group(dist)  # first: a rank that cannot join leaves nothing behind
    try:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot create --out {out} ({err.strerror}); choose another --out") from err
        if dist.rank == 0:
            pending = todo(out, prompts, retry_failed)
            rebuild_index(out, prompts)
        else:
            pending = None
        pending = _broadcast(pending, grouped)
        if pending is None:  # torchrun without a rendezvous (no MASTER_ADDR): every rank reads the same files
            pending = todo(out, prompts, retry_failed)
        mine = pending[dist.rank :: dist.world_size]
        skipped = len(prompts) - len(pending)
        log(f"{len(prompts)} prompts: {skipped} already settled, {len(pending)} to run, {len(mine)} on this rank")
        with sigterm_as_interrupt():
            for i, prompt in enumerate(mine, 1):
                _run_prompt(prompt, out, run_one, dev, dist, log, f"({i}/{len(mine)})", prompts)
        _barrier(grouped)
        entries = rebuild_index(out, prompts)
        if dist.rank == 0:
            print(summary_table(entries), flush=True)
        return 0 if all(e["status"] == DONE for e in entries) else 1
    finally:
        if grouped:
            import torch.distributed as td

            with contextlib.suppress(Exception):
                td.destroy_process_group()


def _run_prompt(
    prompt: str,
    out: Path,
    run_one: RunOne,
    device: str,
    dist: Dist,
    log: Callable[[str], None],
    where: str,
    prompts: list[str],
) -> None:
    run_dir = out / folder_name(prompt)
    # A failed prompt (only run again with --retry-failed) starts over with the current settings: resuming a
    # diverged run from its last checkpoint with the same settings and random state would diverge again.
    before = read_status(run_dir)
    resume = latest_checkpoint(run_dir) is not None and before["status"] != FAILED
    log(f"{where} {'resuming' if resume else 'starting'} {prompt!r} in {run_dir.name}")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _library_error(run_dir, err) from err
    write_status(run_dir, prompt, RUNNING, rank=dist.rank, pid=os.getpid(), host=socket.gethostname())
    rebuild_index(out, prompts)
    start = time.perf_counter()
    try:
        info = run_one(prompt, run_dir, resume, device) or {}
    except KeyboardInterrupt:
        # the trainer saved a checkpoint; the prompt stays resumable
        write_status(run_dir, prompt, PENDING, rank=dist.rank, reason="interrupted")
        rebuild_index(out, prompts)
        raise
    except Exception as err:  # one prompt failing does not stop the others
        # an out-of-memory stop without the single run's advice (--resume, --overwrite: the library resumes itself)
        message = err.summary if isinstance(err, OutOfMemory) else str(err)
        reason = " ".join(message.split()) or type(err).__name__
        # (a UserError raised from one, e.g. a run the last step made diverge, is that error, not this one)
        oom = out_of_memory(err) if isinstance(err, OutOfMemory) or not isinstance(err, UserError) else None
        status, extra = FAILED, {}
        if oom is not None:
            # Out of memory: the steps the trainer saved are kept and the prompt stays pending, so the next run of
            # the library resumes it; but when that gained no step since the last time, it would fail the same way
            # at every rerun: failed, and --retry-failed starts it over with the settings given then.
            found = list_checkpoints(run_dir)
            saved = found[-1][0] if found else 0
            if not isinstance(err, UserError):
                reason = f"{oom} ({type(err).__name__} outside the training loop)"
            if saved and before.get("out_of_memory_at") != saved:
                status, extra = PENDING, {"out_of_memory_at": saved}
            elif saved:
                reason = (
                    f"out of memory again with no step gained since (step {saved}); --retry-failed starts it over "
                    f"with the settings given then (e.g. a lower --resolution): {reason}"
                )
        elif not isinstance(err, UserError):
            reason = f"{type(err).__name__}: {reason}"
            traceback.print_exc(file=sys.stderr)
        write_status(run_dir, prompt, status, rank=dist.rank, reason=reason[:300], **extra)
        if status == PENDING:
            log(f"{where} STOPPED {prompt!r}: {reason}; run the same command again to resume it")
        else:
            log(f"{where} FAILED {prompt!r}: {reason}")
    else:
        status = info.pop("status", DONE)
        secs = round(time.perf_counter() - start, 1)
        notes = [n for n in info.get("notes", ()) if n]  # the run's notes (skipped steps, a faint mesh, ...)
        if not notes:
            info.pop("notes", None)
        write_status(run_dir, prompt, status, rank=dist.rank, seconds=secs, **info)
        log(f"{where} {status} {prompt!r} in {secs:.1f}s")
        for note in notes:
            log(f"{where}   {prompt!r}: {note}")
    _release_memory()  # the failed prompt's trainer (the model is kept for the next prompt, when it shares it)
    rebuild_index(out, prompts)


def _release_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _rank_device(device: str, dist: Dist) -> str:
    """``auto``/``cuda`` become ``cuda:LOCAL_RANK`` under torchrun (one GPU per rank)."""
    if not dist.distributed:
        return device
    name = (device or "auto").strip().lower()
    if name in ("auto", "cuda"):
        import torch

        if torch.cuda.is_available():
            n = torch.cuda.device_count()
            torch.cuda.set_device(dist.local_rank % n)
            return f"cuda:{dist.local_rank % n}"
        if name == "cuda":
            return name  # the single-run check reports "no GPU" in one line
    return device


def summary_table(entries: list[dict[str, Any]]) -> str:
    """A plain-text table: status, folder, prompt, and the reason of failures."""
    counts = {s: sum(e["status"] == s for e in entries) for s in (DONE, FAILED, PENDING, RUNNING)}
    rows = [("status", "folder", "prompt / reason")]
    for e in entries:
        text = e["prompt"] if e["status"] != FAILED else f"{e['prompt']}: {e.get('reason', '')}"
        rows.append((e["status"], e["folder"], text))
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines = [f"{a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows]
    lines.insert(1, "-" * min(100, w0 + w1 + 4 + max(len(r[2]) for r in rows)))
    tally = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    lines.append(f"{len(entries)} prompts: {tally}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- the CLI command


def generate_runner(args: Any, progress: bool) -> RunOne:
    """``run_one`` for ``fastdream generate --prompts``: the single-run path (plan, execute) per prompt, with
    the command's other options applied to every prompt."""
    import copy

    from fastdream import run as single
    from fastdream.commands.generate import config_from_args
    from fastdream.guidance.loading import library_progress_bars

    explicit = set(getattr(args, "_explicit", set())) | ({"set"} if args.set else set())
    # The model is loaded once and prepared for each prompt (it was loaded again for every prompt: seconds to
    # minutes each, and --compile-vae compiled again); only one is kept, so a prompt resumed with other settings
    # (another model, other camera ranges for the builtin prior's data) replaces it.
    loaded: dict[str, Any] = {}

    def guidance_for(plan: Any) -> Any:
        key = single.guidance_key(plan.cfg, plan.device)
        with library_progress_bars(progress):
            if loaded.get("key") != key:
                loaded.clear()
                _release_memory()  # the old model, before the new one loads
                loaded["guidance"] = single.load_guidance_for(plan.cfg, plan.device)
                loaded["key"] = key
            single.prepare_guidance(loaded["guidance"], plan.cfg)  # the text encoder is read again for each prompt
        return loaded["guidance"]

    def run_one(prompt: str, run_dir: Path, resume: bool, device: str) -> dict[str, Any]:
        a = copy.copy(args)
        a.prompt, a.out, a.device = prompt, str(run_dir), device
        cfg = config_from_args(a)
        if resume:  # continue with the saved settings; only the resumable options apply
            plan = single.plan_generate(
                cfg, (explicit & set(single.RESUME_OVERRIDES)) | {"device"}, resume=True, overwrite=False
            )
        else:  # this folder belongs to the batch: leftovers of a start killed before its first checkpoint go
            plan = single.plan_generate(cfg, explicit, resume=False, overwrite=True)
        result = single.execute(plan, progress=progress, export=not args.no_export, guidance=guidance_for(plan))
        if result.interrupted:
            raise KeyboardInterrupt
        return {"step": result.step, "skipped": result.skipped, "notes": list(result.notes)}

    return run_one


def run_prompts_command(args: Any) -> int:
    """``fastdream generate --prompts FILE``: check the shared settings once, then :func:`run_batch`."""
    from fastdream import run as single
    from fastdream.commands.generate import config_from_args
    from fastdream.config import check_builtin_light, resolve, validate

    if getattr(args, "prompt", None):
        raise UserError("give either PROMPT or --prompts FILE, not both")
    if args.resume or args.overwrite:
        raise UserError(
            "--prompts skips finished prompts and resumes unfinished ones by itself; drop --resume/--overwrite "
            "(use --retry-failed to run failed prompts again)"
        )
    if args.out in ("", "runs/<prompt slug>"):
        raise UserError("--prompts needs --out FOLDER (one run folder per prompt is made inside it)")
    for item in args.set or []:  # each prompt's folder and each rank's device are the batch's to choose
        key = item.partition("=")[0].strip()
        if key in ("out", "device", "prompt"):
            what = {"out": "give the library folder with --out", "device": "use --device", "prompt": "list it"}
            raise UserError(f"--set {key} does not go with --prompts ({what[key]} instead)")
    prompts = read_prompts(args.prompts)
    out = single.expand_user(args.out, "--out")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder; choose another --out")
    dist = Dist.from_env()
    device = _rank_device(args.device, dist)
    # Bad settings fail once, in one line, before any prompt runs (the prompt itself is checked per prompt).
    a = copy_args(args, prompt=prompts[0], out=str(out / folder_name(prompts[0])), device=device)
    dev = single.resolve_device(device)
    cfg = resolve(config_from_args(a), dev.type)
    cfg.device = str(dev)
    validate(cfg)
    check_builtin_light(cfg)
    single._check_cheap(cfg, dev, prompt=False)  # CUDA-only options on a CPU, a missing model folder
    single._check_writable(out)
    check_library(out, prompts)
    progress = not args.quiet and not dist.distributed
    return run_batch(
        prompts,
        out,
        generate_runner(args, progress),
        device=device,
        retry_failed=args.retry_failed,
        dist=dist,
    )


def copy_args(args: Any, **changes: Any) -> Any:
    import copy

    a = copy.copy(args)
    for k, v in changes.items():
        setattr(a, k, v)
    return a
