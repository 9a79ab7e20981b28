# SPDX-License-Identifier: Apache-2.0
"""Rendering the field: shapes, backgrounds, shading, gradients, occupancy-grid skipping."""

import torch
from test_field import make_field

from fastdream.cameras import make_cameras, orbit_cameras
from fastdream.ops import OccupancyGrid
from fastdream.renderer import render, render_views

S = 24


def test_shapes_and_blob_in_the_centre():
    f = make_field()
    out = render(f, torch.ones(3), orbit_cameras(2), S, S + 4, shading_mode="albedo", samples_per_ray=48)
    assert out["image"].shape == (2, 3, S, S + 4)
    assert out["opacity"].shape == (2, 1, S, S + 4) and out["depth"].shape == (2, 1, S, S + 4)
    assert out["normals_image"] is None
    op = out["opacity"][0, 0]
    assert op[S // 2, (S + 4) // 2] > 0.9  # the blob is opaque in the middle
    assert op[0, 0] < 0.05  # and the corners see the background
    assert torch.allclose(out["image"][0, :, 0, 0], torch.ones(3), atol=0.05)
    w, ri = out["weights"], out["ray_indices"]
    per_ray = torch.zeros(out["n_rays"]).index_add(0, ri, w)
    assert torch.allclose(per_ray, out["ray_opacity"], atol=1e-5)


def test_empty_field_shows_background_only():
    f = make_field(density_shift=-30.0)
    col = torch.tensor([0.2, 0.4, 0.6])
    out = render(f, col, orbit_cameras(1), S, S, shading_mode="shaded", samples_per_ray=32)
    assert out["opacity"].max() < 1e-6
    assert torch.allclose(out["image"], col[None, :, None, None].expand(1, 3, S, S), atol=1e-5)


def test_textureless_lit_from_the_camera_is_brighter_in_the_centre():
    f = make_field(blob_density=40.0, density_shift=-20.0)  # a sharp sphere of radius ~0.35
    cam = make_cameras(torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([2.2]), torch.tensor([50.0]))
    out = render(f, torch.zeros(3), cam, S, S, shading_mode="textureless", ambient=(0.1,) * 3, diffuse=(0.9,) * 3)
    img = out["image"][0, 0]
    assert out["normals_image"] is not None and out["normals"].shape == (out["n_samples"], 3)
    # Facing the light in the middle (n.l ~ 1 -> 1.0); grazing towards the silhouette: darker.
    assert img[S // 2, S // 2] > 0.9
    assert img[S // 2, S // 2] > img[S // 2, 3] + 0.1
    # The composited normal in the middle faces the camera (+Z).
    assert out["normals_image"][0, 2, S // 2, S // 2] > 0.9


def test_gradients_reach_field_and_background():
    f = make_field()
    from fastdream.field import Background

    bg = Background(generator=torch.Generator().manual_seed(0))
    out = render(f, bg, orbit_cameras(1), 16, 16, shading_mode="shaded", jitter=True,
                 generator=torch.Generator().manual_seed(0))  # fmt: skip
    out["image"].mean().backward()
    assert f.table.grad.abs().sum() > 0 and f.out.weight.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in bg.parameters())


def test_grid_skips_empty_space_without_changing_the_image():
    f = make_field()
    grid = OccupancyGrid(16, bound=1.0, step=2.0 / 48)
    grid.update(f.density, warmup=True, generator=torch.Generator().manual_seed(0))
    assert grid.fraction_occupied() < 0.5
    cams = orbit_cameras(1)
    full = render(f, torch.ones(3), cams, S, S, samples_per_ray=48)
    fast = render(f, torch.ones(3), cams, S, S, samples_per_ray=48, grid=grid)
    assert fast["n_samples"] < full["n_samples"] / 2
    # Only the faint tail of the blob below the grid's threshold is lost.
    assert (full["image"] - fast["image"]).abs().max() < 0.1
    assert (full["image"] - fast["image"]).abs().mean() < 0.01


def test_batch_equals_one_camera_at_a_time():
    f = make_field()
    cams = orbit_cameras(3)
    batch = render(f, torch.ones(3), cams, 12, 12, shading_mode="shaded")
    single = render_views(f, torch.ones(3), cams, 12, shading_mode="shaded")
    for i, o in enumerate(single):
        assert torch.allclose(batch["image"][i], o["image"][0], atol=1e-5)


def test_pruning_occluded_samples_is_exact_in_image_and_gradients():
    """render(prune=True) skips the inside of opaque objects; image, regularisers' inputs and every parameter
    gradient (normals included: shaded mode, orientation-style loss on the weights) match prune=False."""
    from fastdream.losses import orientation_loss

    results = []
    for prune in (False, True):
        f = make_field(blob_density=300.0, density_shift=-100.0)  # an opaque sphere: rays terminate inside
        out = render(f, torch.tensor([0.1, 0.2, 0.3]), orbit_cameras(2), 20, 20, shading_mode="shaded",
                     samples_per_ray=64, prune=prune)  # fmt: skip
        loss = (out["image"] * torch.linspace(0, 1, 20)).sum() + orientation_loss(
            out["weights"], out["normals"], out["directions"], out["ray_indices"], out["n_rays"]
        )
        loss.backward()
        grads = [p.grad.clone() for p in f.parameters()]
        results.append((out, grads))
    (full, g_full), (pruned, g_pruned) = results
    assert pruned["n_samples"] < 0.95 * full["n_samples"]  # no grid: most samples are in empty space
    for key in ("image", "opacity", "depth", "normals_image"):
        assert torch.allclose(full[key], pruned[key], atol=1e-5), key
    for a, b in zip(g_full, g_pruned):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6 * a.abs().max().item())


def test_orientation_loss_inputs_directions_point_from_camera_and_visible_normals_face_it():
    """The regulariser's inputs as the renderer gives them: ``directions`` run from the camera to each sample, so
    on an opaque sphere (visible normals facing the camera) DreamFusion's orientation loss is near zero, and it
    is large for the same weights with the normals flipped (facing away)."""
    from fastdream.losses import orientation_loss

    f = make_field(blob_density=300.0, density_shift=-100.0)  # an opaque sphere
    with torch.no_grad():
        f.table.zero_()
    cams = orbit_cameras(2)
    out = render(f, torch.zeros(3), cams, S, S, shading_mode="shaded", samples_per_ray=64)
    cam_pos = cams.position.repeat_interleave(S * S, dim=0)[out["ray_indices"]]
    to_sample = torch.nn.functional.normalize(out["samples"].positions - cam_pos, dim=-1)
    torch.testing.assert_close(out["directions"], to_sample, atol=1e-5, rtol=0)
    args = (out["weights"], out["directions"], out["ray_indices"], out["n_rays"])
    facing = orientation_loss(args[0], out["normals"], *args[1:])
    away = orientation_loss(args[0], -out["normals"], *args[1:])
    assert away > 0.01 and facing < 0.02 * away


def test_the_default_backends_render_like_the_reference():
    """The whole render (march, encoding with its Jacobian, analytic normals, shading, compositing) on the default
    fast backends against every op forced to its PyTorch reference: image, opacity, depth, normals, the
    regularisers' inputs, and the gradients of every field and background parameter."""
    from fastdream.field import Background
    from fastdream.ops._dispatch import use_backend

    def run(backend):
        f = make_field()
        with torch.no_grad():
            f.table.normal_(0, 0.05, generator=torch.Generator().manual_seed(4))  # more than the blob
        bg = Background(generator=torch.Generator().manual_seed(0))
        cams = orbit_cameras(2)
        with use_backend(backend):
            out = render(f, bg, cams, 13, 17, shading_mode="shaded", samples_per_ray=40, jitter=True,
                         generator=torch.Generator().manual_seed(5))  # fmt: skip
        g = torch.Generator().manual_seed(6)
        keys = ("image", "opacity", "depth", "normals_image")
        loss = sum((out[k] * torch.randn(out[k].shape, generator=g)).sum() for k in keys)
        loss = loss + (out["weights"] * torch.randn(out["weights"].shape, generator=g)).sum()
        loss.backward()
        params = list(f.named_parameters()) + [("bg." + n, p) for n, p in bg.named_parameters()]
        return {k: out[k].detach() for k in (*keys, "weights")}, {n: p.grad for n, p in params}

    (want, want_grads), (got, got_grads) = run("reference"), run(None)
    assert want["weights"].shape == got["weights"].shape and want["weights"].numel() > 100
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=2e-5, rtol=1e-4, msg=k)
    assert want_grads.keys() == got_grads.keys()
    for k in want_grads:
        assert want_grads[k] is not None and want_grads[k].abs().sum() > 0, k
        torch.testing.assert_close(got_grads[k], want_grads[k], atol=2e-5, rtol=1e-3, msg=f"grad {k}")
