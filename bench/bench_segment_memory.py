#!/usr/bin/env python
"""Peak host memory of one ``segment()`` call on a CPU, by image size and label count.

Each case runs in a fresh subprocess: the model is built and warmed up (one call on a 1x1
image with the same labels), the kernel's peak-RSS mark is reset (``/proc/self/clear_refs``),
then one ``segment()`` call runs on the case's image and the growth of the peak over the RSS
before the call is reported (``VmHWM``; where the mark cannot be reset, a 2 ms sampling thread).
A 1x1 image with the same labels is the baseline: what the model's own pass costs at
``--image-size``; the difference is what the image's size adds (upsampling, mask, scores).

    python bench/bench_segment_memory.py            # SD-1.5-sized random weights, 512 px
    python bench/bench_segment_memory.py --model tiny --image-size 128      # fast: tiny model
    # the code of another commit, from a tree of it:
    git archive COMMIT | tar -x -C /tmp/before
    python bench/bench_segment_memory.py --src /tmp/before --limit-gb 8

Prints one JSON line per case and a summary JSON at the end. ``--limit-gb`` caps each
subprocess's address space, so a case that would need more memory fails instead of exhausting
the machine.
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

import click

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"12MP": (3000, 4000), "1x1": (1, 1)}


def label_names(count: int) -> list[str]:
    """``count`` distinct label names from the test vocabulary: single words, then pairs."""
    from labeler.testing import DEFAULT_WORDS

    words = [w for w in DEFAULT_WORDS if w not in {"a", "of", "the", "and", "background"}]
    names = list(words)
    names += [f"{a} {b}" for a in words for b in words if a != b]
    if count > len(names):
        raise click.BadParameter(f"at most {len(names)} labels, got {count}")
    return names[:count]


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def run_case(
    model_kind: str, image_size: int, size: tuple[int, int], labels: int, limit_gb: float | None
) -> dict:
    """One case, in this process (the subprocess side)."""
    import numpy as np
    import torch

    from labeler import SegmenterConfig, StableSeg
    from labeler.testing import sd15_components, tiny_components

    torch.manual_seed(0)
    parts = sd15_components() if model_kind == "sd15" else tiny_components()
    model = StableSeg(**parts, config=SegmenterConfig(image_size=image_size, batch_size=1))
    names = label_names(labels)
    rng = np.random.default_rng(0)
    image = (rng.random((*size, 3)) * 255).astype(np.uint8)
    model.segment(np.zeros((1, 1, 3), np.uint8), names)  # warm-up: weights touched, prompts cached
    _limit_address_space(limit_gb)  # room for the measured call only

    rss_before = _status_kb("VmRSS")
    exact = _reset_peak()
    peak = [rss_before]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _status_kb("VmRSS"))
            time.sleep(0.002)

    sampler = None
    if not exact:
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
    start = time.perf_counter()
    try:
        result = model.segment(image, names)[0]
        error = None
    except (MemoryError, RuntimeError) as err:  # an address-space limit hit
        result, error = None, f"{type(err).__name__}: {str(err)[:200]}"
    seconds = time.perf_counter() - start
    if sampler is not None:
        stop.set()
        sampler.join()
    peak_kb = _status_kb("VmHWM") if exact else peak[0]
    out = {
        "model": model_kind,
        "image_size": image_size,
        "image": f"{size[1]}x{size[0]}",
        "labels": labels,
        "prompts": model.encode_prompts(model.prompt_labels(names))[0].num_prompts,
        "peak_rss_growth_mb": round((peak_kb - rss_before) / 1024, 1),
        "seconds": round(seconds, 2),
        "peak_method": "VmHWM after clear_refs" if exact else "sampled VmRSS",
        "threads": torch.get_num_threads(),
        "code": str(Path(StableSeg.__module__ and sys.modules[StableSeg.__module__].__file__)),
    }
    if error is not None:
        out["error"] = error
    elif result.probs is not None:
        out["note"] = "this code returns probs by default"
    return out


def _limit_address_space(limit_gb: float | None) -> None:
    if limit_gb:
        extra = int(limit_gb * 2**30)
        current = _status_kb("VmSize") * 1024
        resource.setrlimit(resource.RLIMIT_AS, (current + extra, current + extra))


@click.command()
@click.option("--model", "model_kind", type=click.Choice(["sd15", "tiny"]), default="sd15")
@click.option("--image-size", type=int, default=512, show_default=True)
@click.option("--labels", "label_counts", default="5,20,150", show_default=True)
@click.option("--sizes", default="1x1,12MP", show_default=True, help="Comma list of 1x1, 12MP.")
@click.option("--src", type=click.Path(exists=True, file_okay=False), default=str(ROOT))
@click.option(
    "--limit-gb", type=float, default=None, help="Address-space growth cap of the measured call."
)
@click.option("--case", hidden=True, default=None)
def main(model_kind, image_size, label_counts, sizes, src, limit_gb, case) -> None:
    if case is not None:  # the subprocess side
        size_name, labels = case.split(":")
        row = run_case(model_kind, image_size, SIZES[size_name], int(labels), limit_gb)
        click.echo(json.dumps(row))
        return
    env = {**os.environ, "PYTHONPATH": src}
    rows = []
    for labels in (int(n) for n in label_counts.split(",")):
        for size_name in sizes.split(","):
            command = [
                sys.executable,
                __file__,
                "--model",
                model_kind,
                "--image-size",
                str(image_size),
                "--src",
                src,
                "--case",
                f"{size_name}:{labels}",
            ]
            if limit_gb:
                command += ["--limit-gb", str(limit_gb)]
            done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            if done.returncode or not lines:
                row = {"image": size_name, "labels": labels, "error": done.stderr[-500:]}
            else:
                row = json.loads(lines[-1])
            row["src"] = src
            rows.append(row)
            click.echo(json.dumps(row), err=True)
    summary = []
    for labels in {row["labels"] for row in rows}:
        by_size = {row["image"]: row for row in rows if row["labels"] == labels}
        big, small = by_size.get("4000x3000"), by_size.get("1x1")
        if big and small and "peak_rss_growth_mb" in big and "peak_rss_growth_mb" in small:
            summary.append(
                {
                    "labels": labels,
                    "12MP_peak_rss_growth_mb": big["peak_rss_growth_mb"],
                    "1x1_peak_rss_growth_mb (model pass)": small["peak_rss_growth_mb"],
                    "12MP_minus_1x1_mb": round(
                        big["peak_rss_growth_mb"] - small["peak_rss_growth_mb"], 1
                    ),
                    "12MP_seconds": big["seconds"],
                }
            )
    click.echo(json.dumps({"src": src, "runs": rows, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
