"""Compact digests of a ``pseudo-label`` output folder, to compare runs with a golden file.

``tests/golden/pseudo_label_demo.json`` was written by this module from the output of the
job as it was before the pipelined rewrite (main at de55641, the core of issue 13 included;
first written at 376c6f6, before that core changed the masks), run on the demo scenes::

    python cli.py pseudo-label demo/scenes/images --labels-file demo/scenes/colours.txt \\
        --model demo/model --image-size 64 --background-prompt background \\
        --format coco --format png --format labelstudio --preview --out OUT
    python -m tests.pipeline_golden OUT tests/golden/pseudo_label_demo.json

What is kept: each mask's pixels (a digest of its shape and ids, not of the PNG bytes, whose
compression level may change), each record, every COCO image and annotation and every Label
Studio task (digests of everything but the scores, and the scores themselves, compared to 2e-6:
records round them to 6 decimals), the label files, and the preview gallery page. Preview images
are represented by their sizes only: they are JPEGs, whose bytes depend on the JPEG library.
The model version is left out: it names the model folder by its absolute path.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _json_digest(value: Any) -> str:
    return _digest(json.dumps(value, sort_keys=True, ensure_ascii=False).encode())


def mask_digest(path: Path) -> str:
    """Digest of a mask PNG's mode, shape and pixel ids."""
    with Image.open(path) as image:
        mode = image.mode
        ids = np.array(image, dtype=np.uint8)  # (H, W)
    return _digest(f"{mode}{ids.shape}".encode() + ids.tobytes())


def _without_scores(value: Any) -> Any:
    """The value without its scores, and without its model version (see the module)."""
    if isinstance(value, dict):
        return {
            k: _without_scores(v) for k, v in value.items() if k not in ("score", "model_version")
        }
    if isinstance(value, list):
        return [_without_scores(v) for v in value]
    return value


def _scores(value: Any, found: list[float] | None = None) -> list[float]:
    found = [] if found is None else found
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "score":
                found.append(float(item))
            else:
                _scores(item, found)
    elif isinstance(value, list):
        for item in value:
            _scores(item, found)
    return found


def digest_run(out: Path) -> dict[str, Any]:
    """The comparable content of one ``pseudo-label`` output folder."""
    out = Path(out)
    masks = {
        path.relative_to(out / "masks").as_posix(): mask_digest(path)
        for path in sorted((out / "masks").rglob("*.png"))
    }
    records, record_scores = {}, {}
    for path in sorted((out / "records").rglob("*.json")):
        record = json.loads(path.read_text())
        key = path.relative_to(out / "records").as_posix()
        records[key] = _json_digest(_without_scores(record) | {"scores": None})
        record_scores[key] = record["scores"]
    digest: dict[str, Any] = {
        "masks": masks,
        "records": records,
        "record_scores": record_scores,
        "files": {
            name: _digest((out / name).read_bytes())
            for name in ("labelmap.txt", "classes.json", "skipped.jsonl", "preview/index.html")
            if (out / name).exists()
        },
        "previews": {},
    }
    if (out / "coco.json").exists():
        coco = json.loads((out / "coco.json").read_text())
        digest["coco"] = {
            "info": coco["info"],
            "categories": coco["categories"],
            "images": _json_digest(coco["images"]),
            "annotations": [_json_digest(_without_scores(a)) for a in coco["annotations"]],
            "scores": _scores(coco["annotations"]),
        }
    if (out / "labelstudio.json").exists():
        tasks = json.loads((out / "labelstudio.json").read_text())
        digest["labelstudio"] = {
            "tasks": [_json_digest(_without_scores(t)) for t in tasks],
            "scores": _scores(tasks),
        }
    for path in sorted((out / "preview").rglob("*.jpg")):
        with Image.open(path) as image:
            digest["previews"][path.relative_to(out / "preview").as_posix()] = list(image.size)
    return digest


def main(argv: list[str]) -> None:
    out, golden = Path(argv[0]), Path(argv[1])
    golden.write_text(json.dumps(digest_run(out), indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])


def assert_same_outputs(found: dict[str, Any], expected: dict[str, Any]) -> None:
    """Two digests (of :func:`digest_run`) describe the same outputs: everything equal, scores
    to 2e-6 (records round them to 6 decimals; the last digit may differ with the batch)."""
    for key in ("masks", "records", "files", "previews"):
        assert found[key] == expected[key], key
    assert ("coco" in found, "labelstudio" in found) == (
        "coco" in expected,
        "labelstudio" in expected,
    )
    for key in ("coco", "labelstudio"):
        if key not in expected:
            continue
        assert {k: v for k, v in found[key].items() if k != "scores"} == {
            k: v for k, v in expected[key].items() if k != "scores"
        }, key
        assert np.allclose(found[key]["scores"], expected[key]["scores"], rtol=0, atol=2e-6), key
    assert found["record_scores"].keys() == expected["record_scores"].keys()
    for name, scores in expected["record_scores"].items():
        assert scores.keys() == found["record_scores"][name].keys(), name
        got = [found["record_scores"][name][label] for label in scores]
        assert np.allclose(got, list(scores.values()), rtol=0, atol=2e-6), name
