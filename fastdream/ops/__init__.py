# SPDX-License-Identifier: Apache-2.0
"""Public ops: each module holds the public function, its autograd, its reference and its dispatch."""

from fastdream.ops._dispatch import select, use_backend
from fastdream.ops.composite import CompositeResult, composite, composite_reference
from fastdream.ops.hash_grid import (
    HashGridConfig,
    hash_encode,
    hash_encode_reference,
    hash_encode_with_jacobian,
    hash_encode_with_jacobian_reference,
    init_hash_table,
)
from fastdream.ops.normals import (
    density_gradient,
    finite_difference_gradient,
    finite_difference_normals,
    normals_from_gradient,
)
from fastdream.ops.occupancy import OccupancyGrid
from fastdream.ops.raymarch import (
    RaySamples,
    march_rays,
    march_rays_padded,
    march_rays_reference,
    prune_occluded,
    ray_sphere,
)
from fastdream.ops.shading import ShadeMode, shade, shade_reference

__all__ = [
    "CompositeResult",
    "HashGridConfig",
    "OccupancyGrid",
    "RaySamples",
    "ShadeMode",
    "composite",
    "composite_reference",
    "density_gradient",
    "finite_difference_gradient",
    "finite_difference_normals",
    "hash_encode",
    "hash_encode_reference",
    "hash_encode_with_jacobian",
    "hash_encode_with_jacobian_reference",
    "init_hash_table",
    "march_rays",
    "march_rays_padded",
    "march_rays_reference",
    "prune_occluded",
    "normals_from_gradient",
    "ray_sphere",
    "select",
    "shade",
    "shade_reference",
    "use_backend",
]
