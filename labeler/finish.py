"""From the final scores at model resolution to the mask at the image's own size, in row bands.

The final map P (C, S, S) is upsampled bilinearly to the image (H, W), normalised over labels and
turned into a mask. At 12 MP with 150 labels the upsampled P alone would take 7 GB, so it is
never built: the mask is produced band by band of output rows, each band computed from the few
source rows it needs, with a budget on a band's C x rows x W float32. Per-label confidences are
accumulated over the bands on the device (:class:`labeler.scores.LabelScores`); the host
receives one small integer mask and the C confidences per image, and full-size probabilities
only when asked for.

The upsampling reproduces ``F.interpolate(P[None], size=(H, W), mode="bilinear",
align_corners=False)``. An image that fits one band goes through that very call. Otherwise the
columns of a band come from it (the band's source rows at full width), and each output row's two
source rows and weights are those the kernel computes for the full output height (in float32
with the multiply-add fused, as PyTorch's compiled kernels do); the blend of the two rows is
bit-identical to the kernel's in most cases measured on a CPU, and within a few units in the
last place otherwise.

The mask is the argmax of the clamped scores; the best normalised probability is the best
clamped score over their sum (bit for bit the maximum of the normalised probabilities: division
by the same positive number keeps the order), so the C channels are divided only when the
probabilities are asked for. The mask can differ from the argmax of the normalised probabilities
only where two labels' scores are within a rounding step of each other. The background rules are
:mod:`labeler.background`'s; a threshold reads the labels' evidence, upsampled band by band in the
same way.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .background import winner_to_mask
from .result import mask_dtype
from .sar import EPS
from .scores import LabelScores

BAND_BYTES = 64 * 2**20
"""Budget of one band: its C x rows x W float32 upsampled scores (a few such buffers live at
once while a band is processed)."""


@dataclass
class FinishedImage:
    """What one image's finish step hands to the host.

    Attributes:
        mask: (H, W) uint8 (uint16 past ``MAX_LABELS`` labels): 0 background, k = k-th label.
        scores: label -> confidence (mean probability over the label's pixels).
        probs: (C, H, W) float32 normalised probabilities of the labels, only when asked for.
        background: (H, W) float32 background prompt's probability (asked for, with a prompt).
        evidence: (H, W) float32 winning label's evidence (asked for, with a threshold).
    """

    mask: np.ndarray
    scores: dict[str, float]
    probs: np.ndarray | None = None
    background: np.ndarray | None = None
    evidence: np.ndarray | None = None


@dataclass(frozen=True)
class RowWeights:
    """For each output row: its two source rows and their bilinear weights.

    Attributes:
        first, second: (H,) int64 source rows (``second`` is ``first`` at the last source row).
        first_weight, second_weight: (H,) float32 weights, summing to 1.
    """

    first: np.ndarray
    second: np.ndarray
    first_weight: np.ndarray
    second_weight: np.ndarray


def row_weights(in_size: int, out_size: int) -> RowWeights:
    """The source rows and weights of bilinear resizing (align_corners=False) along one axis.

    Computed as PyTorch's kernels compute them: scale = in / out in float32, source position
    ``max(scale * (i + 0.5) - 0.5, 0)`` rounded once to float32 (a fused multiply-add; the
    product of two float32 is exact in float64), the lower row its floor, the weight of the upper
    row the distance to it.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"row_weights: sizes must be >= 1, got {in_size} -> {out_size}")
    if in_size == out_size:
        rows = np.arange(out_size, dtype=np.int64)
        ones = np.ones(out_size, np.float32)
        return RowWeights(rows, rows, ones, np.zeros(out_size, np.float32))
    scale = np.float32(in_size) / np.float32(out_size)
    centres = np.arange(out_size, dtype=np.float32) + np.float32(0.5)  # (H,)
    position = (np.float64(scale) * centres.astype(np.float64) - 0.5).astype(np.float32)
    position = np.maximum(position, np.float32(0.0))
    first = np.minimum(np.floor(position).astype(np.int64), in_size - 1)
    second_weight = np.clip(position - first.astype(np.float32), 0.0, 1.0).astype(np.float32)
    second = first + (first < in_size - 1)
    first_weight = (np.float32(1.0) - second_weight).astype(np.float32)
    return RowWeights(first, second, first_weight, second_weight)


def bilinear_rows(
    scores: torch.Tensor,
    weights: RowWeights,
    width: int,
    start: int,
    stop: int,
    device_weights: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Rows ``start:stop`` of the bilinear upsampling of ``scores`` to (len(weights), width).

    Args:
        scores: (C, h, w) float32.
        weights: :func:`row_weights` (h -> H).
        width: W, the output width.
        start, stop: the band of output rows.
        device_weights: (first_weight, second_weight) of ``weights`` already on
            ``scores.device`` (copied once per image rather than once per band).

    Returns:
        (C, stop - start, W) float32, equal to ``F.interpolate(scores[None], (H, W), "bilinear",
        align_corners=False)[0, :, start:stop]`` up to the rounding of the final blend.
    """
    height = len(weights.first)
    if start == 0 and stop == height:  # the whole image fits one band: the kernel itself
        return F.interpolate(
            scores[None].float(), size=(height, width), mode="bilinear", align_corners=False
        )[0]  # (C, H, W)
    first, second = weights.first[start:stop], weights.second[start:stop]  # (rows,) host
    low, high = int(first[0]), int(second[-1]) + 1  # the source rows this band reads
    # Columns by the kernel itself, rows kept as they are (equal in and out heights copy rows).
    columns = F.interpolate(
        scores[None, :, low:high].float(),
        size=(high - low, width),
        mode="bilinear",
        align_corners=False,
    )[0]  # (C, n, W)
    if device_weights is None:
        device_weights = _to_device(weights, scores.device)
    first_weight, second_weight = (w[start:stop, None] for w in device_weights)  # (rows, 1)
    band = torch.empty(
        (scores.shape[0], stop - start, width), dtype=torch.float32, device=scores.device
    )  # (C, rows, W)
    # Consecutive output rows that read the same two source rows form a run: one broadcast
    # product per run, no gathered copies. The upper row's term is added last, fused where the
    # device fuses multiply-adds, as the interpolation kernels do.
    changes = np.flatnonzero((np.diff(first) != 0) | (np.diff(second) != 0)) + 1
    bounds = [0, *changes.tolist(), stop - start]
    for run_start, run_stop in itertools.pairwise(bounds):
        upper = columns[:, int(first[run_start]) - low, None]  # (C, 1, W)
        lower = columns[:, int(second[run_start]) - low, None]  # (C, 1, W)
        run = band[:, run_start:run_stop]  # (C, r, W) view
        torch.mul(lower, second_weight[run_start:run_stop], out=run)
        run.addcmul_(upper, first_weight[run_start:run_stop])
    return band


def _to_device(weights: RowWeights, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The row weights on ``device``; to CUDA from pinned memory without waiting for the GPU."""
    first = torch.from_numpy(weights.first_weight)
    second = torch.from_numpy(weights.second_weight)
    if device.type == "cuda":
        first, second = first.pin_memory(), second.pin_memory()
    return first.to(device, non_blocking=True), second.to(device, non_blocking=True)


PIXEL_BYTES = 48
"""What a band costs per pixel besides its scores: mask, argmax and winner indices, sums."""


def band_rows(num_channels: int, width: int, band_bytes: int = BAND_BYTES) -> int:
    """Output rows per band so that a band's C x rows x W float32 scores, plus the per-pixel
    bookkeeping (:data:`PIXEL_BYTES`), fit ``band_bytes``; at least 1."""
    return max(1, band_bytes // ((4 * num_channels + PIXEL_BYTES) * width))


def finish_scores(
    scores: torch.Tensor,
    size: tuple[int, int],
    labels: list[str],
    background_threshold: float | None,
    background_channel: bool,
    return_probs: bool = False,
    band_bytes: int = BAND_BYTES,
    evidence: torch.Tensor | None = None,
) -> FinishedImage:
    """Steps 7-8 for one image: upsample, normalise, mask and confidences, band by band.

    Args:
        scores: (C', S, S) un-normalised final scores at model resolution, on the model's
            device; C' = len(labels), plus 1 when the last channel is a background prompt's.
        size: (H, W) of the image.
        labels: the label names (mask id k = ``labels[k - 1]``).
        background_threshold: pixels whose winning label's evidence is below it become 0.
        background_channel: the last channel is the background prompt's; pixels it wins are 0.
        return_probs: also return the (C, H, W) float32 probabilities of the labels (with a
            background channel: the labels' share only, and the prompt's own probability),
            and with a threshold the winning label's evidence.
        band_bytes: budget of one band (see :func:`band_rows`).
        evidence: (C, S, S) the labels' evidence (:func:`labeler.background.label_evidence`),
            needed with a threshold.
    """
    if background_threshold is not None and evidence is None:
        raise ValueError("finish_scores: a background threshold needs the labels' evidence")
    height, width = size
    device = scores.device
    num_channels, num_labels = scores.shape[0], len(labels)
    weights = row_weights(scores.shape[-2], height)
    device_weights = _to_device(weights, device)
    host_dtype = mask_dtype(num_labels)
    # uint16 masks are built as int16 (every device has it) and read back as uint16: the same
    # bits, ids up to 65535.
    dtype = torch.uint8 if host_dtype == np.uint8 else torch.int16
    mask = torch.empty((height, width), dtype=dtype, device=device)  # (H, W)
    confidences = LabelScores(labels, device)
    probs_out = np.empty((num_labels, height, width), np.float32) if return_probs else None
    prompt_out = (
        np.empty((height, width), np.float32) if return_probs and background_channel else None
    )
    threshold = background_threshold
    evidence_out = (
        np.empty((height, width), np.float32) if return_probs and threshold is not None else None
    )
    read = num_channels + (num_labels if threshold is not None else 0)
    rows = band_rows(read, width, band_bytes)
    for start in range(0, height, rows):
        stop = min(start + rows, height)
        band = bilinear_rows(scores, weights, width, start, stop, device_weights)  # (C', r, W)
        band.clamp_(min=0)  # normalise(): non-negative scores over their sum
        total = band.sum(dim=0).clamp_(min=EPS)  # (r, W)
        peak, index = band.max(dim=0)  # (r, W) each
        best = peak.div_(total)  # (r, W) the best normalised probability
        winner = None
        if threshold is not None:
            assert evidence is not None
            rows_evidence = bilinear_rows(evidence, weights, width, start, stop, device_weights)
            winner = rows_evidence.gather(0, index.clamp(max=num_labels - 1)[None])[0]  # (r, W)
            del rows_evidence
        band_mask = winner_to_mask(
            index, num_channels, background_channel, winner, threshold
        )  # (r, W)
        confidences.add_winners(band_mask, best)
        mask[start:stop] = band_mask
        if evidence_out is not None:
            evidence_out[start:stop] = winner.cpu().numpy()
        if prompt_out is not None:
            prompt_out[start:stop] = band[num_labels].div(total).cpu().numpy()
        if probs_out is not None:
            label_probs = band[:num_labels].div_(total)  # (C, r, W) the labels' share
            probs_out[:, start:stop] = label_probs.cpu().numpy()
    host_mask = mask.cpu().numpy().view(host_dtype)  # (H, W) the one copy to the host
    return FinishedImage(
        mask=host_mask,
        scores=confidences.result(),
        probs=probs_out,
        background=prompt_out,
        evidence=evidence_out,
    )
