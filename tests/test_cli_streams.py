# SPDX-License-Identifier: Apache-2.0
"""Standard output that cannot take the results, and no command: one line on stderr, exit status 2."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from clitools import ROOT, assert_user_error

from fastdream import cli
from fastdream.commands import info


def _fastdream_shell(command: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["sh", "-c", f"exec {sys.executable} -m fastdream {command}"], cwd=ROOT, capture_output=True, text=True
    )


@pytest.mark.skipif(not __import__("os").path.exists("/dev/full"), reason="no /dev/full here")
def test_stdout_that_cannot_be_written() -> None:
    res = _fastdream_shell("info > /dev/full")  # a traceback before (ENOSPC inside print)
    assert_user_error(res, "cannot write to standard output", "No space left")


def test_stdout_closed() -> None:
    res = _fastdream_shell("info >&-")  # exit 0 before, and the results went nowhere
    assert_user_error(res, "standard output is closed")


def test_no_command() -> None:
    res = _fastdream_shell("")  # the whole help on stdout before, nothing on stderr
    assert_user_error(res, "give a command", "generate")


def test_a_broken_pipe_is_not_an_error(monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture) -> None:
    """``fastdream info | head -1``: BrokenPipeError is an OSError, and the OSError handler re-raised it."""

    def broken(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(info, "run", broken)
    assert cli.main(["info"]) == 141
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.parametrize("command", cli.COMMANDS)
def test_help_shows_no_unset_default(command: str, capsys: pytest.CaptureFixture) -> None:
    """An option left unset (None) says in its help what that means; argparse's "(default: None)" after it
    ("default: the run's ... (default: None)") contradicted it."""
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f"fastdream {command}" in out
    assert "(default: None)" not in out and "(default: )" not in out


@pytest.mark.parametrize(
    ("error", "said"),
    [
        (
            torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 1 has"),
            "on cuda:1 (it asked for 20.00 GiB more)",
        ),
        (
            RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 3221225472 bytes."),
            "on the CPU (it asked for 3.00 GiB more)",
        ),
        (
            MemoryError("Unable to allocate 256. TiB for an array with shape (35184372088832,)"),
            "on the CPU (it asked for 256 TiB more)",
        ),
    ],
)
def test_out_of_memory_anywhere_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture, error: BaseException, said: str
) -> None:
    """Where no command meets it with its own advice (loading a model, bench's sizes): a traceback before."""

    def fails(args):
        raise error

    monkeypatch.setattr(info, "run", fails)
    monkeypatch.setattr(cli, "check_environment", lambda args: None)
    assert cli.main(["info"]) == 2
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"fastdream info: error: out of memory {said}; free memory on the device"), err
    assert cli.main(["--debug", "info"]) == 2  # the traceback first, then the same line
    err = capfd.readouterr().err
    assert "Traceback" in err and err.splitlines()[-1].startswith(f"fastdream info: error: out of memory {said}")


def test_other_runtime_errors_still_show_their_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(info, "run", lambda args: (_ for _ in ()).throw(RuntimeError("a kernel failed")))
    with pytest.raises(RuntimeError, match="a kernel failed"):
        cli.main(["info"])


def _raised(error: BaseException, wrapper=None, how: str = "cause") -> BaseException:
    try:
        try:
            raise error
        except BaseException as inner:
            if wrapper is None:
                raise
            if how == "cause":
                raise wrapper from inner
            if how == "inner":  # inductor's BackendCompilerFailed(..., inner) from None
                wrapper.inner_exception = inner
                raise wrapper from None
            raise wrapper  # noqa: B904 (the context only, as an error in a handler has)
    except BaseException as e:
        return e


@pytest.mark.parametrize(
    ("error", "said"),
    [
        (
            RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be reported later"),
            "out of memory on the GPU",
        ),
        (
            RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
            "out of memory on the GPU",
        ),
        (
            RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 1048576 bytes."),
            "out of memory on the CPU (it asked for 1.0 MiB more)",
        ),
        (
            _raised(
                torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), RuntimeError("compile failed")
            ),
            "out of memory on the GPU (it asked for 2.00 GiB more)",
        ),
        (
            _raised(torch.OutOfMemoryError("CUDA out of memory."), RuntimeError("BackendCompilerFailed"), "inner"),
            "out of memory on the GPU",
        ),
        (_raised(MemoryError(), ValueError("while handling it"), "context"), "out of memory on the CPU"),
        (
            _raised(torch.OutOfMemoryError("CUDA out of memory."), KeyboardInterrupt(), "context"),
            None,
        ),  # Ctrl-C is Ctrl-C
        (RuntimeError("CUDA error: an illegal memory access was encountered"), None),
        (_raised(KeyError("k"), ValueError("v"), "context"), None),
    ],
)
def test_out_of_memory_is_recognised_in_its_other_forms(error: BaseException, said: str | None) -> None:
    from fastdream.errors import out_of_memory

    assert out_of_memory(error) == said
