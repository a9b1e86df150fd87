"""Stable Diffusion components with random weights, built in memory.

For tests, benchmarks and offline development: no machine here reaches a model hub. The tiny
set runs on a CPU in milliseconds; the SD-1.5-shaped set has the real model's compute.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

DEFAULT_WORDS = [
    "a",
    "photo",
    "of",
    "the",
    "and",
    "background",
    "cat",
    "dog",
    "person",
    "car",
    "tree",
    "sky",
    "road",
    "grass",
    "building",
    "water",
    "bird",
    "horse",
    "red",
    "green",
    "blue",
    "yellow",
    "circle",
    "square",
    "triangle",
    "cross",
    "traffic",
    "light",
]


def tiny_clip_tokenizer(words: Iterable[str] = DEFAULT_WORDS, model_max_length: int = 77) -> Any:
    """A CLIP BPE tokenizer over a small vocabulary.

    Every byte is in the vocabulary, so any text tokenises; each word in ``words`` is one token,
    other words split into several (useful for multi-token labels).
    """
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    merges: list[tuple[str, str]] = []
    for char in sorted(ByteLevel.alphabet()):
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    for word in words:
        pieces = [*word[:-1], word[-1] + "</w>"]
        current = pieces[0]
        for piece in pieces[1:]:
            merged = current + piece
            if merged not in vocab:
                vocab[merged] = len(vocab)
                merges.append((current, piece))
            current = merged
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def tiny_components(
    seed: int = 0,
    words: Iterable[str] = DEFAULT_WORDS,
    model_max_length: int = 77,
    cross_levels: int = 2,
) -> dict[str, Any]:
    """A tiny random Stable Diffusion: UNet with cross-attention at ``cross_levels`` resolutions
    plus the middle block, a VAE that halves the image, a 2-layer CLIP text encoder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer(words, model_max_length)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=model_max_length,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    levels = cross_levels + 1
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32,) * (levels - 1) + (64,),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * cross_levels + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * cross_levels,
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
    )
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer}


def sd15_components(seed: int = 0) -> dict[str, Any]:
    """Random components with Stable Diffusion 1.5's shapes (and so its compute).

    The tokenizer is the tiny one (tokenisation costs nothing); the text encoder has the real
    CLIP ViT-L/14 text tower's shape and vocabulary size.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=64,
        cross_attention_dim=768,
        attention_head_dim=8,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=2,
        sample_size=512,
        scaling_factor=0.18215,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
        )
    )
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tiny_clip_tokenizer(),
    }
