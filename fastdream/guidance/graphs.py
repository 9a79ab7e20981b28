# SPDX-License-Identifier: Apache-2.0
"""Fewer launches for the frozen diffusion models: the UNet call replayed from a CUDA graph (or compiled), and the
Stable Diffusion VAE encoder's forward and backward replayed from two. Used by ``fastdream generate
--cuda-graphs`` and ``fastdream bench --cuda-graphs/--compile``; CUDA only.

The UNet call of one SDS step is ~1,000 kernel launches for a 64x64 latent batch of 2: on an H200 it took
25 ms from Python and 9.8 ms replayed from a graph (benchmarks/RESULTS.md).
"""

from __future__ import annotations

from typing import Any

import torch

from fastdream import _capture
from fastdream.errors import UserError


def accelerate(guidance: Any, *, compile: bool = False, cuda_graphs: bool = False, compile_vae: bool = False) -> None:
    """Replace ``guidance.unet`` by a compiled and/or CUDA-graph-replayed version of itself, and with
    ``cuda_graphs`` a Stable Diffusion guidance's ``vae_mean`` by :class:`GraphedVAEMean`.

    compile alone: ``torch.compile`` (inductor, default mode); cuda_graphs alone: :class:`CUDAGraphUNet`;
    both: ``torch.compile(mode="reduce-overhead")`` (inductor's CUDA graphs around the compiled kernels).

    compile_vae: ``torch.compile`` the SD VAE encoder's forward and backward too (``vae_mean``; with
    ``cuda_graphs`` in "reduce-overhead" mode, instead of :class:`GraphedVAEMean`). Inductor fuses the
    GroupNorms with their SiLUs and picks the convolutions' memory layout itself. On an H100 (session 12) the
    encoder's forward took 5.3 ms against 7.4 ms in graphs, and the SD step 0.92x (``fastdream bench
    --compile-vae``; ``fastdream generate --compile-vae``).
    """
    unet = guidance.unet
    if compile:
        mode = "reduce-overhead" if cuda_graphs else None
        # The compiled wrapper forwards attribute reads (``config``) to the UNet.
        guidance.unet = torch.compile(unet, mode=mode, dynamic=False)
    elif cuda_graphs:
        guidance.unet = CUDAGraphUNet(unet)
    if compile_vae and hasattr(guidance, "vae_mean"):
        guidance.vae_mean = CompiledVAEMean(guidance.vae_mean, mode="reduce-overhead" if cuda_graphs else None)
    elif cuda_graphs and hasattr(guidance, "vae_mean"):
        guidance.vae_mean = GraphedVAEMean(guidance.vae_mean)


class CompiledVAEMean:
    """The VAE encoder's mean under ``torch.compile`` (inductor; ``mode="reduce-overhead"``: in its CUDA graphs).
    The compile happens at the first call, inside training: if it fails (no working compiler, an inductor bug) the
    user gets one line naming the option to drop, not a compiler traceback."""

    def __init__(self, fn: Any, mode: str | None = None) -> None:
        self.fn = torch.compile(fn, mode=mode, dynamic=False)
        self.compiled = False  # True after a first call went through (a --prompts library's next runs reuse it)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        try:
            out = self.fn(x)
            self.compiled = True
            return out
        except torch._dynamo.exc.TorchDynamoException as e:  # compile failures (BackendCompilerFailed, ...)
            cause = getattr(e, "inner_exception", None) or e  # the compiler's own error, when it has one
            first = (str(cause).strip().splitlines() or [""])[0][:160]
            raise UserError(
                f"--compile-vae: torch.compile could not compile the VAE encoder ({type(cause).__name__}: {first}); "
                "drop --compile-vae (--no-compile-vae on --resume of a run saved with it)"
            ) from e


class GraphedVAEMean:
    """The VAE encoder's forward and backward (to the image; the weights are frozen) replayed from two CUDA graphs
    (``torch.cuda.make_graphed_callables``), captured on the first call and again when the input's shape, dtype
    or strides change. Like :class:`CUDAGraphUNet`'s, the returned latent is the graph's static output,
    overwritten by the next call: one SDS step uses it before the next. Calls without gradient run eagerly."""

    def __init__(self, fn: Any, warmup_iters: int = 3) -> None:
        self.fn, self.warmup_iters = fn, warmup_iters
        self._key: tuple | None = None
        self._graphed: Any = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not x.requires_grad:  # no backward wanted: the plain call (the graph's backward expects one)
            return self.fn(x)
        key = (x.shape, x.dtype, x.stride(), x.device)
        if key != self._key:
            if self._graphed is not None:  # the old graphs are destroyed now, not during a capture
                self._graphed = self._key = None
                _capture.collect()
            sample = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device).uniform_(-1, 1)
            with _capture.capturing():
                self._graphed = torch.cuda.make_graphed_callables(
                    self.fn, (sample.requires_grad_(True),), num_warmup_iters=self.warmup_iters
                )
            self._key = key
        return self._graphed(x)


class CUDAGraphUNet(torch.nn.Module):
    """A frozen UNet replayed from a CUDA graph: one launch instead of ~1,000 kernel launches per call.

    The graph is captured on the first call (after a few eager warm-up calls on a side stream) and again
    whenever the input shapes, dtypes or strides change. The returned tensor is the graph's static output,
    overwritten by the next call: use it (``predict_eps`` does) before calling again. Inference only.
    """

    def __init__(self, unet: torch.nn.Module, warmup_calls: int = 3) -> None:
        super().__init__()
        self.unet = unet
        self.config = unet.config
        self.warmup_calls = warmup_calls
        self._key: tuple | None = None
        self._graph: torch.cuda.CUDAGraph | None = None
        self._static_in: list[torch.Tensor] = []
        self._static_out: torch.Tensor | None = None

    @staticmethod
    def _signature(*tensors: torch.Tensor) -> tuple:
        return tuple((t.shape, t.dtype, t.stride(), t.device) for t in tensors)

    @torch.no_grad()
    def _capture(self, sample: torch.Tensor, timestep: torch.Tensor, hidden: torch.Tensor) -> None:
        static = [t.clone() for t in (sample, timestep, hidden)]  # clone keeps channels_last strides

        def call() -> torch.Tensor:
            return self.unet(static[0], static[1], encoder_hidden_states=static[2], return_dict=False)[0]

        side = torch.cuda.Stream(device=sample.device)
        side.wait_stream(torch.cuda.current_stream(sample.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup_calls):
                call()
        torch.cuda.current_stream(sample.device).wait_stream(side)
        # The old graph is destroyed now (no cycle holds it); a failed capture leaves nothing to replay.
        self._graph = self._static_out = self._key = None
        graph = torch.cuda.CUDAGraph()
        with _capture.capturing(), torch.cuda.graph(graph):
            out = call()
        self._graph, self._static_in, self._static_out = graph, static, out

    @torch.no_grad()
    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        return_dict: bool = False,
    ) -> tuple[torch.Tensor]:
        if not torch.is_tensor(timestep):
            timestep = torch.tensor([timestep], device=sample.device).expand(sample.shape[0])
        key = self._signature(sample, timestep, encoder_hidden_states)
        if key != self._key:
            self._capture(sample, timestep, encoder_hidden_states)
            self._key = key
        for dst, src in zip(self._static_in, (sample, timestep, encoder_hidden_states)):
            dst.copy_(src)
        self._graph.replay()
        return (self._static_out,)
