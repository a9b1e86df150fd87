"""Attention processors that record what StableSeg reads from one UNet pass.

Recording processors are installed through the UNet's public ``set_attn_processor`` hook by
:func:`record_attention`, only on the layers that are needed, and the original processors are put
back on exit (also when the pass raises). Nothing of the model's ``forward`` is patched.

* A cross-attention layer keeps the probabilities of the label tokens only, averaged over heads:
  ``softmax(Q K^T * scale)`` is computed explicitly over the text context (77 tokens), which is
  cheap, and reused for the layer's output, so the layer costs no more than before.
* A self-attention layer keeps its queries and keys. The layer's own output still comes from the
  fused ``scaled_dot_product_attention`` kernel; the N x N attention matrix is never formed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.|^(mid_block)\.")


@dataclass(frozen=True)
class LayerInfo:
    """One attention layer of the UNet.

    Attributes:
        name: module path, e.g. ``down_blocks.1.attentions.0.transformer_blocks.0.attn2``.
        kind: ``"cross"`` or ``"self"``.
        size: (height, width) of the layer's token grid for the configured input.
    """

    name: str
    kind: str
    size: tuple[int, int]

    @property
    def side(self) -> int:
        return self.size[0]


def _level(name: str, num_down: int, num_up: int) -> int:
    """How many times the latent grid was halved before this layer runs."""
    match = _BLOCK.match(name)
    if match is None:
        raise ValueError(f"cannot place attention layer {name!r} in the UNet's blocks")
    if match.group(3):
        return num_down - 1
    index = int(match.group(2))
    return index if match.group(1) == "down_blocks" else num_up - 1 - index


def unet_attention_layers(unet: torch.nn.Module, latent_size: tuple[int, int]) -> list[LayerInfo]:
    """List the UNet's attention layers with the grid size each sees for a latent of this size.

    Sizes follow the UNet's configuration: each down block but the last halves the grid
    (stride-2 convolution, so odd sides round up), and the up blocks mirror it.
    """
    from diffusers.models.attention_processor import Attention

    num_down = len(unet.config.down_block_types)
    num_up = len(unet.config.up_block_types)
    layers = []
    for name, module in unet.named_modules():
        if not isinstance(module, Attention):
            continue
        level = _level(name, num_down, num_up)
        height, width = latent_size
        for _ in range(level):
            height, width = math.ceil(height / 2), math.ceil(width / 2)
        kind = "cross" if module.is_cross_attention else "self"
        layers.append(LayerInfo(name=name, kind=kind, size=(height, width)))
    return layers


@dataclass
class AttentionStore:
    """What one recorded pass leaves behind, keyed by layer name.

    Attributes:
        token_index: (B, T) positions of label tokens in each row's prompt; set before the pass.
        cross: layer -> (B, T, h, w) float32 probabilities of the label tokens, mean over heads.
        queries / keys: layer -> (B, heads, h*w, head_dim) in the model's dtype.
        scales: layer -> the softmax scale of that layer (1/sqrt(head_dim) for SD).
    """

    token_index: torch.Tensor | None = None
    cross: dict[str, torch.Tensor] = field(default_factory=dict)
    queries: dict[str, torch.Tensor] = field(default_factory=dict)
    keys: dict[str, torch.Tensor] = field(default_factory=dict)
    scales: dict[str, float] = field(default_factory=dict)

    def clear(self) -> None:
        self.cross.clear()
        self.queries.clear()
        self.keys.clear()
        self.scales.clear()


class RecordingAttnProcessor:
    """A scaled-dot-product attention processor that also records into an AttentionStore.

    It computes what diffusers' default ``AttnProcessor2_0`` computes for the UNet's
    transformer blocks (optional spatial/group norm, norm_cross, q/k norms, residual and
    output rescale), plus the recording.
    """

    def __init__(self, store: AttentionStore, layer: LayerInfo) -> None:
        self.store = store
        self.layer = layer

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        batch, num_tokens, _ = hidden_states.shape  # (B, N, C)
        context_len = (
            num_tokens if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # (B, h, N, d)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # (B, h, L, d)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # (B, h, L, d)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        expected = self.layer.size[0] * self.layer.size[1]
        if num_tokens != expected:
            raise RuntimeError(
                f"attention layer {self.layer.name} saw {num_tokens} tokens, expected "
                f"{self.layer.size[0]}x{self.layer.size[1]}={expected}: the input size does not "
                "match the one the recording was planned for"
            )

        if self.layer.kind == "cross":
            hidden_states = self._cross(attn, query, key, value, attention_mask)
        else:
            self.store.queries[self.layer.name] = query
            self.store.keys[self.layer.name] = key
            self.store.scales[self.layer.name] = float(attn.scale)
            hidden_states = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
            )

        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.to(query.dtype)))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _cross(
        self,
        attn: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Explicit softmax over the text tokens; records the label tokens' columns."""
        index = self.store.token_index
        if index is None:
            raise RuntimeError("AttentionStore.token_index must be set before a recorded pass")
        logits = torch.matmul(query.float(), key.float().transpose(-1, -2)) * attn.scale
        if attention_mask is not None:
            logits = logits + attention_mask.float()
        probs = logits.softmax(dim=-1)  # (B, h, N, L)
        batch, _, num_tokens, _ = probs.shape
        token_probs = probs.mean(dim=1)  # (B, N, L)
        gather_index = index[:, None, :].expand(batch, num_tokens, index.shape[1])
        label_probs = token_probs.gather(-1, gather_index)  # (B, N, T)
        height, width = self.layer.size
        self.store.cross[self.layer.name] = label_probs.transpose(1, 2).reshape(
            batch, -1, height, width
        )  # (B, T, h, w)
        return torch.matmul(probs.to(value.dtype), value)  # (B, h, N, d)


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
