# SPDX-License-Identifier: Apache-2.0
"""Launch helpers shared by the Triton kernels."""

from __future__ import annotations

import os


def block_size(n: int, cap: int = 1024) -> int:
    """A power-of-two block for ``n`` elements; small under the interpreter, where every lane is Python."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        cap = min(cap, 128)
    b = 16
    while b < n and b < cap:
        b *= 2
    return b
