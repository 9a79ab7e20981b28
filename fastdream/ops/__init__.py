# SPDX-License-Identifier: Apache-2.0
"""Public ops: each module holds the public function, its autograd, its reference and its dispatch."""

from fastdream.ops._dispatch import select, use_backend
from fastdream.ops.shading import ShadeMode, shade, shade_reference

__all__ = ["ShadeMode", "select", "shade", "shade_reference", "use_backend"]
