# SPDX-License-Identifier: Apache-2.0
"""Errors that the CLI turns into one line on stderr and exit status 2."""


class UserError(Exception):
    """Bad input or environment: the message says what is wrong and what to do."""


class OutOfMemory(UserError):
    """A run stopped by an allocation that failed; the steps it saved can be resumed (a ``--prompts`` library keeps
    such a prompt pending, not failed)."""


def out_of_memory(e: BaseException) -> str | None:
    """``e`` as "out of memory on <device> (it asked for <size> more)" when it is an allocation that failed, else
    None.

    CUDA raises ``torch.OutOfMemoryError``; torch's CPU allocator a plain RuntimeError ("DefaultCPUAllocator: can't
    allocate memory: you tried to allocate N bytes"), and Python and NumPy a MemoryError, when the OOM killer does
    not end the process first."""
    import re

    import torch

    text = str(e)
    if isinstance(e, torch.OutOfMemoryError):
        gpu = re.search(r"GPU (\d+)", text)
        device = f"cuda:{gpu.group(1)}" if gpu else "the GPU"
        asked = re.search(r"[Tt]ried to allocate ([\d.]+ [KMGT]?i?B)", text)
        size = asked.group(1) if asked else None
    elif isinstance(e, RuntimeError) and "can't allocate memory" in text:
        device = "the CPU"
        asked = re.search(r"tried to allocate (\d+) bytes", text)
        size = f"{int(asked.group(1)) / 2**30:.2f} GiB" if asked else None
    elif isinstance(e, MemoryError):  # Python's, or NumPy's "Unable to allocate 4.00 GiB for an array ..."
        device = "the CPU"
        asked = re.search(r"allocate ([\d.]+?)\.? ([KMGTP]?i?B)", text)  # NumPy writes "256. TiB"
        size = f"{asked.group(1)} {asked.group(2)}" if asked else None
    else:
        return None
    return f"out of memory on {device}" + (f" (it asked for {size} more)" if size else "")
