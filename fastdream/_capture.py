# SPDX-License-Identifier: Apache-2.0
"""CUDA graphs beside CUDA graphs: none may be destroyed while another is being captured.

Destroying a graph is a CUDA call that a capture in progress forbids: it fails ("operation not permitted when
stream is capturing") and invalidates the capture ("operation failed due to a previous error during capture").
``torch.cuda.make_graphed_callables`` keeps its graphs in a class made for the call, and a class sits in a
reference cycle: a graph that fastdream lets go of (an evicted bucket, a replaced VAE graph) is freed only by
Python's cyclic garbage collector, whenever that next runs, which may be in the middle of the next capture. That
is how a renderer capture failed on an H100 (session 9, ``tests/test_render_graphs.py``). Hence:

* :func:`capturing` around every capture: the collector is off while it runs;
* :func:`collect` right after letting graphs go: they are destroyed then, before any capture (ours, or
  inductor's in ``--compile --cuda-graphs``).
"""

from __future__ import annotations

import contextlib
import gc
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def capturing() -> Iterator[None]:
    """Python's cyclic garbage collector off for the duration (restored after, also on error)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def collect() -> None:
    """Destroy the graphs just let go of (and any other cyclic garbage) now, outside any capture."""
    gc.collect()


# PyTorch's advice when a parameter's gradient accumulator was made on another stream than the backward feeding
# it. fastdream's graphs are warmed up and captured on a side stream and replayed on the current one, so with
# ``--cuda-graphs`` it is printed (with a C++ stack line) on every GPU run (session 9, H100). It is expected: the
# gradients are tested equal to the eager ones (tests/test_render_graphs.py, tests/test_field_graphs.py), and any
# synchronisation it adds is inside the step times measured (benchmarks/RESULTS.md).
STREAM_MISMATCH = r"The AccumulateGrad node's stream does not match the stream of the node that produced"


def hide_expected_warnings() -> None:
    """The CLI's warning filter: PyTorch's stream-mismatch advice above off, every other warning kept."""
    warnings.filterwarnings("ignore", message=STREAM_MISMATCH, category=UserWarning)
