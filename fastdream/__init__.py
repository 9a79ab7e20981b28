# SPDX-License-Identifier: Apache-2.0
"""fastdream: text to 3D by Score Distillation Sampling, with fused kernels.

Importing the package never needs a GPU, nvcc or the compiled extension: ``fastdream.backends`` tells
which implementations are usable, and every op falls back to its pure-PyTorch reference.
"""

__version__ = "0.1.0"

from fastdream import backends  # noqa: E402,F401
