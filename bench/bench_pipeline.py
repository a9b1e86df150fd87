#!/usr/bin/env python
"""Throughput and memory of the whole ``pseudo-label`` job, everything but the model.

The job runs as it does for a user (``labeler.jobs.pseudo_label.run``: reading threads, the
main thread, writer threads, streamed exports), on generated folders of JPEGs, with StableSeg
replaced by :class:`bench.stand_in.StandInSegmenter`: **it measures everything but the UNet
pass** (VAE, text encoder, UNet, attention recording and SAR are not run). The stand-in
resizes each image to the model input on the main thread (in the ``prepared=yes`` rows: in the
reading threads, from a reduced JPEG decode, as StableSeg does), and finishes each image with
fixed (C, 64, 64) score maps, in one of two ways (``--finish``):

* ``device``: the host's share of a GPU run: the mask is made once per image size and copied
  for each image (the finishing runs on the accelerator; the host receives a uint8 mask);
* ``cpu``: a CPU run's share: bilinear upsampling to the original size in bands, argmax, one
  bincount for the scores, for every image (about 30 ms at 512² and 1.3 s at 12 MP with 20
  labels on one core).

Every configuration runs in a fresh process, so its peak RSS (``ru_maxrss``) is its own. The
figures printed: images/s of the labelling (and end to end with the exports), CPU ms per image
of each stage (all threads), peak RSS, the largest number of images held between the reading
threads and the model, and peak RSS for 100 against 1,000 images (every format, the polygon
formats too). ``polygons`` is the objects' tracing (:mod:`exporters.polygons`), shared by the
three polygon formats; each format's own stage is its encoding.

    python bench/bench_pipeline.py --quick     # a couple of minutes on 2 cores
    python bench/bench_pipeline.py --polygons  # the polygon formats' rows and the memory runs
    python bench/bench_pipeline.py             # the full grid (about 15 minutes on 2 cores)
    python bench/bench_pipeline.py --quick --format cvat-mask --format hf   # other exports

``--engine ray`` compares the two engines on the same machine instead (``pseudo-label
--engine ray``, :mod:`labeler.jobs.ray_engine`, on a Ray started by the run's process with
``--ray-cpus`` CPUs, against the local engine; StableSeg's input preparation, 512², 20 labels,
every format, previews): the time and the CPU time of every process (the Ray workers and
daemons included) per image once the run is going (from the first image done to the last, so
Ray's start and the actors' start and model loading are left out; they are printed apart), and
the peak memory of each Ray worker process (RSS less the shared object store pages it touched)
for 100 against 1,000 images.

    python bench/bench_pipeline.py --engine ray [--quick]
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import click
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
STAGES = (
    "read",
    "model",
    "mask ids",
    "png",
    "coco",
    "labelstudio",
    "cvat-mask",
    "polygons",
    "coco-polygons",
    "yolo-seg",
    "labelstudio-polygons",
    "preview",
    "record",
    "exports",
)
POLYGON_FORMATS = ["coco-polygons", "yolo-seg", "labelstudio-polygons"]


# ---------------------------------------------------------------------------- data
def generate_folder(folder: Path, count: int, width: int, height: int, seed: int = 0) -> Path:
    """``count`` JPEGs (quality 90) of smooth colour blobs with a little texture; reused when
    the folder already holds them."""
    from PIL import Image

    done = folder / ".complete"
    if done.exists() and done.read_text() == f"{count} {width} {height} {seed}":
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tile = rng.integers(-12, 13, (256, 256, 3), dtype=np.int16)  # texture, repeated
    reps = (-(-height // 256), -(-width // 256), 1)
    texture = np.tile(tile, reps)[:height, :width]  # (H, W, 3)
    for index in range(count):
        low = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        smooth = Image.fromarray(low).resize((width, height), Image.Resampling.BICUBIC)
        pixels = np.clip(np.asarray(smooth, dtype=np.int16) + texture, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img_{index:05d}.jpg", quality=90)
    done.write_text(f"{count} {width} {height} {seed}")
    return folder


# ---------------------------------------------------------------------------- one run
def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class ProcessTree:
    """CPU time and peak memory of this process and its descendants (Ray's daemons and
    workers), sampled every 0.25 s: per process, with its title (``ray::MapWorker(...)``).

    A Ray worker maps the node's shared object store, and the store's pages it has touched
    count in its RSS: a worker's own memory is its RSS less its shared pages (what Ray's
    dashboard shows too), which is the figure kept for the workers."""

    def __init__(self) -> None:
        import psutil

        self.root = psutil.Process()
        self.last_cpu: dict[int, float] = {}  # every process seen, its latest CPU seconds
        self.cpu_at_start = self.cpu_seconds()
        self.cpu_at_start_by_pid = dict(self.last_cpu)
        self.peak_rss: dict[int, int] = {}
        self.titles: dict[int, str] = {}
        self.trace: list[tuple[float, int]] = []  # (perf_counter, largest worker's own bytes)
        self.names: dict[int, str] = {}  # every process's title, as first seen
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _processes(self) -> list[Any]:
        return [self.root, *self.root.children(recursive=True)]

    def cpu_seconds(self) -> float:
        """CPU seconds of every process seen so far (those that ended: their last reading)."""
        import psutil

        for proc in self._processes():
            try:
                times = proc.cpu_times()
            except psutil.Error:
                continue
            self.last_cpu[proc.pid] = times.user + times.system
        return sum(self.last_cpu.values())

    def _sample(self) -> None:
        import psutil

        while not self._stop.wait(0.25):
            self.cpu_seconds()
            largest = 0
            for proc in self._processes():
                try:
                    memory = proc.memory_info()
                    title = " ".join(proc.cmdline()[:1])
                except psutil.Error:
                    continue
                own = memory.rss - memory.shared
                self.peak_rss[proc.pid] = max(self.peak_rss.get(proc.pid, 0), own)
                if title.startswith("ray::") and "IDLE" not in title:
                    self.titles[proc.pid] = title
                self.names.setdefault(proc.pid, title.rsplit("/", 1)[-1][:60])
                if proc.pid in self.titles:
                    largest = max(largest, own)
            self.trace.append((time.perf_counter(), largest))

    def stop(self) -> float:
        """Stop sampling; the CPU seconds every process spent since the start."""
        self._stop.set()
        self._thread.join()
        return self.cpu_seconds() - self.cpu_at_start

    def cpu_by_process(self) -> dict[str, float]:
        """CPU seconds each process spent since the start, by title, the most first."""
        spent: dict[str, float] = {}
        for pid, cpu in self.last_cpu.items():
            name = self.titles.get(pid) or self.names.get(pid, "?")
            spent[name] = spent.get(name, 0.0) + cpu - self.cpu_at_start_by_pid.get(pid, 0.0)
        return dict(sorted(((k, round(v, 2)) for k, v in spent.items()), key=lambda kv: -kv[1]))

    def workers_mb(self) -> dict[str, float]:
        """Peak RSS less shared pages (MB) of each Ray worker that ran a task or an actor."""
        return {
            f"{self.titles[pid]} [{pid}]": round(self.peak_rss[pid] / 2**20)
            for pid in sorted(self.titles)
            if pid in self.peak_rss
        }


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """Run the job once in this process; ``spec`` names the folder and the settings."""
    import functools
    import shutil

    from bench.stand_in import StandInSegmenter
    from labeler.jobs.io import list_images
    from labeler.jobs.pseudo_label import PseudoLabelOptions, run
    from labeler.model_settings import SegmenterConfig

    images_dir, out_dir = Path(spec["images"]), Path(spec["out"])
    shutil.rmtree(out_dir, ignore_errors=True)
    labels = [f"label{i:03d}" for i in range(spec["labels"])]
    engine = spec.get("engine", "local")
    make_model = functools.partial(
        StandInSegmenter,
        image_size=spec["image_size"],
        finish=spec["finish"],
        prepared=spec["prepared"],
        batch_size=spec["batch"],
    )
    model = make_model()
    first = images_dir / list_images(images_dir)[0]
    from PIL import Image

    with Image.open(first) as image:  # warm the stand-in's per-size cache (device finishing)
        width, height = image.size
    if spec["finish"] == "device":
        model._finish(len(labels), width, height)
    options = PseudoLabelOptions(
        images_dir=images_dir,
        out_dir=out_dir,
        labels=labels,
        segmenter=SegmenterConfig(image_size=spec["image_size"], batch_size=spec["batch"]),
        formats=tuple(spec["formats"]),
        preview=spec["preview"],
        workers=spec["workers"],
        engine=engine,
        ray_actor_cpus=spec.get("ray_actor_cpus", 1.0),
    )
    ray_start = 0.0
    if engine == "ray":  # started here, outside the measured run
        import ray

        started = time.perf_counter()
        ray.init(num_cpus=spec["ray_cpus"], include_dashboard=False, log_to_driver=False)
        ray_start = time.perf_counter() - started
    tree = ProcessTree()
    done_at: list[float] = []  # perf_counter of each image done
    steady_cpu: list[float] = []  # CPU seconds of every process at the first and last image
    count = len(list_images(images_dir))

    class Progress:
        def update(self, n: int) -> None:
            for _ in range(n):
                done_at.append(time.perf_counter())
                if len(done_at) in (1, count):
                    steady_cpu.append(tree.cpu_seconds())

        def close(self) -> None:
            pass

    baseline = _rss_bytes()
    trace: list[tuple[int, float]] = []  # (images done, RSS MB), sampled every 0.25 s
    stop = threading.Event()

    def sample() -> None:
        records = out_dir / "records"
        while not stop.wait(0.25):
            done = sum(1 for _ in records.glob("*.json")) if records.exists() else 0
            trace.append((done, _rss_bytes() / 2**20))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    cpu_started = time.process_time()
    run_started = time.perf_counter()
    summary = run(
        options,
        progress=lambda total, initial: Progress(),
        model=make_model if engine == "ray" else model,
    )
    cpu = time.process_time() - cpu_started
    every_cpu = tree.stop()
    stop.set()
    sampler.join()
    if engine == "ray":
        ray.shutdown()
    # Once going: from the first image done to the last. The Ray engine hands images back a
    # chunk at a time: those of the first chunk, done together, are not counted.
    first = sum(1 for at in done_at if at - done_at[0] < 0.05)
    steady_ms = 1000 * (done_at[-1] - done_at[0]) / max(1, len(done_at) - first)
    steady_cpu_ms = 1000 * (steady_cpu[-1] - steady_cpu[0]) / max(1, len(done_at) - first)
    stats = summary.stats
    assert stats is not None
    label_s = stats.seconds["label"]
    result = {
        **{k: v for k, v in spec.items() if k not in ("images", "out")},
        "images_labelled": summary.labelled,
        "images_per_s": summary.labelled / label_s,
        "images_per_s_with_exports": summary.labelled / summary.seconds,
        "seconds_label": label_s,
        "seconds_exports": stats.seconds.get("exports", 0.0),
        "cpu_ms_per_image_total": 1000 * cpu / max(1, summary.labelled),
        "cpu_ms_per_image": {
            stage: round(ms, 2) for stage, ms in stats.clock.cpu_ms_per_item().items()
        },
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_run_mb": baseline / 2**20,
        "peak_waiting": stats.waiting.peak,
        "peak_writing": stats.writing.peak,
        "workers": stats.readers,
        "load_average_1min": os.getloadavg()[0],  # this run's threads count in it too
        "rss_trace_mb": [(n, round(mb)) for n, mb in trace],
        "engine": engine,
        "ray_start_s": ray_start,
        "first_image_s": (done_at[0] - run_started) if done_at else 0.0,
        "steady_ms_per_image": steady_ms,
        "steady_cpu_ms_per_image": steady_cpu_ms,
        "cpu_ms_per_image_every_process": 1000 * every_cpu / max(1, summary.labelled),
        "ray_worker_peak_rss_mb": tree.workers_mb(),
        "cpu_s_by_process": tree.cpu_by_process(),
        # the largest Ray worker's own memory (MB) while the first 100 images were done, and
        # while the images from the 500th on were
        "ray_worker_mb_first_100_vs_from_500": [
            round(
                max((b for t, b in tree.trace if len(done_at) > 99 and t <= done_at[99]), default=0)
                / 2**20
            ),
            round(
                max(
                    (b for t, b in tree.trace if len(done_at) > 499 and t >= done_at[499]),
                    default=0,
                )
                / 2**20
            ),
        ],
    }
    shutil.rmtree(out_dir, ignore_errors=True)
    return result


def run_in_subprocess(spec: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--one", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"run {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- the grid
def _line(result: dict[str, Any]) -> str:
    stages = result["cpu_ms_per_image"]
    shown = " ".join(f"{s}={stages[s]:.1f}" for s in STAGES if s in stages)
    return (
        f"{result['size']:>9} {result['labels']:>3} lbl"
        f" preview={'on ' if result['preview'] else 'off'}"
        f" finish={result['finish']:<6} prepared={'yes' if result['prepared'] else 'no '}"
        f" {'+'.join(f for f in result['formats'] if f != 'png')}"
        f" n={result['images_labelled']:<4} {result['images_per_s']:7.1f} img/s"
        f" ({result['images_per_s_with_exports']:6.1f} with exports)"
        f" cpu {result['cpu_ms_per_image_total']:7.1f} ms/img"
        f" rss {result['peak_rss_mb']:6.0f} MB load {result['load_average_1min']:.1f} | {shown}"
    )


def _engine_line(result: dict[str, Any]) -> str:
    workers = result["ray_worker_peak_rss_mb"]
    largest = max(workers.values(), default=0)
    return (
        f"{result['engine']:>5} n={result['images_labelled']:<5}"
        f" steady {result['steady_ms_per_image']:6.1f} ms/img"
        f" ({result['images_labelled'] / result['seconds_label']:5.1f} img/s overall,"
        f" first image after {result['first_image_s']:4.1f} s, Ray start"
        f" {result['ray_start_s']:4.1f} s)"
        f" cpu {result['steady_cpu_ms_per_image']:6.1f} ms/img steady,"
        f" {result['cpu_ms_per_image_every_process']:6.1f} overall (every process)"
        f" driver rss {result['peak_rss_mb']:5.0f} MB, largest Ray worker {largest} MB"
        f" load {result['load_average_1min']:.1f}"
    )


def compare_engines(data: Path, quick: bool, workers: int | None, batch: int, cpus: int) -> None:
    """The local engine against the Ray engine on the same folder, then the Ray workers' peak
    RSS for 100 against 1,000 images (see the module)."""
    count = 100 if quick else 300
    folder = generate_folder(data / f"jpeg512x{count}", count, 512, 512)

    def spec(images: Path, engine: str) -> dict[str, Any]:
        return {
            "images": str(images),
            "out": str(data / "out"),
            "size": "512x512",
            "labels": 20,
            "formats": ["coco", "png", "labelstudio"],
            "preview": True,
            "finish": "device",
            "prepared": True,
            "image_size": 512,
            "batch": batch,
            "workers": workers,
            "engine": engine,
            "ray_cpus": cpus,
            "ray_actor_cpus": 0.0,  # the stand-in's model work is a GPU run's host share
        }

    report: dict[str, Any] = {"cpus": len(os.sched_getaffinity(0)), "runs": [], "memory": {}}
    for engine in ("local", "ray"):
        result = run_in_subprocess(spec(folder, engine))
        report["runs"].append(result)
        click.echo(_engine_line(result), err=True)
    local, ray = report["runs"]
    click.echo(
        f"ray / local: steady time per image x"
        f"{ray['steady_ms_per_image'] / local['steady_ms_per_image']:.2f}, CPU per image x"
        f"{ray['steady_cpu_ms_per_image'] / local['steady_cpu_ms_per_image']:.2f}"
        f" ({count} JPEGs 512x512, 20 labels, every format, previews, batch {batch}, "
        f"Ray with {cpus} CPUs)",
        err=True,
    )
    for size in (100, 1000):
        images = generate_folder(data / f"jpeg512x{size}", size, 512, 512, seed=2)
        result = run_in_subprocess(spec(images, "ray"))
        report["memory"][str(size)] = result
        click.echo(_engine_line(result), err=True)
        for name, mb in result["ray_worker_peak_rss_mb"].items():
            click.echo(f"    {mb:5.0f} MB  {name}", err=True)
    small = max(report["memory"]["100"]["ray_worker_peak_rss_mb"].values())
    large = max(report["memory"]["1000"]["ray_worker_peak_rss_mb"].values())
    early, late = report["memory"]["1000"]["ray_worker_mb_first_100_vs_from_500"]
    click.echo(
        f"within the 1000-image run, the largest Ray worker holds {early} MB over the first "
        f"100 images and {late} MB from the 500th on",
        err=True,
    )
    click.echo(
        f"largest Ray worker peak RSS (less shared pages): 100 images {small:.0f} MB, "
        f"1000 images {large:.0f} MB "
        f"(x{large / small:.3f}); driver {report['memory']['100']['peak_rss_mb']:.0f} MB and "
        f"{report['memory']['1000']['peak_rss_mb']:.0f} MB",
        err=True,
    )
    click.echo(json.dumps(report, indent=1))


@click.command()
@click.option("--quick", is_flag=True, help="A small grid: a couple of minutes on 2 cores.")
@click.option(
    "--data",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("/tmp/stableseg-bench"),
    show_default=True,
    help="Where the generated folders are kept (reused between runs) and outputs written.",
)
@click.option("--workers", type=int, default=None, help="[default: the job's default]")
@click.option("--batch", type=int, default=8, show_default=True, help="Images per model call.")
@click.option(
    "--format",
    "formats",
    multiple=True,
    default=("coco", "png", "labelstudio"),
    show_default=True,
    help="The exports every run writes (repeatable), as pseudo-label's --format.",
)
@click.option(
    "--polygons",
    "polygons_only",
    is_flag=True,
    help="Only the polygon formats' rows (512² and 12 MP, 20 labels) and the memory runs.",
)
@click.option(
    "--engine",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="local: the grid of the local engine; ray: the Ray engine against the local one.",
)
@click.option("--ray-cpus", type=int, default=2, show_default=True, help="CPUs of the Ray started.")
@click.option("--one", "one", default=None, hidden=True)
def main(
    quick: bool,
    data: Path,
    workers: int | None,
    batch: int,
    formats: tuple[str, ...],
    polygons_only: bool,
    engine: str,
    ray_cpus: int,
    one: str | None,
) -> None:
    if one is not None:
        click.echo(json.dumps(run_one(json.loads(one))))
        return
    if engine == "ray":
        compare_engines(data, quick, workers, batch, ray_cpus)
        return
    formats = list(dict.fromkeys((*formats, "png")))
    quick = quick or polygons_only
    small_n, big_n = (60, 6) if quick else (300, 24)
    label_counts = (20,) if quick else (5, 20, 150)
    small = generate_folder(data / f"jpeg512x{small_n}", small_n, 512, 512)
    big = generate_folder(data / f"jpeg12mp_x{big_n}", big_n, 4000, 3000, seed=1)

    def spec(folder: Path, size: str, labels: int, preview: bool, **extra: Any) -> dict:
        return {
            "images": str(folder),
            "out": str(data / "out"),
            "size": size,
            "labels": labels,
            "formats": formats,
            "preview": preview,
            "finish": "device",
            "prepared": False,
            "image_size": 512,
            "batch": batch,
            "workers": workers,
            **extra,
        }

    every_format = list(dict.fromkeys([*formats, *POLYGON_FORMATS]))
    specs = []
    if not polygons_only:
        for labels in label_counts:
            for preview in (False, True):
                specs.append(spec(small, "512x512", labels, preview))
        for labels in label_counts:
            for preview in (False, True) if not quick else (True,):
                specs.append(spec(big, "4000x3000", labels, preview))
        specs.append(spec(big, "4000x3000", 20, True, prepared=True))
        specs.append(spec(small, "512x512", 20, True, finish="cpu"))
        if not quick:
            specs.append(spec(big, "4000x3000", 20, True, finish="cpu"))
    specs.append(spec(small, "512x512", 20, False, formats=["png", *POLYGON_FORMATS]))
    specs.append(spec(big, "4000x3000", 20, False, formats=["png", *POLYGON_FORMATS]))

    report: dict[str, Any] = {"cpus": len(os.sched_getaffinity(0)), "runs": [], "memory": {}}
    for item in specs:
        result = run_in_subprocess(item)
        report["runs"].append(result)
        click.echo(_line(result), err=True)

    memory_side = 512
    for count in (100, 1000):
        folder = generate_folder(
            data / f"jpeg{memory_side}x{count}", count, memory_side, memory_side, seed=2
        )
        size = f"{memory_side}x{memory_side}"
        result = run_in_subprocess(spec(folder, size, 20, True, formats=every_format))
        report["memory"][str(count)] = result
        click.echo(_line(result), err=True)
    small_rss = report["memory"]["100"]["peak_rss_mb"]
    large_rss = report["memory"]["1000"]["peak_rss_mb"]
    report["memory"]["peak_rss_1000_over_100"] = large_rss / small_rss
    trace = report["memory"]["1000"]["rss_trace_mb"]
    early = max((mb for n, mb in trace if n <= 100), default=0)
    late = max((mb for n, mb in trace if n >= 500), default=0)
    report["memory"]["rss_1000_run_first_100_vs_last_500_mb"] = [early, late]
    click.echo(
        f"peak RSS: 100 images {small_rss:.0f} MB, 1000 images {large_rss:.0f} MB "
        f"(x{large_rss / small_rss:.3f}) at {memory_side}x{memory_side}, 20 labels, "
        f"every format, previews; within the 1000-image run, sampled RSS peaks at {early} MB "
        f"over its first 100 images and {late} MB over its last 500",
        err=True,
    )
    click.echo(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
