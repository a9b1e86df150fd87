"""Measure StableSeg on the demo scenes: mIoU over background + colours, with and without SAR.

    python -m demo.evaluate --model demo/model --scenes demo/scenes

prints a JSON table. The segmenter settings come from ``<model>/stableseg.json`` (written by
``demo.train``). Background is predicted with ``SegmenterConfig.background_prompt``: the word
"background" is prompted after the labels as one more class and the pixels it wins become 0.
``--sweep`` also reports the other cross-attention sizes and the alternative rule,
``background_threshold`` (pixels whose best label's evidence is below it become 0), at
several thresholds. Colour binding (the share of objects, in scenes with two or more, whose
pixels mostly go to their own colour word) is reported alongside.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
import numpy as np

from demo.scenes import COLOUR_NAMES, SceneConfig, make_scenes
from labeler import SegmenterConfig, StableSeg
from labeler.metrics import ConfusionMatrix

THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)


def load_demo_config(model_dir: str | Path) -> SegmenterConfig:
    """The segmenter settings recommended in ``<model_dir>/stableseg.json``."""
    settings = json.loads((Path(model_dir) / "stableseg.json").read_text())["segmenter"]
    return SegmenterConfig(**settings)


def mean_iou(
    preds: Sequence[np.ndarray], gts: Sequence[np.ndarray], labels: Sequence[str]
) -> dict[str, Any]:
    """``ConfusionMatrix.summary`` over background + labels, summed over all images."""
    score = ConfusionMatrix(labels)
    for pred, gt in zip(preds, gts, strict=True):
        score.add(pred, gt)
    return score.summary()


def threshold_masks(
    probs: Sequence[np.ndarray], evidence: Sequence[np.ndarray], threshold: float
) -> list[np.ndarray]:
    """(C, H, W) label probabilities and (H, W) winning-label evidence -> (H, W) masks, pixels
    whose evidence is below ``threshold`` -> 0.

    The rule of ``SegmenterConfig.background_threshold`` (:mod:`labeler.background`), so one
    pass scores many thresholds.
    """
    masks = []
    for prob, winner in zip(probs, evidence, strict=True):
        mask = (prob.argmax(axis=0) + 1).astype(np.uint8)  # (H, W)
        mask[winner < threshold] = 0
        masks.append(mask)
    return masks


def binding_accuracy(probs: Sequence[np.ndarray], gts: Sequence[np.ndarray]) -> float | None:
    """Share of objects, in scenes with two or more, whose pixels mostly go to their label.

    Args:
        probs: (C, H, W) label probabilities per image (the labels compete, not background).
        gts: (H, W) ground-truth ids per image (0 = background, k = label k).
    """
    hits = total = 0
    for prob, gt in zip(probs, gts, strict=True):
        present = [int(k) for k in np.unique(gt) if k != 0]
        if len(present) < 2:
            continue
        winner = prob.argmax(axis=0) + 1  # (H, W)
        for k in present:
            votes = np.bincount(winner[gt == k], minlength=prob.shape[0] + 1)
            hits += int(votes.argmax() == k)
            total += 1
    return hits / total if total else None


def evaluate_model(
    model: StableSeg,
    images: Sequence[np.ndarray],
    gts: Sequence[np.ndarray],
    labels: Sequence[str],
    thresholds: Sequence[float] = (),
) -> dict[str, Any]:
    """mIoU of the model's own masks, per class, binding; with ``thresholds`` (and no
    background prompt) also the mIoU each background threshold would give."""
    sweeping = bool(thresholds) and model.config.background_prompt is None
    if sweeping and model.config.background_threshold is None:
        # A threshold of 0 leaves every mask as it is and makes the pass return the evidence.
        model = model.with_config(model.config.replace(background_threshold=0.0))
    results = list(model.iter_segment(list(images), labels, return_probs=True))
    summary = mean_iou([result.mask for result in results], gts, labels)
    probs = [result.probs for result in results]  # (C, H, W) each
    row: dict[str, Any] = {
        "mIoU": summary["mIoU"],
        "per_class": summary["per_class"],
        "binding": binding_accuracy(probs, gts),
    }
    if sweeping:
        evidence = [result.evidence for result in results]  # (H, W) each
        row["by_threshold"] = {
            str(thr): mean_iou(threshold_masks(probs, evidence, thr), gts, labels)["mIoU"]
            for thr in thresholds
        }
    return row


def evaluate_table(
    model: StableSeg,
    images: Sequence[np.ndarray],
    gts: Sequence[np.ndarray],
    labels: Sequence[str],
    sweep: bool = False,
) -> dict[str, Any]:
    """The demo's table: rows "without SAR" and "with SAR" (and a sweep when asked)."""
    base = model.config
    table: dict[str, Any] = {
        "settings": {
            "image_size": model.input_size,
            "cross_sizes": base.cross_sizes,
            "self_sizes": base.self_sizes,
            "background_prompt": base.background_prompt,
            "background_threshold": base.background_threshold,
        },
    }
    for name, sar in (("without SAR", False), ("with SAR", True)):
        row = evaluate_model(model.with_config(base.replace(use_sar=sar)), images, gts, labels)
        table[name] = row
    if sweep:
        sizes = sorted({layer.side for layer in model.attention_layers() if layer.kind == "cross"})
        variants = [(s,) for s in sizes] + [tuple(sizes[i : i + 2]) for i in range(len(sizes) - 1)]
        variants += [tuple(sizes)] if len(sizes) > 2 else []
        rows = {}
        for cross in variants:
            for sar in (False, True):
                for prompt in dict.fromkeys([base.background_prompt, None]):
                    config = base.replace(cross_sizes=cross, use_sar=sar, background_prompt=prompt)
                    row = evaluate_model(model.with_config(config), images, gts, labels, THRESHOLDS)
                    row.pop("per_class")
                    rows[f"cross={list(cross)} sar={sar} background_prompt={prompt}"] = row
        table["sweep"] = rows
    return table


def probe_components(
    unet: Any,
    vae: Any,
    text_encoder: Any,
    tokenizer: Any,
    config: SegmenterConfig,
    seed: int,
    count: int,
) -> dict[str, Any]:
    """Binding and mIoU on ``count`` fresh scenes, for a model still in training."""
    model = StableSeg(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)
    scenes = make_scenes(seed, 0, count, SceneConfig(size=config.image_size))
    images = [scene.image for scene in scenes]
    gts = [scene.colour_mask for scene in scenes]
    out: dict[str, Any] = {}
    for sar in (False, True):
        for prompt in dict.fromkeys([config.background_prompt, None]):
            run = config.replace(use_sar=sar, background_prompt=prompt)
            row = evaluate_model(model.with_config(run), images, gts, COLOUR_NAMES, THRESHOLDS)
            key = f"{'sar' if sar else 'ca'}{'+prompt' if prompt else ''}"
            out[key] = {
                "binding": round(row["binding"], 3),
                "mIoU": round(row["mIoU"], 1),
                **(
                    {"best_threshold": max(row["by_threshold"].items(), key=lambda kv: kv[1])}
                    if "by_threshold" in row
                    else {}
                ),
            }
    return out


@click.command()
@click.option("--model", "model_dir", default="demo/model", show_default=True)
@click.option("--scenes", "scenes_dir", default="demo/scenes", show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--sweep", is_flag=True, help="Also try other cross sizes and the threshold rule.")
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True)
def cli(model_dir: str, scenes_dir: str, device: str, sweep: bool, threads: int) -> None:
    """Print the demo model's mIoU table (JSON) on an evaluation set."""
    import torch

    from demo.scenes import read_scene_set

    torch.set_num_threads(threads)
    config = load_demo_config(model_dir)
    model = StableSeg.from_pretrained(model_dir, device=device, config=config)
    _, images, gts, labels = read_scene_set(scenes_dir)
    table = evaluate_table(model, images, gts, labels, sweep=sweep)
    table["model"], table["scenes"] = model_dir, f"{scenes_dir} ({len(images)} images)"
    click.echo(json.dumps(table, indent=2))


if __name__ == "__main__":
    cli()
