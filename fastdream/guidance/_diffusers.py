# SPDX-License-Identifier: Apache-2.0
"""What the Stable Diffusion and DeepFloyd IF backends share: frozen modules, the per-view-word text
embedding cache, and the SDS step around one batched classifier-free-guidance UNet call."""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

import torch

from fastdream.errors import UserError
from fastdream.guidance.base import VIEW_WORDS, SDSConfig, check_images, view_indices, view_prompt
from fastdream.sds import (
    PREDICTION_TYPES,
    add_noise,
    eps_from_prediction,
    sample_timesteps,
    sds_grad,
    sds_loss_from_grad,
    sds_weight,
)


def freeze(
    module: torch.nn.Module, device: torch.device, dtype: torch.dtype, *, channels_last: bool = True
) -> torch.nn.Module:
    """eval, requires_grad off, on ``device`` in ``dtype``; channels_last on CUDA (faster fp16 convolutions)
    unless ``channels_last`` is False."""
    module.eval().requires_grad_(False)
    # Cast only what is not in ``dtype`` yet: loaded with torch_dtype, nothing is, and diffusers' warning about
    # casting with .to() (printed even when it has nothing to say) stays out of the user's terminal.
    if any(t.dtype != dtype for t in module.parameters() if t.is_floating_point()):
        module.to(dtype=dtype)
    module.to(device=device)
    if device.type == "cuda" and channels_last:
        module.to(memory_format=torch.channels_last)
    return module


class DiffusersGuidance:
    """Base of the diffusers backends. Subclasses set the class attributes and implement
    :meth:`encode_images` (renders in [0, 1] -> model input z, differentiable) and :meth:`_encode_text`.

    Attributes:
        unet: the frozen UNet2DConditionModel. alphas_cumprod: [T] fp32 on device.
        num_train_timesteps, prediction_type: from the scheduler config.
        text_encoder, tokenizer: set until :meth:`prepare` frees them.
        unet_channels_last: on CUDA the UNet's weights and input are channels_last (the default; False: NCHW).
    """

    default_guidance_scale: float = 100.0
    eps_channels: int = 4  # leading UNet output channels that are ε̂ (IF predicts ε̂ and a variance)

    def __init__(
        self,
        *,
        unet: torch.nn.Module,
        scheduler: Any,
        text_encoder: torch.nn.Module | None,
        tokenizer: Any,
        device: torch.device,
        dtype: torch.dtype,
        resolution: int,
        name: str = "",
        text_encoder_loader: Callable[[], torch.nn.Module] | None = None,
        unet_channels_last: bool = True,
    ) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self.resolution = int(resolution)
        self.name = name
        self.unet = freeze(unet, self.device, dtype, channels_last=unet_channels_last)
        self.unet_channels_last = unet_channels_last and self.device.type == "cuda"
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        self.prediction_type = str(scheduler.config.get("prediction_type", "epsilon"))
        if self.prediction_type not in PREDICTION_TYPES:
            raise UserError(
                f"{name or 'the model'}: its scheduler's prediction_type {self.prediction_type!r} is not supported "
                f"(fastdream reads {', '.join(PREDICTION_TYPES)})"
            )
        self.alphas_cumprod = scheduler.alphas_cumprod.detach().to(self.device, torch.float32)
        if self.num_train_timesteps < 2 or self.alphas_cumprod.numel() != self.num_train_timesteps:
            raise UserError(
                f"{name or 'the model'}: its scheduler has {self.num_train_timesteps} training timesteps "
                f"({self.alphas_cumprod.numel()} noise levels); SDS needs the model's own schedule (1000 for SD and IF)"
            )
        self.text_encoder = freeze(text_encoder, self.device, dtype) if text_encoder is not None else None
        self.tokenizer = tokenizer
        self._text_encoder_loader = text_encoder_loader
        self.prompt: str | None = None
        self.cond_embeddings: torch.Tensor | None = None  # [len(VIEW_WORDS), L, D]
        self.uncond_embeddings: torch.Tensor | None = None  # [1, L, D]
        self.notes: list[str] = []  # what the user should know about the last prepare() (a prompt cut short)

    # --- text -------------------------------------------------------------------------------------------

    def _encode_text(self, texts: list[str]) -> torch.Tensor:
        """[N, L, D] encoder hidden states of ``texts`` (no grad)."""
        raise NotImplementedError

    def _tokenize(self, texts: list[str], max_len: int) -> Any:
        """``texts`` tokenized, padded and cut to ``max_len`` tokens. A text that was cut adds a note to
        :attr:`notes`: the view word comes last (``"{prompt}, front view"``), so a long prompt loses it silently."""
        # max_len + 1 with truncation: tells a cut text without the tokenizer's own over-length warning.
        longest = max(len(ids) for ids in self.tokenizer(texts, truncation=True, max_length=max_len + 1).input_ids)
        if longest > max_len:
            self.notes.append(
                f"note: the prompt with its view word is longer than the {max_len} tokens that "
                f"{self.name or 'the model'}'s text encoder reads; the words past that, the view word ('front "
                f"view', 'side view', ...) among them, are ignored: shorten the prompt"
            )
        return self.tokenizer(texts, padding="max_length", max_length=max_len, truncation=True, return_tensors="pt")

    @torch.no_grad()
    def prepare(self, prompt: str, negative_prompt: str = "") -> None:
        """Cache embeddings of ``"{prompt}, {word} view"`` for each view word and of ``negative_prompt``,
        then free the text encoder (reloaded from the checkpoint if called again)."""
        if self.text_encoder is None:
            if self._text_encoder_loader is None:
                raise RuntimeError("the text encoder was freed and cannot be reloaded")
            self.text_encoder = freeze(self._text_encoder_loader(), self.device, self.dtype)
        texts = [view_prompt(prompt, w) for w in VIEW_WORDS] + [negative_prompt]
        self.notes = []
        emb = self._encode_text(texts)
        self.set_text_embeddings(emb[: len(VIEW_WORDS)], emb[len(VIEW_WORDS) :], prompt)
        self.free_text_encoder()

    def set_text_embeddings(self, cond: torch.Tensor, uncond: torch.Tensor, prompt: str = "") -> None:
        """Install embeddings directly (benchmarks with random weights, precomputed prompts).

        Args:
            cond: [len(VIEW_WORDS), L, D] one per view word, in :data:`VIEW_WORDS` order. uncond: [1, L, D].
        """
        if cond.dim() != 3 or cond.shape[0] != len(VIEW_WORDS):
            raise ValueError(f"cond must be [{len(VIEW_WORDS)}, L, D], got {tuple(cond.shape)}")
        if uncond.dim() != 3 or uncond.shape[0] != 1 or uncond.shape[1:] != cond.shape[1:]:
            raise ValueError(f"uncond must be [1, {cond.shape[1]}, {cond.shape[2]}], got {tuple(uncond.shape)}")
        self.cond_embeddings = cond.detach().to(self.device, self.dtype)
        self.uncond_embeddings = uncond.detach().to(self.device, self.dtype)
        self.prompt = prompt

    def free_text_encoder(self) -> None:
        self.text_encoder = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # --- images and SDS ---------------------------------------------------------------------------------

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> model input z [B, C, h, w], differentiable w.r.t. ``images``."""
        raise NotImplementedError

    @torch.no_grad()
    def predict_eps(
        self, z_t: torch.Tensor, t: torch.Tensor, view_words: list[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(ε̂_uncond, ε̂_cond) fp32 [B, C, h, w] from ONE batched UNet call on [uncond; cond]."""
        if self.cond_embeddings is None or self.uncond_embeddings is None:
            raise RuntimeError("call guidance.prepare(prompt) before sds_loss")
        b = z_t.shape[0]
        # Python-int indexing + stack: no host-to-device copy of an index tensor every step.
        cond = torch.stack([self.cond_embeddings[i] for i in view_indices(view_words).tolist()])
        uncond = self.uncond_embeddings.expand(b, -1, -1)
        z_in = torch.cat([z_t, z_t]).to(self.dtype)
        if self.unet_channels_last:
            z_in = z_in.contiguous(memory_format=torch.channels_last)
        t_in = torch.cat([t, t])
        out = self.unet(z_in, t_in, encoder_hidden_states=torch.cat([uncond, cond]), return_dict=False)[0]
        out = out[:, : self.eps_channels]
        eps = eps_from_prediction(out, torch.cat([z_t, z_t]), t_in, self.alphas_cumprod, self.prediction_type)
        return eps[:b], eps[b:]

    def sds_loss(
        self,
        images: torch.Tensor,
        view_words: list[str],
        cfg: SDSConfig,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """See :meth:`fastdream.guidance.base.Guidance.sds_loss`. t and ε are drawn from ``generator`` (on its
        own device, then moved), so a seeded CPU generator reproduces a run."""
        check_images(images, view_words)
        view_indices(view_words)  # reject unknown words before the VAE runs
        if self.cond_embeddings is None:
            raise RuntimeError("call guidance.prepare(prompt) before sds_loss")
        b = images.shape[0]
        z = self.encode_images(images.to(self.device))
        t = sample_timesteps(b, self.num_train_timesteps, cfg.t_range, generator, self.device)
        gen_device = generator.device if generator is not None else self.device
        eps = torch.randn(z.shape, generator=generator, device=gen_device, dtype=torch.float32).to(self.device)
        with torch.no_grad():
            z_t = add_noise(z.detach().float(), eps, t, self.alphas_cumprod)
            eps_u, eps_c = self.predict_eps(z_t, t, view_words)
            scale = self.default_guidance_scale if cfg.guidance_scale is None else cfg.guidance_scale
            grad = sds_grad(eps_u, eps_c, eps, t, self.alphas_cumprod, scale, cfg.weighting, cfg.grad_clip)
        loss = sds_loss_from_grad(z, grad)
        info = {
            "t": t,
            "t_frac": t.float() / self.num_train_timesteps,
            "weight": sds_weight(t, self.alphas_cumprod, cfg.weighting),
            "grad_norm": grad.norm(),
            "guidance_scale": scale,
        }
        return loss, info
