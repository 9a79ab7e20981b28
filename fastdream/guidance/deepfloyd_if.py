# SPDX-License-Identifier: Apache-2.0
"""DeepFloyd IF stage I guidance (pixel-space diffusion at 64×64) through diffusers.

Closest to the paper's Imagen base model: z is the render itself in [-1, 1], resized to the UNet's
``sample_size`` (64) if needed. The IF UNet predicts ε̂ and a variance (6 output channels); the first 3 are ε̂.
Text: the folder's T5 encoder (may be large; use ``variant="fp16"`` for the fp16 files) with attention mask.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from fastdream.guidance._diffusers import DiffusersGuidance
from fastdream.guidance.loading import ModelSource, load_component, load_tokenizer, transformers_class

TEXT_ENCODERS = ("T5EncoderModel",)
MAX_TEXT_TOKENS = 77  # what IFPipeline uses


class DeepFloydIFGuidance(DiffusersGuidance):
    """SDS with a frozen DeepFloyd IF stage-I UNet and T5 text encoder. ``resolution`` = UNet sample size."""

    default_guidance_scale = 20.0
    eps_channels = 3

    def __init__(self, **kw: Any) -> None:
        unet = kw["unet"]
        super().__init__(resolution=int(unet.config.sample_size), **kw)

    @classmethod
    def from_source(
        cls, source: ModelSource, device: torch.device, dtype: torch.dtype, *, variant: str | None = None, **kw: Any
    ) -> DeepFloydIFGuidance:
        from diffusers import DDPMScheduler, UNet2DConditionModel

        text_cls = transformers_class(source, "text_encoder", TEXT_ENCODERS)

        def text_encoder() -> torch.nn.Module:
            return load_component(source, "text_encoder", text_cls, dtype=dtype, variant=variant)

        return cls(
            unet=load_component(source, "unet", UNet2DConditionModel, torch_dtype=dtype, variant=variant),
            scheduler=load_component(source, "scheduler", DDPMScheduler),
            text_encoder=text_encoder(),
            tokenizer=load_tokenizer(source),
            device=device,
            dtype=dtype,
            name=f"deepfloyd-if:{source.model}",
            text_encoder_loader=text_encoder,
            **kw,
        )

    def _encode_text(self, texts: list[str]) -> torch.Tensor:
        # IFPipeline lower-cases and strips captions (its full cleaning needs bs4/ftfy); T5 sees the mask.
        texts = [t.lower().strip() for t in texts]
        max_len = min(int(self.tokenizer.model_max_length), MAX_TEXT_TOKENS)
        tok = self._tokenize(texts, max_len)
        ids, mask = tok.input_ids.to(self.device), tok.attention_mask.to(self.device)
        return self.text_encoder(ids, attention_mask=mask)[0]

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        r = self.resolution
        x = (
            images
            if images.shape[-2:] == (r, r)
            else F.interpolate(images, (r, r), mode="bilinear", align_corners=False)
        )
        return x.float() * 2.0 - 1.0
