"""StableSeg: zero-shot semantic masks from one Stable Diffusion UNet pass."""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from os import PathLike
from typing import Any

import numpy as np
import torch

from .attention import AttentionRecorder, LayerInfo, recorder_for, unet_attention_layers
from .background import layers_evidence
from .finish import BAND_BYTES, finish_scores
from .images import PreparedImage, prepare_image, resize_for_model, to_rgb_array
from .labels import synonyms_of
from .model_settings import SegmenterConfig, SizeSelection, select_sizes
from .presence import gate, judge_presence, presence_evidence
from .prompts import PromptBatch, build_prompts, validate_labels
from .result import SegmentationResult, share_key
from .sar import (
    ca_labels_at,
    cross_attention_map,
    final_scores,
    label_attention_from_tokens,
    normalise,
    renormalise_over_labels,
    self_attention_class_probs,
)
from .tiles import TileCanvas, Window, tile_windows, window_labels, working_size


def default_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device | str) -> torch.dtype:
    """fp16 on CUDA, fp32 elsewhere."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


CPU_UNET_MEMORY = 2 * 2**30
"""Budget of one UNet call's per-row memory on a CPU (bytes), where free memory says little."""
CUDA_UNET_FRACTION = 0.5
"""Share of the GPU memory free (and cached by PyTorch) that one UNet call's rows may take."""
ACTIVATION_FACTOR = 16
"""Live (tokens x inner dim) tensors of one transformer block, per row: its input and norms,
Q, K, V, the attention output and the feed-forward's GEGLU projection (8 wide)."""


@dataclass(frozen=True)
class MapPlan:
    """Which attention layers a pass records, and how their maps are weighted."""

    cross: dict[str, float]
    self_: dict[str, float]
    layers: list[LayerInfo]
    common_size: tuple[int, int]


@dataclass(frozen=True)
class _Prompts:
    """A label list's prompts, their text embeddings and token maps on the model's device."""

    batch: PromptBatch
    embeddings: torch.Tensor  # (P, L, D)
    token_index: torch.Tensor  # (P, T)
    token_class: torch.Tensor  # (P, T)
    token_weight: torch.Tensor | None  # (P, T), with synonyms only (the default: each label's mean)


@dataclass
class _Pass:
    """Per-batch maps before upsampling to image size (all at ``common_size``)."""

    final: torch.Tensor  # (B, C, S, S) un-normalised scores
    layer_maps: dict[str, torch.Tensor]  # layer -> (B, C, h, w)
    evidence: torch.Tensor | None = None  # (B, labels, S, S), with a background threshold
    shares: dict[str, torch.Tensor] | None = None  # cross layer -> (B, 1, h, w) label share
    present: torch.Tensor | None = None  # (B, C) bool, with a presence threshold

    def select(self, rows: list[int]) -> _Pass:
        """The pass of some of its images (``rows``, in that order)."""
        return _Pass(
            final=self.final[rows],
            layer_maps={name: m[rows] for name, m in self.layer_maps.items()},
            evidence=None if self.evidence is None else self.evidence[rows],
            shares=None if self.shares is None else {n: m[rows] for n, m in self.shares.items()},
            present=None if self.present is None else self.present[rows],
        )

    @staticmethod
    def concat(parts: list[_Pass]) -> _Pass:
        """The passes of consecutive image groups as one pass over all their images."""
        if len(parts) == 1:
            return parts[0]
        first = parts[0]
        return _Pass(
            final=torch.cat([part.final for part in parts]),
            layer_maps={
                name: torch.cat([part.layer_maps[name] for part in parts])
                for name in first.layer_maps
            },
            evidence=None
            if first.evidence is None
            else torch.cat([part.evidence for part in parts]),  # type: ignore[misc]
            shares=None
            if first.shares is None
            else {
                name: torch.cat([part.shares[name] for part in parts])  # type: ignore[index]
                for name in first.shares
            },
            present=None if first.present is None else torch.cat([part.present for part in parts]),  # type: ignore[misc]
        )


@dataclass(frozen=True)
class _View:
    """One member of a test-time ensemble: a prompt template, a timestep, mirrored or not."""

    template: str
    timestep: int
    flipped: bool


@dataclass
class _Recorded:
    """What one UNet call recorded (see :class:`labeler.attention.AttentionStore`)."""

    cross: dict[str, torch.Tensor]  # layer -> (rows, T, h, w)
    queries: dict[str, torch.Tensor]  # layer -> (rows, heads, N, d)
    keys: dict[str, torch.Tensor]  # layer -> (rows, heads, N, d)
    scales: dict[str, float]


@dataclass
class PendingResult:
    """One image segmented at model resolution, its full-size finish still to do.

    :meth:`StableSeg.segment_pending` makes these while it holds the model; :meth:`finish`
    (upsampling to the image's size, mask, confidences) can then run outside any lock the
    caller keeps around model passes.
    """

    segmenter: StableSeg
    scores: torch.Tensor  # (C, S, S) final scores at the common size
    shape: tuple[int, int]  # (H, W) of the mask
    labels: list[str]
    return_probs: bool = False
    evidence: torch.Tensor | None = None  # (labels, S, S)
    layer_maps: dict[str, np.ndarray] | None = None

    def finish(self) -> SegmentationResult:
        """The :class:`SegmentationResult` at the image's size."""
        out = self.segmenter._finish(
            self.scores, self.shape, self.labels, self.return_probs, self.evidence
        )
        out.layer_maps = self.layer_maps
        return out


SD_LATENT_SIDE = 64
"""The latent side Stable Diffusion 1.x and 2.x base were trained at (512 px)."""


def native_image_size(unet: torch.nn.Module, vae: torch.nn.Module) -> int:
    """The resolution a Stable Diffusion was trained at: the UNet's latent sample size times the
    VAE's downsampling factor (64 x 8 = 512 for SD 1.x and 2.x base, 96 x 8 = 768 for the 2.x
    v-models, 16 x 4 = 64 for demo/model). A non-square sample size gives its longer side; a
    UNet whose configuration states none is taken for SD's (64 latent pixels)."""
    sample = unet.config.sample_size
    if sample is None:
        sample = SD_LATENT_SIDE
    side = int(sample if isinstance(sample, int) else max(sample))
    return side * 2 ** (len(vae.config.block_out_channels) - 1)


class StableSeg:
    """The StableSeg zero-shot segmenter.

    Build it from a diffusers-format Stable Diffusion with :meth:`from_pretrained`, or from
    components. ``segment(images, labels)`` returns one :class:`SegmentationResult` per image.

    The recording attention processors are installed on the UNet at the first pass and kept
    (shared by every segmenter on the same UNet); :meth:`close` (or leaving a ``with`` block)
    gives the UNet its own processors back, as does the last segmenter on a UNet when it is
    garbage collected. :meth:`compile` compiles the UNet with ``torch.compile``.
    """

    band_bytes: int = BAND_BYTES
    """Budget of one row band of the finish step (C x rows x W float32)."""
    unet_memory: int | None = None
    """Budget of one UNet call's per-row memory in bytes (recorded Q/K and maps, activations);
    None: half the free GPU memory on CUDA, :data:`CPU_UNET_MEMORY` elsewhere. Prompt rows x
    images past it are split over several calls (:meth:`rows_per_call`)."""

    def __init__(
        self,
        unet: torch.nn.Module,
        vae: torch.nn.Module,
        text_encoder: torch.nn.Module,
        tokenizer: Any,
        config: SegmenterConfig | None = None,
    ) -> None:
        self.unet = unet.eval()
        self.vae = vae.eval()
        self.text_encoder = text_encoder.eval()
        self.tokenizer = tokenizer
        self.config = config or SegmenterConfig()
        self.source = "components"
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.native_size = native_image_size(unet, vae)
        self.image_size = self.config.image_size or self.native_size
        if self.image_size % self.vae_scale_factor:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of the VAE's "
                f"downsampling factor {self.vae_scale_factor}"
            )
        self._embedding_cache: dict[tuple[str, ...], _Prompts] = {}
        self._release: weakref.finalize | None = None

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        model_id_or_dir: str | PathLike[str],
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        config: SegmenterConfig | None = None,
        **load_kwargs: Any,
    ) -> StableSeg:
        """Load a diffusers-format Stable Diffusion 1.x / 2.x (hub id or local folder).

        Only the UNet, VAE, text encoder and tokenizer are loaded; ``load_kwargs`` (for example
        ``revision``, ``variant``, ``local_files_only``) go to every ``from_pretrained`` call.
        """
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        device = torch.device(device) if device is not None else default_device()
        dtype = dtype if dtype is not None else default_dtype(device)
        source = str(model_id_or_dir)
        unet = UNet2DConditionModel.from_pretrained(
            source, subfolder="unet", torch_dtype=dtype, **load_kwargs
        )
        vae = AutoencoderKL.from_pretrained(
            source, subfolder="vae", torch_dtype=dtype, **load_kwargs
        )
        text_encoder = CLIPTextModel.from_pretrained(
            source, subfolder="text_encoder", torch_dtype=dtype, **load_kwargs
        )
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **load_kwargs)
        model = cls(
            unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, config=config
        )
        model.source = source
        return model.to(device)

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> StableSeg:
        """Move the model (channels-last on CUDA). Returns self."""
        device = torch.device(device) if device is not None else self.device
        for module in (self.unet, self.vae, self.text_encoder):
            if dtype is None:
                module.to(device)
            else:
                module.to(device=device, dtype=dtype)
        if device.type == "cuda":
            self.unet.to(memory_format=torch.channels_last)
            self.vae.to(memory_format=torch.channels_last)
        self._embedding_cache.clear()
        return self

    @property
    def input_size(self) -> int:
        """Side of the square image the model sees: ``config.image_size``, or the model's own
        (``native_size``) when that is None; with tiles, the longer side of the working image
        (readers decode images at least this large)."""
        if self.config.tiles is not None:
            return math.ceil(self.config.tiles * self.image_size)
        return self.image_size

    @property
    def batch_size(self) -> int:
        """Images per UNet pass (``config.batch_size``)."""
        return self.config.batch_size

    def prepare(self, image: Any, size: tuple[int, int] | None = None) -> PreparedImage:
        """An image (PIL or array, any mode and size) -> the model's input and its mask size.

        What :meth:`segment` does to an image first, as a step of its own: readers run it in
        worker threads, so the calling thread never touches full-size pixels. ``size`` is the
        (width, height) of the original when ``image`` is a reduced decode of it.
        """
        if self.config.tiles is not None:
            return prepare_image(image, self._working_size, size)
        return prepare_image(image, self.image_size, size)

    def _working_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """(width, height) of the working image of tiles for an original of ``size``."""
        assert self.config.tiles is not None
        return working_size(size, self.image_size, self.config.tiles, self._cell_pixels)

    @functools.cached_property
    def _cell_pixels(self) -> int:
        """Input pixels per cell of the final scores (8 for SD at 512 px)."""
        latent = self.image_size // self.vae_scale_factor
        cells = max(layer.side for layer in unet_attention_layers(self.unet, (latent, latent)))
        return self.image_size // cells

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def with_config(self, config: SegmenterConfig) -> StableSeg:
        """A segmenter sharing these weights (and the UNet's recording processors) with another
        configuration."""
        other = StableSeg(self.unet, self.vae, self.text_encoder, self.tokenizer, config)
        other.source = self.source
        other.band_bytes = self.band_bytes
        other.unet_memory = self.unet_memory
        return other

    # ------------------------------------------------------------------ recording, compile
    def _recorder(self) -> AttentionRecorder:
        """The UNet's recorder, with this segmenter counted among its users."""
        recorder = recorder_for(self.unet)
        assert recorder is not None
        if self._release is None or not self._release.alive:
            recorder.attach()
            self._release = weakref.finalize(self, recorder.detach)
            self._release.atexit = False
        return recorder

    def close(self) -> None:
        """Give the UNet its own attention processors back.

        The segmenter stays usable (its next pass installs the recording processors again), and
        so do the others sharing the UNet.
        """
        if self._release is not None:
            self._release()  # this segmenter no longer counts as a user
        recorder = recorder_for(self.unet, create=False)
        if recorder is not None:
            recorder.restore()

    def __enter__(self) -> StableSeg:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def compile(self, mode: str | None = None, **options: Any) -> StableSeg:
        """Compile the UNet with ``torch.compile`` (in place); returns self.

        A runtime option: masks do not change (up to floating-point rounding). The recording
        processors are installed first, so the traced graph contains them and is reused batch
        after batch; every segmenter sharing the UNet runs the compiled one. ``mode`` and
        ``options`` (``backend``, ``dynamic``, ``fullgraph``, ...) go to ``torch.compile``.
        """
        self._recorder().install(self.plan().layers)
        self.unet.compile(mode=mode, **options)
        return self

    @property
    def model_version(self) -> str:
        """A short id that changes when the model source or the configuration changes."""
        return self.version_for(self.source, self.config, self.dtype)

    @staticmethod
    def version_for(source: str, config: SegmenterConfig, dtype: torch.dtype) -> str:
        """The ``model_version`` a model from ``source`` with this config and dtype has.

        Known without loading the weights (Label Studio asks for it with a 3 s timeout).
        """
        # batch_size changes speed, not masks: leave it out.
        blob = json.dumps(
            {"source": source, "config": repr(config.replace(batch_size=1)), "dtype": str(dtype)},
            sort_keys=True,
        )
        return "stableseg-" + hashlib.sha256(blob.encode()).hexdigest()[:12]

    # ------------------------------------------------------------------ planning
    @property
    def latent_size(self) -> tuple[int, int]:
        side = self.image_size // self.vae_scale_factor
        return side, side

    def attention_layers(self) -> list[LayerInfo]:
        """Every attention layer of the UNet with its grid size at :attr:`input_size`."""
        return unet_attention_layers(self.unet, self.latent_size)

    def plan(self, all_layers: bool = False) -> MapPlan:
        """Choose the recorded layers and their weights from the configuration.

        With ``all_layers`` every attention layer is recorded (for the StableSeg++ cache), while
        the weights stay those of the configuration.
        """
        cfg = self.config
        layers = self.attention_layers()
        cross = [layer for layer in layers if layer.kind == "cross"]
        selfs = [layer for layer in layers if layer.kind == "self"]
        common = max((layer.size for layer in layers), key=lambda s: s[0] * s[1])
        if cfg.map_weights is not None:
            known = {layer.name for layer in layers}
            unknown = sorted(set(cfg.map_weights) - known)
            if unknown:
                raise ValueError(
                    f"map_weights names layers this UNet does not have: {unknown[:5]}"
                    f"{' ...' if len(unknown) > 5 else ''}"
                )
            cross_w = {n.name: cfg.map_weights.get(n.name, 0.0) for n in cross}
            self_w = {n.name: cfg.map_weights.get(n.name, 0.0) for n in selfs}
            if not any(cross_w.values()):
                raise ValueError("map_weights gives every cross-attention layer weight 0")
        else:
            cross_w = _uniform(cross, cfg.cross_sizes, "cross_sizes", smallest=2)
            self_w = _uniform(selfs, cfg.self_sizes, "self_sizes", smallest=None)
        if not cfg.use_sar:
            self_w = {name: 0.0 for name in self_w}
        elif not any(self_w.values()):
            raise ValueError("use_sar=True but no self-attention layer has weight")
        chosen = {n for n, w in {**cross_w, **self_w}.items() if w > 0}
        recorded = [layer for layer in layers if all_layers or layer.name in chosen]
        return MapPlan(cross=cross_w, self_=self_w, layers=recorded, common_size=common)

    # ------------------------------------------------------------------ the method
    @torch.inference_mode()
    def encode_prompts(self, labels: Sequence[str]) -> tuple[PromptBatch, torch.Tensor]:
        """Step 1: prompts and their text embeddings (P, L, D), cached per label list."""
        prompts = self._prompts(labels)
        return prompts.batch, prompts.embeddings

    @torch.inference_mode()
    def _prompts(self, labels: Sequence[str], template: str | None = None) -> _Prompts:
        template = self.config.prompt_template if template is None else template
        synonyms = tuple(synonyms_of(label) for label in labels)  # Label == its name: keyed too
        key = (*labels, "\x00", template, self.config.label_separator, synonyms)
        if key not in self._embedding_cache:
            batch = build_prompts(self.tokenizer, labels, template, self.config.label_separator)
            ids = batch.input_ids.to(self.device)
            embeddings = self.text_encoder(ids)[0]  # (P, L, D)
            if len(self._embedding_cache) > 32:
                self._embedding_cache.clear()
            # The token maps go to the device once per label list, not once per batch.
            self._embedding_cache[key] = _Prompts(
                batch,
                embeddings,
                batch.token_index.to(self.device),
                batch.token_class.to(self.device),
                batch.token_weight.to(self.device) if any(synonyms) else None,
            )
        return self._embedding_cache[key]

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Step 2: (B, 3, S, S) in [-1, 1] -> latents z0 = mean * scaling_factor, no noise."""
        pixels = pixels.to(device=self.device, dtype=self.dtype)
        if self.device.type == "cuda":
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        latents = self.vae.encode(pixels).latent_dist.mean  # (B, c, S/f, S/f)
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    def row_bytes(self, layers: Sequence[LayerInfo]) -> int:
        """Bytes one prompt row costs in a UNet call that records ``layers``.

        From the attention modules' shapes and the model's dtype: the Q and K each recorded
        self-attention layer keeps, the label-token maps of the recorded cross-attention layers
        (float32, at most the whole text context) and, for the largest layer, the explicit
        softmax over the text of a recorded cross-attention layer and the transformer block's
        working tensors (:data:`ACTIVATION_FACTOR`).
        """
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        context = int(getattr(self.tokenizer, "model_max_length", 77))
        recorded = {layer.name for layer in layers}
        kept, working = 0, 0
        for layer in self.attention_layers():
            module = self.unet.get_submodule(layer.name)
            tokens = layer.size[0] * layer.size[1]
            inner = int(module.to_q.out_features)
            working = max(working, tokens * inner * itemsize * ACTIVATION_FACTOR)
            if layer.name not in recorded:
                continue
            if layer.kind == "self":
                kept += 2 * tokens * inner * itemsize  # Q and K
            else:
                kept += context * tokens * 4  # label-token maps, float32
                working = max(working, 2 * int(module.heads) * tokens * context * 4)
        return kept + working

    def unet_budget(self) -> int:
        """Bytes one UNet call's rows may take: :attr:`unet_memory` when set, else half the
        GPU memory free or cached by PyTorch on CUDA, :data:`CPU_UNET_MEMORY` elsewhere."""
        if self.unet_memory is not None:
            return int(self.unet_memory)
        device = self.device
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
            return int((free + cached) * CUDA_UNET_FRACTION)
        return CPU_UNET_MEMORY

    def rows_per_call(self, layers: Sequence[LayerInfo]) -> int:
        """Prompt rows x images one UNet call recording ``layers`` may take (at least 1)."""
        return max(1, self.unet_budget() // max(1, self.row_bytes(layers)))

    @torch.inference_mode()
    def _unet_call(
        self,
        latents: torch.Tensor,
        prompts: _Prompts,
        layers: Sequence[LayerInfo],
        first: int,
        last: int,
        timestep: int | None = None,
    ) -> _Recorded:
        """One recorded UNet call on every image of ``latents`` with prompts ``first:last``.

        Rows are image-major (image i, prompt p at row i * (last - first) + p - first). Rows
        never meet inside the UNet (its normalisations are per row), so a row's maps are the
        same whichever call it runs in.
        """
        batch, count = latents.shape[0], last - first
        rows = latents.repeat_interleave(count, dim=0)  # (B*p, c, h, w)
        context = prompts.embeddings[first:last].repeat(batch, 1, 1)  # (B*p, L, D)
        step = self.config.timestep if timestep is None else timestep
        timestep_rows = torch.full((rows.shape[0],), step, device=self.device)
        token_index = prompts.token_index[first:last].repeat(batch, 1)  # (B*p, T)
        with self._recorder().recording(layers, token_index) as store:
            self.unet(rows, timestep_rows, encoder_hidden_states=context, return_dict=False)
            return _Recorded(
                dict(store.cross), dict(store.queries), dict(store.keys), dict(store.scales)
            )

    def views(self) -> list[_View]:
        """The members of the test-time ensemble, the configured pass first; one UNet pass
        each (templates x timesteps x mirrored)."""
        cfg = self.config
        templates = (cfg.prompt_template, *cfg.ensemble_templates)
        timesteps = (cfg.timestep, *cfg.ensemble_timesteps)
        flips = (False, True) if cfg.flip else (False,)
        return [_View(*view) for view in itertools.product(templates, timesteps, flips)]

    @torch.inference_mode()
    def _ensemble_pass(
        self,
        pixels: torch.Tensor,
        labels: list[str],
        plan: MapPlan,
        present: torch.Tensor | None = None,
        encoded: torch.Tensor | None = None,
        judged: _Pass | None = None,
    ) -> _Pass:
        """Steps 3-7 for every member of the ensemble, their final maps (and evidence) averaged.

        The first member decides which labels are present (with a presence threshold) for all
        of them, unless ``present`` (B, C) says it (tiles' windows); a mirrored member sees the
        mirrored image (``pixels``, (B, 3, S, S), encoded once per orientation; ``encoded``:
        the unmirrored latents when already made) and its maps are mirrored back. The
        per-layer maps returned are the first member's; ``judged`` is that member's pass when
        already made (the judging pass of ``reprompt``). With ``reprompt``, the images with a
        class left out are segmented again with only the classes that take part
        (:meth:`_prompt_present`).
        """
        views = self.views()
        latents_of: dict[bool, torch.Tensor] = {}
        if encoded is not None:
            latents_of[False] = encoded
        if self.config.reprompt:
            if present is None and self.config.presence_threshold is not None:
                view = views[0]  # unmirrored: every label prompted, presence judged
                if False not in latents_of:
                    latents_of[False] = self.encode_images(pixels)
                judged = self._attention_pass(
                    latents_of[False], self._prompts(labels, view.template), plan, view.timestep
                )
                present = judged.present
                assert present is not None
            if present is not None and not bool(present.all()):
                return self._prompt_present(
                    pixels, labels, plan, present, latents_of.get(False), judged
                )
        first: _Pass | None = None
        final: torch.Tensor | None = None
        evidence: torch.Tensor | None = None
        for view in views:
            if view.flipped not in latents_of:
                seen_pixels = pixels.flip(-1) if view.flipped else pixels
                latents_of[view.flipped] = self.encode_images(seen_pixels)  # (B, c, h, w)
            inputs = latents_of[view.flipped]
            if first is not None:
                present = first.present
            if first is None and judged is not None:
                result = judged  # the first member's pass, made to judge presence
            else:
                result = self._attention_pass(
                    inputs, self._prompts(labels, view.template), plan, view.timestep, present
                )
            scores, seen = result.final, result.evidence  # (B, C, S, S), (B, labels, S, S)
            if view.flipped:
                scores = scores.flip(-1)
                seen = None if seen is None else seen.flip(-1)
            final = scores if final is None else final + scores
            if seen is not None:
                evidence = seen if evidence is None else evidence + seen
            if first is None:
                first = result
        assert first is not None and final is not None
        if len(views) == 1:
            return first
        first.final = final / len(views)
        first.evidence = None if evidence is None else evidence / len(views)
        return first

    @torch.inference_mode()
    def _prompt_present(
        self,
        pixels: torch.Tensor,
        labels: list[str],
        plan: MapPlan,
        present: torch.Tensor,
        encoded: torch.Tensor | None,
        judged: _Pass | None = None,
    ) -> _Pass:
        """The ensemble's pass with each image prompted with only its classes that take part
        (``present``, (B, C) bool; the background prompt always does).

        Images that keep the same classes share a pass; each pass's maps are put back in the
        channels of ``labels``, the left-out classes' channels 0, as :func:`gate` leaves them.
        The images that keep every class take their rows of ``judged`` (the judging pass, every
        class prompted) as their first member's pass.
        """
        groups: dict[tuple[bool, ...], list[int]] = {}
        for index, row in enumerate(present.cpu().tolist()):
            groups.setdefault(tuple(row), []).append(index)
        batch, num_classes = present.shape
        num_labels = num_classes - (self.config.background_prompt is not None)
        merged: _Pass | None = None
        for pattern, rows in groups.items():
            keep = [c for c, on in enumerate(pattern) if on]
            part = self._ensemble_pass(
                pixels[rows],
                [labels[c] for c in keep],
                plan,
                torch.ones(len(rows), len(keep), dtype=torch.bool, device=present.device),
                None if encoded is None else encoded[rows],
                judged.select(rows) if judged is not None and len(keep) == num_classes else None,
            )
            if merged is None:
                merged = _Pass(
                    final=_in_channels(part.final, batch, num_classes),
                    layer_maps={
                        name: _in_channels(m, batch, num_classes)
                        for name, m in part.layer_maps.items()
                    },
                    evidence=None
                    if part.evidence is None
                    else _in_channels(part.evidence, batch, num_labels),
                    shares=None
                    if part.shares is None
                    else {name: _in_channels(m, batch, 1) for name, m in part.shares.items()},
                    present=present,
                )
            label_keep = [c for c in keep if c < num_labels]
            _scatter(merged.final, part.final, rows, keep)
            for name, m in part.layer_maps.items():
                _scatter(merged.layer_maps[name], m, rows, keep)
            if merged.evidence is not None and part.evidence is not None:
                _scatter(merged.evidence, part.evidence, rows, label_keep)
            for name, m in (part.shares or {}).items():
                _scatter(merged.shares[name], m, rows, [0])  # type: ignore[index]
        assert merged is not None
        return merged

    @torch.inference_mode()
    def _attention_pass(
        self,
        latents: torch.Tensor,
        prompts: _Prompts,
        plan: MapPlan,
        timestep: int | None = None,
        present: torch.Tensor | None = None,
    ) -> _Pass:
        """Steps 3-7 for one batch of latents: UNet pass, CAPM, CA map, SAR, final scores.

        ``timestep`` defaults to the configuration's; ``present`` (B, C) bool says which
        classes take part (None: judged here when the configuration has a presence threshold,
        else all).

        The UNet takes one row per (image, prompt). When the rows pass :meth:`rows_per_call`,
        the images go through in groups, and an image whose prompts alone pass it goes through
        twice, its prompts in pieces: once recording the cross-attention layers (the CA map
        needs every prompt's), once recording the self-attention layers, each piece's Q and K
        reduced to its SAR share as soon as it is recorded. Either way the maps are those of one
        call with every row.
        """
        batch, num_prompts = latents.shape[0], prompts.batch.num_prompts
        limit = self.rows_per_call(plan.layers)
        if batch > 1 and batch * num_prompts > limit:
            per_call = max(1, limit // num_prompts)
            return _Pass.concat(
                [
                    self._attention_pass(
                        latents[start : start + per_call],
                        prompts,
                        plan,
                        timestep,
                        None if present is None else present[start : start + per_call],
                    )
                    for start in range(0, batch, per_call)
                ]
            )
        if batch * num_prompts <= limit:
            recorded = self._unet_call(latents, prompts, plan.layers, 0, num_prompts, timestep)
            return self._maps(recorded.cross, prompts, plan, batch, recorded, present=present)
        # One image with more prompt rows than a call takes.
        cross_layers = [layer for layer in plan.layers if layer.kind == "cross"]
        step = self.rows_per_call(cross_layers)
        pieces: dict[str, list[torch.Tensor]] = {}
        for first in range(0, num_prompts, step):
            last = min(num_prompts, first + step)
            piece = self._unet_call(latents, prompts, cross_layers, first, last, timestep)
            for name, token_maps in piece.cross.items():
                pieces.setdefault(name, []).append(token_maps)  # (p, T, h, w)
            del piece
        cross = {name: torch.cat(maps) for name, maps in pieces.items()}  # (P, T, h, w)
        return self._maps(cross, prompts, plan, batch, None, latents, timestep, present)

    @torch.inference_mode()
    def _maps(
        self,
        cross: dict[str, torch.Tensor],
        prompts: _Prompts,
        plan: MapPlan,
        batch: int,
        recorded: _Recorded | None,
        latents: torch.Tensor | None = None,
        timestep: int | None = None,
        present: torch.Tensor | None = None,
    ) -> _Pass:
        """Steps 4-7 from the recorded maps: CAPM, CA map, SAR, final scores.

        ``recorded`` holds the self-attention layers' Q and K of every row; when it is None,
        ``latents`` (one image) go through the UNet again in pieces for them (at ``timestep``),
        and SAR runs one round whatever ``sar_rounds`` says (another round would need those
        passes again). ``present`` (B, C): the classes that take part (see
        :mod:`labeler.presence`); None with a presence threshold: judged here.
        """
        num_prompts = prompts.batch.num_prompts
        num_classes = len(prompts.batch.spans)
        layer_maps: dict[str, torch.Tensor] = {}
        attention: dict[str, torch.Tensor] = {}
        shares: dict[str, torch.Tensor] = {}
        for name, token_maps in cross.items():
            attention[name] = label_attention_from_tokens(
                token_maps, prompts.token_class, num_classes, num_prompts, prompts.token_weight
            )  # (B, C, h, w) before renormalisation
            # CAPM of the layer (B, C, h, w) and the labels' share of its attention (B, 1, h, w)
            layer_maps[name], shares[name] = renormalise_over_labels(attention[name])
        cross.clear()
        capm = cross_attention_map(layer_maps, plan.cross, plan.common_size)  # (B, C, S, S)
        evidence = None
        if self.config.background_threshold is not None:
            num_labels = num_classes - (self.config.background_prompt is not None)
            evidence = layers_evidence(
                attention, plan.cross, plan.common_size, num_labels
            )  # (B, labels, S, S)
        del attention

        if present is None and self.config.presence_threshold is not None:
            num_labels = num_classes - (self.config.background_prompt is not None)
            present = judge_presence(
                presence_evidence(layer_maps, plan.cross),
                self.config.presence_threshold,
                num_labels,
            )  # (B, C)
        seed = capm
        if present is not None:
            seed = gate(capm, present, -1.0)  # absent classes never win the CA map
            capm = gate(capm, present, 0.0)

        sizes = {layer.name: layer.size for layer in plan.layers}
        self_names = [layer.name for layer in plan.layers if layer.kind == "self"]
        rounds = self.config.sar_rounds if (recorded is not None and self_names) else 1
        final = capm
        for round_ in range(rounds):
            last_round = round_ == rounds - 1
            labels_at = {
                name: ca_labels_at(seed, sizes[name]).flatten(1)  # (B, h*w)
                for name in self_names
            }
            totals: dict[str, Any] = dict.fromkeys(labels_at, 0)
            if recorded is not None:
                queries, keys, scales = recorded.queries, recorded.keys, recorded.scales
                for name in list(queries):
                    # Each layer's Q and K are let go as soon as its last round's map is made;
                    # the prompt rows of an image are refined one at a time and summed, so
                    # memory grows with the labels, not with labels x prompts.
                    query = queries.pop(name) if last_round else queries[name]
                    key = keys.pop(name) if last_round else keys[name]
                    query = query.unflatten(0, (batch, num_prompts))  # (B, P, h, N, d)
                    key = key.unflatten(0, (batch, num_prompts))  # (B, P, h, N, d)
                    for prompt in range(num_prompts):
                        totals[name] = totals[name] + self_attention_class_probs(
                            query[:, prompt],
                            key[:, prompt],
                            labels_at[name],
                            num_classes,
                            scales[name],
                        )  # (B, C, h*w)
                    del query, key
            elif labels_at:
                assert latents is not None
                self_layers = [layer for layer in plan.layers if layer.kind == "self"]
                step = self.rows_per_call(self_layers)
                for first in range(0, num_prompts, step):
                    last = min(num_prompts, first + step)
                    piece = self._unet_call(latents, prompts, self_layers, first, last, timestep)
                    for name in list(piece.queries):
                        query, key = piece.queries.pop(name), piece.keys.pop(name)  # (p, h, N, d)
                        for row in range(last - first):
                            totals[name] = totals[name] + self_attention_class_probs(
                                query[row : row + 1],
                                key[row : row + 1],
                                labels_at[name],
                                num_classes,
                                piece.scales[name],
                            )  # (1, C, h*w)
                        del query, key
                    del piece
            for name, total in totals.items():
                layer_maps[name] = (total / num_prompts).view(batch, num_classes, *sizes[name])

            final = final_scores(
                capm, layer_maps, plan.self_, plan.common_size, self.config.self_only
            )  # (B, C, S, S)
            if present is not None:
                final = gate(final, present, 0.0)
            seed = final if present is None else gate(final, present, -1.0)
        return _Pass(
            final=final, layer_maps=layer_maps, evidence=evidence, shares=shares, present=present
        )

    @torch.inference_mode()
    def _finish(
        self,
        scores: torch.Tensor,
        shape: tuple[int, int],
        labels: list[str],
        return_probs: bool = False,
        evidence: torch.Tensor | None = None,
    ) -> SegmentationResult:
        """Steps 7-8 for one image: upsample to its size, normalise, mask, confidences.

        Done in row bands on the model's device (:mod:`labeler.finish`): full-size
        probabilities exist only when ``return_probs`` asks for them. ``evidence`` (labels, S, S)
        is the labels' evidence for the background threshold (:mod:`labeler.background`).
        """
        finished = finish_scores(
            scores,
            size=shape,
            labels=labels,
            background_threshold=self.config.background_threshold,
            background_channel=self.config.background_prompt is not None,
            return_probs=return_probs,
            band_bytes=self.band_bytes,
            evidence=evidence,
        )
        return SegmentationResult(
            mask=finished.mask,
            probs=finished.probs,
            labels=list(labels),
            scores=finished.scores,
            background=finished.background,
            evidence=finished.evidence,
        )

    def segment(
        self,
        images: Any,
        labels: Sequence[str],
        *,
        return_probs: bool = False,
        return_layer_maps: bool = False,
    ) -> list[SegmentationResult]:
        """Segment images into the given labels.

        Args:
            images: a PIL image or numpy array, or a list of them (any mode, any size).
            labels: label names; mask value k means ``labels[k - 1]``, 0 means background.
            return_probs: also return ``result.probs``, the (C, H, W) float32 probabilities at
                the image's size (C x H x W x 4 bytes: 7 GB for 150 labels at 12 MP; ask only
                when needed, e.g. for DenseCRF). Otherwise ``result.probs`` is None.
            return_layer_maps: also return every attention layer's class map at its own size
                (``result.layer_maps``: layer -> (C, h, w) float16), for the StableSeg++ cache.
                With ``config.background_prompt`` the maps have one more, last, channel.

        Returns:
            One :class:`SegmentationResult` per image, in order, at each image's original size.
        """
        return list(
            self.iter_segment(
                images, labels, return_probs=return_probs, return_layer_maps=return_layer_maps
            )
        )

    def num_prompts(self, labels: Sequence[str]) -> int:
        """Prompts (UNet rows per image) that ``labels`` need, the background prompt included."""
        return self._prompts(self.prompt_labels(labels)).batch.num_prompts

    def prompt_labels(self, labels: Sequence[str]) -> list[str]:
        """The classes the prompt names: the labels, then the background prompt if any."""
        labels = validate_labels(labels, max_labels=None)
        if self.config.background_prompt is None:
            return labels
        return validate_labels([*labels, self.config.background_prompt], max_labels=None)

    def iter_segment(
        self,
        images: Any,
        labels: Sequence[str],
        *,
        return_probs: bool = False,
        return_layer_maps: bool = False,
    ) -> Iterator[SegmentationResult]:
        """Like :meth:`segment`, yielding results batch by batch."""
        for pending in self.iter_pending(
            images, labels, return_probs=return_probs, return_layer_maps=return_layer_maps
        ):
            yield pending.finish()

    def segment_pending(
        self,
        images: Any,
        labels: Sequence[str],
        *,
        return_probs: bool = False,
        return_layer_maps: bool = False,
    ) -> list[PendingResult]:
        """Like :meth:`segment`, but each image's full-size finish is left to
        :meth:`PendingResult.finish`: the model's part (VAE, UNet, maps at model resolution)
        is done here, so a caller that serialises model passes need not hold its lock for the
        finish (its cost grows with the image's pixels, not the model's)."""
        return list(
            self.iter_pending(
                images, labels, return_probs=return_probs, return_layer_maps=return_layer_maps
            )
        )

    def iter_pending(
        self,
        images: Any,
        labels: Sequence[str],
        *,
        return_probs: bool = False,
        return_layer_maps: bool = False,
    ) -> Iterator[PendingResult]:
        """Like :meth:`segment_pending`, yielding batch by batch."""
        labels = validate_labels(labels, max_labels=None)
        prompted = self.prompt_labels(labels)
        if not isinstance(images, (list, tuple)):
            images = [images]
        plan = self.plan(all_layers=return_layer_maps)
        if self.config.tiles is not None and return_layer_maps:
            raise ValueError(
                "tiles do not make one set of layer maps per image (StableSeg++ map "
                "weights are fitted without tiles): leave tiles off for this run"
            )
        size = self.config.batch_size
        if self.config.tiles is not None:
            for start in range(0, len(images), size):
                chunk = images[start : start + size]
                yield from self._segment_tiles(chunk, start, labels, prompted, plan, return_probs)
            return
        for start in range(0, len(images), size):
            chunk = images[start : start + size]
            pixels, shapes = self._model_input(chunk, start)  # (B, 3, S, S), B x (H, W)
            result = self._ensemble_pass(pixels, prompted, plan)
            for i, shape in enumerate(shapes):
                layer_maps = None
                if return_layer_maps:
                    layer_maps = {
                        name: m[i].half().cpu().numpy() for name, m in result.layer_maps.items()
                    }
                    for name, share in (result.shares or {}).items():
                        layer_maps[share_key(name)] = share[i].half().cpu().numpy()
                yield PendingResult(
                    segmenter=self,
                    scores=result.final[i],  # (C, S, S)
                    shape=shape,
                    labels=labels,
                    return_probs=return_probs,
                    evidence=None if result.evidence is None else result.evidence[i],
                    layer_maps=layer_maps,
                )

    @torch.inference_mode()
    def _segment_tiles(
        self,
        images: Sequence[Any],
        first_index: int,
        labels: list[str],
        prompted: list[str],
        plan: MapPlan,
        return_probs: bool,
    ) -> list[PendingResult]:
        """A batch of images with tiles (:mod:`labeler.tiles`): one whole-image pass over the
        batch chooses each window's labels, the windows of every image go through in full
        batches, and each image's windows' final scores are blended at score resolution and
        finished as one image's scores are. Each pass is the ensemble's
        (:meth:`_ensemble_pass`); the windows' labels are passed as the classes present, so a
        label judged absent by the whole-image pass (with a presence threshold) stays out of
        every window of its image."""
        side, step = self.image_size, self._cell_pixels
        working = [
            self._working_image(image, first_index + offset, step)
            for offset, image in enumerate(images)
        ]  # (h, w, 3) pixels and the mask's (H, W), per image
        whole = self._ensemble_pass(
            _pixels_tensor([resize_for_model(pixels, side) for pixels, _ in working]),
            prompted,
            plan,
        )
        num_classes = whole.final.shape[1]
        background = self.config.background_prompt is not None
        canvases: list[TileCanvas] = []
        evidences: list[TileCanvas | None] = []
        jobs: list[tuple[int, Window, torch.Tensor]] = []  # (image, window, its classes)
        for k, (pixels, _) in enumerate(working):
            height, width = pixels.shape[:2]
            canvases.append(TileCanvas(num_classes, (height // step, width // step), self.device))
            evidences.append(
                None
                if whole.evidence is None
                else TileCanvas(whole.evidence.shape[1], canvases[k].weight.shape, self.device)
            )
            whole_probs = normalise(whole.final[k], dim=0)  # (C, s, s)
            for window in tile_windows((width, height), side, self.config.tile_overlap, step):
                allowed = window_labels(whole_probs, window, (width, height), self.config.tile_gate)
                if background:
                    allowed[-1] = True  # the background prompt is not a label to choose
                if whole.present is not None:
                    allowed &= whole.present[k].to(allowed.device)  # judged on the whole
                jobs.append((k, window, allowed))
        for start in range(0, len(jobs), self.config.batch_size):
            chunk = jobs[start : start + self.config.batch_size]
            crops = [
                working[k][0][w.top : w.top + side, w.left : w.left + side] for k, w, _ in chunk
            ]
            allowed = torch.stack([classes for _, _, classes in chunk])  # (B, C)
            result = self._ensemble_pass(_pixels_tensor(crops), prompted, plan, allowed)
            for row, (k, window, _) in enumerate(chunk):
                origin = [window.cells(step)]
                canvases[k].add(result.final[row : row + 1], origin)
                blend = evidences[k]
                if blend is not None and result.evidence is not None:
                    blend.add(result.evidence[row : row + 1], origin)
        results = []
        for k, (_, shape) in enumerate(working):
            blend = evidences[k]
            results.append(
                PendingResult(
                    segmenter=self,
                    scores=canvases[k].result(),
                    shape=shape,
                    labels=labels,
                    return_probs=return_probs,
                    evidence=None if blend is None else blend.result(),
                )
            )
        return results

    def _working_image(
        self, image: Any, index: int, step: int
    ) -> tuple[np.ndarray, tuple[int, int]]:
        """Tiles' working image (h, w, 3) uint8 and the mask's (H, W), from an image or the
        :class:`PreparedImage` that :meth:`prepare` made of it."""
        if not isinstance(image, PreparedImage):
            image = self.prepare(to_rgb_array(image, index=index))
        pixels = np.asarray(image.pixels)
        height, width = pixels.shape[:2]
        side = self.image_size
        if (
            pixels.ndim != 3
            or pixels.dtype != np.uint8
            or height % step
            or width % step
            or min(height, width) < side
        ):
            raise ValueError(
                f"prepared image {index} must be (h, w, 3) uint8 with each side a multiple of "
                f"{step} and at least {side} for tiles, got {pixels.shape} {pixels.dtype}"
            )
        width_out, height_out = image.size
        return pixels, (int(height_out), int(width_out))

    def _model_input(
        self, images: Sequence[Any], first_index: int
    ) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Step 2's input for a batch: (B, 3, S, S) in [-1, 1] and each mask's (H, W).

        A :class:`PreparedImage` brings its (S, S, 3) pixels and size; anything else is an image
        (PIL or array, any mode) resized here by the same rule (:func:`resize_for_model`).
        """
        side = self.image_size
        batch, shapes = [], []
        for offset, image in enumerate(images):
            index = first_index + offset
            if isinstance(image, PreparedImage):
                pixels = np.asarray(image.pixels)
                if pixels.shape != (side, side, 3) or pixels.dtype != np.uint8:
                    raise ValueError(
                        f"prepared image {index} must be ({side}, {side}, 3) uint8 at the "
                        f"model's image_size, got {pixels.shape} {pixels.dtype}"
                    )
                width, height = image.size
                shapes.append((int(height), int(width)))
            else:
                rgb = to_rgb_array(image, index=index)
                pixels = resize_for_model(rgb, side)
                shapes.append(rgb.shape[:2])
            batch.append(pixels)
        return _pixels_tensor(batch), shapes


def _in_channels(part: torch.Tensor, batch: int, channels: int) -> torch.Tensor:
    """Zeros shaped like ``part`` (b, c, ...) with ``batch`` rows and ``channels`` channels."""
    return part.new_zeros((batch, channels, *part.shape[2:]))


def _scatter(whole: torch.Tensor, part: torch.Tensor, rows: list[int], channels: list[int]) -> None:
    """``whole[rows[i], channels[j]] = part[i, j]``: a group's maps back in the full batch."""
    index = torch.tensor(channels, device=whole.device)
    for position, row in enumerate(rows):
        whole[row].index_copy_(0, index, part[position].to(whole.dtype))


def _pixels_tensor(batch: Sequence[np.ndarray]) -> torch.Tensor:
    """(S, S, 3) uint8 arrays -> (B, 3, S, S) float in [-1, 1]."""
    tensor = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2)  # (B, 3, S, S) uint8
    return tensor.float().div_(127.5).sub_(1.0)


def _uniform(
    layers: list[LayerInfo], sizes: SizeSelection, field: str, smallest: int | None
) -> dict[str, float]:
    """Equal weights over the layers whose side ``sizes`` selects (default: the smallest few)."""
    try:
        chosen = select_sizes(sizes, (layer.side for layer in layers), smallest)
    except ValueError as err:
        raise ValueError(f"{field}: {err} (at this UNet and image size)") from None
    picked = [layer.name for layer in layers if layer.side in chosen]
    weight = 1.0 / len(picked) if picked else 0.0
    return {layer.name: (weight if layer.name in picked else 0.0) for layer in layers}
