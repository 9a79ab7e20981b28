# SPDX-License-Identifier: Apache-2.0
"""The ``fastdream`` command: a thin layer over the library.

Each subcommand lives in ``fastdream/commands/<name>.py`` with ``add_parser(subparsers)`` and
``run(args) -> int``. Bad input raises :class:`fastdream.errors.UserError` (or argparse rejects it): one line
on stderr, exit status 2, no traceback unless ``--debug``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import os
import sys
import traceback
from typing import TYPE_CHECKING

from fastdream.errors import UserError, out_of_memory

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


def _traceback_if_debug(args: argparse.Namespace) -> None:
    """--debug: the traceback of the error being handled, before its one line (the exit status stays 2)."""
    if args.debug:
        traceback.print_exc(file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        print(f"fastdream: error: give a command: {', '.join(COMMANDS)} (fastdream --help)", file=sys.stderr)
        return 2
    if sys.stdout is None:  # started with stdout closed (>&-): print() would drop the results without a word
        print(
            f"fastdream {args.command}: error: standard output is closed; give it a file (> out.txt) or /dev/null",
            file=sys.stderr,
        )
        return 2
    from fastdream._capture import hide_expected_warnings

    hide_expected_warnings()
    stdout = sys.stdout
    sys.stdout = _GuardedStdout(stdout)
    try:
        check_environment(args)
        code = int(args._run(args) or 0)
        sys.stdout.flush()  # a failure to write the last of it is the command's failure too
        return code
    except UserError as e:
        _traceback_if_debug(args)
        print(f"fastdream {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # before OSError, its base class
        # stdout closed early (``fastdream bench | head -1``): not an error of ours.
        _stdout_to_devnull()
        return 141
    except OSError as e:
        # A path the system cannot take, wherever it is first used (a stat, a mkdir, a probe): one line. Other
        # OS errors are met where they happen, with what to do about them.
        if e.errno == errno.ENAMETOOLONG:
            _traceback_if_debug(args)
            print(
                f"fastdream {args.command}: error: a file or folder name in {e.filename or 'a path'} is too long "
                f"for the file system (255 bytes at most per name); choose a shorter one",
                file=sys.stderr,
            )
            return 2
        raise
    except StdoutError as e:  # > /dev/full, a full disk under > file
        _traceback_if_debug(args)
        err = e.__cause__
        why = getattr(err, "strerror", None) or type(err).__name__
        print(f"fastdream {args.command}: error: cannot write to standard output ({why})", file=sys.stderr)
        _stdout_to_devnull()
        return 2
    except (RuntimeError, MemoryError) as e:
        # Out of memory where no command met it with its own advice (loading a model, bench's sizes): one line.
        oom = out_of_memory(e)
        if oom is None:
            raise
        _traceback_if_debug(args)
        print(
            f"fastdream {args.command}: error: {oom}; free memory on the device (other processes) or lower the sizes "
            f"given to fastdream {args.command}",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print(f"fastdream {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        sys.stdout = stdout


def _stdout_to_devnull() -> None:
    """Point stdout's file descriptor at /dev/null, so that the interpreter's final flush does not fail again."""
    with contextlib.suppress(OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


class StdoutError(Exception):
    """Writing standard output failed (the OSError is the cause): told apart from a file's write error."""


class _GuardedStdout:
    """``sys.stdout`` for the duration of a command: its write errors become :class:`StdoutError` (a broken pipe
    stays a BrokenPipeError: ``| head`` is not an error)."""

    def __init__(self, stream) -> None:
        self._stream = stream

    @staticmethod
    @contextlib.contextmanager
    def _errors():
        try:
            yield
        except BrokenPipeError:
            raise
        except OSError as e:
            raise StdoutError() from e

    def write(self, text: str) -> int:
        with self._errors():
            return self._stream.write(text)

    def flush(self) -> None:
        with self._errors():
            self._stream.flush()

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


if __name__ == "__main__":
    sys.exit(main())
