# SPDX-License-Identifier: Apache-2.0
"""``fastdream info``: versions, devices, and which backends are compiled and usable."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform

import torch

import fastdream
from fastdream import backends


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "info",
        help="versions, devices and usable backends",
        description="Versions (fastdream, Python, torch, Triton, diffusers, transformers), the devices, and which "
        "backend of the ops is compiled and usable here, with why not where one is not.",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def collect() -> dict:
    from fastdream.ops import _dispatch

    devices = ["cpu"] + [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())]
    return {
        "fastdream": fastdream.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "diffusers": _version("diffusers"),
        "transformers": _version("transformers"),
        "devices": devices,
        # what setup.py recorded about the extension's build (fastdream/_build_info.json); {} when nothing
        "build": backends.build_info(),
        "backends": [
            {"name": b.name, "compiled": b.compiled, "usable": b.usable, "note": b.note} for b in backends.status()
        ],
        # FASTDREAM_BACKEND*: what is set, and what the other commands would refuse about it
        "backend_overrides": _dispatch.env_overrides(),
        "backend_override_problems": _dispatch.env_problems(),
    }


def _build_line(build: dict) -> str:
    if not build:
        return "not recorded (fastdream/_build_info.json is missing: built before it existed, or not by setup.py)"
    torch_part = f"against torch {build.get('torch')}"
    if build.get("openmp") is False:  # recorded since 2026-11-28; older records built with it
        torch_part += f", without OpenMP (the C++ CPU kernels run on one thread: {build.get('why_not_openmp')})"
    if build.get("cuda"):
        return f"{torch_part}, CUDA part by nvcc {build.get('nvcc')} for {build.get('cuda_archs')}"
    return f"{torch_part}, no CUDA part: {build.get('why_not_cuda')}"


def run(args: argparse.Namespace) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key in ("fastdream", "python", "torch", "torch_cuda", "triton", "diffusers", "transformers"):
        print(f"{key:>13}: {info[key]}")
    print(f"{'devices':>13}: {', '.join(info['devices'])}")
    print(f"{'build':>13}: {_build_line(info['build'])}")
    print("     backends:")
    for b in info["backends"]:
        flags = f"compiled={'yes' if b['compiled'] else 'no':<3} usable={'yes' if b['usable'] else 'no':<3}"
        print(f"  {b['name']:>11}  {flags}  {b['note']}")
    overrides = info["backend_overrides"]
    print(f"{'overrides':>13}: " + (", ".join(f"{k}={v}" for k, v in overrides.items()) or "none"))
    for problem in info["backend_override_problems"]:
        print(f"{'':>13}  error: {problem}")
    return 0
