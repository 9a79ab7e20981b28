# SPDX-License-Identifier: Apache-2.0
"""The builtin prior: a closed-vocabulary diffusion model of coloured primitive shapes.

It needs no download: its data are images of five canonical primitives in a palette of colours, rendered by
fastdream's own shading from the generator's camera distribution, and its denoiser is the exact one of the
Gaussian-smoothed empirical distribution of those images. A demonstration and test prior, not a general
text-to-image model: a run can be scored against the known answer (``fastdream evaluate``).
"""

from fastdream.builtin.vocabulary import COLOURS, SHAPES, parse_prompt

__all__ = ["COLOURS", "SHAPES", "parse_prompt"]
