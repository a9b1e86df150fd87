"""Attention processors that record what StableSeg reads from one UNet pass.

Recording processors are installed through the UNet's public ``set_attn_processor`` hook, only on
the layers that are needed; nothing of the model's ``forward`` is patched.
:class:`AttentionRecorder` installs them once per UNet and keeps them, so a run pays for the
installation once and a compiled UNet is not retraced every batch. Each pass switches on the
layers it reads; between passes every recording processor is a plain attention processor.
:meth:`AttentionRecorder.restore` puts the UNet's own processors back.

* A cross-attention layer keeps the probabilities of the label tokens only, averaged over heads:
  ``softmax(Q K^T * scale)`` is computed explicitly over the text context (77 tokens), which is
  cheap, and reused for the layer's output, so the layer costs no more than before.
* A self-attention layer keeps its queries and keys. The layer's own output still comes from the
  fused ``scaled_dot_product_attention`` kernel; the N x N attention matrix is never formed.
"""

from __future__ import annotations

import math
import re
import threading
import weakref
from collections.abc import Iterator, Sequence
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
        """Forget the last pass (its tensors and token index)."""
        self.token_index = None
        self.cross.clear()
        self.queries.clear()
        self.keys.clear()
        self.scales.clear()


class RecordingAttnProcessor:
    """A scaled-dot-product attention processor that also records into an AttentionStore.

    It computes what diffusers' default ``AttnProcessor2_0`` computes for the UNet's
    transformer blocks (optional spatial/group norm, norm_cross, q/k norms, residual and
    output rescale), plus the recording. While ``active`` is False it records nothing and
    computes exactly what ``AttnProcessor2_0`` computes, for any input size.
    """

    def __init__(self, store: AttentionStore, layer: LayerInfo, active: bool = True) -> None:
        self.store = store
        self.layer = layer
        self.active = active

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

        if not self.active:
            hidden_states = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
            )
            return self._output(attn, hidden_states, query, residual, input_ndim, batch, head_dim)

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
        return self._output(attn, hidden_states, query, residual, input_ndim, batch, head_dim)

    @staticmethod
    def _output(
        attn: Any,
        hidden_states: torch.Tensor,
        query: torch.Tensor,
        residual: torch.Tensor,
        input_ndim: int,
        batch: int,
        head_dim: int,
    ) -> torch.Tensor:
        """Heads joined, output projection, back to the input's layout, residual, rescale."""
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.to(query.dtype)))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(residual.shape)
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


class AttentionRecorder:
    """Recording processors installed once on a UNet and reused pass after pass.

    One recorder per UNet (:func:`recorder_for`): segmenters that share a UNet (``with_config``
    views) share it. Each layer that some pass has needed keeps a recording processor; a pass
    switches on the layers it reads (:meth:`recording`) and the others compute plain attention.
    So the processors are installed again only when a pass needs a layer not yet recorded (the
    union grows, e.g. once for the StableSeg++ cache), never per batch.

    :meth:`restore` gives the UNet its previous processors back; the next pass installs the
    recording ones again. A pass that raises leaves the processors installed but switched off
    and the store empty, so the UNet computes what it computed before.
    """

    def __init__(self, unet: torch.nn.Module) -> None:
        self._unet = weakref.ref(unet)
        self.store = AttentionStore()
        self.installs = 0
        """How many times processors were installed (``set_attn_processor`` calls)."""
        self.users = 0
        """Segmenters holding this recorder (see :meth:`attach`)."""
        self._processors: dict[str, RecordingAttnProcessor] = {}  # layer name -> ours
        self._originals: dict[str, Any] = {}  # layer name -> the processor ours replaced
        self._modules: dict[str, Any] = {}  # layer name -> its Attention module
        self._lock = threading.RLock()

    def _unet_or_raise(self) -> torch.nn.Module:
        unet = self._unet()
        if unet is None:
            raise RuntimeError("the UNet of this AttentionRecorder no longer exists")
        return unet

    def _module(self, unet: torch.nn.Module, name: str) -> Any:
        if name not in self._modules:
            self._modules[name] = unet.get_submodule(name)
        return self._modules[name]

    def installed(self) -> list[str]:
        """Names of the layers that carry one of this recorder's processors now."""
        unet = self._unet()
        if unet is None:
            return []
        return [
            name
            for name, proc in self._processors.items()
            if self._module(unet, name).processor is proc
        ]

    def install(self, layers: Sequence[LayerInfo]) -> bool:
        """Make sure every layer of ``layers`` carries a recording processor.

        Returns True when processors had to be installed (one ``set_attn_processor`` call for
        the union of the layers recorded so far and ``layers``), False when all were in place.
        """
        with self._lock:
            return self._install(self._unet_or_raise(), layers)

    def _install(self, unet: torch.nn.Module, layers: Sequence[LayerInfo]) -> bool:
        current_names = set(self.installed())
        needed = {layer.name: layer for layer in layers}
        if set(needed) <= current_names:
            return False
        processors = dict(unet.attn_processors)  # "<layer>.processor" -> processor
        for name in needed:
            if f"{name}.processor" not in processors:
                raise KeyError(f"{name!r} is not an attention layer of this UNet")
        keep = {name: self._processors[name] for name in current_names}
        for name, layer in needed.items():
            if name in keep:
                continue
            previous = processors[f"{name}.processor"]
            if not isinstance(previous, RecordingAttnProcessor):
                self._originals[name] = previous
            keep[name] = RecordingAttnProcessor(self.store, layer, active=False)
        for name, proc in keep.items():
            processors[f"{name}.processor"] = proc
        unet.set_attn_processor(processors)
        self._processors = keep
        self.installs += 1
        return True

    def restore(self) -> None:
        """Put back the processors the recording ones replaced (where they are still ours)."""
        unet = self._unet()
        with self._lock:
            if unet is not None:
                processors = dict(unet.attn_processors)
                changed = False
                for name, proc in self._processors.items():
                    key = f"{name}.processor"
                    if processors.get(key) is proc and name in self._originals:
                        processors[key] = self._originals[name]
                        changed = True
                if changed:
                    unet.set_attn_processor(processors)
            self._processors.clear()
            self._originals.clear()
            self.store.clear()

    @contextmanager
    def recording(
        self, layers: Sequence[LayerInfo], token_index: torch.Tensor | None
    ) -> Iterator[AttentionStore]:
        """One recorded pass: ``layers`` switched on for the block, the store filled by it.

        Read what you need from the store inside the block: on exit the processors are switched
        off and the store is emptied, whether the block succeeds or raises. Passes are
        serialised (one store per UNet).
        """
        with self._lock:
            self._install(self._unet_or_raise(), layers)
            wanted = {layer.name: layer for layer in layers}
            for name, proc in self._processors.items():
                layer = wanted.get(name)
                if layer is not None and proc.layer != layer:
                    proc.layer = layer  # another image size; equal layers keep their object
                proc.active = layer is not None
            self.store.clear()
            self.store.token_index = token_index
            try:
                yield self.store
            finally:
                for proc in self._processors.values():
                    proc.active = False
                self.store.clear()

    def attach(self) -> None:
        """A segmenter starts using this recorder."""
        self.users += 1

    def detach(self) -> None:
        """A segmenter stops using it; the last one out restores the UNet's processors."""
        self.users = max(0, self.users - 1)
        if self.users == 0:
            self.restore()


_RECORDERS: weakref.WeakKeyDictionary[torch.nn.Module, AttentionRecorder] = (
    weakref.WeakKeyDictionary()
)
_RECORDERS_LOCK = threading.Lock()


def recorder_for(unet: torch.nn.Module, create: bool = True) -> AttentionRecorder | None:
    """The :class:`AttentionRecorder` of this UNet (made on first use unless ``create=False``)."""
    with _RECORDERS_LOCK:
        recorder = _RECORDERS.get(unet)
        if recorder is None and create:
            recorder = _RECORDERS[unet] = AttentionRecorder(unet)
        return recorder
