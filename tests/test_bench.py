# SPDX-License-Identifier: Apache-2.0
"""The step benchmark: its step is the trainer's, its numbers add up, its CLI and its model configs.

Everything runs on the CPU with tiny configs (``--tiny``); the CUDA-graph wrapper is checked when a GPU is there.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from fastdream import bench
from fastdream.bench import BenchConfig, StepRunner, build_guidance, run_bench, run_config
from fastdream.cameras import make_cameras
from fastdream.cli import main
from fastdream.config import FieldConfig
from fastdream.guidance.base import SDSConfig
from fastdream.guidance.graphs import CUDAGraphUNet, GraphedVAEMean
from fastdream.renderer import render

CPU = torch.device("cpu")


def _runner(model: str, **kw) -> StepRunner:
    cfg = BenchConfig(model=model, device="cpu", tiny=True, **kw)
    g = build_guidance(cfg, CPU)
    return StepRunner(cfg, CPU, g, int(g.resolution))


def test_render_in_parts_matches_the_renderer():
    runner = _runner("builtin")
    runner.run.render.jitter = False
    runner.warm_grid()
    assert runner.grid.fraction_occupied() < 1.0  # the grid skips space, so the march really uses it
    t = torch.tensor
    light = t([[1.0, 2.0, 1.5], [-1.5, 1.0, 2.0]])  # away from the camera: shading really depends on normals
    cams = make_cameras(t([20.0, 70.0]), t([30.0, -120.0]), t([2.2, 2.4]), t([50.0, 45.0]), light)
    h = runner.resolution
    r, s = runner.run.render, runner.run.shading
    ref = render(
        runner.field, runner.background, cams, h, h, shading_mode="shaded", grid=runner.grid,
        samples_per_ray=r.samples_per_ray, ambient=s.ambient, diffuse=s.diffuse,
    )  # fmt: skip
    ours = runner.render(cams)
    assert ours["image"].shape == (2, 3, h, h)
    torch.testing.assert_close(ours["image"], ref["image"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours["opacity"], ref["ray_opacity"], rtol=1e-5, atol=1e-6)
    assert runner.n_samples == ref["n_samples"] > 0


@pytest.mark.parametrize("shading", ["shaded", "albedo"])
def test_render_graphs_path_matches_the_renderer(shading):
    """--render-graphs' step path (fastdream.render_graphs, here with the capture replaced by the eager module so
    that the padded path runs on the CPU) renders what the renderer does, with the parted path's regularisers."""
    from fastdream.render_graphs import GraphedRender

    runner = _runner("builtin", render_graphs=True, shading=shading)
    runner.run.render.jitter = False
    runner.warm_grid()
    runner.render_graphs = GraphedRender(
        runner.field, runner.background, runner.grid, min_sightings=1, capture=lambda module, args, warmup: module
    )
    t = torch.tensor
    cams = make_cameras(t([20.0]), t([30.0]), t([2.2]), t([50.0]), t([[1.0, 2.0, 1.5]]))
    h = runner.resolution
    r, s = runner.run.render, runner.run.shading
    ref = render(
        runner.field, runner.background, cams, h, h, shading_mode=shading, grid=runner.grid,
        samples_per_ray=r.samples_per_ray, ambient=s.ambient, diffuse=s.diffuse,
    )  # fmt: skip
    runner.render(cams)  # the first call learns the sample count (eager)
    ours = runner.render(cams)
    assert runner.render_graphs.replays == 1
    torch.testing.assert_close(ours["image"], ref["image"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours["opacity"], ref["ray_opacity"], rtol=1e-5, atol=1e-6)
    runner.render_graphs = None
    parted = runner.render(cams)
    torch.testing.assert_close(ours["reg"], parted["reg"], rtol=1e-5, atol=1e-7)
    assert runner.n_samples == ref["n_samples"] > 0


def test_compile_vae_gives_the_eager_latents_and_image_gradient():
    """--compile-vae (inductor, here its CPU backend) encodes like the eager VAE, forward and backward."""
    pytest.importorskip("diffusers")
    from fastdream.guidance.graphs import accelerate

    torch._dynamo.reset()
    g = _runner("sd").guidance
    h = int(g.resolution)
    images = torch.rand(1, 3, h, h, generator=torch.Generator().manual_seed(3))

    def encode():
        x = images.clone().requires_grad_()
        z = g.encode_images(x)
        (z * torch.randn(z.shape, generator=torch.Generator().manual_seed(4))).sum().backward()
        return z.detach(), x.grad

    z_eager, grad_eager = encode()
    eager_fn = g.vae_mean
    accelerate(g, compile_vae=True)
    assert g.vae_mean is not eager_fn
    frames = torch._dynamo.utils.counters["frames"]["ok"]
    z_comp, grad_comp = encode()
    assert torch._dynamo.utils.counters["frames"]["ok"] > frames  # dynamo really compiled it
    torch.testing.assert_close(z_comp, z_eager, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad_comp, grad_eager, rtol=1e-4, atol=1e-6)
    assert grad_eager.abs().sum() > 0


def test_compile_vae_failure_is_one_line(monkeypatch):
    """A compile that fails at the first call (inside training) is one line naming the option, not a traceback."""
    pytest.importorskip("diffusers")
    from fastdream.errors import UserError
    from fastdream.guidance import graphs

    def broken(*a, **kw):
        def call(x):
            raise torch._dynamo.exc.BackendCompilerFailed(None, RuntimeError("no working C++ compiler"), None)

        return call

    g = _runner("sd").guidance
    monkeypatch.setattr(graphs.torch, "compile", broken)
    graphs.accelerate(g, compile_vae=True)
    h = int(g.resolution)
    with pytest.raises(
        UserError, match="--compile-vae.*RuntimeError: no working C.. compiler.*drop --compile-vae"
    ) as err:
        g.encode_images(torch.rand(1, 3, h, h).requires_grad_())
    assert "\n" not in str(err.value)


def test_compiled_vae_says_when_it_has_compiled(monkeypatch):
    """A --prompts library's later runs reuse the compiled encoder: 'the first steps compile' is said only until a
    call went through (a failed compile does not count)."""
    from fastdream.errors import UserError
    from fastdream.guidance import graphs

    monkeypatch.setattr(graphs.torch, "compile", lambda fn, **kw: fn)  # the wrapper's bookkeeping, not inductor
    calls = []

    def encoder(x):
        calls.append(x)
        if len(calls) == 1:
            raise torch._dynamo.exc.BackendCompilerFailed(None, RuntimeError("no compiler"), None)
        return x * 2

    vae = graphs.CompiledVAEMean(encoder)
    assert not vae.compiled
    with pytest.raises(UserError):
        vae(torch.ones(2))
    assert not vae.compiled
    assert torch.equal(vae(torch.ones(2)), torch.full((2,), 2.0)) and vae.compiled


@pytest.mark.parametrize("model", ["sd", "if"])
def test_parted_sds_loss_is_the_guidance_sds_loss(model):
    pytest.importorskip("diffusers")
    runner = _runner(model)
    g = runner.guidance
    h = runner.resolution
    images = torch.rand(2, 3, h, h, generator=torch.Generator().manual_seed(1))
    words = ["front", "overhead"]
    x1 = images.clone().requires_grad_()
    runner.noise_gen.manual_seed(7)
    loss1 = runner.sds_loss(x1, words)
    loss1.backward()
    x2 = images.clone().requires_grad_()
    loss2, _ = g.sds_loss(x2, words, SDSConfig(), generator=torch.Generator().manual_seed(7))
    loss2.backward()
    torch.testing.assert_close(loss1, loss2)
    torch.testing.assert_close(x1.grad, x2.grad)
    assert x1.grad.abs().sum() > 0


def test_step_trains_the_field_and_updates_the_grid():
    runner = _runner("builtin")
    runner.warm_grid()
    table0 = runner.field.table.detach().clone()
    bg0 = runner.background.net[0].weight.detach().clone()
    updates0 = int(runner.grid.updates)
    loss = runner.step()
    assert torch.isfinite(loss)
    assert not torch.equal(runner.field.table, table0)
    assert not torch.equal(runner.background.net[0].weight, bg0)
    assert int(runner.grid.updates) == updates0 + 1
    assert runner.guidance.shading_mode == "shaded"  # the prior is told the mode, as the trainer does
    runner.step(grid_update=False)  # benchmarks/bench_step.py's amortised rounds: one update in 16 steps
    assert int(runner.grid.updates) == updates0 + 1


def test_run_bench_builtin_parts_and_total():
    steps = 2
    r = run_bench(BenchConfig(model="builtin", device="cpu", steps=steps, warmup=1, tiny=True))
    expected = [p for p in bench.PARTS if p != "guidance_encode"]  # the builtin prior encodes nothing
    assert list(r.parts) == expected
    for s in r.parts.values():
        assert 0.0 < s.min_ms <= s.median_ms <= s.max_ms
    total = sum(s.median_ms for k, s in r.parts.items() if k != "grid_update") + r.parts["grid_update"].median_ms / 16
    assert r.step_ms == pytest.approx(total)
    # the field side: every part from the rays to the backward (the builtin prior's backward is the field's alone)
    field = ("rays_march", "field", "shade_composite", "backward")
    assert r.field_side_ms == pytest.approx(sum(r.parts[k].median_ms for k in field))
    assert r.to_dict()["field_side_ms"] == r.field_side_ms
    assert r.samples_per_step > 0 and r.peak_memory_bytes > 2**20
    assert r.config["resolution"] == 16
    from fastdream.ops import _dispatch

    assert r.backends["hash_encode"] == _dispatch.select("hash_encode", CPU)
    table = r.format_table()
    for label in ("rays + marching", "field forward", "guidance: denoiser", "backward", "optimizer", "grid update"):
        assert label in table
    assert f"field side{r.field_side_ms:>33.2f}  (rays + marching, field, shading + compositing, backward)" in table


def test_field_side_leaves_out_the_host_work_before_a_graphed_render_and_models_with_their_own_backward():
    parts = {
        k: bench.PartStats(v, v, v)
        for k, v in dict(rays_march=0.9, field=1.0, shade_composite=0.1, backward=1.7, optimizer=1.2).items()
    }

    def result(**config):
        return bench.BenchResult(config, "cuda", "GPU", parts, 5.0, 6.0, 0, "", 1.0, {}, {})

    assert result(model="builtin", render_graphs=True).field_side_ms == pytest.approx(2.8)
    assert result(model="builtin", render_graphs=False).field_side_ms == pytest.approx(3.7)
    assert result(model="sd", render_graphs=True).field_side_ms is None  # its backward runs through the VAE
    assert result(model="if", render_graphs=False).field_side_ms is None


def test_the_object_scene_renders_as_many_samples_as_a_trained_object():
    """The default scene widens the initial blob to a trained object's occupied size; the fresh field, which every
    step benchmark before 2026-11-27 timed, gives far fewer samples (on CUDA's defaults ~9.7k, against 20-30k)."""
    fresh = run_bench(BenchConfig(model="builtin", device="cpu", steps=2, warmup=0, tiny=True, scene="fresh"))
    obj = run_bench(BenchConfig(model="builtin", device="cpu", steps=2, warmup=0, tiny=True))
    assert obj.config["scene"] == "object" and fresh.config["scene"] == "fresh"
    assert obj.samples_per_step > 1.8 * fresh.samples_per_step, (obj.samples_per_step, fresh.samples_per_step)
    assert "scene object" in obj.format_table() and "grid update (1 step in 16)" in obj.format_table()
    assert run_config(BenchConfig(), CPU, 64).field.blob_radius == bench.OBJECT_BLOB_RADIUS
    assert run_config(BenchConfig(scene="fresh"), CPU, 64).field.blob_radius == FieldConfig().blob_radius
    assert obj.peak_reserved_bytes is None  # CUDA only


def test_reference_ops_are_forced():
    r = run_bench(BenchConfig(model="builtin", device="cpu", steps=1, warmup=0, tiny=True, ops="reference"))
    assert set(r.backends.values()) == {"reference"}


def test_host_checks_and_skipped_steps_are_counted(capsys):
    """--host-checks (the A/B of the trainer's deferred checks) runs the same step; a NaN loss is counted as a
    skipped step either way, read once at the end."""
    for host_checks in (False, True):
        runner = _runner("builtin", host_checks=host_checks)
        runner.step()
        assert runner.skipped == 0
        real = runner.sds_loss
        runner.sds_loss = lambda *a, real=real, **kw: real(*a, **kw) * float("nan")
        runner.step()
        assert runner.skipped == 1 and runner.cfg.host_checks is host_checks
    assert main(["bench", "--tiny", "--device", "cpu", "--steps", "1", "--warmup", "0", "--host-checks"]) == 0
    assert "host checks" in capsys.readouterr().out


def test_cli_sd_tiny_writes_json(tmp_path, capsys):
    pytest.importorskip("diffusers")
    out = tmp_path / "sd.json"
    rc = main(
        ["bench", "--model", "sd", "--tiny", "--device", "cpu", "--steps", "1", "--warmup", "0", "--json", str(out)]
    )
    assert rc == 0
    doc = json.loads(out.read_text())
    assert list(doc["parts"]) == list(bench.PARTS)  # SD has the VAE-encode part
    assert doc["config"]["model"] == "sd" and doc["config"]["tiny"] is True
    assert doc["parts"]["guidance_encode"]["median_ms"] > 0
    assert "guidance: encode" in capsys.readouterr().out


def test_cli_profile_writes_the_op_table_and_a_trace(tmp_path, capsys):
    pytest.importorskip("diffusers")
    out = tmp_path / "prof.txt"
    argv = ["bench", "--model", "sd", "--tiny", "--device", "cpu", "--steps", "2", "--warmup", "0"]
    assert main([*argv, "--vae-groupnorm", "split", "--profile", str(out)]) == 0
    table = out.read_text()
    assert "2 steps" in table and "Self CPU" in table and "aten::" in table
    assert json.loads(out.with_name("prof.txt.trace.json").read_text())["traceEvents"]
    assert "split GroupNorm" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--model", "sd", "--tiny", "--cuda-graphs", "--device", "cpu"], "--cuda-graphs"),
        (["--tiny", "--field-graphs", "--device", "cpu"], "--field-graphs"),
        (["--tiny", "--render-graphs", "--device", "cpu"], "--render-graphs"),
        (["--tiny", "--cudnn-benchmark", "--device", "cpu"], "--cudnn-benchmark"),
        (["--compile", "--device", "cpu"], "--model sd"),
        (["--compile-vae", "--model", "if", "--tiny", "--device", "cpu"], "--compile-vae"),
        (["--model", "sd", "--device", "cpu"], "--tiny"),
        (["--steps", "0", "--device", "cpu"], "--steps"),
        (["--device", "tpu"], "--device"),
        (["--device", "cpu:5"], "--device"),
        (["--device", "cpu", "--tiny", "--batch", "100000"], "--batch 100000"),  # ran until the memory ran out
        (["--device", "cpu", "--tiny", "--batch", "64", "--resolution", "512"], "at most 64 cameras"),
        (["--device", "cpu", "--tiny", "--json", "/nonexistent-dir/x.json"], "--json"),
        (["--device", "cpu", "--tiny", "--profile", "/nonexistent-dir/p.txt"], "--profile"),
        (["--device", "cpu", "--tiny", "--profile", ""], "--profile is empty"),
        (["--device", "cpu", "--tiny", "--json", " "], "--json is empty"),
        (["--device", "cpu", "--tiny", "--profile", "p.txt", "--json", "p.txt.trace.json"], "--profile's trace"),
        (["--device", "cpu", "--tiny", "--profile", "p.txt", "--json", "./p.txt"], "both name"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(argv, words, capsys):
    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err and "Traceback" not in err


def test_cli_cuda_without_gpu_is_a_user_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert main(["bench", "--device", "cuda"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_model_configs_have_the_published_sizes():
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):  # shapes only: no memory, no time
        unet = diffusers.UNet2DConditionModel(**bench.SD21_BASE_UNET)
        vae = diffusers.AutoencoderKL(**bench.SD21_BASE_VAE)
        if_unet = diffusers.UNet2DConditionModel(**bench.IF_I_XL_UNET)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(unet) == 865_910_724  # stable-diffusion-2-1-base UNet
    assert n(vae) == 83_653_863  # its AutoencoderKL
    assert 4.2e9 < n(if_unet) < 4.5e9  # IF-I-XL: 4.3B
    assert unet.config.cross_attention_dim == bench.SD21_TEXT_SHAPE[1]
    assert if_unet.config.encoder_hid_dim == bench.IF_TEXT_SHAPE[1] and if_unet.config.out_channels == 6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_unet_matches_eager():
    diffusers = pytest.importorskip("diffusers")
    dev = torch.device("cuda")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**bench.TINY_SD_UNET).to(dev).eval()
    wrapped = CUDAGraphUNet(unet)
    for seed in (0, 1):  # the second call replays with new inputs
        g = torch.Generator(device=dev).manual_seed(seed)
        x = torch.randn(2, 4, 8, 8, device=dev, generator=g)
        t = torch.tensor([10, 500], device=dev)
        c = torch.randn(2, 8, 32, device=dev, generator=g)
        with torch.no_grad():
            ref = unet(x, t, encoder_hidden_states=c, return_dict=False)[0]
        out = wrapped(x, t, encoder_hidden_states=c)[0]
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graphed_vae_mean_matches_eager_forward_and_backward():
    diffusers = pytest.importorskip("diffusers")
    dev = torch.device("cuda")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(**bench.TINY_SD_VAE).to(dev).eval().requires_grad_(False)

    def mean(x):
        return vae.encode(x).latent_dist.mean

    graphed = GraphedVAEMean(mean)
    for seed in (0, 1):  # the second call replays with new inputs
        g = torch.Generator(device=dev).manual_seed(seed)
        x = torch.rand(1, 3, 32, 32, device=dev, generator=g) * 2 - 1
        w = torch.randn(1, 4, 16, 16, device=dev, generator=g)
        a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ref = mean(a)
        (ref * w).sum().backward()
        out = graphed(b)
        (out * w).sum().backward()
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fails", [False, True])
def test_cudnn_benchmark_is_set_for_the_run_and_restored(fails, monkeypatch):
    """--cudnn-benchmark holds torch.backends.cudnn.benchmark on during the run only, failed runs included
    (CUDA is faked: the CPU has no cuDNN, and validate() refuses the option there)."""
    seen = []

    def fake_run(cfg, device, forced, profile):
        seen.append(torch.backends.cudnn.benchmark)
        if fails:
            raise RuntimeError("boom")
        return "result"

    monkeypatch.setattr(bench, "resolve_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(bench, "validate", lambda cfg, device: None)
    monkeypatch.setattr(bench, "_run_validated", fake_run)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    cfg = BenchConfig(model="sd", device="cuda", tiny=True, cudnn_benchmark=True)
    if fails:
        with pytest.raises(RuntimeError, match="boom"):
            run_bench(cfg)
    else:
        assert run_bench(cfg) == "result"
        assert run_bench(BenchConfig(model="sd", device="cuda", tiny=True)) == "result"  # off: left alone
    assert seen == ([True] if fails else [True, False])
    assert torch.backends.cudnn.benchmark is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize(("compile_vae", "cudnn_benchmark"), [(False, False), (True, False), (False, True)])
def test_sd_step_with_every_graph_on_cuda(compile_vae, cudnn_benchmark):
    """The fastest SD configuration end to end on CUDA: UNet and VAE in CUDA graphs (or the VAE compiled), the
    whole render in CUDA graphs, with or without cuDNN's autotuning; no capture fails and the steps replay."""
    pytest.importorskip("diffusers")
    torch._dynamo.reset()
    cfg = BenchConfig(
        model="sd", device="cuda", tiny=True, cuda_graphs=True, render_graphs=True, compile_vae=compile_vae,
        cudnn_benchmark=cudnn_benchmark, steps=4, warmup=4,
    )  # fmt: skip
    result = run_bench(cfg)
    note = next(n for n in result.notes if n.startswith("renderer CUDA graphs"))
    assert "turned off" not in note and " 0 replays" not in note, note
    assert math.isfinite(result.step_ms) and result.step_ms > 0


def test_profile_keeps_stderr_but_kinetos_logs(capfd, tmp_path):
    """libkineto writes "USDT:... profiler_start" and, without a GPU, "ERROR:... gpuGetDeviceCount failed" to
    file descriptor 2; bench --profile drops those lines and passes everything else on."""
    import os
    import sys

    with bench._without_kineto_logs():
        os.write(2, b"USDT:2026-11-27 07:39:34 27200:27200 SyncActivityProfilerHandler.cpp:39] profiler_start\n")
        print("a warning of our own", file=sys.stderr)
        os.write(2, b"ERROR:2026-11-27 07:39:34 27200:27200 DeviceProperties.cpp:56] gpuGetDeviceCount failed\n")
        os.write(2, b"ERROR: something else\n")
    assert capfd.readouterr().err == "a warning of our own\nERROR: something else\n"
    out = tmp_path / "prof.txt"
    argv = ["bench", "--model", "builtin", "--tiny", "--device", "cpu", "--steps", "1", "--warmup", "0"]
    assert main([*argv, "--profile", str(out)]) == 0
    err = capfd.readouterr().err
    assert "profiler_start" not in err and ".cpp:" not in err, err
    assert "Self CPU" in out.read_text()


class _ScalerRunner:
    """A runner whose first ``overflows`` steps are skipped, as the fp16 gradient scaler's first ones are."""

    def __init__(self, overflows: int, scaler: object | None = object()) -> None:
        self.scaler, self.overflows, self.steps, self.skipped = scaler, overflows, 0, 0

    def step(self) -> None:
        self.steps += 1
        self.skipped += self.steps <= self.overflows


@pytest.mark.parametrize("overflows, expected", [(0, 3), (11, 14), (100, bench.SCALER_SETTLE_STEPS)])
def test_the_gradient_scaler_settles_before_the_timed_steps(overflows, expected):
    """Its first overflows were timed when --warmup was short (a skipped step's optimizer is cheaper)."""
    r = _ScalerRunner(overflows)
    assert bench.settle_gradient_scaler(r) == expected == r.steps
    assert bench.settle_gradient_scaler(_ScalerRunner(5, scaler=None)) == 0  # the CPU: no scaler
