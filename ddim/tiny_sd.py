"""A tiny random Stable Diffusion pipeline, built from diffusers' and transformers' own classes.

For tests and ``ddim bench``: the components have the layout of a real SD 1.x/2.x pipeline (a
``UNet2DConditionModel`` with cross-attention, an ``AutoencoderKL``, a ``CLIPTextModel`` and a
``CLIPTokenizer``) but a few thousand random weights each. The tokenizer's vocabulary and merges are
written here (byte-level characters and a handful of merges), so nothing is ever downloaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["tiny_stable_diffusion", "write_tiny_tokenizer"]

_MERGES = ["t h", "th e</w>", "a n", "an d</w>", "c a", "ca t</w>", "d o", "do g</w>", "r e", "re d</w>"]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def write_tiny_tokenizer(folder: str | os.PathLike, max_length: int = 16) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` of a small CLIP BPE tokenizer into ``folder``.

    The vocabulary holds the special tokens (ids 0, 1 = ``<|startoftext|>``, ``<|endoftext|>``), every
    byte character with and without ``</w>``, and the results of a few merges ("the", "and", "cat",
    "dog", "red"): 524 tokens. Returns the folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    tokens = ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)]
    tokens += [m.replace(" ", "") for m in _MERGES]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(_MERGES) + "\n")
    return folder


def tiny_stable_diffusion(
    seed: int = 0,
    *,
    prediction: str = "epsilon",
    scheduler: str = "DDIMScheduler",
    scheduler_config: dict[str, Any] | None = None,
    sample_size: int = 8,
    cross_attention_dim: int = 32,
    max_length: int = 16,
    tokenizer_dir: str | os.PathLike | None = None,
    layout: str = "sd1",
) -> Any:
    """A ``StableDiffusionPipeline`` with random weights (seeded) and no safety checker.

    Args:
        seed: torch seed for the weights.
        prediction: the scheduler's ``prediction_type`` ("epsilon" or "v_prediction").
        scheduler: a diffusers scheduler class name (default "DDIMScheduler").
        scheduler_config: overrides of the SD 1.x scheduler config (scaled_linear β from 0.00085 to
            0.012, ``steps_offset=1``, ``set_alpha_to_one=False``, no clipping).
        sample_size: the latent size h = w (images are twice that: the VAE has one down-sampling).
        cross_attention_dim: the text embedding width.
        max_length: the tokenizer's ``model_max_length`` (tokens per prompt).
        tokenizer_dir: where to write the tokenizer files (default: a temporary folder).
        layout: "sd1" (default: SD 1.x's UNet and CLIP, quick-GELU) or "sd2" (SD 2.x's: linear
            projections in the transformer blocks, per-level attention head sizes, a GELU text encoder).

    Needs diffusers and transformers (``pip install 'ddim[diffusers]'``).
    """
    import tempfile

    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if layout not in ("sd1", "sd2"):
        raise ValueError(f"layout must be 'sd1' or 'sd2', got {layout!r}")
    sd2 = layout == "sd2"
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=(2, 4) if sd2 else 2,
        use_linear_projection=sd2,
        norm_num_groups=4,
    )
    vae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=2 * sample_size,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            hidden_size=cross_attention_dim,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=600,
            max_position_embeddings=max(77, max_length),
            hidden_act="gelu" if sd2 else "quick_gelu",
        )
    )
    tok_dir = Path(tokenizer_dir) if tokenizer_dir is not None else Path(tempfile.mkdtemp(prefix="tiny-clip-"))
    write_tiny_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=max_length)
    cfg = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction,
    )
    cfg.update(scheduler_config or {})
    sched = getattr(diffusers, scheduler).from_config(cfg)
    return diffusers.StableDiffusionPipeline(
        unet=unet.eval(),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
