# SPDX-License-Identifier: Apache-2.0
"""benchmarks/make_sd_shaped.py: the random-weight SD-shaped folder loads through the real loader and trains."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from fastdream.bench import TINY_SD_UNET
from fastdream.cli import main as fastdream_main

pytest.importorskip("diffusers")
SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "make_sd_shaped.py"


def _script():
    spec = importlib.util.spec_from_file_location("make_sd_shaped", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_folder_loads_and_trains(tmp_path, capsys):
    script = _script()
    folder = tmp_path / "sd"
    assert script.main([str(folder), "--tiny"]) == 0
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    unet = json.loads((folder / "unet" / "config.json").read_text())
    assert unet["block_out_channels"] == list(TINY_SD_UNET["block_out_channels"])
    run = tmp_path / "run"
    argv = ["generate", "a red cube", "--model", str(folder), "--device", "cpu", "--steps", "2", "--resolution", "16"]
    assert fastdream_main([*argv, "--out", str(run), "--no-export", "--quiet"]) == 0
    assert (run / "checkpoints" / "step_000002.pt").is_file()
    capsys.readouterr()
    assert script.main([str(folder), "--tiny"]) == 2  # never writes into a non-empty folder
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not empty" in err
