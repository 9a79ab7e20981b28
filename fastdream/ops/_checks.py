# SPDX-License-Identifier: Apache-2.0
"""Input checks at the public boundary of every op: one clear error naming the argument, before any launch."""

from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.float64)


def check_tensor(
    name: str,
    t: object,
    shape: Sequence[int | None],
    dtypes: Sequence[torch.dtype] = FLOAT_DTYPES,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Check that ``t`` is a tensor of ``shape`` (None: any size), one of ``dtypes``, on ``device``.

    Raises:
        TypeError: not a tensor, or a wrong dtype.
        ValueError: a wrong shape, device, or a layout other than strided.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise ValueError(f"{name}: expected a dense (strided) tensor, got layout {t.layout}")
    want = "[" + ", ".join("N" if s is None else str(s) for s in shape) + "]"
    if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
        raise ValueError(f"{name}: expected shape {want}, got {list(t.shape)}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name}: expected dtype {names}, got {str(t.dtype).replace('torch.', '')}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got one on {t.device}")
    return t


def same_device(**tensors: torch.Tensor) -> torch.device:
    """The common device of ``tensors``; a ValueError naming the first one that differs."""
    items = list(tensors.items())
    dev = items[0][1].device
    for name, t in items[1:]:
        if t.device != dev:
            raise ValueError(f"{name}: expected a tensor on {dev} like {items[0][0]}, got one on {t.device}")
    return dev
