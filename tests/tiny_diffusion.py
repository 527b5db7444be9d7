"""Tiny Stable Diffusion pipelines the tests build themselves: diffusers' and transformers'
real model classes with a few channels and one or two blocks, random (seeded) weights,
saved with `save_pretrained` as a diffusers folder, so the diffusion engine's real loading
code reads them. Nothing is downloaded.

Sizes are chosen for a 2-core CI machine: one UNet step at 64x64 takes milliseconds.
"""

from __future__ import annotations

import json
from pathlib import Path


def _bytes_to_unicode() -> list[str]:
    """GPT-2's (and CLIP's) printable stand-in for each of the 256 byte values."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def _clip_vocabulary() -> tuple[dict[str, int], list[str]]:
    """A byte-level BPE vocabulary as CLIP's tokenizer reads it: every byte's character,
    alone and word-final (`</w>`), the two special tokens, and a few merges so some
    common words are single tokens."""
    characters = list(_bytes_to_unicode())
    tokens = characters + [c + "</w>" for c in characters]
    merges = ["a n", "an d</w>", "t h", "th e</w>", "o n</w>", "i n", "e r</w>"]
    for merge in merges:
        tokens.append(merge.replace(" ", ""))
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(dict.fromkeys(tokens))}, merges


def build_tiny_pipeline(folder: Path, *, seed: int = 0) -> Path:
    """A StableDiffusionImg2ImgPipeline folder (model_index.json, unet/, vae/, text_encoder/,
    tokenizer/, scheduler/) of a model whose native size is 64x64 pixels (32x32 latents)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        LCMScheduler,
        StableDiffusionImg2ImgPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocabulary, merges = _clip_vocabulary()
    words = folder.parent / f"{folder.name}-words"
    words.mkdir(parents=True, exist_ok=True)
    (words / "vocab.json").write_text(json.dumps(vocabulary))
    (words / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer.from_pretrained(str(words), model_max_length=16)

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        sample_size=64,
    )
    # Random weights make latents of a tiny spread (about 0.02); a scaling factor that
    # brings them to unit spread, as SD's 0.18215 does for its trained VAE, makes the output
    # depend on the camera as a real model's does, not on the noise alone.
    vae.register_to_config(scaling_factor=1.0 / _latent_spread(vae, sample=True))
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocabulary),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=16,
            bos_token_id=vocabulary["<|startoftext|>"],
            eos_token_id=vocabulary["<|endoftext|>"],
            pad_token_id=vocabulary["<|endoftext|>"],
        )
    )
    # Random attention weights let the prompt move the picture only a little; a larger
    # scale on the text encoder's last norm makes two prompts as far apart in the picture
    # as they are for a trained model.
    with torch.no_grad():
        for name, parameter in text_encoder.named_parameters():
            if name.endswith("final_layer_norm.weight"):  # text_model. before it in 4.x
                parameter.mul_(24.0)
    scheduler = LCMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
    )
    pipeline = StableDiffusionImg2ImgPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(str(folder))
    return folder


def build_tiny_taesd(folder: Path, *, seed: int = 1) -> Path:
    """A tiny AutoencoderTiny (the TAESD architecture) folder matching the tiny pipeline's
    latents: 4 channels, a scale factor of 2."""
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    tiny = AutoencoderTiny(
        encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8),
        num_encoder_blocks=(1, 1),
        num_decoder_blocks=(1, 1),
        latent_channels=4,
    )
    tiny.register_to_config(scaling_factor=1.0 / _latent_spread(tiny, sample=False))
    tiny.save_pretrained(str(folder))
    return folder


def _latent_spread(vae: object, *, sample: bool) -> float:
    """The standard deviation of `vae`'s latents for a smooth test picture."""
    import torch

    ramp = torch.linspace(-1, 1, 64)
    picture = torch.stack(
        [ramp[None, :].expand(64, 64), ramp[:, None].expand(64, 64), -ramp[None, :].expand(64, 64)]
    )
    with torch.no_grad():
        encoded = vae.encode(picture[None])  # type: ignore[attr-defined]
        latents = encoded.latent_dist.mode() if sample else encoded.latents
    return float(latents.std())


def build_tiny_ip_adapter(folder: Path, pipeline: Path, *, seed: int = 2) -> tuple[Path, Path]:
    """A tiny IP-Adapter for the tiny pipeline: its weights file, laid out as the published
    ones are (`image_proj.*` for the image projection, `ip_adapter.N.to_k_ip/to_v_ip.weight`
    for the Nth cross-attention, N = 1, 3, 5, ...), and a tiny CLIP image encoder folder
    (32 px input) with its preprocessor config. Returns (weights file, encoder folder)."""
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    encoder = folder / "image_encoder"
    CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
            projection_dim=16,
        )
    ).save_pretrained(str(encoder))
    CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(str(encoder))

    unet = UNet2DConditionModel.from_pretrained(str(pipeline / "unet"))
    width = unet.config.cross_attention_dim
    channels = list(unet.config.block_out_channels)
    tokens = 4  # the plain IP-Adapter's image tokens
    state = {
        "image_proj.proj.weight": torch.randn(tokens * width, 16) * 4,
        "image_proj.proj.bias": torch.zeros(tokens * width),
        "image_proj.norm.weight": torch.ones(width),
        "image_proj.norm.bias": torch.zeros(width),
    }
    key = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        if name.startswith("mid_block"):
            hidden = channels[-1]
        elif name.startswith("up_blocks"):
            hidden = channels[::-1][int(name[len("up_blocks.")])]
        else:
            hidden = channels[int(name[len("down_blocks.")])]
        for part in ("to_k_ip", "to_v_ip"):
            state[f"ip_adapter.{key}.{part}.weight"] = torch.randn(hidden, width) * 2
        key += 2
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / "ip-adapter.safetensors"
    save_file(state, str(weights))
    return weights, encoder
