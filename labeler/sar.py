"""From recorded attention to class probabilities: CAPM, Self-Attention Refinement, final map.

Pure tensor functions; the reference implementations in the tests compute the same quantities
with explicit attention matrices and loops.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

EPS = 1e-8
"""Floor of a denominator (a pixel whose scores are all 0 stays all 0)."""


def label_attention_from_tokens(
    token_maps: torch.Tensor,
    token_class: torch.Tensor,
    num_classes: int,
    num_prompts: int,
    token_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """The cross-attention each label gets at one layer, before renormalisation over labels.

    Args:
        token_maps: (B*P, T, h, w) probabilities of the label tokens (rows image-major: image i,
            prompt p at row i*P + p).
        token_class: (P, T) label index of each token column; -1 on padding.
        num_classes: C.
        num_prompts: P.
        token_weight: (P, T) each token's weight (``PromptBatch.token_weight``): with synonyms,
            the mean over the label's names of each name's mean token map. None: every token of
            a label weighs the same.

    Returns:
        (B, C, h, w): for each label the mean of its tokens' maps (a share of the softmax over
        the prompt's tokens; the rest went to other tokens, BOS and padding among them).

    Synonyms are merged here, before the renormalisation over labels: everything after (the
    CAPM, the background evidence, presence, SAR's class vectors, the argmax) sees one class per
    label, and a label with synonyms neither gains nor loses weight against the others for
    having more names, as it would if each name were a class of its own until the final map.
    """
    rows, _, height, width = token_maps.shape
    batch = rows // num_prompts
    valid = token_class >= 0
    onehot = F.one_hot(token_class.clamp(min=0), num_classes).to(token_maps.dtype)  # (P, T, C)
    onehot = onehot * valid[..., None].to(token_maps.dtype)
    if token_weight is None:
        counts = onehot.sum(dim=1, keepdim=True).clamp(min=1)  # (P, 1, C)
        average = onehot / counts  # (P, T, C)
    else:
        average = onehot * token_weight[..., None].to(token_maps.dtype)  # (P, T, C)
    maps = token_maps.view(batch, num_prompts, -1, height, width)  # (B, P, T, h, w)
    # A label's weights sum to 1 over every prompt it appears in (its names may be spread over
    # several), so summing over prompts gives each label's (weighted) mean.
    return torch.einsum("bpthw,ptc->bchw", maps, average)  # (B, C, h, w)


def renormalise_over_labels(attention: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-attention probability map (CAPM) of one layer from its labels' attention.

    Args:
        attention: (B, C, h, w) each label's attention (:func:`label_attention_from_tokens`).

    Returns:
        (CAPM, share): the (B, C, h, w) attention renormalised over labels, so each pixel holds
        a distribution over the C labels, and the (B, 1, h, w) share of the attention all the
        labels got together (``attention = CAPM * share``).
    """
    share = attention.sum(dim=1, keepdim=True)  # (B, 1, h, w)
    return attention / share.clamp(min=EPS), share


def ca_labels_at(capm: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The CA map at a layer's grid size: (B, C, S, S) class probabilities -> (B, h, w) labels.

    At the common size it is the argmax of the CAPM. A coarser layer takes the argmax of the CAPM
    averaged over each of its cells (area pooling), so every cell is labelled by what covers it:
    a nearest-neighbour resize would read one pixel per cell (the top-left one with PyTorch's
    legacy ``nearest``, about 28 image pixels off-centre at 8 x 8 for a 512 px image) and lose
    small objects that miss it.
    """
    if tuple(capm.shape[-2:]) == tuple(size):
        return capm.argmax(dim=1)
    return F.adaptive_avg_pool2d(capm.float(), size).argmax(dim=1)  # (B, h, w)


def self_attention_class_probs(
    query: torch.Tensor,
    key: torch.Tensor,
    ca_map: torch.Tensor,
    num_classes: int,
    scale: float,
) -> torch.Tensor:
    """Self-attention probability map (SAPM) of one layer, the heart of SAR.

    Each label's class vector is the mean key over the pixels the CA map gives it; every
    pixel's query then attends over the class vectors (softmax over labels), averaged over heads.
    A label with no pixel at this layer's size is left out of the softmax.

    Args:
        query, key: (B, heads, N, d) of the layer.
        ca_map: (B, N) label index (0-based) of every token of the layer.
        num_classes: C.
        scale: the layer's softmax scale (1/sqrt(d)).

    Returns:
        (B, C, N) probabilities; a left-out label has probability 0.
    """
    query, key = query.float(), key.float()
    member = F.one_hot(ca_map, num_classes).float()  # (B, N, C)
    counts = member.sum(dim=1)  # (B, C)
    class_keys = torch.einsum("bnc,bhnd->bhcd", member, key)  # (B, heads, C, d)
    class_keys = class_keys / counts.clamp(min=1)[:, None, :, None]
    logits = torch.matmul(query, class_keys.transpose(-1, -2)) * scale  # (B, heads, N, C)
    logits = logits.masked_fill((counts == 0)[:, None, None, :], float("-inf"))
    return logits.softmax(dim=-1).mean(dim=1).transpose(1, 2)  # (B, C, N)


def at_common_size(layer_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, C, h, w) one layer's map -> (B, C, S, S) float32 at the common ``size`` (bilinear)."""
    if tuple(layer_map.shape[-2:]) != tuple(size):
        layer_map = F.interpolate(
            layer_map.float(), size=size, mode="bilinear", align_corners=False
        )
    return layer_map.float()


def weighted_sum(
    maps: Mapping[str, torch.Tensor], weights: Mapping[str, float], size: tuple[int, int]
) -> torch.Tensor | None:
    """sum_l w_l * upsample(maps[l]) at ``size`` (bilinear); None when no map has weight.

    Args:
        maps: layer -> (B, C, h, w).
        weights: layer -> weight; layers missing or with weight 0 are skipped.
    """
    total = None
    for name, layer_map in maps.items():
        weight = float(weights.get(name, 0.0))
        if weight == 0.0:
            continue
        term = weight * at_common_size(layer_map, size)  # (B, C, S, S)
        total = term if total is None else total + term
    return total


def cross_attention_map(
    layer_maps: Mapping[str, torch.Tensor],
    cross_weights: Mapping[str, float],
    size: tuple[int, int],
) -> torch.Tensor:
    """Step 4: the CAPM, ``sum_l w_l * CAPM_l`` over the cross-attention layers at ``size``.

    Args:
        layer_maps: layer -> (B, C, h, w) class maps; layers without a cross weight are skipped.
        cross_weights: cross-attention layer -> weight.
        size: the common size (S, S).

    Returns:
        (B, C, S, S) the weighted sum (not renormalised).
    """
    capm = weighted_sum(layer_maps, cross_weights, size)  # (B, C, S, S)
    if capm is None:
        raise ValueError(
            f"no cross-attention map has weight: layers {sorted(layer_maps)[:5]}, "
            f"weights {dict(list(cross_weights.items())[:5])}"
        )
    return capm


def final_scores(
    capm: torch.Tensor,
    layer_maps: Mapping[str, torch.Tensor],
    self_weights: Mapping[str, float],
    size: tuple[int, int],
    self_only: bool = False,
) -> torch.Tensor:
    """Step 7: the final map ``P = CAPM + SAPM`` at the common size, not yet normalised.

    The SAPM is ``sum_l w_l * SAPM_l`` over the self-attention layers. Without SAR (no self
    layer has weight) P is the CAPM alone; with ``self_only`` it is the SAPM alone (the CAPM
    only seeded SAR).

    Args:
        capm: (B, C, S, S) from :func:`cross_attention_map`.
        layer_maps: layer -> (B, C, h, w) class maps; layers without a self weight are skipped.
        self_weights: self-attention layer -> weight.
        size: the common size (S, S).

    Returns:
        (B, C, S, S) the final scores.
    """
    sapm = weighted_sum(layer_maps, self_weights, size)  # (B, C, S, S) or None
    if sapm is None:
        return capm
    if self_only:
        return sapm
    return capm + sapm


def normalise(scores: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Scores -> a distribution over labels along ``dim`` (non-negative scores)."""
    scores = scores.clamp(min=0)
    return scores / scores.sum(dim=dim, keepdim=True).clamp(min=EPS)
