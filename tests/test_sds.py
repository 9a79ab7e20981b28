# SPDX-License-Identifier: Apache-2.0
"""SDS maths on hand-computed cases."""

import math

import pytest
import torch

from fastdream.guidance.base import SDSConfig, normalize_view_word, view_indices, view_prompt
from fastdream.sds import (
    add_noise,
    eps_from_prediction,
    guided_eps,
    sample_timesteps,
    sds_grad,
    sds_loss_from_grad,
    sds_weight,
)

# ᾱ for four timesteps; t = [1, 3] picks ᾱ = 0.64 (α 0.8, σ 0.6) and ᾱ = 0.25 (α 0.5, σ² 0.75).
ALPHAS_CUMPROD = torch.tensor([0.9, 0.64, 0.36, 0.25])
T = torch.tensor([1, 3])
EPS_U = torch.tensor([[0.5, -1.0], [0.0, 2.0]]).reshape(2, 1, 1, 2)
EPS_C = torch.tensor([[1.0, 0.0], [1.0, 1.0]]).reshape(2, 1, 1, 2)
EPS = torch.tensor([[0.25, 0.5], [-1.0, 0.0]]).reshape(2, 1, 1, 2)
OMEGA = 3.0
# ε̂ = ε_u + 3 (ε_c − ε_u) = [[2, 2], [3, -1]]; ε̂ − ε = [[1.75, 1.5], [4, -1]].
DIFF = torch.tensor([[1.75, 1.5], [4.0, -1.0]]).reshape(2, 1, 1, 2)


def test_guided_eps_hand_computed():
    assert torch.equal(guided_eps(EPS_U, EPS_C, OMEGA), torch.tensor([[2.0, 2.0], [3.0, -1.0]]).reshape(2, 1, 1, 2))


@pytest.mark.parametrize(
    "weighting, expected",
    [
        ("sds", [[0.63, 0.54], [3.0, -0.75]]),  # σ² = 0.36, 0.75
        ("dreamfusion", [[0.63, 0.54], [3.0, -0.75]]),
        ("uniform", [[1.75, 1.5], [4.0, -1.0]]),
        ("sigma", [[1.05, 0.9], [4.0 * math.sqrt(0.75), -math.sqrt(0.75)]]),  # σ = 0.6, sqrt(0.75)
    ],
)
def test_sds_grad_hand_computed(weighting, expected):
    grad = sds_grad(EPS_U, EPS_C, EPS, T, ALPHAS_CUMPROD, OMEGA, weighting)
    assert grad.dtype == torch.float32 and grad.shape == EPS.shape
    torch.testing.assert_close(grad, torch.tensor(expected).reshape(2, 1, 1, 2), rtol=1e-6, atol=1e-6)
    w = sds_weight(T, ALPHAS_CUMPROD, weighting)
    torch.testing.assert_close(grad, w.reshape(2, 1, 1, 1) * DIFF, rtol=0, atol=0)


def test_sds_weight_values():
    torch.testing.assert_close(sds_weight(T, ALPHAS_CUMPROD, "sds"), torch.tensor([0.36, 0.75]))
    torch.testing.assert_close(sds_weight(T, ALPHAS_CUMPROD, "sigma"), torch.tensor([0.6, math.sqrt(0.75)]))
    assert torch.equal(sds_weight(T, ALPHAS_CUMPROD, "uniform"), torch.ones(2))
    with pytest.raises(ValueError, match="weighting"):
        sds_weight(T, ALPHAS_CUMPROD, "nope")


def test_add_noise_hand_computed():
    z = torch.tensor([[1.0, -2.0], [2.0, 4.0]]).reshape(2, 1, 1, 2)
    z_t = add_noise(z, EPS, T, ALPHAS_CUMPROD)
    # 0.8·1 + 0.6·0.25, 0.8·(−2) + 0.6·0.5; 0.5·2 − sqrt(0.75), 0.5·4
    expected = torch.tensor([[0.95, -1.3], [1.0 - math.sqrt(0.75), 2.0]]).reshape(2, 1, 1, 2)
    torch.testing.assert_close(z_t, expected, rtol=1e-6, atol=1e-6)


def test_loss_trick_gradient_is_exactly_sds_grad():
    z = torch.tensor([[1.0, -2.0], [2.0, 4.0]]).reshape(2, 1, 1, 2).requires_grad_(True)
    grad = sds_grad(EPS_U, EPS_C, EPS, T, ALPHAS_CUMPROD, OMEGA, "sds")
    loss = sds_loss_from_grad(z, grad)
    assert loss.dim() == 0
    loss.backward()
    assert torch.equal(z.grad, grad)  # bit for bit
    # the value is 0.5‖grad‖², for logging: 0.5 (0.63² + 0.54² + 3² + 0.75²)
    torch.testing.assert_close(loss.detach(), torch.tensor(0.5 * (0.63**2 + 0.54**2 + 9.0 + 0.75**2)))


def test_loss_trick_chains_through_a_differentiable_map():
    x = torch.tensor([0.5, 1.5, -1.0, 2.0], requires_grad=True)
    z = (2.0 * x).reshape(1, 1, 2, 2)  # dz/dx = 2
    grad = torch.tensor([1.0, -2.0, 0.5, 3.0]).reshape(1, 1, 2, 2)
    sds_loss_from_grad(z, grad).backward()
    assert torch.equal(x.grad, 2.0 * grad.flatten())


def test_perfect_denoiser_gives_zero_gradient():
    eps = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sds_grad(eps, eps, eps, T, ALPHAS_CUMPROD, 100.0), torch.zeros_like(eps))


def test_non_finite_predictions_are_zeroed_and_clip_applies():
    eu = EPS_U.clone()
    eu[0, 0, 0, 0] = float("nan")
    eu[1, 0, 0, 1] = float("inf")
    grad = sds_grad(eu, EPS_C, EPS, T, ALPHAS_CUMPROD, OMEGA, "uniform")
    assert torch.isfinite(grad).all()
    assert grad[0, 0, 0, 0] == 0 and grad[1, 0, 0, 1] == 0
    clipped = sds_grad(EPS_U, EPS_C, EPS, T, ALPHAS_CUMPROD, OMEGA, "uniform", grad_clip=1.6)
    torch.testing.assert_close(clipped, torch.tensor([[1.6, 1.5], [1.6, -1.0]]).reshape(2, 1, 1, 2))
    clipped = sds_grad(EPS_U, EPS_C, EPS, T, ALPHAS_CUMPROD, OMEGA, "uniform", grad_clip=0.9)  # both signs
    torch.testing.assert_close(clipped, torch.tensor([[0.9, 0.9], [0.9, -0.9]]).reshape(2, 1, 1, 2))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_eps_from_prediction_recovers_the_noise(prediction_type):
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    z_t = add_noise(x0, eps, T, ALPHAS_CUMPROD)
    a = ALPHAS_CUMPROD[T].sqrt().reshape(2, 1, 1, 1)
    s = (1 - ALPHAS_CUMPROD[T]).sqrt().reshape(2, 1, 1, 1)
    pred = {"epsilon": eps, "v_prediction": a * eps - s * x0, "sample": x0}[prediction_type]
    torch.testing.assert_close(eps_from_prediction(pred, z_t, T, ALPHAS_CUMPROD, prediction_type), eps)
    with pytest.raises(ValueError, match="prediction_type"):
        eps_from_prediction(pred, z_t, T, ALPHAS_CUMPROD, "flow")


def test_sample_timesteps_range_and_seed():
    t = sample_timesteps(4000, 1000, (0.02, 0.98), generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.shape == (4000,)
    assert int(t.min()) == 20 and int(t.max()) == 980  # inclusive ends, reached with 4000 draws
    t2 = sample_timesteps(4000, 1000, (0.02, 0.98), generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, t2)
    assert torch.equal(sample_timesteps(3, 1000, (0.5, 0.5)), torch.full((3,), 500))
    assert int(sample_timesteps(100, 1000, (0.99, 1.0)).max()) == 999  # never past the last timestep
    with pytest.raises(ValueError, match="t_range"):
        sample_timesteps(1, 1000, (0.5, 0.2))


def test_sds_config_validation():
    cfg = SDSConfig()
    assert cfg.guidance_scale is None and cfg.t_range == (0.02, 0.98) and cfg.weighting == "sds"
    for bad in (dict(t_range=(0.5, 0.2)), dict(t_range=(-0.1, 0.5)), dict(weighting="x"), dict(guidance_scale=-1.0)):
        with pytest.raises(ValueError):
            SDSConfig(**bad)


def test_view_word_helpers():
    assert normalize_view_word("Front view") == "front" and normalize_view_word("overhead") == "overhead"
    assert view_prompt(" a red cube ", "back") == "a red cube, back view"
    assert view_indices(["front", "side view", "back", "overhead"]).tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="view word"):
        normalize_view_word("below")
