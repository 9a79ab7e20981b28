# SPDX-License-Identifier: Apache-2.0
"""Camera conventions (positions, look-at, rays, field of view), the camera and light sampler, and the
view-dependent prompt words at DreamFusion's thresholds."""

import math

import pytest
import torch

from fastdream.cameras import view_word
from fastdream.guidance.base import VIEW_WORDS


@pytest.mark.parametrize(
    "elevation, azimuth, word",
    [
        (60.0, 0.0, "front"),  # 60° itself is not overhead
        (60.01, 0.0, "overhead"),
        (60.01, 180.0, "overhead"),  # overhead wins over any azimuth
        (90.0, 90.0, "overhead"),
        (0.0, 0.0, "front"),
        (0.0, 44.9, "front"),
        (0.0, -44.9, "front"),
        (0.0, 45.0, "side"),  # ±45° itself is side
        (0.0, -45.0, "side"),
        (0.0, 90.0, "side"),
        (0.0, 135.0, "side"),  # ±135° itself is side
        (0.0, -135.0, "side"),
        (0.0, 135.1, "back"),
        (0.0, -135.1, "back"),
        (0.0, 180.0, "back"),
        (0.0, -180.0, "back"),
        (0.0, 359.0, "front"),  # wraparound
        (0.0, 360.0, "front"),
        (0.0, 315.0, "side"),
        (0.0, 225.0, "side"),
        (0.0, 224.9, "back"),
        (0.0, -359.0, "front"),
        (-10.0, 0.0, "front"),  # below the horizon is still front
    ],
)
def test_view_word_thresholds(elevation, azimuth, word):
    got = view_word(elevation, azimuth)
    assert got == word
    assert got in VIEW_WORDS  # what Guidance.sds_loss accepts


def _cam(elevation, azimuth, distance=2.0, fov=50.0):
    from fastdream.cameras import make_cameras

    def t(v):
        return torch.tensor([float(v)])

    return make_cameras(t(elevation), t(azimuth), t(distance), t(fov))


@pytest.mark.parametrize(
    "elevation, azimuth, position",
    [
        (0.0, 0.0, (0.0, 0.0, 2.0)),  # azimuth 0: the camera on +Z, facing the object's front
        (0.0, 90.0, (2.0, 0.0, 0.0)),  # azimuth 90: +X
        (0.0, 180.0, (0.0, 0.0, -2.0)),
        (0.0, -90.0, (-2.0, 0.0, 0.0)),
        (90.0, 0.0, (0.0, 2.0, 0.0)),  # overhead: +Y
        (30.0, 0.0, (0.0, 1.0, 3.0**0.5)),
    ],
)
def test_camera_positions_and_look_at(elevation, azimuth, position):
    cam = _cam(elevation, azimuth)
    torch.testing.assert_close(cam.position[0], torch.tensor(position), atol=1e-6, rtol=0)
    rot = cam.c2w[0, :3, :3]
    torch.testing.assert_close(rot.T @ rot, torch.eye(3), atol=1e-6, rtol=0)  # orthonormal
    assert torch.det(rot) > 0.999  # right-handed
    # OpenGL: the camera looks down its -Z axis, at the origin
    torch.testing.assert_close(-rot[:, 2], -cam.position[0] / 2.0, atol=1e-6, rtol=0)
    if elevation < 89.0:  # image up is world-up side, image right is horizontal
        assert rot[1, 1] > 0 and abs(float(rot[1, 0])) < 1e-6


def test_front_camera_sees_x_to_the_right_and_y_up():
    from fastdream.cameras import get_rays

    h, w = 8, 12
    o, d = get_rays(_cam(0.0, 0.0), h, w)
    assert o.shape == (h * w, 3) and torch.allclose(o, torch.tensor([[0.0, 0.0, 2.0]]).expand(h * w, 3))
    torch.testing.assert_close(d.norm(dim=-1), torch.ones(h * w))
    d = d.reshape(h, w, 3)
    assert (d[..., 2] < 0).all()  # towards the object
    assert (d[0, :, 1] > 0).all() and (d[-1, :, 1] < 0).all()  # row 0 is the top of the image
    assert (d[:, 0, 0] < 0).all() and (d[:, -1, 0] > 0).all()  # column 0 is the left (-X)
    # the four centre pixels' rays are symmetric about the optical axis
    centre = d[h // 2 - 1 : h // 2 + 1, w // 2 - 1 : w // 2 + 1].reshape(4, 3).mean(0)
    torch.testing.assert_close(centre / centre.norm(), torch.tensor([0.0, 0.0, -1.0]), atol=1e-6, rtol=0)


def test_fov_is_vertical():
    """The top and bottom edges of the image (not pixel centres) are fov/2 above and below the optical axis."""
    from fastdream.cameras import get_rays

    fov, h, w = 50.0, 64, 96
    _, d = get_rays(_cam(0.0, 0.0, fov=fov), h, w)
    d = d.reshape(h, w, 3)
    # pixel-centre rays of rows 0 and 1 straddle the edge; extrapolate the tangent half a pixel out
    tan_rows = d[:, w // 2, 1] / -d[:, w // 2, 2]
    tan_edge = tan_rows[0] + 0.5 * (tan_rows[0] - tan_rows[1])
    assert abs(math.degrees(math.atan(float(tan_edge))) - fov / 2) < 1e-3
    # square pixels: the horizontal step of the tangent equals the vertical one
    tan_cols = d[h // 2, :, 0] / -d[h // 2, :, 2]
    torch.testing.assert_close(tan_cols[1] - tan_cols[0], tan_rows[0] - tan_rows[1], rtol=1e-4, atol=0)


def test_overhead_camera_has_the_front_at_the_bottom():
    from fastdream.cameras import get_rays

    _, d = get_rays(_cam(90.0, 0.0), 8, 8)
    d = d.reshape(8, 8, 3)
    assert (d[..., 1] < 0).all()  # looking down
    assert (d[0, :, 2] < 0).all() and (d[-1, :, 2] > 0).all()  # top row towards -Z (back), bottom towards +Z
    assert (d[:, -1, 0] > 0).all()  # right is +X


def test_sample_cameras_ranges_and_lights():
    from fastdream.cameras import CameraConfig, sample_cameras

    cfg = CameraConfig(distance_range=(2.0, 2.5), fov_range=(40.0, 60.0))
    cams = sample_cameras(cfg, 4000, torch.Generator().manual_seed(0))
    assert cams.elevation.min() >= -10 and cams.elevation.max() <= 90 and cams.elevation.max() > 89
    assert cams.azimuth.min() >= -180 and cams.azimuth.max() <= 180
    assert cams.distance.min() >= 2.0 and cams.distance.max() <= 2.5
    assert math.radians(40) <= cams.fov.min() and cams.fov.max() <= math.radians(60)
    torch.testing.assert_close(cams.position.norm(dim=-1), cams.distance)
    # Uniform in angle: mean elevation 40°. Lights around the scaled camera position: E[light] = 1.15 E[position].
    assert abs(float(cams.elevation.mean()) - 40.0) < 1.5
    off = cams.light - 1.15 * cams.position
    assert float(off.mean(0).abs().max()) < 0.05
    # Across the camera direction the light moves by the jitter only: 2 dims of N(0, 0.5²).
    along = cams.position / cams.position.norm(dim=-1, keepdim=True)
    across = cams.light - along * (cams.light * along).sum(-1, keepdim=True)
    assert abs(math.sqrt(float(across.square().sum(-1).mean()) / 2) - 0.5) < 0.02
    # uniform on the sphere: mean of sin(elevation) = (sin 90 + sin(-10)) / 2
    sphere = sample_cameras(CameraConfig(uniform_sphere_elevation=True), 4000, torch.Generator().manual_seed(1))
    mean_sin = float(torch.sin(torch.deg2rad(sphere.elevation)).mean())
    assert abs(mean_sin - (1.0 - math.sin(math.radians(10))) / 2) < 0.02


def test_orbit_cameras_face_front_right_back_left():
    from fastdream.cameras import orbit_cameras

    cams = orbit_cameras(4, elevation=0.0, distance=2.0)
    assert [view_word(float(e), float(a)) for e, a in zip(cams.elevation, cams.azimuth)] == [
        "front",
        "side",
        "back",
        "side",
    ]
    torch.testing.assert_close(cams.light, cams.position)  # the turntable's light sits at the camera
