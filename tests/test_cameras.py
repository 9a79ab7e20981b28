# SPDX-License-Identifier: Apache-2.0
"""View-dependent prompt words at DreamFusion's thresholds."""

import pytest

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
