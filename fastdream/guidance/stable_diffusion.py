# SPDX-License-Identifier: Apache-2.0
"""Stable Diffusion 1.x/2.x guidance (latent diffusion) through diffusers.

The render is resized (bilinear) to the model's native size, ``unet.config.sample_size`` × the VAE scale
factor (512 for SD 2.1 base), mapped to [-1, 1] and VAE-encoded WITH gradient; z is the posterior mean
× ``vae.config.scaling_factor``. The SDS gradient w.r.t. z flows back through the VAE encoder to the render.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from fastdream.guidance._diffusers import DiffusersGuidance, freeze
from fastdream.guidance.loading import ModelSource, load_component, load_tokenizer, transformers_class

TEXT_ENCODERS = ("CLIPTextModel", "CLIPTextModelWithProjection")
# The VAE's one attention (mid block, 64x64 tokens, one head of 512 channels at 512x512): "sdpa" is diffusers'
# default (PyTorch's scaled_dot_product_attention; head size 512 rules out flash attention, so on CUDA it runs
# the memory-efficient kernel, whose backward alone took 5 ms a step on an H200), "classic" diffusers'
# AttnProcessor (baddbmm, softmax, bmm: a few large matmuls each way). fastdream's default is "classic".
VAE_ATTENTION = ("sdpa", "classic")
# The VAE encoder's GroupNorms: "native" (torch.nn.GroupNorm) or "split" (fastdream.guidance.groupnorm: the
# statistics as split reductions, PyTorch's backward). "split" is the default: on an H100 (2026-11-26, same call,
# UNet and VAE in CUDA graphs) the encode took 7.3 ms instead of 11.6 and the step 40.7 instead of 44.0.
VAE_GROUPNORM = ("native", "split")
# Measured on an H200 (2026-11-26, benchmarks/RESULTS.md), SD-2.1-base-shaped 64x64 step with the UNet in a CUDA
# graph: channels_last VAE + sdpa 53.6 ms; contiguous VAE 50.8; classic attention 48.4; both 40.4 (encode 13.5 ->
# 10.9 ms, backward 19.3 -> 9.0 ms). In channels_last, each of the encoder's 22 GroupNorms (at up to 512x512x128)
# first copied its input to NCHW and back; the UNet (64x64 latents) stays channels_last, which is faster there.
# Since session 11 the split GroupNorm has a channels_last path of its own (no copies); with it the channels_last
# VAE measured 2% slower than the contiguous one (H100, session 12), so the default stays contiguous.


class StableDiffusionGuidance(DiffusersGuidance):
    """SDS with a frozen Stable Diffusion UNet + VAE encoder + CLIP text encoder.

    Attributes:
        vae: frozen AutoencoderKL (only its encoder is used). model_resolution: native image size (512).
        resolution: render size the trainer should produce (default 64; upsampled to ``model_resolution``).
        vae_channels_last: on CUDA, the VAE's weights and input in channels_last (default False: contiguous NCHW).
        vae_attention: see ``VAE_ATTENTION``. vae_groupnorm: see ``VAE_GROUPNORM``.
    """

    default_guidance_scale = 100.0
    eps_channels = 4

    def __init__(
        self,
        *,
        vae: torch.nn.Module,
        render_resolution: int = 64,
        vae_channels_last: bool = False,
        vae_attention: str = "classic",
        vae_groupnorm: str = "split",
        **kw: Any,
    ) -> None:
        if vae_attention not in VAE_ATTENTION:
            raise ValueError(f"vae_attention must be one of {VAE_ATTENTION}, got {vae_attention!r}")
        if vae_groupnorm not in VAE_GROUPNORM:
            raise ValueError(f"vae_groupnorm must be one of {VAE_GROUPNORM}, got {vae_groupnorm!r}")
        super().__init__(resolution=render_resolution, **kw)
        self.vae = freeze(vae, self.device, self.dtype, channels_last=vae_channels_last)
        self.vae_channels_last = vae_channels_last and self.device.type == "cuda"
        if vae_attention == "classic":
            from diffusers.models.attention_processor import AttnProcessor

            self.vae.set_attn_processor(AttnProcessor())
        if vae_groupnorm == "split":
            from fastdream.guidance.groupnorm import use_split_group_norm

            use_split_group_norm(self.vae.encoder)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self.model_resolution = int(self.unet.config.sample_size) * self.vae_scale_factor

    @classmethod
    def from_source(
        cls, source: ModelSource, device: torch.device, dtype: torch.dtype, *, variant: str | None = None, **kw: Any
    ) -> StableDiffusionGuidance:
        """Load unet, vae, text encoder, tokenizer and scheduler of ``source`` (see loading.py)."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

        weights = {"torch_dtype": dtype, "variant": variant}
        text_cls = transformers_class(source, "text_encoder", TEXT_ENCODERS)

        def text_encoder() -> torch.nn.Module:
            return load_component(source, "text_encoder", text_cls, dtype=dtype, variant=variant)

        return cls(
            unet=load_component(source, "unet", UNet2DConditionModel, **weights),
            vae=load_component(source, "vae", AutoencoderKL, **weights),
            scheduler=load_component(source, "scheduler", DDPMScheduler),
            text_encoder=text_encoder(),
            tokenizer=load_tokenizer(source),
            device=device,
            dtype=dtype,
            name=f"stable-diffusion:{source.model}",
            text_encoder_loader=text_encoder,
            **kw,
        )

    def _encode_text(self, texts: list[str]) -> torch.Tensor:
        max_len = min(int(self.tokenizer.model_max_length), int(self.text_encoder.config.max_position_embeddings))
        tok = self._tokenize(texts, max_len)
        kwargs = {}
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            kwargs["attention_mask"] = tok.attention_mask.to(self.device)
        return self.text_encoder(tok.input_ids.to(self.device), **kwargs)[0]

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        r = self.model_resolution
        x = (
            images
            if images.shape[-2:] == (r, r)
            else F.interpolate(images, (r, r), mode="bilinear", align_corners=False)
        )
        x = (x * 2.0 - 1.0).to(self.dtype)
        if self.vae_channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.vae_mean(x) * self.scaling_factor

    def vae_mean(self, x: torch.Tensor) -> torch.Tensor:
        """The VAE posterior of ``x`` ([B, 3, r, r] in [-1, 1], model dtype), unscaled: its mean, not a sample
        (deterministic; the VAE's own noise is tiny next to SDS noise). ``fastdream bench --cuda-graphs`` replaces
        it by a CUDA-graphed forward and backward."""
        return self.vae.encode(x).latent_dist.mean
