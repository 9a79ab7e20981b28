# SPDX-License-Identifier: Apache-2.0
"""Write a Stable-Diffusion-2.1-base-shaped pipeline folder with RANDOM weights (no download).

It is for timing ``fastdream generate --model FOLDER`` end to end on a GPU: the whole run (loading, every step
with previews, checkpoints and grid updates, the export) through the same loader real checkpoints use. The
target it serves is "10,000 steps in under 5 minutes" (issue #6). The images such a model guides towards are
meaningless: use the folder for timings only.

- UNet and VAE: SD 2.1 base's shapes (``fastdream.bench.SD21_BASE_UNET`` / ``SD21_BASE_VAE``), which is all a
  step's time depends on.
- Text encoder: a one-layer CLIP text model with SD 2.1's width (1024) and 77 positions. The trainer computes
  the embeddings once per view word and frees the encoder, so its size does not matter for the step time.
- Tokenizer: letters only.

Usage::

    python benchmarks/make_sd_shaped.py /tmp/sd-shaped [--device cuda] [--tiny]
    fastdream generate "a red cube" --model /tmp/sd-shaped --device cuda --cuda-graphs --steps 1000 --no-export

``--tiny`` writes the small configs of ``fastdream bench --tiny`` instead (CPU tests of this script).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

LETTERS = "abcdefghijklmnopqrstuvwxyz,."


def letter_tokenizer(max_length: int):
    """A CLIP tokenizer whose vocabulary is single letters (enough for prompts; no merges file needed)."""
    import transformers

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in LETTERS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    return transformers.CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def build(out: Path, device: str = "cpu", tiny: bool = False) -> Path:
    """Write the pipeline folder ``out`` (fp16 weights unless ``tiny``); returns ``out``."""
    import diffusers
    import transformers
    from diffusers.utils import logging as diffusers_logging

    from fastdream.bench import SD21_BASE_SCHEDULER, SD21_BASE_UNET, SD21_BASE_VAE, TINY_SD_UNET, TINY_SD_VAE

    diffusers_logging.set_verbosity_error()
    unet_cfg, vae_cfg = (TINY_SD_UNET, TINY_SD_VAE) if tiny else (SD21_BASE_UNET, SD21_BASE_VAE)
    width = int(unet_cfg["cross_attention_dim"])
    length = 16 if tiny else 77
    torch.manual_seed(0)
    with torch.device(device):  # random init of ~1 B parameters: seconds on a GPU
        unet = diffusers.UNet2DConditionModel(**unet_cfg)
        vae = diffusers.AutoencoderKL(**vae_cfg)
        text_encoder = transformers.CLIPTextModel(
            transformers.CLIPTextConfig(
                vocab_size=len(LETTERS) * 2 + 2,
                hidden_size=width,
                intermediate_size=width * 4,
                num_hidden_layers=1,
                num_attention_heads=max(1, width // 64),
                max_position_embeddings=length,
                bos_token_id=0,
                eos_token_id=1,
                pad_token_id=1,
            )
        )
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=letter_tokenizer(length),
        unet=unet,
        scheduler=diffusers.DDPMScheduler(**SD21_BASE_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if not tiny:
        pipe.to(torch.float16)  # half the bytes to write and read; the loader casts as it needs
    pipe.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="folder to write (created; must not exist or be empty)")
    p.add_argument("--device", default="cpu", help="where to initialise the weights (cuda: much faster)")
    p.add_argument("--tiny", action="store_true", help="the tiny configs of fastdream bench --tiny (tests)")
    args = p.parse_args(argv)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        print(f"make_sd_shaped: {out} exists and is not empty; pick a new folder", file=sys.stderr)
        return 2
    build(out, args.device, args.tiny)
    print(f"wrote an SD-2.1-base-shaped pipeline with random weights to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
