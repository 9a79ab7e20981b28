# SPDX-License-Identifier: Apache-2.0
"""The interface every guidance backend implements (diffusers SD, diffusers IF, builtin).

The trainer uses a guidance object in three ways::

    guidance = load_guidance("builtin" | hub id | folder, device)
    guidance.prepare("a red cube")                 # once: text embeddings per view word, encoders freed
    loss, info = guidance.sds_loss(images, words, SDSConfig(guidance_scale=guidance.default_guidance_scale))
    loss.backward()                                # d loss / d images is the SDS gradient pulled back to pixels

``images`` are renders ``[B, 3, H, W]`` in ``[0, 1]`` (any H, W; a backend resizes to what it needs, the
trainer should render at ``guidance.resolution``). ``words`` are view words from
:func:`fastdream.cameras.view_word` ("front", "side", "back", "overhead"; "front view" etc. also accepted).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

VIEW_WORDS: tuple[str, ...] = ("front", "side", "back", "overhead")
WEIGHTINGS: tuple[str, ...] = ("sds", "uniform", "sigma", "dreamfusion")


@dataclass(frozen=True)
class SDSConfig:
    """Settings of one SDS evaluation.

    Attributes:
        guidance_scale: classifier-free guidance weight ω; ε̂ = ε_u + ω (ε_c − ε_u). ``None`` uses the
            backend's ``default_guidance_scale`` (SD: 100, IF: 20, builtin: its own).
        t_range: diffusion time t ~ U(t_range) as a fraction of the scheduler's ``num_train_timesteps``.
        weighting: w(t). ``"sds"`` (default) and its alias ``"dreamfusion"``: σ_t² = 1 − ᾱ_t (the paper);
            ``"uniform"``: 1; ``"sigma"``: σ_t.
        grad_clip: if set, the per-element SDS gradient is clamped to ``[-grad_clip, grad_clip]``.
    """

    guidance_scale: float | None = None
    t_range: tuple[float, float] = (0.02, 0.98)
    weighting: str = "sds"
    grad_clip: float | None = None

    def __post_init__(self) -> None:
        lo, hi = self.t_range
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"t_range must satisfy 0 <= lo <= hi <= 1, got {self.t_range}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if self.guidance_scale is not None and self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {self.guidance_scale}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip must be > 0, got {self.grad_clip}")


@runtime_checkable
class Guidance(Protocol):
    """A frozen text-to-image diffusion prior that scores renders by SDS.

    Attributes:
        resolution: the render size (H = W) the trainer should produce for it (64 for all current backends;
            SD upsamples internally to its native size).
        default_guidance_scale: ω used when ``SDSConfig.guidance_scale`` is None.
        device: where the model runs; ``images`` may live there or be moved there.
    """

    resolution: int
    default_guidance_scale: float
    device: torch.device

    def prepare(self, prompt: str, negative_prompt: str = "") -> None:
        """Compute and cache the text embeddings of ``f"{prompt}, {word} view"`` for every word of
        :data:`VIEW_WORDS` and of the negative prompt (the unconditional branch), then free the text encoder.
        Calling it again with another prompt replaces the cache (the diffusers backends reload the encoder)."""
        ...

    def sds_loss(
        self,
        images: torch.Tensor,  # [B, 3, H, W] in [0, 1]
        view_words: list[str],  # len B
        cfg: SDSConfig,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """One SDS evaluation with one batched UNet call for [uncond, cond].

        Returns:
            loss: scalar tensor; d loss / d z = w(t)(ε̂ − ε) exactly at the model input z (VAE latents for SD,
                images in [-1, 1] for IF and builtin), summed over the batch (not averaged). Its value is
                0.5 ‖w(t)(ε̂ − ε)‖², for logging only.
            info: detached tensors: ``t`` [B] int timesteps, ``t_frac`` [B], ``weight`` [B] w(t),
                ``grad_norm`` scalar ‖w(t)(ε̂ − ε)‖ over the batch.
        """
        ...


def normalize_view_word(word: str) -> str:
    """'front view' / 'Front' -> 'front'; raises ValueError for anything not in :data:`VIEW_WORDS`."""
    w = word.strip().lower()
    if w.endswith(" view"):
        w = w[: -len(" view")].strip()
    if w not in VIEW_WORDS:
        raise ValueError(f"unknown view word {word!r}; expected one of {VIEW_WORDS}")
    return w


def view_prompt(prompt: str, word: str) -> str:
    """DreamFusion's view-dependent prompt: ``"a red cube, front view"``."""
    return f"{prompt.strip()}, {normalize_view_word(word)} view"


def view_indices(view_words: list[str], device: torch.device | str | None = None) -> torch.Tensor:
    """Indices into :data:`VIEW_WORDS` of each word, as an int64 tensor [B]."""
    return torch.tensor([VIEW_WORDS.index(normalize_view_word(w)) for w in view_words], dtype=torch.long, device=device)


def check_images(images: torch.Tensor, view_words: list[str]) -> None:
    """The input checks every backend's ``sds_loss`` starts with."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a [B, 3, H, W] tensor in [0, 1], got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point, got {images.dtype}")
    if len(view_words) != images.shape[0]:
        raise ValueError(f"view_words has {len(view_words)} entries for a batch of {images.shape[0]} images")
