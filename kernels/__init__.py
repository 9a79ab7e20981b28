# SPDX-License-Identifier: Apache-2.0
"""Triton kernels of fastdream, installed as ``fastdream.kernels``: one module per op, each with its
``@triton.jit`` kernels and plain launchers. Import these modules only when triton is installed."""
