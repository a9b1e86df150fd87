#!/usr/bin/env python
"""Large requests on a GPU (issue 18): a real CUDA out-of-memory answered 503 with the model
serving on, and the memory of 254 long labels with UNet calls bounded or not. Prints JSON.

    python bench/gpu_large_requests.py                 # on a CUDA machine (bench/gpu_check.sh)
    python bench/gpu_large_requests.py --smoke         # on a CPU: the tiny model; the
                                                       # out-of-memory error is raised, not real

``oom``: the backend app (in-process, Flask's test client) on the tiny model; one prediction
loads it; the GPU's memory is then filled until an allocation fails, the next prediction must
answer 503 with ``Retry-After``; the filler is freed and the one after must answer 200.

``labels254``: one 4000x3000 image, 254 labels of 8 tokens each, SD-1.5-shaped random weights
at 512 px in fp16; the peak CUDA memory of ``segment`` with the UNet calls bounded to
``--unet-memory`` MiB and with one call for every row, and whether the masks agree.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

WORDS = ["cat", "dog", "person", "car", "tree", "sky", "road", "grass"]
LONG_LABELS = [" ".join(WORDS[(i + j) % 8] for j in range(7)) + f" {i}" for i in range(254)]
CONFIG = (
    '<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
    '<Label value="cat"/><Label value="dog"/></BrushLabels></View>'
)


def oom_check(device: str, smoke: bool) -> dict:
    """503 with Retry-After on a real CUDA out-of-memory error, then 200."""
    from PIL import Image

    from labeler import SegmenterConfig, StableSeg
    from labeler.jobs.models import save_diffusers_folder
    from labeler.model_settings import ModelSettings, ModelSpec
    from labeler.testing import tiny_components
    from ml_backend.backend_settings import BackendSettings
    from ml_backend.server import create_app

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = save_diffusers_folder(tiny_components(seed=0), root / "model")
        Image.new("RGB", (48, 40), (120, 30, 200)).save(root / "a.png")
        settings = BackendSettings(
            stableseg=ModelSettings(
                ModelSpec(str(model), device=device), SegmenterConfig(image_size=64)
            ),
            local_files_document_root=str(root),
        )
        client = create_app(settings).test_client()
        body = {
            "tasks": [{"id": 1, "data": {"image": "/data/local-files/?d=a.png"}}],
            "label_config": CONFIG,
        }
        out: dict = {"warm": client.post("/predict", json=body).status_code}
        filler: list[torch.Tensor] = []
        original = StableSeg.segment_pending
        if smoke:

            def failing(self, *args, **kwargs):  # no GPU: the real error class, raised
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (smoke)")

            StableSeg.segment_pending = failing  # type: ignore[method-assign]
        else:
            for chunk in (2**30, 2**26, 2**22):  # fill the GPU: 1 GiB, 64 MiB, 4 MiB pieces
                try:
                    while True:
                        filler.append(torch.empty(chunk, dtype=torch.uint8, device=device))
                except torch.cuda.OutOfMemoryError:
                    pass
            out["filled_gib"] = round(sum(t.numel() for t in filler) / 2**30, 1)
        refused = client.post("/predict", json=body)
        out["refused"] = refused.status_code
        out["retry_after"] = refused.headers.get("Retry-After")
        out["detail"] = refused.get_json().get("detail")
        filler.clear()
        StableSeg.segment_pending = original  # type: ignore[method-assign]
        again = client.post("/predict", json=body)
        out["again"] = again.status_code
        out["ok"] = out["warm"] == 200 and out["refused"] == 503 and out["again"] == 200
        out["ok"] = out["ok"] and bool(out["retry_after"])
        return out


def labels_check(device: str, smoke: bool, unet_memory_mib: int) -> dict:
    """Peak device memory of 254 long labels on a 12 MP image, bounded and not."""
    from labeler import SegmenterConfig, StableSeg
    from labeler.testing import sd15_components, tiny_components

    torch.manual_seed(0)
    parts = tiny_components(seed=0) if smoke else sd15_components(seed=0)
    side = 64 if smoke else 512
    dtype = torch.float32 if smoke else torch.float16
    model = StableSeg(**parts, config=SegmenterConfig(image_size=side, batch_size=1))
    model.to(device, dtype)
    rng = np.random.default_rng(0)
    height, width = (300, 400) if smoke else (3000, 4000)
    image = (rng.random((height, width, 3)) * 255).astype(np.uint8)
    plan = model.plan()
    out: dict = {
        "image": f"{width}x{height}",
        "image_size": side,
        "prompts": model.num_prompts(LONG_LABELS),
        "row_mb": round(model.row_bytes(plan.layers) / 2**20, 1),
        "rows_per_call_default": model.rows_per_call(plan.layers),
    }
    masks = {}
    for name, memory in (("bounded", unet_memory_mib * 2**20), ("one_call", 2**50)):
        model.unet_memory = memory
        out[f"rows_per_call_{name}"] = model.rows_per_call(plan.layers)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        started = time.perf_counter()
        try:
            masks[name] = model.segment(image, LONG_LABELS)[0].mask
            error = None
        except torch.cuda.OutOfMemoryError as err:
            error = str(err)[:200]
        if device == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
            out[f"peak_mb_{name}"] = round(peak / 2**20, 1)
        out[f"seconds_{name}"] = round(time.perf_counter() - started, 2)
        if error:
            out[f"error_{name}"] = error
    if len(masks) == 2:
        out["masks_agree"] = float((masks["bounded"] == masks["one_call"]).mean())
    out["ok"] = "bounded" in masks
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model")
    parser.add_argument("--unet-memory", type=int, default=1024, help="MiB, bounded case")
    args = parser.parse_args()
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --smoke on a CPU")
    memory = 8 if args.smoke else args.unet_memory
    report = {
        "smoke": args.smoke,
        "labels254": labels_check(device, args.smoke, memory),
        "oom": oom_check(device, args.smoke),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
