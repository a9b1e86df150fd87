"""StableSeg: zero-shot semantic masks from one Stable Diffusion UNet pass."""

from __future__ import annotations

import functools
import hashlib
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
from .model_settings import SegmenterConfig, SizeSelection, select_sizes
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
from .tiles import TileCanvas, tile_windows, window_labels, working_size


def default_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device | str) -> torch.dtype:
    """fp16 on CUDA, fp32 elsewhere."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


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


@dataclass
class _Pass:
    """Per-batch maps before upsampling to image size (all at ``common_size``)."""

    final: torch.Tensor  # (B, C, S, S) un-normalised scores
    layer_maps: dict[str, torch.Tensor]  # layer -> (B, C, h, w)
    evidence: torch.Tensor | None = None  # (B, labels, S, S), with a background threshold
    shares: dict[str, torch.Tensor] | None = None  # cross layer -> (B, 1, h, w) label share


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
        if self.config.image_size % self.vae_scale_factor:
            raise ValueError(
                f"image_size {self.config.image_size} is not a multiple of the VAE's "
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
        """Side of the square image the model sees (``config.image_size``); with tiles, the
        longer side of the working image (readers decode images at least this large)."""
        if self.config.tiles is not None:
            return math.ceil(self.config.tiles * self.config.image_size)
        return self.config.image_size

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
        return prepare_image(image, self.config.image_size, size)

    def _working_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """(width, height) of the working image of tiles for an original of ``size``."""
        assert self.config.tiles is not None
        return working_size(size, self.config.image_size, self.config.tiles, self._cell_pixels)

    @functools.cached_property
    def _cell_pixels(self) -> int:
        """Input pixels per cell of the final scores (8 for SD at 512 px)."""
        latent = self.config.image_size // self.vae_scale_factor
        cells = max(layer.side for layer in unet_attention_layers(self.unet, (latent, latent)))
        return self.config.image_size // cells

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
        side = self.config.image_size // self.vae_scale_factor
        return side, side

    def attention_layers(self) -> list[LayerInfo]:
        """Every attention layer of the UNet with its grid size at ``config.image_size``."""
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
    def _prompts(self, labels: Sequence[str]) -> _Prompts:
        key = (*labels, "\x00", self.config.prompt_template, self.config.label_separator)
        if key not in self._embedding_cache:
            batch = build_prompts(
                self.tokenizer, labels, self.config.prompt_template, self.config.label_separator
            )
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

    @torch.inference_mode()
    def _attention_pass(
        self,
        latents: torch.Tensor,
        prompts: _Prompts,
        plan: MapPlan,
        allowed: torch.Tensor | None = None,
    ) -> _Pass:
        """Steps 3-7 for one batch of latents: UNet pass, CAPM, CA map, SAR, final scores.

        ``allowed`` (B, C) bool, for tiles' windows: the classes each image may use; the others
        win no pixel of the CA map (so SAR gets no class vector for them) and score 0.
        """
        batch, num_prompts = latents.shape[0], prompts.batch.num_prompts
        num_classes = len(prompts.batch.spans)
        rows = latents.repeat_interleave(num_prompts, dim=0)  # (B*P, c, h, w)
        context = prompts.embeddings.repeat(batch, 1, 1)  # (B*P, L, D)
        timestep = torch.full((rows.shape[0],), self.config.timestep, device=self.device)
        token_index = prompts.token_index.repeat(batch, 1)  # (B*P, T)
        with self._recorder().recording(plan.layers, token_index) as store:
            self.unet(rows, timestep, encoder_hidden_states=context, return_dict=False)
            cross, queries, keys = dict(store.cross), dict(store.queries), dict(store.keys)
            scales = dict(store.scales)

        layer_maps: dict[str, torch.Tensor] = {}
        attention: dict[str, torch.Tensor] = {}
        shares: dict[str, torch.Tensor] = {}
        for name, token_maps in cross.items():
            attention[name] = label_attention_from_tokens(
                token_maps, prompts.token_class, num_classes, num_prompts
            )  # (B, C, h, w) before renormalisation
            # CAPM of the layer (B, C, h, w) and the labels' share of its attention (B, 1, h, w)
            layer_maps[name], shares[name] = renormalise_over_labels(attention[name])
        capm = cross_attention_map(layer_maps, plan.cross, plan.common_size)  # (B, C, S, S)
        if allowed is not None:
            gate = allowed[:, :, None, None].to(capm.device)  # (B, C, 1, 1)
            capm = normalise(capm * gate, dim=1).masked_fill(~gate, -1.0)  # never the argmax
        evidence = None
        if self.config.background_threshold is not None:
            num_labels = num_classes - (self.config.background_prompt is not None)
            evidence = layers_evidence(
                attention, plan.cross, plan.common_size, num_labels
            )  # (B, labels, S, S)
        del attention

        sizes = {layer.name: layer.size for layer in plan.layers}
        for name in list(queries):
            size = sizes[name]
            labels = ca_labels_at(capm, size).flatten(1)  # (B, h*w)
            # Each layer's Q and K are let go as soon as its map is made; the prompt rows of an
            # image are refined one at a time and averaged, so memory grows with the labels,
            # not with labels x prompts (labels past one text context make more prompts).
            query = queries.pop(name).unflatten(0, (batch, num_prompts))  # (B, P, heads, N, d)
            key = keys.pop(name).unflatten(0, (batch, num_prompts))  # (B, P, heads, N, d)
            total = sum(
                self_attention_class_probs(
                    query[:, prompt], key[:, prompt], labels, num_classes, scales[name]
                )  # (B, C, h*w)
                for prompt in range(num_prompts)
            )
            del query, key
            layer_maps[name] = (total / num_prompts).view(batch, num_classes, *size)

        if allowed is not None:
            capm = capm.clamp(min=0.0)
        final = final_scores(
            capm, layer_maps, plan.self_, plan.common_size, self.config.self_only
        )  # (B, C, S, S)
        return _Pass(final=final, layer_maps=layer_maps, evidence=evidence, shares=shares)

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
        labels = validate_labels(labels, max_labels=None)
        prompted = self.prompt_labels(labels)
        if not isinstance(images, (list, tuple)):
            images = [images]
        plan = self.plan(all_layers=return_layer_maps)
        prompts = self._prompts(prompted)
        if self.config.tiles is not None:
            if return_layer_maps:
                raise ValueError(
                    "tiles do not make one set of layer maps per image (StableSeg++ map "
                    "weights are fitted without tiles): leave tiles off for this run"
                )
            for index, image in enumerate(images):
                yield self._segment_tiles(image, index, labels, prompts, plan, return_probs)
            return
        size = self.config.batch_size
        for start in range(0, len(images), size):
            chunk = images[start : start + size]
            pixels, shapes = self._model_input(chunk, start)  # (B, 3, S, S), B x (H, W)
            latents = self.encode_images(pixels)
            result = self._attention_pass(latents, prompts, plan)
            for i, shape in enumerate(shapes):
                evidence = None if result.evidence is None else result.evidence[i]
                out = self._finish(result.final[i], shape, labels, return_probs, evidence)
                if return_layer_maps:
                    out.layer_maps = {
                        name: m[i].half().cpu().numpy() for name, m in result.layer_maps.items()
                    }
                    for name, share in (result.shares or {}).items():
                        out.layer_maps[share_key(name)] = share[i].half().cpu().numpy()
                yield out

    @torch.inference_mode()
    def _segment_tiles(
        self,
        image: Any,
        index: int,
        labels: list[str],
        prompts: _Prompts,
        plan: MapPlan,
        return_probs: bool,
    ) -> SegmentationResult:
        """One image with tiles (:mod:`labeler.tiles`): a whole-image pass chooses each
        window's labels, the windows' final scores are blended at score resolution, and the
        blend is finished as one image's scores are."""
        side, step = self.config.image_size, self._cell_pixels
        pixels, shape = self._working_image(image, index, step)  # (h, w, 3), (H, W)
        height, width = pixels.shape[:2]
        whole = self._attention_pass(
            self.encode_images(_pixels_tensor([resize_for_model(pixels, side)])), prompts, plan
        )
        whole_probs = normalise(whole.final[0], dim=0)  # (C, s, s)
        windows = tile_windows((width, height), side, self.config.tile_overlap, step)
        num_classes = whole.final.shape[1]
        canvas = TileCanvas(num_classes, (height // step, width // step), self.device)
        evidence = None
        if whole.evidence is not None:
            evidence = TileCanvas(whole.evidence.shape[1], canvas.weight.shape, self.device)
        background = self.config.background_prompt is not None
        gate = self.config.tile_gate
        for start in range(0, len(windows), self.config.batch_size):
            chunk = windows[start : start + self.config.batch_size]
            crops = [pixels[w.top : w.top + side, w.left : w.left + side] for w in chunk]
            allowed = torch.stack(
                [window_labels(whole_probs, w, (width, height), gate) for w in chunk]
            )  # (B, C)
            if background:
                allowed[:, -1] = True  # the background prompt is not a label to choose
            result = self._attention_pass(
                self.encode_images(_pixels_tensor(crops)), prompts, plan, allowed
            )
            origins = [w.cells(step) for w in chunk]
            canvas.add(result.final, origins)
            if evidence is not None and result.evidence is not None:
                evidence.add(result.evidence, origins)
        blended = None if evidence is None else evidence.result()
        return self._finish(canvas.result(), shape, labels, return_probs, blended)

    def _working_image(
        self, image: Any, index: int, step: int
    ) -> tuple[np.ndarray, tuple[int, int]]:
        """Tiles' working image (h, w, 3) uint8 and the mask's (H, W), from an image or the
        :class:`PreparedImage` that :meth:`prepare` made of it."""
        if not isinstance(image, PreparedImage):
            image = self.prepare(to_rgb_array(image, index=index))
        pixels = np.asarray(image.pixels)
        height, width = pixels.shape[:2]
        side = self.config.image_size
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
        side = self.config.image_size
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
