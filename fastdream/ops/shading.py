# SPDX-License-Identifier: Apache-2.0
"""Lambertian shading of packed samples (DreamFusion's shading model).

    c = rho * (diffuse * max(0, n . (light - p) / |light - p|) + ambient)

Modes: ``albedo`` (c = rho), ``shaded``, ``textureless`` (rho replaced by white, so only geometry can
explain the image). Gradients flow to ``albedo`` and ``normals``; positions, the light position and the light
colours are constants of a step (the reference detaches them too, so every backend computes the same thing).

Implementations: ``reference`` (PyTorch), ``cpp`` (C++ CPU loop) and ``cuda`` (the same per-sample code,
``csrc/include/fastdream/shading.h``), ``triton`` (``fastdream.kernels.shading``).

Example:
    >>> import torch
    >>> from fastdream.ops import shade
    >>> rho = torch.full((4, 3), 0.5); n = torch.tensor([[0.0, 0.0, 1.0]]).expand(4, 3).contiguous()
    >>> p = torch.zeros(4, 3); light = torch.tensor([0.0, 0.0, 2.0])
    >>> c = shade(rho, n, p, light, ambient=torch.full((3,), 0.1), diffuse=torch.full((3,), 0.9), mode="shaded")
    >>> torch.allclose(c, torch.full((4, 3), 0.5))
    True
"""

from __future__ import annotations

import enum
import operator

import torch

from fastdream import backends
from fastdream.ops import _dispatch
from fastdream.ops._checks import check_tensor, same_device

OP = "shade"


class ShadeMode(enum.IntEnum):
    ALBEDO = 0
    SHADED = 1
    TEXTURELESS = 2

    @classmethod
    def parse(cls, mode: str | int | ShadeMode) -> ShadeMode:
        if isinstance(mode, str):
            try:
                return cls[mode.upper()]
            except KeyError:
                raise ValueError(f"mode: expected one of albedo, shaded, textureless; got {mode!r}") from None
        try:
            value = operator.index(mode)  # ints (and numpy ints), not floats: 1.5 is no mode
        except TypeError:
            raise TypeError(f"mode: expected albedo, shaded, textureless or 0..2; got {type(mode).__name__}") from None
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"mode: expected one of albedo, shaded, textureless (0..2); got {mode!r}") from None


def shade_reference(
    albedo: torch.Tensor,  # [S, 3]
    normals: torch.Tensor,  # [S, 3], unit length
    positions: torch.Tensor,  # [S, 3]
    light: torch.Tensor,  # [3]
    ambient: torch.Tensor,  # [3]
    diffuse: torch.Tensor,  # [3]
    mode: ShadeMode | str | int,
) -> torch.Tensor:  # [S, 3]
    """Pure-PyTorch Lambertian shading: the ground truth and the fallback on any device."""
    mode = ShadeMode.parse(mode)
    if mode == ShadeMode.ALBEDO:
        return albedo
    to_light = light.detach() - positions.detach()
    to_light = to_light / to_light.square().sum(-1, keepdim=True).clamp_min(1e-12).sqrt()
    lam = torch.relu((normals * to_light).sum(-1, keepdim=True))
    shade_ = diffuse.detach() * lam + ambient.detach()
    if mode == ShadeMode.TEXTURELESS:
        return shade_.expand_as(albedo)
    return albedo * shade_


class _Impl:
    """A fast implementation: ``forward(...) -> c`` and ``backward(grad, ...) -> (grad_albedo, grad_normals)``
    on contiguous float32 tensors."""

    def __init__(self, forward, backward):
        self.forward = forward
        self.backward = backward


def _cpp_impl() -> _Impl:
    ext = backends.extension()
    return _Impl(ext.shade_forward, ext.shade_backward)


def _triton_impl() -> _Impl:
    from fastdream.kernels import shading as k

    return _Impl(k.shade_forward, k.shade_backward)


# cpp and cuda are the same entry point: the extension dispatches on the tensors' device.
_dispatch.register(OP, "reference", shade_reference)
_dispatch.register(OP, "cpp", _cpp_impl)
_dispatch.register(OP, "cuda", _cpp_impl)
_dispatch.register(OP, "triton", _triton_impl)


@torch.library.custom_op("fastdream::shade", mutates_args=())
def _shade_op(
    albedo: torch.Tensor,
    normals: torch.Tensor,
    positions: torch.Tensor,
    light: torch.Tensor,
    ambient: torch.Tensor,
    diffuse: torch.Tensor,
    mode: int,
    backend: str,
) -> torch.Tensor:
    return _dispatch.get(OP, backend)().forward(albedo, normals, positions, light, ambient, diffuse, mode)


@_shade_op.register_fake
def _(albedo, normals, positions, light, ambient, diffuse, mode, backend):
    return torch.empty_like(albedo)


@torch.library.custom_op("fastdream::shade_backward", mutates_args=())
def _shade_backward_op(
    grad: torch.Tensor,
    albedo: torch.Tensor,
    normals: torch.Tensor,
    positions: torch.Tensor,
    light: torch.Tensor,
    ambient: torch.Tensor,
    diffuse: torch.Tensor,
    mode: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    g_rho, g_n = _dispatch.get(OP, backend)().backward(
        grad.contiguous(), albedo, normals, positions, light, ambient, diffuse, mode
    )
    return g_rho, g_n


@_shade_backward_op.register_fake
def _(grad, albedo, normals, positions, light, ambient, diffuse, mode, backend):
    return torch.empty_like(albedo), torch.empty_like(normals)


def _setup_context(ctx, inputs, output):
    albedo, normals, positions, light, ambient, diffuse, mode, backend = inputs
    ctx.save_for_backward(albedo, normals, positions, light, ambient, diffuse)
    ctx.mode = mode
    ctx.backend = backend


def _backward(ctx, grad):
    albedo, normals, positions, light, ambient, diffuse = ctx.saved_tensors
    g_rho, g_n = _shade_backward_op(grad, albedo, normals, positions, light, ambient, diffuse, ctx.mode, ctx.backend)
    return g_rho, g_n, None, None, None, None, None, None


_shade_op.register_autograd(_backward, setup_context=_setup_context)


def shade(
    albedo: torch.Tensor,  # [S, 3]
    normals: torch.Tensor,  # [S, 3], unit length
    positions: torch.Tensor,  # [S, 3]
    light: torch.Tensor,  # [3] light position (world)
    ambient: torch.Tensor,  # [3] ambient light colour
    diffuse: torch.Tensor,  # [3] diffuse light colour
    mode: ShadeMode | str | int = ShadeMode.SHADED,
) -> torch.Tensor:  # [S, 3]
    """Lambertian shading of ``S`` samples; differentiable in ``albedo`` and ``normals``.

    Fast backends compute in float32 and return float32; the reference keeps the input dtype.

    Raises:
        TypeError / ValueError: an argument of the wrong type, dtype, shape or device (named).
    """
    mode = ShadeMode.parse(mode)
    check_tensor("albedo", albedo, (None, 3))
    s = albedo.shape[0]
    check_tensor("normals", normals, (s, 3))
    check_tensor("positions", positions, (s, 3))
    check_tensor("light", light, (3,))
    check_tensor("ambient", ambient, (3,))
    check_tensor("diffuse", diffuse, (3,))
    device = same_device(
        albedo=albedo, normals=normals, positions=positions, light=light, ambient=ambient, diffuse=diffuse
    )
    backend = _dispatch.select(OP, device)
    if backend == "reference":
        return shade_reference(albedo, normals, positions, light, ambient, diffuse, mode)
    args = [t.float().contiguous() for t in (albedo, normals, positions, light, ambient, diffuse)]
    return _shade_op(*args, int(mode), backend)
