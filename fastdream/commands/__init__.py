# SPDX-License-Identifier: Apache-2.0
"""The subcommands of ``fastdream``: one module each, with ``add_parser(subparsers)`` and ``run(args)``."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in its help, except an unset one (``None``), an empty text or an empty list: their
    help says what they mean (no "(default: None)" after "default: the run's", no "(default: [])" after --set)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default in ("", []):
            return action.help
        return super()._get_help_string(action)
