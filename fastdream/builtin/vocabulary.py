# SPDX-License-Identifier: Apache-2.0
"""The builtin prior's vocabulary: ``[a|an|the] COLOUR SHAPE``, case-insensitive.

Example:
    >>> from fastdream.builtin.vocabulary import parse_prompt
    >>> parse_prompt("A Red  cube")
    ('red', 'cube')
"""

from __future__ import annotations

from fastdream.errors import UserError

SHAPES: tuple[str, ...] = ("sphere", "cube", "cylinder", "cone", "torus")

# Albedo in linear RGB, 0..1. "grey" is an alias of "gray". The colours sit near the corners of the RGB cube
# where they can: classifier-free guidance pushes each channel away from the unconditional mean, so a field's
# albedo saturates towards the corner of its colour (measured: red 0.85 ended at 1.0).
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.95, 0.05, 0.05),
    "green": (0.05, 0.90, 0.05),
    "blue": (0.05, 0.10, 0.95),
    "yellow": (0.95, 0.90, 0.05),
    "orange": (0.95, 0.50, 0.05),
    "purple": (0.60, 0.10, 0.90),
    "white": (0.95, 0.95, 0.95),
    "gray": (0.50, 0.50, 0.50),
}
ALIASES: dict[str, str] = {"grey": "gray"}
ARTICLES = ("a", "an", "the")
_PUNCTUATION = str.maketrans({c: " " for c in ".,;:!?"})


def vocabulary_line() -> str:
    """One line naming every accepted word."""
    colours = ", ".join([*COLOURS, *ALIASES])
    shapes = ", ".join(SHAPES)
    return f"builtin prompts are '[a|an|the] COLOUR SHAPE' with COLOUR one of {colours} and SHAPE one of {shapes}"


def parse_prompt(prompt: str) -> tuple[str, str]:
    """``"A Red cube"`` -> ``("red", "cube")``.

    Raises:
        UserError: the prompt is not ``[a|an|the] COLOUR SHAPE`` of the vocabulary (the message lists it).
    """
    words = str(prompt).lower().translate(_PUNCTUATION).split()  # "a red cube." and "a red cube!" alike
    if words and words[0] in ARTICLES:
        words = words[1:]
    if len(words) == 2:
        colour, shape = ALIASES.get(words[0], words[0]), words[1]
        if colour in COLOURS and shape in SHAPES:
            return colour, shape
    raise UserError(f"prompt {prompt!r} is not in the builtin vocabulary; {vocabulary_line()}")


def label(colour: str, shape: str) -> str:
    """The canonical prompt of a label: ``"a red cube"``."""
    return f"a {colour} {shape}"
