#!/usr/bin/env python
"""Memory of a real ``stableseg serve`` process for large requests (issue 18). Prints JSON.

    python bench/bench_backend_memory.py                    # this checkout, tiny model
    python bench/bench_backend_memory.py --unet-memory 64   # UNet calls of a few rows
    # the code of another commit, from a tree of it:
    git archive COMMIT | tar -x -C /tmp/before
    python bench/bench_backend_memory.py --src /tmp/before

Starts ``python cli.py serve`` of ``--src`` (gunicorn, one worker of two threads, CPU) on a
tiny random Stable Diffusion, with images read from a local folder, and sends one request at a
time:

* ``warm``: one 48x40 PNG, two labels (loads the model; the baseline);
* ``png100mp``: one 100 MP 16-bit RGBA PNG (under a megabyte on disk), two labels;
* ``labels254``: ``--tasks`` small PNGs with 254 labels of 8 tokens each (40 prompts each).

For each: the HTTP status, seconds, the peak of the serving processes' resident memory over
the baseline (sampled every 5 ms from /proc) and where it settled a second after the answer.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["cat", "dog", "person", "car", "tree", "sky", "road", "grass"]
LONG_LABELS = [" ".join(WORDS[(i + j) % 8] for j in range(7)) + f" {i}" for i in range(254)]


def _config(labels: list[str]) -> str:
    values = "".join(f'<Label value="{label}"/>' for label in labels)
    return (
        '<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
        f"{values}</BrushLabels></View>"
    )


def _rss_kb(session: int) -> int:
    """Resident memory of every process of the server's session, in kB."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getsid(int(entry.name)) != session:
                continue
            for line in (entry / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except (OSError, ProcessLookupError):
            continue
    return total


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _measure(url: str, session: int, body: dict, baseline: int) -> dict:
    peak = [_rss_kb(session)]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_kb(session))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    response = requests.post(f"{url}/predict", json=body, timeout=600)
    seconds = time.perf_counter() - started
    stop.set()
    sampler.join()
    time.sleep(1.0)
    settled = _rss_kb(session)
    out = {
        "status": response.status_code,
        "seconds": round(seconds, 2),
        "peak_over_baseline_mb": round((peak[0] - baseline) / 1024, 1),
        "after_over_baseline_mb": round((settled - baseline) / 1024, 1),
    }
    if response.status_code != 200:
        out["detail"] = response.text[:300]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=ROOT, help="tree whose cli.py serves")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--tasks", type=int, default=4, help="tasks of the labels254 case")
    parser.add_argument("--unet-memory", type=int, default=None, help="STABLESEG_UNET_MEMORY")
    parser.add_argument("--side", type=int, default=10_000, help="side of the large PNG")
    args = parser.parse_args()

    from labeler.jobs.io import image_bytes
    from labeler.jobs.models import save_diffusers_folder
    from labeler.testing import compressible_png, tiny_components

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = save_diffusers_folder(tiny_components(seed=0), work / "model")
        files = work / "files"
        files.mkdir()
        rng = np.random.default_rng(0)
        small = Image.fromarray((rng.random((40, 48, 3)) * 255).astype(np.uint8))
        (files / "a.png").write_bytes(image_bytes(small))
        (files / "big.png").write_bytes(compressible_png(args.side, args.side))
        port = _free_port()
        env = {
            **os.environ,
            "PYTHONPATH": str(args.src),
            "OMP_NUM_THREADS": "1",
            "LOCAL_FILES_DOCUMENT_ROOT": str(files),
            "STABLESEG_MAX_TASKS": str(max(32, args.tasks)),
        }
        if args.unet_memory is not None:
            env["STABLESEG_UNET_MEMORY"] = str(args.unet_memory)
        command = [sys.executable, "cli.py", "serve", "--model", str(model), "--device", "cpu"]
        command += ["--image-size", str(args.image_size), "--port", str(port)]
        command += ["--workers", "1", "--threads", "2"]
        log = (work / "serve.log").open("wb")
        server = subprocess.Popen(
            command, cwd=args.src, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 180
            while True:
                try:
                    if requests.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except requests.RequestException:
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit((work / "serve.log").read_text()[-3000:])
                time.sleep(0.5)

            def task(name: str, number: int) -> dict:
                return {"id": number, "data": {"image": f"/data/local-files/?d={name}"}}

            two = _config(["cat", "dog"])
            report: dict = {"src": str(args.src), "image_size": args.image_size, "cases": {}}
            warm = {"tasks": [task("a.png", 1)], "label_config": two}
            report["cases"]["warm"] = _measure(url, server.pid, warm, _rss_kb(server.pid))
            baseline = _rss_kb(server.pid)
            report["baseline_mb"] = round(baseline / 1024, 1)
            cases = {
                "png100mp": {"tasks": [task("big.png", 2)], "label_config": two},
                "labels254": {
                    "tasks": [task("a.png", 10 + i) for i in range(args.tasks)],
                    "label_config": _config(LONG_LABELS),
                },
            }
            for name, body in cases.items():
                report["cases"][name] = _measure(url, server.pid, body, baseline)
                print(json.dumps({name: report["cases"][name]}), file=sys.stderr)
            print(json.dumps(report, indent=1))
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
            log.close()


if __name__ == "__main__":
    main()
