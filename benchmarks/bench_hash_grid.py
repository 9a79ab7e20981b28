# SPDX-License-Identifier: Apache-2.0
"""Hash-grid microbenchmarks: every usable backend against the reference, forward, forward+backward (to the
table), and the fused encoding+Jacobian forward+backward (the normals path), at the default config
(L=16, F=2, T=19).

Sizes: 2**18 points on the CPU, 2**20 on CUDA; ``FASTDREAM_BENCH_HASH_N`` overrides. Run with
``pytest benchmarks/bench_hash_grid.py`` (the CPU default run takes under a minute on 2 cores).
"""

from __future__ import annotations

import os

import pytest
import torch

from fastdream.ops import HashGridConfig, _dispatch, hash_encode, hash_encode_with_jacobian, use_backend

pytest.importorskip("pytest_benchmark")

OP = "hash_encode"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
N = int(os.environ.get("FASTDREAM_BENCH_HASH_N", 2**20 if DEVICE.type == "cuda" else 2**18))
CFG = HashGridConfig()
BACKENDS = [b for b in ("reference", "cpp", "cuda", "triton") if b in _dispatch.usable_backends(OP, DEVICE)]
if DEVICE.type == "cpu":  # the Triton interpreter is a correctness tool, not a contender
    BACKENDS = [b for b in BACKENDS if b != "triton"]


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(N, 3, generator=g) * 2 - 1).to(DEVICE)
    table = ((torch.rand(CFG.levels, CFG.table_size, CFG.features, generator=g) * 2 - 1) * 1e-2).to(DEVICE)
    grad = torch.randn(N, CFG.out_dim, generator=g).to(DEVICE)
    return x, table, grad


def _pedantic(backend: str) -> dict:
    # On the CPU a call takes seconds (the reference ~5x more): few rounds keep the default run short.
    if DEVICE.type == "cpu":
        return {"rounds": 1, "warmup_rounds": 0} if backend == "reference" else {"rounds": 3, "warmup_rounds": 1}
    return {"rounds": 20, "warmup_rounds": 3}


@pytest.mark.parametrize("backend", BACKENDS)
def test_hash_encode_forward(benchmark, data, backend):
    x, table, _ = data
    benchmark.group = f"hash_encode forward N={N} {DEVICE.type}"

    def run():
        with use_backend(backend), torch.no_grad():
            out = hash_encode(x, table, CFG)
        _sync()
        return out

    out = benchmark.pedantic(run, iterations=1, **_pedantic(backend))
    assert out.shape == (N, CFG.out_dim)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hash_encode_forward_backward(benchmark, data, backend):
    x, table, grad = data
    benchmark.group = f"hash_encode forward+backward N={N} {DEVICE.type}"
    t = table.clone().requires_grad_(True)

    def run():
        t.grad = None
        with use_backend(backend):
            hash_encode(x, t, CFG).backward(grad)
        _sync()
        return t.grad

    g = benchmark.pedantic(run, iterations=1, **_pedantic(backend))
    assert g.shape == table.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_hash_encode_jacobian_forward_backward(benchmark, data, backend):
    x, table, grad = data
    benchmark.group = f"hash_encode_with_jacobian forward+backward N={N} {DEVICE.type}"
    t = table.clone().requires_grad_(True)
    grad_jac = grad[:, :, None].expand(N, CFG.out_dim, 3)

    def run():
        t.grad = None
        with use_backend(backend):
            enc, jac = hash_encode_with_jacobian(x, t, CFG)
            torch.autograd.backward([enc, jac], [grad, grad_jac])
        _sync()
        return t.grad

    g = benchmark.pedantic(run, iterations=1, **_pedantic(backend))
    assert g.shape == table.shape
