#!/usr/bin/env python
"""What object storage costs the ``pseudo-label`` job, everything but the model.

The same folder of JPEGs is labelled twice by ``labeler.jobs.pseudo_label.run`` with the model
replaced by :class:`bench.stand_in.StandInSegmenter` (``device`` finishing: the host's share of a
GPU run): local folder -> local folder, then bucket -> bucket on moto's S3 server on 127.0.0.1,
in a process of its own (the same machine: this measures the client's and the job's overhead
and moto's own CPU time, which shares the cores, not a network's latency). It
prints, for each, the labelling's images/s, the exports' assembly time, the resume's listing
time (a rerun that finds every image done), and the bucket run's time per image against the
local one.

    python -m bench.bench_storage               # 200 images of 512x384, from the checkout's root
    python -m bench.bench_storage --count 1000
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click


def _run(images: Any, out: Any, workers: int) -> dict[str, float]:
    from bench.stand_in import StandInSegmenter
    from labeler.jobs.pseudo_label import PseudoLabelOptions, run
    from labeler.model_settings import SegmenterConfig

    labels = [f"label{i:02d}" for i in range(5)]
    model = StandInSegmenter(image_size=512, finish="device", prepared=True, batch_size=8)
    options = PseudoLabelOptions(
        images_dir=images,
        out_dir=out,
        labels=labels,
        segmenter=SegmenterConfig(image_size=512, batch_size=8),
        formats=("coco", "png", "labelstudio"),
        workers=workers,
    )
    started = time.monotonic()
    summary = run(options, model=model)
    first = time.monotonic() - started
    assert summary.stats is not None and summary.labelled == summary.total
    started = time.monotonic()
    again = run(options, model=model)  # every image done: the listing and the exports
    rerun = time.monotonic() - started
    assert again.labelled == 0
    return {
        "images/s": summary.total / summary.stats.seconds["label"],
        "exports s": summary.stats.seconds["exports"],
        "total s": first,
        "rerun s": rerun,
    }


@click.command()
@click.option("--count", default=200, show_default=True, help="Images in the folder.")
@click.option("--workers", default=2, show_default=True, help="Reading and writing threads.")
def main(count: int, workers: int) -> None:
    """Local folders against an S3 bucket (moto on loopback), the model stood in."""
    from bench.bench_pipeline import generate_folder

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    work = Path(tempfile.mkdtemp(prefix="bench-storage-"))
    try:
        images = generate_folder(work / "images", count, 512, 384)
        os.environ.update(
            AWS_ACCESS_KEY_ID="bench",
            AWS_SECRET_ACCESS_KEY="bench",
            AWS_DEFAULT_REGION="us-east-1",
            AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
        )
        for _ in range(300):  # the server answers within seconds
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        from labeler.jobs.storage import filesystem

        fs = filesystem("s3")
        fs.mkdir("bench-in")
        fs.mkdir("bench-out")
        fs.put(str(images) + "/", "bench-in/images/", recursive=True)
        rows = {
            "local -> local": _run(images, work / "out", workers),
            "s3 -> s3 (moto)": _run("s3://bench-in/images", "s3://bench-out/run", workers),
        }
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)
    print(f"{count} JPEGs 512x384, 5 labels, coco + png + labelstudio, {workers} workers")
    names = list(next(iter(rows.values())))
    print(f"{'':18s}" + "".join(f"{n:>12s}" for n in names))
    for name, row in rows.items():
        print(f"{name:18s}" + "".join(f"{row[n]:12.2f}" for n in names))
    local, remote = rows["local -> local"], rows["s3 -> s3 (moto)"]
    print(
        f"bucket / local time per image (labelling): {local['images/s'] / remote['images/s']:.2f}x"
    )


if __name__ == "__main__":
    main()
