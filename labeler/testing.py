"""Stable Diffusion components with random weights, built in memory.

For tests, benchmarks and offline development: no machine here reaches a model hub. The tiny
set runs on a CPU in milliseconds; the SD-1.5-shaped set has the real model's compute.
"""

from __future__ import annotations

import itertools
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
    """A CLIP BPE tokenizer over a small vocabulary in which each word of ``words`` is exactly
    one token.

    Every byte is in the vocabulary, so any text tokenises; other words split into several
    tokens (useful for multi-token labels). Merges are added word by word after running BPE
    with the merges so far, so a word that shares a prefix or a pair with an earlier word
    still ends as one token.
    """
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in sorted(ByteLevel.alphabet()):
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    for word in words:
        pieces = _bpe([*word[:-1], word[-1] + "</w>"], merges)
        while len(pieces) > 1:  # join the leftover pieces left to right with new merges
            merges.append((pieces[0], pieces[1]))
            vocab.setdefault(pieces[0] + pieces[1], len(vocab))
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def _bpe(pieces: list[str], merges: list[tuple[str, str]]) -> list[str]:
    """Apply byte-pair merges by rank, as the tokenizer does."""
    ranks = {pair: rank for rank, pair in enumerate(merges)}
    while len(pieces) > 1:
        pairs = enumerate(itertools.pairwise(pieces))
        rank, i = min((ranks.get(pair, len(ranks)), i) for i, pair in pairs)
        if rank == len(ranks):
            break
        pieces = [*pieces[:i], pieces[i] + pieces[i + 1], *pieces[i + 2 :]]
    return pieces


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


def compressible_png(width: int, height: int, *, bit_depth: int = 16, alpha: bool = True) -> bytes:
    """A valid PNG of ``width`` x ``height`` that is tiny on disk and quick to make.

    For tests and benchmarks of large decodes: its first row is a colour ramp and every other
    row repeats the one above (PNG's "up" filter on zeros), so a 100 MP 16-bit RGBA picture
    takes well under a megabyte and well under a second to write, yet decodes to its full size.
    The compressed rows are made once and repeated (a full flush makes deflate output
    position-independent).
    """
    import struct
    import zlib

    import numpy as np

    channels = 4 if alpha else 3
    sample = np.dtype(">u2") if bit_depth == 16 else np.dtype(np.uint8)
    top = 65535 if bit_depth == 16 else 255
    ramp = (np.arange(width, dtype=np.float64) * top / max(1, width - 1)).astype(np.int64)
    first = np.stack([ramp, ramp[::-1], np.full(width, top // 3), np.full(width, top)], -1)
    first = first[:, :channels].astype(sample).tobytes()
    stride = width * channels * sample.itemsize
    rows_per_block = max(1, min(height - 1, 8_000_000 // (stride + 1)))
    block = (b"\x02" + bytes(stride)) * rows_per_block  # "up" filter, nothing changes

    def deflate(data: bytes) -> bytes:
        compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
        return compressor.compress(data) + compressor.flush(zlib.Z_FULL_FLUSH)

    head = b"\x00" + first
    parts, checksum = [deflate(head)], zlib.adler32(head)
    packed, left = deflate(block), height - 1
    while left >= rows_per_block:
        parts.append(packed)
        checksum = zlib.adler32(block, checksum)
        left -= rows_per_block
    if left:
        tail = block[: left * (stride + 1)]
        parts.append(deflate(tail))
        checksum = zlib.adler32(tail, checksum)
    stream = b"\x78\x01" + b"".join(parts) + b"\x03\x00" + struct.pack(">I", checksum)

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    colour_type = 6 if alpha else 2
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", stream) + chunk(b"IEND", b"")
    )
