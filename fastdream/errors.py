# SPDX-License-Identifier: Apache-2.0
"""Errors that the CLI turns into one line on stderr and exit status 2."""


class UserError(Exception):
    """Bad input or environment: the message says what is wrong and what to do."""


class OutOfMemory(UserError):
    """A run stopped by an allocation that failed; the steps it saved can be resumed (a ``--prompts`` library keeps
    such a prompt pending, not failed). ``summary``: what happened and what was saved, without the single run's
    advice (its --resume and --overwrite commands, which a ``--prompts`` library refuses: it resumes by itself)."""

    def __init__(self, message: str, summary: str | None = None) -> None:
        super().__init__(message)
        self.summary = summary if summary is not None else message


def out_of_memory(e: BaseException) -> str | None:
    """``e`` as "out of memory on <device> (it asked for <size> more)" when it is an allocation that failed, else
    None. An error raised from such a failure (torch.compile wraps them) counts as one.

    CUDA raises ``torch.OutOfMemoryError`` (cuBLAS and pinned host memory a RuntimeError naming it); torch's CPU
    allocator a plain RuntimeError ("DefaultCPUAllocator: can't allocate memory: you tried to allocate N bytes";
    "not enough memory" on Windows), and Python and NumPy a MemoryError, when the OOM killer does not end the
    process first."""
    import re

    import torch

    cuda_oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # torch.OutOfMemoryError: 2.5+
    seen = 0
    # The error itself, then what it was raised from (inductor's BackendCompilerFailed keeps it as inner_exception).
    # Not through a KeyboardInterrupt or SystemExit: those are what they say, whatever they interrupted.
    while isinstance(e, Exception) and seen < 4:
        text = str(e)
        if isinstance(e, cuda_oom) or (
            isinstance(e, RuntimeError)
            and any(k in text for k in ("CUDA error: out of memory", "CUBLAS_STATUS_ALLOC_FAILED"))
        ):
            gpu = re.search(r"GPU (\d+)", text)
            device = f"cuda:{gpu.group(1)}" if gpu else "the GPU"
            asked = re.search(r"[Tt]ried to allocate ([\d.]+ [KMGT]?i?B)", text)
            size = asked.group(1) if asked else None
        elif isinstance(e, RuntimeError) and ("can't allocate memory" in text or "not enough memory" in text):
            device = "the CPU"
            asked = re.search(r"tried to allocate (\d+) bytes", text)
            size = None
            if asked:
                n = int(asked.group(1))
                size = f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
        elif isinstance(e, MemoryError):  # Python's, or NumPy's "Unable to allocate 4.00 GiB for an array ..."
            device = "the CPU"
            asked = re.search(r"allocate ([\d.]+?)\.? ([KMGTP]?i?B)", text)  # NumPy writes "256. TiB"
            size = f"{asked.group(1)} {asked.group(2)}" if asked else None
        else:
            e, seen = e.__cause__ or getattr(e, "inner_exception", None) or e.__context__, seen + 1
            continue
        return f"out of memory on {device}" + (f" (it asked for {size} more)" if size else "")
    return None
