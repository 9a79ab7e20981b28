# SPDX-License-Identifier: Apache-2.0
"""The training render replayed from CUDA graphs (fastdream.render_graphs).

On the CPU, with the capture replaced by the eager module (so the padded march, the fixed capacity, the overflow
re-render, the buckets and the fallbacks all run here):

- every output and every parameter's gradient equal the eager renderer's, in each shading mode, with each kind
  of background, with jitter from the same generator and through an occupancy grid;
- a step with more samples than its capacity is rendered again, larger, with the same result;
- the buckets, the eviction and the eager fallbacks are the documented ones;
- a failing capture warns once and renders eagerly from then on;
- no graph is destroyed during a capture: the garbage collector is off while one runs, and an evicted bucket's
  graph is destroyed before the next capture begins.

On CUDA: the same comparison with real graphs, under autocast, across buckets, optimiser steps and grid updates.
"""

from __future__ import annotations

import contextlib
import gc
import warnings

import pytest
import torch

from fastdream import _capture
from fastdream.cameras import get_rays, make_cameras, orbit_cameras
from fastdream.config import FieldConfig
from fastdream.field import Background, NeuralField
from fastdream.losses import opacity_loss, orientation_loss
from fastdream.ops import OccupancyGrid, ShadeMode, march_rays
from fastdream.render_graphs import GraphedRender
from fastdream.renderer import render, render_samples

KEYS = ("image", "opacity", "depth", "normals_image", "weights", "normals", "directions", "ray_indices", "ray_opacity")


def _models(device: str = "cpu") -> tuple[NeuralField, Background, OccupancyGrid]:
    cfg = FieldConfig(levels=4, features=2, log2_table_size=12, base_resolution=4, finest_resolution=32, hidden=16)
    field = NeuralField(cfg, bound=1.0, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():  # a table of trained magnitude, so that the normals depend on it
        field.table.uniform_(-0.05, 0.05, generator=torch.Generator(device=device).manual_seed(1))
    grid = OccupancyGrid(resolution=16).to(device)
    grid.update(lambda x: 50.0 * ((x - 0.1).norm(dim=-1) < 0.6).float(), warmup=True)  # skips some space
    return field, Background(generator=torch.Generator().manual_seed(2)).to(device), grid


def _stand_in(log: list[int] | None = None):
    def capture(module, args, warmup_iters):
        if log is not None:
            log.append(module.capacity)
        return module

    return capture


def _camera(step: int):
    az = torch.tensor([-150.0 + 47.0 * step])
    el, dist = torch.tensor([10.0 + 7.0 * step]), torch.tensor([2.0 + 0.15 * step])
    return make_cameras(el, az, dist, torch.tensor([45.0]))


def _step(renderer, models, bg, cams, size, mode, seed, amp=False):
    """One training render through ``renderer`` and a loss on every output: (outputs, grads, n_samples)."""
    field, background, grid = models
    params = list(field.parameters()) + list(background.parameters())
    for p in params:
        p.grad = None
    gen = torch.Generator(field.table.device).manual_seed(seed)
    with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
        out = renderer(
            field, bg, cams, size, size, shading_mode=mode, grid=grid, samples_per_ray=64, jitter=True, generator=gen
        )
    dev = out["image"].device
    view = torch.tensor([0.3, -0.5, 0.8], device=dev)
    loss = (out["image"] * torch.linspace(0.5, 1.5, 3, device=dev)[None, :, None, None]).square().mean()
    loss = loss + out["opacity"].mean() + 0.1 * out["depth"].mean() + out["weights"].square().sum()
    if out["normals"] is not None:
        loss = loss + (out["normals"] @ view).square().mean() + out["normals_image"].abs().mean()
    # The regularisers: GraphedRender's own (computed in the graph), the renderer's from fastdream.losses.
    regs = [out.get("opacity_loss"), out.get("orientation_loss")]
    if regs[0] is None:
        regs[0] = opacity_loss(out["ray_opacity"])
    if regs[1] is None and out["normals"] is not None:
        regs[1] = orientation_loss(out["weights"], out["normals"], out["directions"], out["ray_indices"], out["n_rays"])
    regs = [r for r in regs if r is not None]
    loss = loss + 2.0 * regs[0] + sum(10.0 * r for r in regs[1:])
    loss.backward()
    values = {k: out[k].detach().clone() for k in KEYS if out[k] is not None}
    values["regularisers"] = torch.stack(regs).detach()
    grads = {i: p.grad.clone() for i, p in enumerate(params) if p.grad is not None}
    assert out["samples"].n_samples == out["n_samples"] == out["weights"].shape[0]
    return values, grads, out["n_samples"]


def _assert_same(got, want, atol=1e-6, rtol=1e-5, what=""):
    assert got[2] == want[2] > 0, what
    assert got[0].keys() == want[0].keys(), what
    for k in want[0]:
        a, b = got[0][k], want[0][k]
        if a.dtype == torch.int64:
            assert torch.equal(a, b), f"{what} {k}"
        else:
            torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m, k=k: f"{what} {k}: {m}")
    assert got[1].keys() == want[1].keys(), what
    for i in want[1]:
        scale = want[1][i].abs().max().item() + 1e-12
        torch.testing.assert_close(
            got[1][i], want[1][i], atol=atol * max(1.0, scale), rtol=rtol, msg=lambda m, i=i: f"{what} param {i}: {m}"
        )


@pytest.mark.parametrize("mode", ["albedo", "shaded", "textureless"])
@pytest.mark.parametrize("bg_kind", ["module", "color", "white"])
def test_padded_graph_path_equals_the_eager_renderer(mode, bg_kind):
    models = _models()
    graphed = GraphedRender(*models, min_sightings=1, capture=_stand_in())
    bg = {"module": models[1], "color": torch.tensor([0.2, 0.5, 0.9]), "white": None}[bg_kind]
    for step in range(4):
        cams = _camera(step)
        got = _step(graphed, models, bg, cams, 13, mode, seed=step)
        want = _step(render, models, bg, cams, 13, mode, seed=step)
        _assert_same(got, want, what=f"{mode} {bg_kind} step {step}")
    assert graphed.eager_calls == 1 and graphed.replays == 3  # the first call learns the sample count


@contextlib.contextmanager
def _no_host_reads():
    """Any read of a tensor's values on the host raises: on CUDA such a read would break the graph capture."""
    names = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu")
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def refuse(name):
        def f(self, *args, **kwargs):
            raise AssertionError(f"a host read in the captured render: Tensor.{name}")

        return f

    for n in names:
        setattr(torch.Tensor, n, refuse(n))
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


@pytest.mark.parametrize("mode", ["albedo", "shaded", "textureless"])
def test_the_captured_render_reads_nothing_on_the_host(mode):
    """What a CUDA graph captures (forward and backward of the padded render) must not read tensor values on the
    host. Checked here on the CPU path, like make_graphed_callables' warm-up: forward, then gradients of every
    output that has one, with every host read of a tensor refused."""
    models = _models()
    checked = []

    def capture(module, args, warmup_iters):
        with _no_host_reads():
            outs = [o for o in module(*args) if o.requires_grad]
            params = [p for p in module.parameters() if p.requires_grad]
            torch.autograd.grad(outs, params, [torch.ones_like(o) for o in outs], allow_unused=True)
        checked.append(module.capacity)
        return module

    for bg in (models[1], torch.tensor([0.1, 0.2, 0.3]), None):
        graphed = GraphedRender(*models, min_sightings=1, capture=capture)
        for step in range(2):
            _step(graphed, models, bg, _camera(step), 12, mode, seed=step)
    assert len(checked) == 3


def test_shaded_and_textureless_share_one_graph():
    """The trainer alternates shaded and textureless renders at random: one graph serves both (the mode is an
    input), with each mode's values and gradients, so the buckets are not doubled."""
    models = _models()
    log: list[int] = []
    graphed = GraphedRender(*models, min_sightings=1, capture=_stand_in(log))
    modes = ["shaded", "textureless", "textureless", "shaded", "textureless", "shaded"]
    for step, mode in enumerate(modes):
        got = _step(graphed, models, models[1], _camera(step % 2), 12, mode, seed=step)
        want = _step(render, models, models[1], _camera(step % 2), 12, mode, seed=step)
        _assert_same(got, want, what=f"{mode} step {step}")
    # The first call learns the sample count; then one bucket (one capture, an overflow aside) serves both modes.
    assert graphed.captures == len(log) == 1 + graphed.overflows and graphed.replays == len(modes) - 1
    assert len(graphed._graphs) == 1 + graphed.overflows


def test_the_textureless_blend_is_exactly_each_mode():
    """render_samples' ``textureless`` input at 0 and 1 gives the shaded and textureless modes bit for bit, and
    refuses any other mode."""
    models = _models()
    field, background, grid = models
    rays_o, rays_d = get_rays(_camera(1), 10, 10)
    samples = march_rays(rays_o, rays_d, grid, step=2 * field.bound / 64, bound=field.bound)
    light, amb, dif = _camera(1).light, torch.full((3,), 0.1), torch.full((3,), 0.9)

    def run(mode, t):
        for p in field.parameters():
            p.grad = None
        out = render_samples(
            field, background, samples, rays_d, light, pixels_per_camera=100, mode=mode, ambient=amb,
            diffuse=dif, need_normals=True, textureless=t,
        )  # fmt: skip
        out["image_rays"].mul(torch.linspace(0.5, 1.5, 3)).square().sum().backward()
        return out["image_rays"].detach(), [p.grad.clone() for p in field.parameters()]

    for mode, t in ((ShadeMode.SHADED, 0.0), (ShadeMode.TEXTURELESS, 1.0)):
        img, grads = run(ShadeMode.SHADED, torch.tensor([t]))
        img_want, grads_want = run(mode, None)
        assert torch.equal(img, img_want), mode
        for g, w in zip(grads, grads_want):
            torch.testing.assert_close(g, w, atol=1e-7, rtol=1e-6)
    with pytest.raises(ValueError, match="only with the shaded mode"):
        run(ShadeMode.TEXTURELESS, torch.tensor([1.0]))


def test_overflow_renders_again_larger_with_the_same_result():
    models = _models()
    log: list[int] = []
    graphed = GraphedRender(*models, min_sightings=1, headroom=1.0, capture=_stand_in(log))
    far, near = _camera(0), make_cameras(*(torch.tensor([v]) for v in (20.0, 30.0, 1.6, 60.0)))
    _step(graphed, models, None, far, 12, "shaded", seed=0)  # eager: learns a small count
    got = _step(graphed, models, None, near, 12, "shaded", seed=1)  # the near camera has more samples
    want = _step(render, models, None, near, 12, "shaded", seed=1)
    _assert_same(got, want, what="overflow")
    assert graphed.overflows == 1 and len(log) == 2 and log[0] < want[2] <= log[1]


def test_buckets_second_sight_and_eviction():
    models = _models()
    log: list[int] = []
    graphed = GraphedRender(*models, max_graphs=2, history=1, capture=_stand_in(log))
    sizes = (12, 12, 12, 20, 20, 20, 12, 28, 28, 28, 12)  # 144, 400 and 784 rays: three buckets
    for i, size in enumerate(sizes):
        _step(graphed, models, models[1], orbit_cameras(1), size, "shaded", seed=i)
    # History 1: a call's capacity comes from the previous call's count; a key is (capacity, resolution, ...).
    # Call 1 learns the count (eager), call 2 sees (c12, 12) first (eager), call 3 captures it. Call 4 (20) overflows
    # c12 and is rendered again at c20 (first sight, eager); call 5 captures (c20, 20), call 6 replays it. Call 7
    # (12) gets c20 from call 6: a new key, eager. Call 8 (28) overflows; call 9 captures (c28, 28) and evicts
    # (c12, 12), last used at call 3, rather than (c20, 20), used at call 6. Calls 10 and 11 replay or see new keys.
    assert graphed.overflows == 2
    assert graphed.captures == len(log) == 3 and log == sorted(log)
    assert [k[1] for k in graphed._graphs][:2] == [20, 28]
    assert graphed.replays + graphed.eager_calls == len(sizes)


@pytest.mark.parametrize("reuse", [2.0, 1.0])
def test_a_larger_captured_bucket_is_reused_when_the_count_shrinks(reuse):
    """The near camera's samples get a graph; the far camera's fewer samples then need a smaller bucket. With
    ``reuse`` 2 the larger graph serves them (no capture); with 1 the smaller bucket is captured. Either way the
    result is the eager renderer's."""
    models = _models()
    log: list[int] = []
    graphed = GraphedRender(*models, min_sightings=1, history=1, reuse=reuse, capture=_stand_in(log))
    near, far = make_cameras(*(torch.tensor([v]) for v in (20.0, 30.0, 1.6, 60.0))), _camera(3)
    for step, cams in enumerate([near, near, far, far, far]):
        got = _step(graphed, models, None, cams, 12, "shaded", seed=step)
        want = _step(render, models, None, cams, 12, "shaded", seed=step)
        _assert_same(got, want, what=f"step {step}")
    assert graphed.overflows == 0 and graphed.replays == 4
    if reuse == 2.0:
        assert len(log) == 1
    else:  # the far camera's own, smaller bucket, within 2x of the near one's (so reuse 2 applied above)
        assert len(log) == 2 and log[1] < log[0] <= 2 * log[1]


def test_ineligible_calls_render_eagerly():
    models = _models()
    field, background, grid = models
    graphed = GraphedRender(*models, min_sightings=1, capture=_stand_in())
    _step(graphed, models, background, orbit_cameras(1), 10, "shaded", seed=0)  # first call: eager
    assert graphed.eager_calls == 1
    cams2 = orbit_cameras(2)
    got = _step(graphed, models, background, cams2, 10, "shaded", seed=1)  # two cameras
    want = _step(render, models, background, cams2, 10, "shaded", seed=1)
    _assert_same(got, want, atol=0, rtol=0)
    other = Background(generator=torch.Generator().manual_seed(5))
    _step(graphed, models, other, orbit_cameras(1), 10, "shaded", seed=2)  # another environment map
    _step(graphed, (field, background, OccupancyGrid(resolution=8)), None, orbit_cameras(1), 10, "shaded", seed=3)
    with torch.no_grad():
        graphed(field, background, orbit_cameras(1), 10, 10, shading_mode="shaded", grid=grid)
    field.eval()
    graphed(field, background, orbit_cameras(1), 10, 10, shading_mode="shaded", grid=grid)
    field.train()
    graphed(field, None, orbit_cameras(1), 10, 10, shading_mode="shaded", grid=grid, prune=True)
    graphed(field, None, orbit_cameras(1), 10, 10, shading_mode="shaded", grid=grid, normals_method="finite_difference")
    assert graphed.eager_calls == 8 and graphed.replays == 0 and graphed.captures == 0
    plain = GraphedRender(*models, min_sightings=1)  # no stand-in: CPU tensors never go to a graph
    for i in range(3):
        _step(plain, models, background, orbit_cameras(1), 10, "shaded", seed=i)
    assert plain.eager_calls == 3 and plain.captures == 0
    for kw, word in (({"max_graphs": 0}, "max_graphs"), ({"min_sightings": 0}, "min_sightings")):
        with pytest.raises(ValueError, match=word):
            GraphedRender(field, **kw)
    with pytest.raises(ValueError, match="headroom"):
        GraphedRender(field, headroom=0.5)
    with pytest.raises(ValueError, match="history"):
        GraphedRender(field, history=0)
    with pytest.raises(ValueError, match="reuse"):
        GraphedRender(field, reuse=0.5)


def test_a_failing_capture_warns_once_and_renders_eagerly():
    models = _models()

    def broken(module, args, warmup_iters):
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")

    graphed = GraphedRender(*models, min_sightings=1, capture=broken)
    _step(graphed, models, models[1], _camera(0), 12, "shaded", seed=0)  # eager: learns the count
    want = _step(render, models, models[1], _camera(1), 12, "shaded", seed=1)
    with pytest.warns(RuntimeWarning, match="rendering eagerly from now on"):
        got = _step(graphed, models, models[1], _camera(1), 12, "shaded", seed=1)
    _assert_same(got, want)
    assert graphed.disabled and "more detail" not in graphed.disabled
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _step(graphed, models, models[1], _camera(2), 12, "shaded", seed=2)
    assert graphed.captures == 0 and graphed.eager_calls == 3


def test_no_graph_is_destroyed_during_a_capture():
    """On an H100 a capture failed ("operation failed due to a previous error during capture") when Python's
    cyclic garbage collector, running in the middle of it, destroyed graphs of evicted buckets (which only it
    can free). Here a stand-in graph that, like make_graphed_callables' result, sits in a reference cycle logs
    its capture and its destruction."""
    models = _models()
    events = []

    class Replay:
        def __init__(self, module):
            self.module, self.cycle = module, self
            events.append("captured")

        def __call__(self, *args):
            return self.module(*args)

        def __del__(self):
            events.append("destroyed")

    def capture(module, args, warmup_iters):
        events.append("capturing, collector " + ("on" if gc.isenabled() else "off"))
        return Replay(module)

    graphed = GraphedRender(*models, max_graphs=1, min_sightings=1, capture=capture)
    for i, size in enumerate([12, 12, 16, 12]):  # eager, capture 12, evict 12 + capture 16, evict 16 + capture 12
        _step(graphed, models, models[1], _camera(i), size, "shaded", seed=i)
    # One graph kept: each capture after the first evicts the previous graph, destroyed before it begins (an
    # overflow's larger re-render is a capture too).
    one = ["capturing, collector off", "captured"]
    assert graphed.captures >= 3 and events == (one + ["destroyed"]) * (graphed.captures - 1) + one, events
    assert gc.isenabled() and graphed.replays == 3


def test_capturing_restores_the_collector():
    assert gc.isenabled()
    with pytest.raises(RuntimeError, match="boom"), _capture.capturing():
        assert not gc.isenabled()
        raise RuntimeError("boom")
    assert gc.isenabled()
    gc.disable()
    try:  # off before: still off after
        with _capture.capturing():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_the_cli_hides_only_the_expected_stream_warning():
    """PyTorch's AccumulateGrad stream advice (printed on every --cuda-graphs GPU run, H100) is filtered; any other
    warning still shows."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _capture.hide_expected_warnings()
        warnings.warn(
            "The AccumulateGrad node's stream does not match the stream of the node that produced the incoming "
            "gradient. This may incur unnecessary synchronization",
            UserWarning,
            stacklevel=2,
        )
        warnings.warn("something else", UserWarning, stacklevel=2)
        warnings.warn(
            "The AccumulateGrad node's stream does not match the stream of the node", RuntimeWarning, stacklevel=2
        )
    assert [str(w.message) for w in seen][0] == "something else" and len(seen) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("mode", ["albedo", "shaded", "textureless"])
def test_cuda_graphs_match_the_eager_renderer_across_buckets_and_updates(mode):
    models = _models("cuda")
    field, background, grid = models
    graphed = GraphedRender(*models, max_graphs=2, min_sightings=1)
    opt = torch.optim.Adam(list(field.parameters()) + list(background.parameters()), lr=1e-2)
    colour = torch.tensor([0.2, 0.5, 0.9], device="cuda")
    sizes = [24, 24, 32, 24, 48, 24, 24]
    for step, size in enumerate(sizes):
        cams = _camera(step)
        bg = background if step % 2 == 0 else colour
        got = _step(graphed, models, bg, cams, size, mode, seed=step, amp=True)
        want = _step(render, models, bg, cams, size, mode, seed=step, amp=True)
        _assert_same(got, want, atol=5e-3, rtol=5e-3, what=f"{mode} step {step}")
        opt.step()  # in place: the next replay must see the new parameters
        if step == 3:  # and the new grid
            grid.update(lambda x: 50.0 * ((x + 0.1).norm(dim=-1) < 0.5).float(), warmup=True)
    assert graphed.disabled is None and graphed.captures >= 2 and graphed.replays >= 4
