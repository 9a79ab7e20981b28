# SPDX-License-Identifier: Apache-2.0
"""Value tests of the regularisers on constructed input."""

import math

import torch

from fastdream.losses import opacity_loss, orientation_loss


def test_orientation_loss_values():
    # Ray 0: a normal facing the camera (n.v = -1, no penalty) and one facing away at 60 degrees (n.v = 0.5).
    # Ray 1: one sample facing straight away (n.v = 1).
    v = torch.tensor([[0.0, 0.0, -1.0]] * 3)
    n = torch.tensor([[0.0, 0.0, 1.0], [0.0, math.sqrt(3) / 2, -0.5], [0.0, 0.0, -1.0]])
    w = torch.tensor([0.7, 0.2, 0.4])
    rays = torch.tensor([0, 0, 1])
    got = orientation_loss(w, n, v, rays, n_rays=2)
    expected = ((0.7 * 0.0 + 0.2 * 0.25) + 0.4 * 1.0) / 2
    assert torch.allclose(got, torch.tensor(expected))
    # A third ray with no samples counts as zero in the mean.
    assert torch.allclose(orientation_loss(w, n, v, rays, n_rays=3), torch.tensor(expected * 2 / 3))


def test_orientation_loss_stops_gradient_at_weights():
    w = torch.tensor([0.5], requires_grad=True)
    n = torch.tensor([[0.0, 0.0, 1.0]], requires_grad=True)
    v = torch.tensor([[0.0, 0.0, 1.0]])
    orientation_loss(w, n, v, torch.tensor([0]), n_rays=1).backward()
    assert w.grad is None
    # d/dn [w (n.v)^2] = 2 w (n.v) v
    assert torch.allclose(n.grad, torch.tensor([[0.0, 0.0, 1.0]]))


def test_opacity_loss_values():
    op = torch.tensor([0.0, 1.0, 0.5])
    expected = (0.1 + math.sqrt(1.01) + math.sqrt(0.26)) / 3
    assert abs(float(opacity_loss(op)) - expected) < 1e-6
    # Its gradient pushes opacity down, more for opaque rays.
    op = op.clone().requires_grad_(True)
    opacity_loss(op).backward()
    assert op.grad[0] == 0 and op.grad[1] > op.grad[2] > 0
