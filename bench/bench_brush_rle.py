#!/usr/bin/env python
"""Label Studio brush RLE: our numpy encoder against ``label_studio_converter.brush.mask2rle``.

Prints JSON: milliseconds per label (one binary mask) of the reference, as the exporter called
it before (mask as 0/255, ``mask2rle``, a list of ints), and of ``mask_to_brush_rle`` (the same
list, from ``exporters.brush_rle``), at 512x512 and at 12 MP (4000x3000), for several masks:

* ``blob``: one ellipse, a few runs a row, like a real segment;
* ``label map``: each label of a 20-label map upsampled from 64x64 (the mean over its labels);
  also timed from the map itself (``encode_brush_rles``: the map's runs found once, as
  ``brush_results`` does), the comparison of the map with each label included;
* ``noise 50%``: random pixels, the worst case (a run every two pixels);
* ``empty``: no pixel.

Every case also checks that both encoders give the same bytes. Timings are the process's CPU
time (one thread: numpy runs these on one core), so that other work on a shared machine counts
little; medians of the repeats that fit a time budget per encoder and case (at least one run; the
reference takes about 20 s on 12 MP noise). The whole run takes about a minute on 2 cores.

    python bench/bench_brush_rle.py
    python bench/bench_brush_rle.py --sizes 512x512 --budget 0.5
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import click
import numpy as np

from exporters.brush_rle import brush_rle_bytes, encode_brush_rles
from exporters.labelstudio import mask_to_brush_rle

_MAP_LABELS = 20
_MAP_GRID = 64


def reference(binary: np.ndarray) -> list[int]:
    """The exporter's former path: 0/255 alpha through label_studio_converter."""
    from label_studio_converter import brush

    alpha = binary.astype(np.uint8) * np.uint8(255)  # (H, W)
    return [int(v) for v in brush.mask2rle(alpha)]


def masks(
    kind: str, height: int, width: int, rng: np.random.Generator
) -> tuple[list[np.ndarray], np.ndarray | None]:
    """The (H, W) bool masks of one case, one per label; and the (H, W) id map of a label map."""
    if kind == "blob":
        rows, cols = np.ogrid[:height, :width]
        ellipse = ((rows - 0.45 * height) / (0.3 * height)) ** 2 + (
            (cols - 0.55 * width) / (0.3 * width)
        ) ** 2
        return [ellipse < 1], None
    if kind == "label map":
        grid = rng.integers(1, _MAP_LABELS + 1, (_MAP_GRID, _MAP_GRID))  # (64, 64) ids
        rows = np.arange(height) * _MAP_GRID // height  # nearest upsampling
        cols = np.arange(width) * _MAP_GRID // width
        label_map = grid[rows[:, None], cols[None, :]]  # (H, W)
        return [label_map == k for k in np.unique(label_map)], label_map  # the labels present
    if kind == "noise 50%":
        return [rng.random((height, width)) < 0.5], None
    if kind == "empty":
        return [np.zeros((height, width), dtype=bool)], None
    raise KeyError(f"unknown mask kind {kind!r}; valid: blob, label map, noise 50%, empty")


def time_per_label(
    encode: Callable[[np.ndarray], Any], labels: list[np.ndarray], budget: float
) -> tuple[float, int, list[Any]]:
    """Median CPU ms per label over repeats within ``budget`` CPU seconds (at least one), the
    number of repeats, and the first repeat's outputs."""
    runs = []
    first: list[Any] = []
    spent = 0.0
    while not runs or spent < budget:
        start = time.process_time()
        outputs = [encode(binary) for binary in labels]
        elapsed = time.process_time() - start
        first = first or outputs
        runs.append(elapsed / len(labels))
        spent += elapsed
    return 1e3 * statistics.median(runs), len(runs), first


@click.command()
@click.option(
    "--sizes",
    default="512x512,4000x3000",
    show_default=True,
    help="Comma-separated WIDTHxHEIGHT image sizes.",
)
@click.option(
    "--kinds",
    default="blob,label map,noise 50%,empty",
    show_default=True,
    help="Comma-separated masks: blob, label map, noise 50%, empty.",
)
@click.option(
    "--budget",
    default=1.0,
    show_default=True,
    type=click.FloatRange(min=0.0),
    help="Seconds of repeats per encoder and case (at least one run each).",
)
@click.option("--seed", default=0, show_default=True, help="Seed of the random masks.")
def main(sizes: str, kinds: str, budget: float, seed: int) -> None:
    """Time both encoders on each size and mask; print JSON."""
    began = time.perf_counter()
    rng = np.random.default_rng(seed)
    warm = np.eye(8, dtype=bool)
    reference(warm), mask_to_brush_rle(warm)  # warm up: imports label_studio_converter
    cases = []
    for size in sizes.split(","):
        try:
            width, height = (int(v) for v in size.lower().split("x"))
        except ValueError as error:
            raise click.BadParameter(
                f"size {size!r} is not WIDTHxHEIGHT", param_hint="--sizes"
            ) from error
        for kind in kinds.split(","):
            labels, label_map = masks(kind.strip(), height, width, rng)
            ours_ms, ours_repeats, ours = time_per_label(mask_to_brush_rle, labels, budget)
            bytes_ms, _, _ = time_per_label(brush_rle_bytes, labels, budget)
            reference_ms, reference_repeats, expected = time_per_label(reference, labels, budget)
            case: dict[str, Any] = {
                "size": f"{width}x{height}",
                "mask": kind.strip(),
                "labels": len(labels),
                "runs_per_label": round(
                    float(np.mean([np.count_nonzero(np.diff(b.ravel())) + 1 for b in labels]))
                ),
                "rle_bytes_per_label": round(
                    float(np.mean([brush_rle_bytes(b).size for b in labels]))
                ),
                "reference_ms": round(reference_ms, 2),
                "ours_ms": round(ours_ms, 2),
                "ours_bytes_only_ms": round(bytes_ms, 2),
                "speedup": round(reference_ms / ours_ms, 1),
                "identical": ours == expected,
                "repeats": {"reference": reference_repeats, "ours": ours_repeats},
            }
            if label_map is not None:
                ids = np.unique(label_map).tolist()
                map_ms, _, by_label = time_per_label(
                    partial(encode_brush_rles, label_ids=ids), [label_map], budget
                )
                case["ours_from_label_map_ms"] = round(map_ms / len(ids), 2)
                case["speedup_from_label_map"] = round(reference_ms * len(ids) / map_ms, 1)
                case["identical"] = case["identical"] and list(by_label[0].values()) == expected
            cases.append(case)
    report = {
        "benchmark": "brush RLE encoding, CPU ms per label (one binary mask)",
        "reference": "label_studio_converter.brush.mask2rle, mask as 0/255, list of ints",
        "ours": "exporters.labelstudio.mask_to_brush_rle (list of ints)",
        "ours_bytes_only": "exporters.brush_rle.brush_rle_bytes (uint8 array, no list)",
        "ours_from_label_map": "exporters.brush_rle.encode_brush_rles on the id map, per label",
        "numpy": np.__version__,
        "python": platform.python_version(),
        "cases": cases,
        "wall_seconds": round(time.perf_counter() - began, 1),
    }
    click.echo(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
