# SPDX-License-Identifier: Apache-2.0
"""The ``fastdream`` command: a thin layer over the library.

Each subcommand lives in ``fastdream/commands/<name>.py`` with ``add_parser(subparsers)`` and
``run(args) -> int``. Bad input raises :class:`fastdream.errors.UserError` (or argparse rejects it): one line
on stderr, exit status 2, no traceback unless ``--debug``.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
from typing import TYPE_CHECKING

from fastdream.errors import UserError

if TYPE_CHECKING:
    import torch

COMMANDS = ("generate", "export", "evaluate", "bench", "info")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage too: keep it short)
        self.exit(2, f"fastdream: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastdream", description="Text to 3D by Score Distillation Sampling, fast.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"fastdream.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"fastdream.commands.{name}":
                continue  # command not part of this build
            raise
        p = mod.add_parser(sub)
        p.set_defaults(_run=mod.run)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    return parser


def _command_device(args: argparse.Namespace) -> torch.device | None:
    """The device a command's ``--device`` names, for the backend check; None when it has none, or one the
    command itself refuses (its own message is clearer)."""
    import torch

    name = str(getattr(args, "device", None) or "").strip().lower()
    if not name:
        return None
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        return None
    if dev.type == "cpu" or (dev.type == "cuda" and torch.cuda.is_available()):
        return dev
    return None


def check_environment(args: argparse.Namespace) -> None:
    """Checks of the environment every command shares, before it runs: ``FASTDREAM_BACKEND*`` (``info``
    reports them instead).

    Raises:
        UserError: one line naming the variable.
    """
    if args.command == "info":
        return
    from fastdream.ops import _dispatch

    _dispatch.check_env(_command_device(args))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    from fastdream._capture import hide_expected_warnings

    hide_expected_warnings()
    try:
        check_environment(args)
        return int(args._run(args) or 0)
    except UserError as e:
        if args.debug:
            raise
        print(f"fastdream {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        # A path the system cannot take, wherever it is first used (a stat, a mkdir, a probe): one line. Other
        # OS errors are met where they happen, with what to do about them.
        if e.errno != errno.ENAMETOOLONG or args.debug:
            raise
        print(
            f"fastdream {args.command}: error: a file or folder name in {e.filename or 'a path'} is too long for "
            f"the file system (255 bytes at most per name); choose a shorter one",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print(f"fastdream {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # stdout closed early (``fastdream bench | head -1``): not an error of ours. Point stdout at devnull so
        # the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
