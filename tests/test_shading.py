# SPDX-License-Identifier: Apache-2.0
"""Lambertian shading: every usable implementation against the reference, outputs and gradients."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import backend_params
from hypothesis import given, settings
from hypothesis import strategies as st

from fastdream.ops import ShadeMode, shade, shade_reference, use_backend

MODES = ["albedo", "shaded", "textureless"]


def _inputs(s: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rho = torch.rand(s, 3, generator=g)
    n = torch.nn.functional.normalize(torch.randn(s, 3, generator=g), dim=-1)
    p = torch.randn(s, 3, generator=g) * 0.5
    light = torch.tensor([0.7, 1.9, 2.2])
    amb = torch.tensor([0.1, 0.15, 0.2])
    dif = torch.tensor([0.9, 0.8, 0.7])
    return [t.to(device) for t in (rho, n, p, light, amb, dif)]


def _run(backend, args, mode, weight):
    rho, n = (args[0].clone().requires_grad_(), args[1].clone().requires_grad_())
    with use_backend(backend):
        out = shade(rho, n, *args[2:], mode=mode)
    (out * weight).sum().backward()
    g_rho = rho.grad if rho.grad is not None else torch.zeros_like(rho)
    return out.detach(), g_rho, n.grad if n.grad is not None else torch.zeros_like(n)


@pytest.mark.parametrize("device,backend", backend_params("shade"))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("s", [0, 1, 97, 1025])
def test_matches_reference(device, backend, mode, s):
    args = _inputs(s, device)
    weight = torch.randn(s, 3, device=device)
    ref = _run("reference", args, mode, weight)
    fast = _run(backend, args, mode, weight)
    for name, a, b in zip(("colour", "grad_albedo", "grad_normals"), fast, ref):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_reference_values():
    # A surface facing a light straight above it: cos = 1, so c = rho * (diffuse + ambient).
    rho = torch.tensor([[0.5, 0.25, 1.0]])
    n = torch.tensor([[0.0, 1.0, 0.0]])
    p = torch.zeros(1, 3)
    light = torch.tensor([0.0, 3.0, 0.0])
    amb, dif = torch.tensor([0.1, 0.1, 0.1]), torch.tensor([0.5, 0.6, 0.7])
    torch.testing.assert_close(shade_reference(rho, n, p, light, amb, dif, "shaded"), rho * (dif + amb))
    torch.testing.assert_close(shade_reference(rho, n, p, light, amb, dif, "textureless"), (dif + amb)[None])
    torch.testing.assert_close(shade_reference(rho, n, p, light, amb, dif, "albedo"), rho)
    # Facing away from the light: ambient only. At 60 degrees: half the diffuse term.
    away = shade_reference(rho, -n, p, light, amb, dif, "shaded")
    torch.testing.assert_close(away, rho * amb)
    tilted = torch.tensor([[math.sin(math.pi / 3), math.cos(math.pi / 3), 0.0]])
    torch.testing.assert_close(shade_reference(rho, tilted, p, light, amb, dif, "shaded"), rho * (0.5 * dif + amb))


@pytest.mark.parametrize("device,backend", backend_params("shade"))
@pytest.mark.parametrize("mode", ["shaded", "textureless"])
def test_light_on_sample_and_nan(device, backend, mode):
    # A light exactly on a sample gets ambient only (defined, finite); NaN normals propagate as NaN colour in
    # every backend alike, never a crash, and their gradients are the reference's (relu passes a NaN's gradient).
    args = _inputs(5, device)
    rho, n, p, light, amb, dif = args
    p[2] = light
    n[3] = float("nan")
    weight = torch.randn(5, 3, device=device)
    out, g_rho, g_n = _run(backend, args, mode, weight)
    ref, r_rho, r_n = _run("reference", args, mode, weight)
    assert torch.isfinite(out[[0, 1, 2, 4]]).all()
    torch.testing.assert_close(out[2], (rho[2] if mode == "shaded" else 1.0) * amb)
    for name, a, b in (("colour", out, ref), ("grad_albedo", g_rho, r_rho), ("grad_normals", g_n, r_n)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, equal_nan=True, msg=name)


@settings(max_examples=25, deadline=None)
@given(
    s=st.integers(0, 40),
    seed=st.integers(0, 10_000),
    mode=st.sampled_from(MODES),
    lx=st.floats(-3, 3),
    ly=st.floats(-3, 3),
    lz=st.floats(-3, 3),
)
def test_property_cpp_matches_reference(s, seed, mode, lx, ly, lz):
    params = [p.values for p in backend_params("shade") if p.values[1] != "none"]
    args = _inputs(s, "cpu", seed)
    args[3] = torch.tensor([lx, ly, lz])
    weight = torch.randn(s, 3)
    ref = _run("reference", args, mode, weight)
    for device, backend in params:
        moved = [a.to(device) for a in args]
        fast = _run(backend, moved, mode, weight.to(device))
        for a, b in zip(fast, ref):
            torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-5)


def test_input_errors_name_the_argument():
    rho, n, p, light, amb, dif = _inputs(4, "cpu")
    with pytest.raises(ValueError, match="normals"):
        shade(rho, n[:3], p, light, amb, dif)
    with pytest.raises(TypeError, match="albedo"):
        shade(rho.to(torch.int32), n, p, light, amb, dif)
    with pytest.raises(ValueError, match="light"):
        shade(rho, n, p, light[:2], amb, dif)
    with pytest.raises(TypeError, match="positions"):
        shade(rho, n, p.numpy(), light, amb, dif)
    with pytest.raises(ValueError, match="mode"):
        shade(rho, n, p, light, amb, dif, mode="phong")
    with pytest.raises(ValueError, match="albedo"):
        shade(rho.to_sparse(), n, p, light, amb, dif)


def test_mode_parse():
    assert ShadeMode.parse("Textureless") is ShadeMode.TEXTURELESS
    assert ShadeMode.parse(1) is ShadeMode.SHADED
    assert ShadeMode.parse(ShadeMode.ALBEDO) is ShadeMode.ALBEDO
    for bad, exc in ((1.5, TypeError), (None, TypeError), (3, ValueError), (-1, ValueError)):
        with pytest.raises(exc, match="^mode:"):
            ShadeMode.parse(bad)


def test_torch_compile_traces_the_custom_op():
    pytest.importorskip("torch._dynamo")
    from fastdream.ops import select

    if select("shade", "cpu") == "reference":
        pytest.skip("no compiled shading backend here")
    args = _inputs(33, "cpu")
    compiled = torch.compile(lambda *a: shade(*a, mode="shaded") * 2.0, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(*args), shade_reference(*args, "shaded") * 2.0)


# --- audit additions --------------------------------------------------------------------------------------------


def _compare(backend, args, mode, weight):
    got, want = _run(backend, args, mode, weight), _run("reference", args, mode, weight)
    for name, a, b in zip(("colour", "grad_albedo", "grad_normals"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, equal_nan=True, msg=name)


@pytest.mark.parametrize("device,backend", backend_params("shade"))
@pytest.mark.parametrize("mode", MODES)
def test_nonfinite_positions_and_light_match_reference(device, backend, mode):
    """A NaN position or light: NaN colour and NaN normal gradient, as in the reference (not a finite ~1e6 one);
    an infinite position: the reference's values."""
    nan, inf = float("nan"), float("inf")
    args = _inputs(6, device)
    p = args[2]
    p[2, 0] = nan
    p[3] = torch.tensor([inf, 0.0, 0.0])
    p[4] = torch.tensor([-inf, inf, 1.0])
    _compare(backend, args, mode, torch.randn(6, 3, generator=torch.Generator().manual_seed(1)).to(device))
    args = _inputs(5, device)
    args[3] = torch.tensor([nan, 0.0, 0.0], device=device)
    _compare(backend, args, mode, torch.randn(5, 3, generator=torch.Generator().manual_seed(2)).to(device))


@pytest.mark.parametrize("device,backend", backend_params("shade"))
@pytest.mark.parametrize("mode", MODES)
def test_nonfinite_albedo_and_zero_normal_match_reference(device, backend, mode):
    """textureless ignores the albedo: a NaN/inf albedo must not reach the normals' gradient."""
    nan, inf = float("nan"), float("inf")
    args = _inputs(4, device)
    args[0][0, 1], args[0][1, 0] = nan, inf
    args[1][2] = 0.0
    _compare(backend, args, mode, torch.randn(4, 3, generator=torch.Generator().manual_seed(1)).to(device))


@pytest.mark.parametrize("device,backend", backend_params("shade"))
@pytest.mark.parametrize("mode", MODES)
def test_nonfinite_upstream_gradient_reaches_only_what_depends_on_it(device, backend, mode):
    """albedo mode: normals get no gradient; textureless: albedo gets none, even from a NaN/inf upstream gradient."""
    args = _inputs(3, device)
    weight = torch.ones(3, 3)
    weight[0, 0], weight[1, 1] = float("nan"), float("inf")
    _compare(backend, args, mode, weight.to(device))


@pytest.mark.parametrize("device,backend", backend_params("shade"))
@pytest.mark.parametrize("mode", MODES)
def test_float64_and_non_contiguous_inputs(device, backend, mode):
    args = [a.double() for a in _inputs(37, device)]
    args[1] = args[1].T.contiguous().T  # column-major normals
    weight = torch.randn(37, 3, dtype=torch.float64, device=device)
    got, want = _run(backend, args, mode, weight), _run("reference", args, mode, weight)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float64
    for name, a, b in zip(("colour", "grad_albedo", "grad_normals"), got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6, msg=name)


def test_reference_gradcheck_float64():
    rho, n, p, light, amb, dif = (a.double() for a in _inputs(6, "cpu"))
    for mode in MODES:
        assert torch.autograd.gradcheck(
            lambda r, m, mode=mode: shade_reference(r, m, p, light, amb, dif, mode),
            (rho.requires_grad_(), n.requires_grad_()),
        )
