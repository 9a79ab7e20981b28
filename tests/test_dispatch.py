# SPDX-License-Identifier: Apache-2.0
"""The backend dispatcher and the extension's presence."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

from fastdream import backends
from fastdream.ops import _dispatch


def test_reference_always_usable():
    assert backends.usable("reference", torch.device("cpu"))
    assert "reference" in _dispatch.usable_backends("shade", torch.device("cpu"))


def test_default_prefers_compiled_cpu(monkeypatch):
    monkeypatch.delenv("FASTDREAM_BACKEND", raising=False)
    monkeypatch.delenv("FASTDREAM_BACKEND_SHADE", raising=False)
    want = "cpp" if backends.extension() is not None else "reference"
    assert _dispatch.select("shade", "cpu") == want


def test_env_override(monkeypatch):
    monkeypatch.setenv("FASTDREAM_BACKEND_SHADE", "reference")
    assert _dispatch.select("shade", "cpu") == "reference"
    monkeypatch.setenv("FASTDREAM_BACKEND_SHADE", "bogus")
    with pytest.raises(ValueError, match="bogus"):
        _dispatch.select("shade", "cpu")
    monkeypatch.delenv("FASTDREAM_BACKEND_SHADE")
    monkeypatch.setenv("FASTDREAM_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="cannot run on cpu"):
        _dispatch.select("shade", "cpu")


def test_override_to_missing_implementation_falls_back(monkeypatch):
    _dispatch.register("_only_reference_op", "reference", lambda: None)
    monkeypatch.setenv("FASTDREAM_BACKEND", "triton")
    assert _dispatch.select("_only_reference_op", "cpu") == "reference"


def test_context_manager_beats_env(monkeypatch):
    monkeypatch.setenv("FASTDREAM_BACKEND", "reference")
    if backends.extension() is None:
        pytest.skip("extension not built")
    with _dispatch.use_backend("cpp"):
        assert _dispatch.select("shade", "cpu") == "cpp"
    assert _dispatch.select("shade", "cpu") == "reference"


def test_unknown_op():
    with pytest.raises(KeyError):
        _dispatch.select("no_such_op", "cpu")


def test_extension_loaded_and_reports_cuda_part():
    ext = backends.extension()
    assert ext is not None, backends.extension_error()
    # When nvcc was there at build time, the CUDA part must have been compiled in (the CI relies on it).
    if shutil.which("nvcc") and torch.version.cuda:
        assert ext.cuda_compiled()


def test_info_command_reports_backends():
    out = subprocess.run(
        [sys.executable, "-m", "fastdream", "info"], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    assert "cpp" in out and "reference" in out and "torch" in out
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("cpp"))
    assert "usable=yes" in line
    # The build record: written by setup.py beside the extension, also under pip install -e (the README's
    # install), whose build copies the extension into the source tree.
    build = backends.build_info()
    assert build, f"{backends.BUILD_INFO} is missing: rebuild (pip install --no-build-isolation -e .)"
    assert build["torch"] == torch.__version__ and build["cuda"] == backends.cuda_compiled()
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("build:"))
    assert f"build: against torch {torch.__version__}, " in line


def test_a_missing_extension_is_said_once_before_long_work(monkeypatch, capsys):
    """A torch mismatch (or a broken plain ``pip install .``) left every op on its reference, tens of times slower,
    with nothing on the terminal saying so; only ``fastdream info`` showed it."""
    from fastdream import run as fd_run

    monkeypatch.setattr(backends, "extension", lambda: None)
    monkeypatch.setattr(backends, "extension_error", lambda: "ImportError: _C.so: undefined symbol: _ZN3c10\n x")
    monkeypatch.setattr(backends, "_warned", False)
    monkeypatch.delenv("FASTDREAM_BACKEND", raising=False)
    assert fd_run.warn_if_extension_missing is backends.warn_if_extension_missing  # what generate calls
    backends.warn_if_extension_missing()
    backends.warn_if_extension_missing()  # once: a --prompts library calls it for every prompt
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("warning: the compiled extension fastdream._C did not load (ImportError: _C.so: undefined")
    assert "PyTorch reference" in err and "--no-build-isolation" in err
    monkeypatch.setattr(backends, "_warned", False)
    monkeypatch.setenv("FASTDREAM_BACKEND", "reference")  # asked for: nothing to say
    backends.warn_if_extension_missing()
    monkeypatch.setattr(backends, "extension", lambda: object())  # loaded: nothing to say
    monkeypatch.delenv("FASTDREAM_BACKEND")
    backends.warn_if_extension_missing()
    assert capsys.readouterr().err == ""


def test_generate_says_so_before_training(monkeypatch, capfd, tmp_path):
    from clitools import TINY

    from fastdream.cli import main

    monkeypatch.setattr(backends, "extension", lambda: None)  # every op on its reference (the dispatch asks too)
    monkeypatch.setattr(backends, "extension_error", lambda: "ImportError: undefined symbol")
    monkeypatch.setattr(backends, "_warned", False)
    monkeypatch.delenv("FASTDREAM_BACKEND", raising=False)
    assert main(["generate", "a red cube", *TINY, "--out", str(tmp_path / "run")]) == 0
    err = capfd.readouterr().err
    assert "warning: the compiled extension fastdream._C did not load (ImportError: undefined symbol)" in err
