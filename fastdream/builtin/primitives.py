# SPDX-License-Identifier: Apache-2.0
"""The canonical primitives of the builtin prior (world frame: +Y up, centred at the origin).

sphere radius 0.5; cube side 0.8, axis-aligned; cylinder radius 0.4, height 0.8, axis +Y; cone base radius
0.45 at y = -0.45, apex at y = +0.45; torus major radius 0.45, minor radius 0.15, axis +Y.

Each is an exact signed distance function (negative inside), with normals from its analytic gradient,
area-uniform surface samples (for Chamfer distances) and a density for volume rendering.

Example:
    >>> import torch
    >>> from fastdream.builtin.primitives import sdf
    >>> sdf("sphere", torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.0, 0.0]])).tolist()
    [-0.5, 0.5]
"""

from __future__ import annotations

import math

import torch

SPHERE_RADIUS = 0.5
CUBE_HALF = 0.4
CYLINDER_RADIUS, CYLINDER_HALF_HEIGHT = 0.4, 0.4
CONE_RADIUS, CONE_HALF_HEIGHT = 0.45, 0.45
TORUS_MAJOR, TORUS_MINOR = 0.45, 0.15


def _sphere(p: torch.Tensor) -> torch.Tensor:
    return p.norm(dim=-1) - SPHERE_RADIUS


def _cube(p: torch.Tensor) -> torch.Tensor:
    q = p.abs() - CUBE_HALF
    return q.clamp_min(0).norm(dim=-1) + q.amax(dim=-1).clamp_max(0)


def _cylinder(p: torch.Tensor) -> torch.Tensor:
    d = torch.stack([p[..., [0, 2]].norm(dim=-1) - CYLINDER_RADIUS, p[..., 1].abs() - CYLINDER_HALF_HEIGHT], -1)
    return d.amax(dim=-1).clamp_max(0) + d.clamp_min(0).norm(dim=-1)


def _cone(p: torch.Tensor) -> torch.Tensor:
    # Exact capped cone (Quilez) with top radius 0: q = (radial, y), base at y = -h with radius r.
    h, r = CONE_HALF_HEIGHT, CONE_RADIUS
    qx, qy = p[..., [0, 2]].norm(dim=-1), p[..., 1]
    k1x, k1y = 0.0, h
    k2x, k2y = -r, 2.0 * h
    cax = qx - torch.minimum(qx, torch.where(qy < 0, torch.full_like(qx, r), torch.zeros_like(qx)))
    cay = qy.abs() - h
    f = (((k1x - qx) * k2x + (k1y - qy) * k2y) / (k2x * k2x + k2y * k2y)).clamp(0.0, 1.0)
    cbx, cby = qx - k1x + k2x * f, qy - k1y + k2y * f
    inside = (cbx < 0) & (cay < 0)
    dist = torch.minimum(cax * cax + cay * cay, cbx * cbx + cby * cby).clamp_min(0).sqrt()
    return torch.where(inside, -dist, dist)


def _torus(p: torch.Tensor) -> torch.Tensor:
    q = torch.stack([p[..., [0, 2]].norm(dim=-1) - TORUS_MAJOR, p[..., 1]], -1)
    return q.norm(dim=-1) - TORUS_MINOR


_SDF = {"sphere": _sphere, "cube": _cube, "cylinder": _cylinder, "cone": _cone, "torus": _torus}
# Radius of a sphere at the origin that contains the primitive (for ray bounds).
BOUNDING_RADIUS = {
    "sphere": 0.5,
    "cube": 0.4 * math.sqrt(3),
    "cylinder": 0.4 * math.sqrt(2),
    "cone": 0.45 * math.sqrt(2),
    "torus": 0.6,
}


def sdf(shape: str, points: torch.Tensor) -> torch.Tensor:
    """Signed distance of ``points`` [..., 3] to the primitive ``shape``: [...], negative inside."""
    try:
        fn = _SDF[shape]
    except KeyError:
        raise ValueError(f"shape: expected one of {', '.join(_SDF)}; got {shape!r}") from None
    return fn(points)


def normals(shape: str, points: torch.Tensor) -> torch.Tensor:
    """Outward unit normals [..., 3]: the normalised analytic gradient of the SDF at ``points`` [..., 3]."""
    with torch.enable_grad():
        p = points.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(sdf(shape, p).sum(), p)
    # Exactly on a kink of the SDF (d = 0 where max/clamp meet) autograd returns a zero subgradient: use
    # central differences there.
    bad = g.norm(dim=-1) < 0.5
    if bool(bad.any()):
        q, h = points[bad].detach(), 1e-4
        eye = torch.eye(3, dtype=q.dtype, device=q.device) * h
        g[bad] = torch.stack([sdf(shape, q + eye[k]) - sdf(shape, q - eye[k]) for k in range(3)], -1)
    return torch.nn.functional.normalize(g, dim=-1)


def density(shape: str, points: torch.Tensor, sharpness: float = 200.0, scale: float = 1000.0) -> torch.Tensor:
    """Volume density [...] of the solid: ``scale * sigmoid(-sharpness * sdf)`` (opaque within ~1/sharpness)."""
    return scale * torch.sigmoid(-sharpness * sdf(shape, points))


def _unit(n: int, g: torch.Generator | None) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, 3, generator=g, dtype=torch.float64), dim=-1)


def _choose(areas: list[float], n: int, g: torch.Generator | None) -> torch.Tensor:
    w = torch.tensor(areas, dtype=torch.float64)
    return torch.multinomial(w / w.sum(), n, replacement=True, generator=g)


def _disc(n: int, radius: float, g: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    rad = radius * torch.rand(n, generator=g, dtype=torch.float64).sqrt()
    ang = 2 * math.pi * torch.rand(n, generator=g, dtype=torch.float64)
    return rad * torch.cos(ang), rad * torch.sin(ang)


def sample_surface(shape: str, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` points [n, 3] (float32) uniformly distributed by area on the primitive's surface."""
    g = generator
    u = lambda: torch.rand(n, generator=g, dtype=torch.float64)  # noqa: E731
    if shape == "sphere":
        p = SPHERE_RADIUS * _unit(n, g)
    elif shape == "cube":
        face = torch.randint(0, 6, (n,), generator=g)
        a, b = (2 * u() - 1) * CUBE_HALF, (2 * u() - 1) * CUBE_HALF
        axis, sign = face // 2, (face % 2) * 2.0 - 1.0
        p = torch.empty(n, 3, dtype=torch.float64)
        for k in range(3):
            m = axis == k
            others = [j for j in range(3) if j != k]
            p[m, k] = sign[m].double() * CUBE_HALF
            p[m, others[0]], p[m, others[1]] = a[m], b[m]
    elif shape == "cylinder":
        r, h = CYLINDER_RADIUS, CYLINDER_HALF_HEIGHT
        part = _choose([2 * math.pi * r * 2 * h, math.pi * r * r, math.pi * r * r], n, g)
        ang = 2 * math.pi * u()
        x, z, y = r * torch.cos(ang), r * torch.sin(ang), (2 * u() - 1) * h
        dx, dz = _disc(n, r, g)
        cap = part > 0
        x, z = torch.where(cap, dx, x), torch.where(cap, dz, z)
        y = torch.where(part == 1, torch.full_like(y, h), torch.where(part == 2, torch.full_like(y, -h), y))
        p = torch.stack([x, y, z], -1)
    elif shape == "cone":
        r, h = CONE_RADIUS, CONE_HALF_HEIGHT
        slant = math.hypot(r, 2 * h)
        part = _choose([math.pi * r * slant, math.pi * r * r], n, g)
        s = u().sqrt()  # fraction of the way from apex to base: area grows linearly with s^2
        ang = 2 * math.pi * u()
        x, z, y = s * r * torch.cos(ang), s * r * torch.sin(ang), h - 2 * h * s
        dx, dz = _disc(n, r, g)
        base = part == 1
        p = torch.stack(
            [torch.where(base, dx, x), torch.where(base, torch.full_like(y, -h), y), torch.where(base, dz, z)], -1
        )
    elif shape == "torus":
        big, small = TORUS_MAJOR, TORUS_MINOR
        chunks, have = [], 0
        while have < n:  # rejection: the area element is proportional to (R + r cos(theta))
            m = 2 * (n - have) + 16
            theta = 2 * math.pi * torch.rand(m, generator=g, dtype=torch.float64)
            keep = torch.rand(m, generator=g, dtype=torch.float64) * (big + small) < big + small * torch.cos(theta)
            theta = theta[keep][: n - have]
            phi = 2 * math.pi * torch.rand(theta.shape[0], generator=g, dtype=torch.float64)
            rad = big + small * torch.cos(theta)
            chunks.append(torch.stack([rad * torch.cos(phi), small * torch.sin(theta), rad * torch.sin(phi)], -1))
            have += theta.shape[0]
        p = torch.cat(chunks)
    else:
        raise ValueError(f"shape: expected one of {', '.join(_SDF)}; got {shape!r}")
    return p.float()
