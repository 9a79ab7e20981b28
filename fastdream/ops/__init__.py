# SPDX-License-Identifier: Apache-2.0
"""Public ops: each module holds the public function, its autograd, its reference and its dispatch."""

from fastdream.ops._dispatch import select, use_backend
from fastdream.ops.composite import CompositeResult, composite, composite_reference
from fastdream.ops.occupancy import OccupancyGrid
from fastdream.ops.raymarch import RaySamples, march_rays, march_rays_reference, ray_sphere
from fastdream.ops.shading import ShadeMode, shade, shade_reference

__all__ = [
    "CompositeResult",
    "OccupancyGrid",
    "RaySamples",
    "ShadeMode",
    "composite",
    "composite_reference",
    "march_rays",
    "march_rays_reference",
    "ray_sphere",
    "select",
    "shade",
    "shade_reference",
    "use_backend",
]
