"""Which labels are in an image, when every label of a project is prompted for every image.

A pre-labelling project prompts all its labels for every image, while each image holds a few of
them: an absent label still gets some attention everywhere and steals pixels, from the
background most of all once SAR has given it a class vector. With
``SegmenterConfig.presence_threshold`` set, the labels judged absent take no part in SAR's class
vectors or in the argmax (:func:`gate`); the background prompt's channel always takes part.

The evidence is the model's own cross-attention, before SAR. Each chosen cross-attention layer
gives every pixel a distribution over the prompted classes (its CAPM); the layers do not bind
labels equally well, and in one image the layer whose distributions are sharpest (the lowest
mean entropy over its pixels) is the one that tells the labels apart best. On that layer, a
label's *presence evidence* is the best ratio, over the layer's cells, of its probability to the
strongest class's there:

    presence_c = max_x  CAPM_l*(x)_c / max_k CAPM_l*(x)_k     in [0, 1]

1 means the label wins at least one cell; 0.8 that somewhere it gets at least 0.8 of what the
winning class gets. A label is present when ``presence_c >= threshold``. Like the background
threshold, the value compares a label with its competitors at the same place, not with 1/C, so
it means the same for two labels or 150. The label with the most evidence always takes part.

Gating leaves the absent labels' words in the prompt, where they still shape every other label's
cross-attention; with ``SegmenterConfig.reprompt`` the segmenter prompts each image again with
only the labels judged present (:meth:`labeler.segmenter.StableSeg._prompt_present`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .sar import EPS


def layer_sharpness(layer_map: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) one layer's distributions over the classes -> (B,) mean entropy (nats);
    lower is sharper."""
    probs = layer_map.float().clamp(min=0)
    probs = probs / probs.sum(dim=1, keepdim=True).clamp(min=EPS)  # (B, C, h, w)
    entropy = -(probs * probs.clamp(min=EPS).log()).sum(dim=1)  # (B, h, w)
    return entropy.flatten(1).mean(dim=1)


def best_ratio(layer_map: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, C): each class's best ratio, over the cells, of its probability to
    the strongest class's in the same cell (1: it wins at least one cell)."""
    layer_map = layer_map.float()
    strongest = layer_map.amax(dim=1, keepdim=True).clamp(min=EPS)  # (B, 1, h, w)
    return (layer_map / strongest).flatten(2).amax(dim=2)  # (B, C)


def presence_evidence(
    layer_maps: Mapping[str, torch.Tensor], cross_weights: Mapping[str, float]
) -> torch.Tensor:
    """Every class's presence evidence (see the module docstring) from the CAPMs of the chosen
    cross-attention layers.

    Args:
        layer_maps: layer -> (B, C, h, w) CAPM of the layer (classes renormalised).
        cross_weights: cross layer -> weight; layers with weight 0 or missing are not read.

    Returns:
        (B, C) evidence in [0, 1], read per image from its sharpest layer.
    """
    chosen = [name for name, weight in cross_weights.items() if weight and name in layer_maps]
    if not chosen:
        raise ValueError("presence needs at least one cross-attention layer with weight")
    entropy = torch.stack([layer_sharpness(layer_maps[n]) for n in chosen], dim=1)  # (B, L)
    ratios = torch.stack([best_ratio(layer_maps[n]) for n in chosen], dim=1)  # (B, L, C)
    sharpest = entropy.argmin(dim=1)  # (B,)
    return ratios[torch.arange(ratios.shape[0], device=ratios.device), sharpest]  # (B, C)


def judge_presence(evidence: torch.Tensor, threshold: float, num_labels: int) -> torch.Tensor:
    """(B, C) evidence -> (B, C) bool, True for the classes that take part.

    The first ``num_labels`` classes are labels, present when their evidence reaches
    ``threshold``; the label with the most evidence always is (an image is prompted with labels
    because it holds at least one), and any class after them (the background prompt's) always
    takes part.
    """
    present = evidence >= threshold - 1e-6  # (B, C); a winner's ratio is 1 up to rounding
    strongest = evidence[:, :num_labels].argmax(dim=1)  # (B,)
    present[torch.arange(present.shape[0], device=present.device), strongest] = True
    present[:, num_labels:] = True
    return present


def gate(scores: torch.Tensor, present: torch.Tensor, fill: float) -> torch.Tensor:
    """(B, C, ...) scores with the absent classes' channels set to ``fill``.

    ``fill`` 0 takes them out of a sum of non-negative maps; -1 keeps them from winning an
    argmax over non-negative scores.
    """
    shape = (*present.shape, *([1] * (scores.dim() - present.dim())))
    return torch.where(present.view(shape), scores, torch.full_like(scores, fill))
