"""Test helpers around the attention recording: one-block recording, one layer's CAPM.

The product records through :class:`labeler.attention.AttentionRecorder` and computes CAPMs in
the segmenter's pass; these helpers let the tests drive one piece alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch

from labeler.attention import AttentionStore, LayerInfo, RecordingAttnProcessor
from labeler.sar import label_attention_from_tokens, renormalise_over_labels


@contextmanager
def record_attention(
    unet: torch.nn.Module, layers: Iterable[LayerInfo], store: AttentionStore | None = None
) -> Iterator[AttentionStore]:
    """Install recording processors on ``layers`` for the duration of the block.

    The UNet's previous processors are restored on exit, whether the block succeeds or raises.
    """
    store = store if store is not None else AttentionStore()
    original = dict(unet.attn_processors)
    replaced = dict(original)
    for layer in layers:
        key = f"{layer.name}.processor"
        if key not in replaced:
            raise KeyError(f"{layer.name!r} is not an attention layer of this UNet")
        replaced[key] = RecordingAttnProcessor(store, layer)
    # set_attn_processor pops entries from the dict it is given: hand it copies.
    unet.set_attn_processor(replaced)
    try:
        yield store
    finally:
        unet.set_attn_processor(dict(original))


def class_maps_from_tokens(
    token_maps: torch.Tensor, token_class: torch.Tensor, num_classes: int, num_prompts: int
) -> torch.Tensor:
    """Cross-attention probability map (CAPM) of one layer: (B, C, h, w), each label's
    attention (:func:`labeler.sar.label_attention_from_tokens`) renormalised over labels so
    each pixel holds a distribution over the C labels."""
    attention = label_attention_from_tokens(token_maps, token_class, num_classes, num_prompts)
    return renormalise_over_labels(attention)[0]
