# SPDX-License-Identifier: Apache-2.0
"""The training render replayed from CUDA graphs: rays, marching, field + normals, shading, environment map and
compositing, forward and backward, two replays a step.

At 64x64 the renderer is launch-bound. A step has ~10k samples and a few microseconds of GPU work per kernel, but
it launches ~200 kernels between rays, marching, the field, shading and compositing and their backward, and each
costs more on the host than on the GPU. On an H100 the parts were ~2 ms each for rays + marching and for shading +
compositing, against well under 0.1 ms of GPU work (benchmarks/RESULTS.md). :mod:`fastdream.field_graphs`
replayed the field alone. Here the whole render is one graph pair.

**A fixed size.** A graph's shapes are fixed, the number of samples is not. The march writes into ``capacity``
rows (:func:`fastdream.ops.march_rays_padded`: zeros past the samples, offsets clamped, no host round-trip). The
capacity is the bucket (:func:`fastdream.field_graphs.capacity`) of the recent steps' largest sample count plus
``headroom``. After the forward replay the true count is read: the step's one host round-trip. If it exceeds the
capacity, the step is rendered again with the same inputs at a large enough bucket, so no sample is ever lost.
Padding is exact. The padding rows belong to no ray, compositing gives them weight 0 and zero gradient, and
their field values and normals (at the origin) are finite.

**Inputs.** Per-step values are graph inputs, copied in at each replay. The camera, the light, the background
colour and the light colours are packed into one tensor (one host-to-device copy a step). The jitter is drawn from
the caller's generator exactly as :func:`fastdream.renderer.render` draws it. The shaded and textureless modes
share a graph: which one is an input, 0 or 1, that blends the albedo towards white before shading
(:func:`fastdream.renderer.render_samples`'s ``textureless``). Whether the mode is albedo, the background's kind
(environment map, colour or white), the resolution, the march step and autocast are part of a bucket's key.
The parameters and the occupancy grid are read by address. Optimiser steps and grid updates work in place, so
every replay sees them.

**Buckets** are captured on their ``min_sightings``-th call; earlier calls run the same padded module eagerly. At
most ``max_graphs`` buckets are kept, the least recently used evicted. A step whose bucket is not captured but a
larger one (up to ``reuse`` times the rows) is, replays the larger one: at these sizes padding rows cost little,
and a capture (warm-up passes, then the capture itself) costs many steps' worth. So the sample count shrinking and
growing over training does not capture a bucket for every size it passes.

**Eager fallback.** :func:`fastdream.renderer.render` runs instead when a graph cannot help or cannot express
the call:

- not CUDA, no gradients, or the field in eval mode (previews, turntables);
- more than one camera;
- ``prune``, finite-difference normals, a custom ``density_and_normals``;
- a field, grid or environment map other than the ones given at construction;
- the first call (no sample count seen yet).

If a capture raises, the error is reported once as a warning and every later call renders eagerly: a run is never
lost to a graph.

Used by ``fastdream generate --cuda-graphs`` (the trainer) and ``fastdream bench --render-graphs``.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from typing import Any

import torch

from fastdream import _capture
from fastdream.cameras import Cameras, get_rays
from fastdream.field import Background, NeuralField
from fastdream.field_graphs import capacity
from fastdream.losses import opacity_loss, orientation_loss
from fastdream.ops import OccupancyGrid, RaySamples, ShadeMode, march_rays_padded
from fastdream.renderer import DEFAULT_AMBIENT, DEFAULT_DIFFUSE, _to_image, render, render_samples


class _StepRender(torch.nn.Module):
    """What is captured: one camera's rays, the padded march and :func:`render_samples`. A module holding the
    field and the environment map, so that their parameters are the graph's."""

    def __init__(
        self,
        field: NeuralField,
        background: Background | None,
        grid: OccupancyGrid | None,
        mode: ShadeMode,
        need_normals: bool,
        height: int,
        width: int,
        capacity: int,
        step: float,
        bound: float,
    ) -> None:
        super().__init__()
        self.field = field
        self.background = background
        self.grid = grid
        self.mode, self.need_normals = mode, need_normals
        self.height, self.width = height, width
        self.capacity, self.step, self.bound = capacity, step, bound

    def forward(self, step_values: torch.Tensor, jitter: torch.Tensor):
        # step_values [30]: c2w (16), fov, light (3), background colour, ambient, diffuse (3 each), textureless (1):
        # one copy a step
        c2w, fov, light = step_values[:16].view(1, 4, 4), step_values[16:17], step_values[17:20].view(1, 3)
        bg_color, ambient, diffuse = step_values[20:23], step_values[23:26], step_values[26:29]
        textureless = step_values[29:30] if self.mode == ShadeMode.SHADED else None
        cams = Cameras(c2w, fov, fov, fov, fov, light)  # get_rays reads c2w and fov only
        rays_o, rays_d = get_rays(cams, self.height, self.width)
        samples, total = march_rays_padded(
            rays_o, rays_d, self.grid, capacity=self.capacity, step=self.step, bound=self.bound, jitter=jitter
        )
        out = render_samples(
            self.field,
            self.background if self.background is not None else bg_color,
            samples,
            rays_d,
            light,
            pixels_per_camera=self.height * self.width,
            mode=self.mode,
            ambient=ambient,
            diffuse=diffuse,
            need_normals=self.need_normals,
            normals_method="analytic",
            textureless=textureless,
        )
        # DreamFusion's regularisers too (fastdream.losses): the padding rows have weight 0, so they add nothing.
        regs = [opacity_loss(out["opacity"])]
        outs = [out["image_rays"], out["opacity"], out["depth"], out["weights"]]
        if self.need_normals:
            outs += [out["normals"], out["normals_rays"]]
            n_rays = self.height * self.width
            regs.append(
                orientation_loss(out["weights"], out["normals"], samples.directions, samples.ray_indices, n_rays)
            )
        rows = [samples.ray_indices, samples.t_starts, samples.t_ends, samples.positions, samples.directions]
        return (*outs, *regs, *rows, samples.offsets, total)


def _make_graphed(module: torch.nn.Module, args: tuple[torch.Tensor, ...], warmup_iters: int) -> Callable:
    # make_graphed_callables needs autocast's weight-cast cache off: the casts are then part of the graph and see
    # each optimiser update.
    amp = torch.is_autocast_enabled("cuda")
    with torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), enabled=amp, cache_enabled=False):
        return torch.cuda.make_graphed_callables(module, args, num_warmup_iters=warmup_iters, allow_unused_input=True)


class GraphedRender:
    """:func:`fastdream.renderer.render` for training steps, replayed from CUDA graphs (see the module doc).

    Call it like ``render`` (same arguments, same result). The result also holds the regularisers of
    :mod:`fastdream.losses` on its outputs, ``opacity_loss`` and ``orientation_loss`` (None without normals):
    computed in the graph when the step is replayed.

    Args:
        field: the field (its parameters are captured by address).
        background: the environment map the renders use, if any (its parameters too).
        grid: the occupancy grid the renders march through (read by address; updated in place), if any.
        max_graphs: buckets kept at once.
        warmup_iters: eager forward+backward passes before each capture.
        min_sightings: a bucket is captured on its ``min_sightings``-th call (earlier calls run eagerly).
        headroom: the capacity is the bucket of ``headroom`` times the largest sample count of the last ``history``
            steps.
        reuse: a captured bucket with up to ``reuse`` times that capacity is replayed instead (1: never).
        capture: how a module becomes its replay, ``(module, sample_args, warmup_iters) -> callable``. The default
            captures CUDA graphs. Tests pass one that returns the module itself: the padded path then runs eagerly
            on any device.
    """

    def __init__(
        self,
        field: NeuralField,
        background: Background | None = None,
        grid: OccupancyGrid | None = None,
        *,
        max_graphs: int = 8,
        warmup_iters: int = 2,
        min_sightings: int = 2,
        headroom: float = 1.15,
        history: int = 8,
        reuse: float = 2.0,
        capture: Callable | None = None,
    ) -> None:
        if max_graphs < 1:
            raise ValueError(f"max_graphs: expected >= 1, got {max_graphs}")
        if min_sightings < 1:
            raise ValueError(f"min_sightings: expected >= 1, got {min_sightings}")
        if not (math.isfinite(headroom) and headroom >= 1.0):
            raise ValueError(f"headroom: expected a number >= 1, got {headroom}")
        if history < 1:
            raise ValueError(f"history: expected >= 1, got {history}")
        if not (math.isfinite(reuse) and reuse >= 1.0):
            raise ValueError(f"reuse: expected a number >= 1, got {reuse}")
        self.field, self.background, self.grid = field, background, grid
        self.max_graphs = max_graphs
        self.warmup_iters = warmup_iters
        self.min_sightings = min_sightings
        self.headroom = headroom
        self.reuse = reuse
        self._capture = capture or _make_graphed
        self._any_device = capture is not None
        self._graphs: OrderedDict[tuple, Callable] = OrderedDict()
        self._seen: Counter[tuple] = Counter()
        self._counts: deque[int] = deque(maxlen=history)
        self.disabled: str | None = None  # why graphs were turned off (a capture failed), else None
        self.captures = 0  # graphs captured
        self.replays = 0  # steps served from a graph
        self.eager_calls = 0  # steps rendered eagerly (ineligible, a bucket's first sight, or disabled)
        self.overflows = 0  # steps with more samples than their capacity (rendered again, larger)

    def _bg_kind(self, background: Any) -> str | None:
        """How ``background`` enters the graph: "module", "color" (a [3] input) or "white"; None: it cannot."""
        if background is None:
            return "white"
        if isinstance(background, torch.Tensor):
            return "color" if background.numel() == 3 else None
        if self.background is not None and background is self.background:
            return "module"
        return None

    def _eligible(self, field, cameras, grid, need_normals, normals_method, prune, density_and_normals, kind) -> bool:
        method = normals_method or self.field.cfg.normals
        return (
            self.disabled is None
            and field is self.field
            and grid is self.grid
            and kind is not None
            and (self.field.table.is_cuda or self._any_device)
            and torch.is_grad_enabled()
            and self.field.training
            and len(cameras) == 1
            and not prune
            and density_and_normals is None
            and (not need_normals or method == "analytic")
            and len(self._counts) > 0
        )

    def _rows(self, n: int, fixed: tuple) -> int:
        """The capacity for ``n`` samples: the bucket of ``n``, or the smallest captured bucket of the same kind
        that holds it with at most ``reuse`` times the bucket's rows."""
        cap = capacity(n)
        held = [k[0] for k in self._graphs if k[1:] == fixed and cap <= k[0] <= self.reuse * cap]
        return min(held) if held else cap

    def _run(self, key: tuple, make: Callable[[], torch.nn.Module], args: tuple[torch.Tensor, ...]) -> tuple:
        """The outputs of bucket ``key`` on ``args``: replayed, captured now, or run eagerly."""
        g = self._graphs.get(key)
        if g is None:
            self._seen[key] += 1
            if self._seen[key] >= self.min_sightings:
                if len(self._graphs) >= self.max_graphs:
                    while len(self._graphs) >= self.max_graphs:
                        self._graphs.popitem(last=False)
                    _capture.collect()  # the evicted graphs are destroyed now, not during a capture
                try:
                    with _capture.capturing():
                        g = self._capture(make(), args, self.warmup_iters)
                except Exception as e:  # noqa: BLE001 - any capture failure: report once, then render eagerly
                    first = str(e).splitlines()[0] if str(e) else ""
                    self.disabled = f"{type(e).__name__}: {first}"[:200]
                    warnings.warn(
                        f"fastdream: capturing the renderer in a CUDA graph failed ({self.disabled}); "
                        "rendering eagerly from now on",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                    return make()(*args)
                self._graphs[key] = g
                self.captures += 1
            else:
                return make()(*args)
        else:
            self._graphs.move_to_end(key)
        return g(*args)

    def __call__(
        self,
        field: NeuralField,
        background: Background | torch.Tensor | None,
        cameras: Cameras,
        height: int,
        width: int,
        *,
        shading_mode: ShadeMode | str = "albedo",
        grid: OccupancyGrid | None = None,
        samples_per_ray: int = 96,
        bound: float | None = None,
        ambient: tuple[float, float, float] | torch.Tensor = DEFAULT_AMBIENT,
        diffuse: tuple[float, float, float] | torch.Tensor = DEFAULT_DIFFUSE,
        need_normals: bool | None = None,
        normals_method: str | None = None,
        jitter: bool = False,
        generator: torch.Generator | None = None,
        prune: bool = False,
        density_and_normals: Any = None,
    ) -> dict[str, Any]:
        """Same arguments and result as :func:`fastdream.renderer.render`."""
        mode = ShadeMode.parse(shading_mode)
        need_normals = bool(need_normals) or mode != ShadeMode.ALBEDO
        kind = self._bg_kind(background)
        if not self._eligible(field, cameras, grid, need_normals, normals_method, prune, density_and_normals, kind):
            out = render(
                field,
                background,
                cameras,
                height,
                width,
                shading_mode=mode,
                grid=grid,
                samples_per_ray=samples_per_ray,
                bound=bound,
                ambient=ambient,
                diffuse=diffuse,
                need_normals=need_normals,
                normals_method=normals_method,
                jitter=jitter,
                generator=generator,
                prune=prune,
                density_and_normals=density_and_normals,
            )
            self.eager_calls += 1
            if torch.is_grad_enabled() and field is self.field and field.training:
                self._counts.append(out["n_samples"])
            out["opacity_loss"] = opacity_loss(out["ray_opacity"])
            out["orientation_loss"] = None
            if out["normals"] is not None:
                args = (out["weights"], out["normals"], out["directions"], out["ray_indices"], out["n_rays"])
                out["orientation_loss"] = orientation_loss(*args)
            return out

        dev = self.field.table.device
        bound = self.field.bound if bound is None else float(bound)
        n_rays = height * width
        # The step's values in one tensor, built where the cameras are (the CPU in training) and copied once.
        host = cameras.c2w.device
        bg = background.reshape(3) if kind == "color" else torch.ones(3)
        # The shaded and textureless modes: one graph (the shaded one) and a 0/1 input.
        textureless = torch.tensor([1.0 if mode == ShadeMode.TEXTURELESS else 0.0])
        graph_mode = ShadeMode.SHADED if mode == ShadeMode.TEXTURELESS else mode
        parts = [cameras.c2w, cameras.fov, cameras.light, bg, torch.as_tensor(ambient), torch.as_tensor(diffuse)]
        parts.append(textureless)
        step_values = torch.cat([t.to(host, torch.float32).reshape(-1) for t in parts]).to(dev)
        # The jitter is drawn here as march_rays draws it, so the random stream is the eager renderer's.
        u = torch.rand(n_rays, device=dev, generator=generator) if jitter else torch.zeros(n_rays, device=dev)
        args = (step_values, u)
        amp = torch.is_autocast_enabled("cuda") if dev.type == "cuda" else False
        step = 2.0 * bound / samples_per_ray
        fixed = (height, width, int(graph_mode), need_normals, kind, step, bound, amp, torch.get_autocast_dtype("cuda"))

        def run(cap: int) -> tuple:
            def make() -> torch.nn.Module:
                bg = self.background if kind == "module" else None
                return _StepRender(self.field, bg, self.grid, graph_mode, need_normals, height, width, cap, step, bound)

            return self._run((cap, *fixed), make, args)

        cap = self._rows(math.ceil(max(self._counts) * self.headroom), fixed)
        outs = run(cap)
        total = int(outs[-1])  # the step's one host round-trip
        if total > cap:  # more samples than rows: render again, large enough (same inputs, same samples)
            self.overflows += 1
            cap = self._rows(total, fixed)
            outs = run(cap)
        self._counts.append(total)
        self.replays += (cap, *fixed) in self._graphs
        self.eager_calls += (cap, *fixed) not in self._graphs
        image, opacity, depth, weights = outs[:4]
        normals, normals_rays = (outs[4][:total], outs[5]) if need_normals else (None, None)
        regs = outs[6:8] if need_normals else outs[4:5]
        rows = [x[:total] for x in outs[-7:-2]]
        samples = RaySamples(*rows, outs[-2])
        return {
            # computed in the graph; the same values as fastdream.losses on the outputs below
            "opacity_loss": regs[0],
            "orientation_loss": regs[1] if need_normals else None,
            "image": _to_image(image, 1, height, width),
            "opacity": _to_image(opacity[:, None], 1, height, width),
            "depth": _to_image(depth[:, None], 1, height, width),
            "normals_image": _to_image(normals_rays, 1, height, width) if normals_rays is not None else None,
            "weights": weights[:total],
            "normals": normals,
            "directions": samples.directions,
            "ray_indices": samples.ray_indices,
            "ray_opacity": opacity,
            "n_rays": n_rays,
            "samples": samples,
            "n_samples": total,
        }
