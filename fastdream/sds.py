# SPDX-License-Identifier: Apache-2.0
"""Score Distillation Sampling: the maths, free of any model.

DreamFusion (Poole et al., 2022): with z the model input (image or latent), t ~ U(t_min, t_max),
ε ~ N(0, I) and z_t = α_t z + σ_t ε (α_t = sqrt(ᾱ_t), σ_t = sqrt(1 − ᾱ_t)), the SDS gradient is

    ∂L/∂z = w(t) (ε̂(z_t; y, t) − ε),   ε̂ = ε_u + ω (ε_c − ε_u)   (classifier-free guidance)

with the U-Net Jacobian omitted. :func:`sds_loss_from_grad` turns it into a scalar whose autograd gradient
w.r.t. z is exactly that, so the trainer can call ``loss.backward()``.

Example:
    >>> import torch
    >>> ac = torch.linspace(0.999, 0.01, 1000)
    >>> t = torch.tensor([500])
    >>> z, eps = torch.zeros(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    >>> z_t = add_noise(z, eps, t, ac)
    >>> g = sds_grad(eps, eps, eps, t, ac, guidance_scale=100.0)  # a perfect denoiser: zero gradient
    >>> float(g.abs().max())
    0.0
"""

from __future__ import annotations

import torch

from fastdream.guidance.base import WEIGHTINGS

__all__ = [
    "add_noise",
    "eps_from_prediction",
    "guided_eps",
    "sample_timesteps",
    "sds_grad",
    "sds_loss_from_grad",
    "sds_weight",
]


def _per_sample(x: torch.Tensor, ndim: int) -> torch.Tensor:
    """[B] -> [B, 1, ..., 1] with ``ndim`` dims in total, for broadcasting against [B, C, H, W]."""
    return x.reshape(x.shape[0], *([1] * (ndim - 1)))


def _alpha_bar(t: torch.Tensor, alphas_cumprod: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """ᾱ_t gathered per sample in fp32 and broadcast to ``like``'s rank."""
    ab = alphas_cumprod.to(device=t.device, dtype=torch.float32)[t.long()]
    return _per_sample(ab, like.dim())


def sample_timesteps(
    batch: int,
    num_train_timesteps: int,
    t_range: tuple[float, float] = (0.02, 0.98),
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Integer timesteps t [B] uniform in [round(lo·T), round(hi·T)] (inclusive), T = num_train_timesteps.

    Drawn on the generator's device (so a seeded CPU generator gives the same t on any device), then moved
    to ``device``.
    """
    lo, hi = t_range
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"t_range must satisfy 0 <= lo <= hi <= 1, got {t_range}")
    t_min = int(round(lo * num_train_timesteps))
    t_max = min(int(round(hi * num_train_timesteps)), num_train_timesteps - 1)
    t_min = min(t_min, t_max)
    gen_device = generator.device if generator is not None else device
    t = torch.randint(t_min, t_max + 1, (batch,), generator=generator, device=gen_device, dtype=torch.long)
    return t.to(device) if device is not None else t


def add_noise(z: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Forward diffusion z_t = sqrt(ᾱ_t) z + sqrt(1 − ᾱ_t) ε.

    Args:
        z: [B, ...] clean input. eps: same shape, the noise. t: [B] int timesteps.
        alphas_cumprod: [T] ᾱ of the scheduler.

    Returns:
        z_t in z's dtype (computed in fp32).
    """
    ab = _alpha_bar(t, alphas_cumprod, z)
    return (ab.sqrt() * z.float() + (1.0 - ab).sqrt() * eps.float()).to(z.dtype)


def sds_weight(t: torch.Tensor, alphas_cumprod: torch.Tensor, kind: str = "sds") -> torch.Tensor:
    """w(t) [B] in fp32: ``"sds"``/``"dreamfusion"`` σ_t² = 1 − ᾱ_t, ``"uniform"`` 1, ``"sigma"`` σ_t."""
    ab = alphas_cumprod.to(device=t.device, dtype=torch.float32)[t.long()]
    if kind in ("sds", "dreamfusion"):
        return 1.0 - ab
    if kind == "uniform":
        return torch.ones_like(ab)
    if kind == "sigma":
        return (1.0 - ab).sqrt()
    raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {kind!r}")


def guided_eps(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance ε̂ = ε_u + ω (ε_c − ε_u), in fp32."""
    eu = eps_uncond.float()
    return eu + guidance_scale * (eps_cond.float() - eu)


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")  # diffusers' scheduler ``prediction_type`` values


def eps_from_prediction(
    pred: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """Convert a UNet output to ε̂ (fp32) for ``prediction_type`` "epsilon", "v_prediction" or "sample".

    v = α_t ε − σ_t x₀ gives ε = α_t v + σ_t z_t; x₀ gives ε = (z_t − α_t x₀) / σ_t.
    """
    if prediction_type == "epsilon":
        return pred.float()
    ab = _alpha_bar(t, alphas_cumprod, z_t)
    a, s = ab.sqrt(), (1.0 - ab).sqrt()
    if prediction_type == "v_prediction":
        return a * pred.float() + s * z_t.float()
    if prediction_type == "sample":
        return (z_t.float() - a * pred.float()) / s
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


def sds_grad(
    eps_pred_uncond: torch.Tensor,
    eps_pred_cond: torch.Tensor,
    eps: torch.Tensor,
    t: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    guidance_scale: float,
    weighting: str = "sds",
    grad_clip: float | None = None,
) -> torch.Tensor:
    """The SDS gradient w(t)(ε̂ − ε) w.r.t. the model input z, fp32, same shape as ``eps``.

    Args:
        eps_pred_uncond, eps_pred_cond: [B, C, H, W] UNet ε predictions without and with the prompt.
        eps: [B, C, H, W] the noise added to z. t: [B] int timesteps. alphas_cumprod: [T].
        guidance_scale: ω. weighting: see :func:`sds_weight`.
        grad_clip: optional per-element clamp of the result.

    Non-finite entries (fp16 overflow in the UNet) become 0 rather than poisoning the field.
    """
    w = _per_sample(sds_weight(t, alphas_cumprod, weighting), eps.dim())
    grad = w * (guided_eps(eps_pred_uncond, eps_pred_cond, guidance_scale) - eps.float())
    grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
    if grad_clip is not None:
        grad = grad.clamp(-grad_clip, grad_clip)
    return grad


def sds_loss_from_grad(z: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """A scalar whose gradient w.r.t. ``z`` is exactly ``grad`` (summed over the batch, not averaged).

    ``(grad · z).sum()`` has gradient ``grad`` bit for bit; a detached offset makes the value
    0.5 ‖grad‖² for logging without touching the gradient.
    """
    grad = grad.detach().float()
    linear = (grad * z.float()).sum()
    return linear + (0.5 * grad.square().sum() - linear).detach()
