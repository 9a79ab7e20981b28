# SPDX-License-Identifier: Apache-2.0
"""The field's forward and backward (``NeuralField.density_and_normals``) replayed from CUDA graphs.

At 64x64 the field side of a step is launch-bound: ~10k samples, a few microseconds of work per kernel, and
~50 operators in the forward and ~100 in the backward (hash grid with its Jacobian, MLP, the analytic density
gradient, normalisation), each costing more on the host than on the GPU (benchmarks/RESULTS.md). Here both
passes are captured once per sample-count bucket with ``torch.cuda.make_graphed_callables`` and replayed: two
launches a step.

The sample count changes every step, a CUDA graph's shapes cannot: the samples are padded with zeros up to a
bucket (:func:`capacity`: at most 1/4 more, never fewer than 1,024) and the outputs cut back. A bucket is captured
the second time it is asked for (``min_sightings``); the first time runs eagerly, so sizes seen once cost no
capture. Padding rows are
independent of the real ones (the field is evaluated point by point) and get a zero gradient, so the results
are the eager ones up to the order of floating-point additions (the hash grid's atomics; cuBLAS may pick other
kernels for other row counts). The parameters are read by address, so optimiser updates in place are seen by
every replay. At most ``max_graphs`` buckets are kept (least recently used evicted); each holds its own memory
pool, about the size of one eager forward and backward at that bucket plus the table's gradient.

Measured on an H100 (benchmarks/RESULTS.md): the builtin 64x64 step's field forward 2.86 -> 0.36 ms and its
backward 6.00 -> 2.81 ms. With an SD-shaped model in a 15-step benchmark the sample count wandered over 13
buckets of the first version's 1/8-octave spacing, and the captures (~25 ms each) dominated: hence the coarser
buckets and the capture on second sight.

Used by ``fastdream bench --field-graphs`` (CUDA only). Elsewhere, in eval mode, without gradients, or for
finite-difference normals, the call is the eager one.
"""

from __future__ import annotations

from collections import Counter, OrderedDict

import torch
import torch.nn.functional as F

from fastdream import _capture
from fastdream.field import NeuralField

MIN_CAPACITY = 1024


def capacity(n: int) -> int:
    """The bucket for ``n`` samples: the smallest ``m * 2**k >= n`` with ``4 <= m <= 8`` (so at most 1/4 more
    rows than asked for: four buckets per octave), and at least :data:`MIN_CAPACITY`.

    Example:
        >>> [capacity(n) for n in (0, 1024, 1025, 9701, 16384, 16385)]
        [1024, 1024, 1280, 10240, 16384, 20480]
    """
    n = max(int(n), MIN_CAPACITY)
    k = max(0, n.bit_length() - 3)
    m = -(-n // (1 << k))  # ceil
    return m << k


class _DensityAndNormals(torch.nn.Module):
    """The module ``make_graphed_callables`` captures: its parameters are the field's."""

    def __init__(self, field: NeuralField) -> None:
        super().__init__()
        self.field = field

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.field.density_and_normals(x, method="analytic")


class GraphedDensityAndNormals:
    """``field.density_and_normals`` with the forward and backward replayed from CUDA graphs (see the module doc).

    Args:
        field: the field (its parameters are captured by address).
        max_graphs: buckets kept at once.
        warmup_iters: eager forward+backward passes before each capture (``make_graphed_callables``).
        min_sightings: a bucket is captured on its ``min_sightings``-th call (earlier calls run eagerly).
    """

    def __init__(self, field: NeuralField, max_graphs: int = 8, warmup_iters: int = 2, min_sightings: int = 2) -> None:
        if max_graphs < 1:
            raise ValueError(f"max_graphs: expected >= 1, got {max_graphs}")
        if min_sightings < 1:
            raise ValueError(f"min_sightings: expected >= 1, got {min_sightings}")
        self.field = field
        self.max_graphs = max_graphs
        self.warmup_iters = warmup_iters
        self.min_sightings = min_sightings
        self._graphs: OrderedDict[tuple, torch.nn.Module] = OrderedDict()
        self._seen: Counter[tuple] = Counter()
        self.captures = 0  # how many graphs were captured (tests, benchmarks)
        self.replays = 0  # calls served from a graph

    def _eager(self, x: torch.Tensor, method: str | None) -> bool:
        method = method or self.field.cfg.normals
        return (
            method != "analytic"
            or not x.is_cuda
            or x.shape[0] == 0
            or not torch.is_grad_enabled()
            or not self.field.training
        )

    def _graph(self, cap: int, device: torch.device) -> torch.nn.Module | None:
        """The graph of bucket ``cap``, captured now if this is its ``min_sightings``-th call; None: run eagerly."""
        amp = torch.is_autocast_enabled("cuda")
        dtype = torch.get_autocast_dtype("cuda")
        key = (cap, device, amp, dtype)
        g = self._graphs.get(key)
        if g is not None:
            self._graphs.move_to_end(key)
            return g
        self._seen[key] += 1
        if self._seen[key] < self.min_sightings:
            return None
        if len(self._graphs) >= self.max_graphs:
            while len(self._graphs) >= self.max_graphs:
                self._graphs.popitem(last=False)
            _capture.collect()  # the evicted graphs are destroyed now, not during a capture
        sample = torch.zeros(cap, 3, device=device)
        # make_graphed_callables needs autocast's weight-cast cache off: the casts are then part of the graph
        # and see each optimiser update.
        with torch.autocast("cuda", dtype=dtype, enabled=amp, cache_enabled=False), _capture.capturing():
            g = torch.cuda.make_graphed_callables(
                _DensityAndNormals(self.field), (sample,), num_warmup_iters=self.warmup_iters
            )
        self._graphs[key] = g
        self.captures += 1
        return g

    def __call__(self, x: torch.Tensor, method: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[N, 3] -> (density [N], albedo [N, 3], normals [N, 3]), as ``NeuralField.density_and_normals``."""
        if self._eager(x, method):
            return self.field.density_and_normals(x, method=method)
        n = x.shape[0]
        cap = capacity(n)
        g = self._graph(cap, x.device)
        if g is None:
            return self.field.density_and_normals(x, method=method)
        xp = F.pad(x.detach().float(), (0, 0, 0, cap - n))
        sigma, albedo, normals = g(xp)
        self.replays += 1
        return sigma[:n], albedo[:n], normals[:n]
