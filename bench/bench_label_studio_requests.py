"""How long the requests of ``stableseg label-studio predict`` take against a real Label Studio,
as the project grows: a listing page, an upload of a batch of predictions, and the check that
runs before a batch is sent again. Prints JSON.

    python bench/bench_label_studio_requests.py [--sizes 100,5000] [--batch 16] [--side 512]

Starts Label Studio from its own environment (tests/labelstudio_server.py; about 30 s), makes a
project of each size (tasks imported in one request, no files needed), and times each request
``--repeats`` times with the label-studio-sdk client the command uses. The predictions are real
brush results of a ``--side`` x ``--side`` mask with four labels.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from exporters import brush_prediction


def _load_labelstudio_server():
    """The tests' ``labelstudio_server`` module, from this checkout's file: imported as
    ``tests.labelstudio_server`` it would be looked up in the top-level ``tests`` package that
    label-studio-converter installs into site-packages, which shadows ours."""
    path = Path(__file__).resolve().parent.parent / "tests" / "labelstudio_server.py"
    spec = importlib.util.spec_from_file_location("stableseg_labelstudio_server", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while defined
    spec.loader.exec_module(module)
    return module


lss = _load_labelstudio_server()  # the tests' Label Studio

LABELS = ["red", "green", "blue", "yellow"]
CONFIG = (
    '<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
    + "".join(f'<Label value="{label}"/>' for label in LABELS)
    + "</BrushLabels></View>"
)


def _prediction(side: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    mask = np.zeros((side, side), np.uint8)  # (H, W) four blobs of labels on background
    for label in range(1, 5):
        y, x = rng.integers(0, side - side // 4, size=2)
        mask[y : y + side // 4, x : x + side // 4] = label
    scores = {name: 0.5 + 0.1 * k for k, name in enumerate(LABELS)}
    return brush_prediction(mask, LABELS, scores, "bench-v1")


def _timed(call, repeats: int) -> dict:
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - started)
    return {"median_s": round(statistics.median(seconds), 4), "max_s": round(max(seconds), 4)}


def _time_project(
    server: lss.LabelStudio, client, size: int, predictions: list[dict], repeats: int
) -> dict:
    """Make a project of ``size`` tasks and time the command's three requests on it."""
    batch_size = len(predictions)
    project = server.post("/api/projects", json={"title": f"bench {size}", "label_config": CONFIG})
    tasks = [{"image": f"/data/local-files/?d=imgs/{i}.png"} for i in range(size)]
    server.post(f"/api/projects/{project['id']}/import", json=tasks, timeout=600)
    ids = [t.id for t in client.tasks.list(project=project["id"], page_size=size, include="id")]
    rounds = iter(range(10**6))

    def upload() -> None:  # each round on other tasks, as a run goes
        start = next(rounds) * batch_size % max(size - batch_size, 1)
        batch = [{"task": ids[start + i], **p} for i, p in enumerate(predictions)]
        client.projects.import_predictions(id=project["id"], request=batch)

    def page() -> None:
        client.tasks.list(
            project=project["id"],
            page=(size + 99) // 100,  # the last page
            page_size=100,
            include="id,data,predictions_model_versions",
            resolve_uri=False,
            query=json.dumps({"ordering": ["tasks:id"]}),
        )

    def stored() -> None:
        query = json.dumps({"selectedItems": {"all": False, "included": ids[:batch_size]}})
        client.tasks.list(
            project=project["id"],
            page_size=batch_size,
            include="id,predictions_model_versions",
            query=query,
        )

    return {
        "tasks": size,
        "upload": {**_timed(upload, repeats), "body_bytes": len(json.dumps(predictions))},
        "list_page_of_100": _timed(page, repeats),
        "stored_check": _timed(stored, repeats),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,5000")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from label_studio_sdk import LabelStudio

    out: dict = {"batch": args.batch, "side": args.side, "projects": []}
    with (
        tempfile.TemporaryDirectory() as tmp,
        lss.label_studio(Path(tmp) / "data", Path(tmp) / "files") as server,
    ):
        client = LabelStudio(base_url=server.url, api_key=server.personal_token, timeout=300)
        predictions = [_prediction(args.side, seed) for seed in range(args.batch)]
        for size in (int(s) for s in args.sizes.split(",")):
            out["projects"].append(_time_project(server, client, size, predictions, args.repeats))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
