#!/usr/bin/env python
"""The whole ``pseudo-label`` job with a real (random-weight) Stable Diffusion, end to end.

Saves Stable Diffusion 1.5-shaped random components (``labeler.testing.sd15_components``; or
the tiny ones with ``--tiny``) as a diffusers folder with ``save_pretrained``, generates a
folder of JPEGs, and runs the job as the CLI does (``labeler.jobs.pseudo_label.run`` loading
``--model`` from that folder). Prints one JSON: images/s of the labelling and end to end (model
loading and exports included), CPU ms per image of each stage, and the settings.

    python bench/bench_job.py --device cuda --images 512 --size 512 --batch 32
    python bench/bench_job.py --tiny --device cpu --images 16 --size 64 --image-size 64
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

LABELS = "cat,dog,person,car,tree,sky,road,grass,building,water"


def save_model(folder: Path, tiny: bool, dtype: str) -> Path:
    """Random components written in diffusers layout (``model_index.json`` and subfolders)."""
    from labeler.jobs.models import save_diffusers_folder
    from labeler.testing import sd15_components, tiny_components

    parts = tiny_components(seed=0) if tiny else sd15_components(seed=0)
    return save_diffusers_folder(parts, folder, dtype)


@click.command()
@click.option("--device", default="cuda", show_default=True)
@click.option("--dtype", type=click.Choice(["fp16", "bf16", "fp32"]), default="fp16")
@click.option("--images", "count", type=int, default=512, show_default=True)
@click.option("--size", type=int, default=512, show_default=True, help="Generated image side.")
@click.option("--image-size", type=int, default=512, show_default=True, help="Model input.")
@click.option("--batch", type=int, default=32, show_default=True)
@click.option("--workers", type=int, default=None)
@click.option("--compile", "compile_unet", is_flag=True)
@click.option("--tiny", is_flag=True, help="The tiny random model (checks the script).")
@click.option("--labels", default=LABELS, show_default=True)
def main(device, dtype, count, size, image_size, batch, workers, compile_unet, tiny, labels):
    from bench.bench_pipeline import generate_folder
    from labeler.jobs.pseudo_label import PseudoLabelOptions, run
    from labeler.model_settings import ModelSpec, SegmenterConfig

    with tempfile.TemporaryDirectory(prefix="stableseg-job-") as work:
        work = Path(work)
        started = time.monotonic()
        model_dir = save_model(work / "model", tiny, dtype)
        saved_s = time.monotonic() - started
        images = generate_folder(work / "images", count, size, size, seed=3)
        options = PseudoLabelOptions(
            images_dir=images,
            out_dir=work / "out",
            labels=labels.split(","),
            model=ModelSpec(str(model_dir), device=device, dtype=dtype, compile=compile_unet),
            segmenter=SegmenterConfig(image_size=image_size, batch_size=batch),
            formats=("coco", "png", "labelstudio"),
            workers=workers,
        )
        summary = run(options)
        stats = summary.stats
        report = {
            "model": "tiny" if tiny else "sd15-shaped random",
            "device": device,
            "dtype": dtype,
            "compile": compile_unet,
            "images": summary.labelled,
            "image_side": size,
            "model_input": image_size,
            "batch": batch,
            "labels": len(options.labels),
            "workers": stats.readers,
            "seconds_saving_model": saved_s,
            "seconds_end_to_end": summary.seconds,
            "seconds_label": stats.seconds["label"],
            "seconds_exports": stats.seconds.get("exports", 0.0),
            "images_per_s": summary.labelled / stats.seconds["label"],
            "images_per_s_end_to_end": summary.labelled / summary.seconds,
            "cpu_ms_per_image": {
                stage: round(ms, 2) for stage, ms in stats.clock.cpu_ms_per_item().items()
            },
            "peak_waiting": stats.waiting.peak,
            "peak_writing": stats.writing.peak,
        }
    click.echo(json.dumps(report))


if __name__ == "__main__":
    main()
