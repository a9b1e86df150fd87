"""Large requests cost bounded memory (issue 18): reduced decoding, bounded UNet calls, request
budgets for pixels and prompt rows, CUDA out-of-memory as a 503, the finish outside the model
lock, memory handed back after a large request.

The request budgets and the 100 MP picture run against a real ``python cli.py serve`` on
loopback (started as in ``test_backend_limits``); the rest in-process on the tiny model.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from labeler import SegmenterConfig, StableSeg
from labeler.images import PixelGate, decode_image, to_rgb_array
from labeler.jobs.io import image_bytes
from labeler.model_settings import ModelSettings, ModelSpec
from labeler.testing import compressible_png
from ml_backend import cache
from ml_backend.backend_settings import BackendSettings
from ml_backend.server import create_app

from .conftest import TINY_SIZE
from .support import local_http_server
from .test_backend_limits import FakeLabelStudio, Served, _png, _serve

BIG_SIDE = 10_000  # 100 MP, STABLESEG_MAX_PIXELS' default
WORDS = ["cat", "dog", "person", "car", "tree", "sky", "road", "grass"]
LONG_LABELS = [" ".join(WORDS[(i + j) % 8] for j in range(7)) + f" {i}" for i in range(254)]
"""254 labels of 8 tokens each: 40 prompts of the tiny model's 77-token context."""
MAX_PROMPT_ROWS = 48  # STABLESEG_MAX_PROMPT_ROWS of the test server: 254 long labels, one task


def _config(labels: list[str]) -> str:
    values = "".join(f'<Label value="{label}"/>' for label in labels)
    return (
        '<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
        f"{values}</BrushLabels></View>"
    )


# ---------------------------------------------------------------------- decoding
def test_reduced_decodes_convert_16_bit_and_alpha_like_a_full_decode():
    """A 16-bit RGBA, a 16-bit grey and a transparent 8-bit PNG decoded for a small copy give
    what the full decode, converted and then reduced, gives (to one level)."""
    rng = np.random.default_rng(3)
    grey = Image.fromarray((rng.random((160, 120)) * 40_000 + 300).astype(np.uint16))
    rgba = Image.fromarray((rng.random((160, 120, 4)) * 255).astype(np.uint8))
    for data in (compressible_png(240, 160), image_bytes(grey), image_bytes(rgba)):
        reduced, size = decode_image(data, at_least=lambda shown: (30, 30))
        full = decode_image(data)[0]
        assert reduced.mode == "RGB" and size == full.size
        factor = full.width // reduced.width
        assert factor == 2  # at least REDUCING_GAP times the size asked for
        expected = np.asarray(Image.fromarray(to_rgb_array(full)).reduce(factor), np.int16)
        assert np.abs(np.asarray(reduced, np.int16) - expected).max() <= 1


def test_the_pixel_gate_holds_one_large_decode_at_a_time():
    gate = PixelGate(100)
    inside, most = [0], [0]
    lock = threading.Lock()

    def decode(pixels: int) -> None:
        with gate.hold(pixels):
            with lock:
                inside[0] += pixels
                most[0] = max(most[0], inside[0])
            time.sleep(0.02)
            with lock:
                inside[0] -= pixels

    threads = [threading.Thread(target=decode, args=(p,)) for p in (60, 60, 30, 150, 40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    assert gate.held == 0 and most[0] <= 150  # the one past the capacity ran alone


# ---------------------------------------------------------------------- UNet calls
def test_unet_calls_split_over_rows_give_the_masks_of_one_call(tiny_parts):
    """Images in groups, and an image's prompts in pieces (two passes), under a budget of a few
    rows: the same masks, scores and layer maps as one call with every row."""
    model = StableSeg(**tiny_parts, config=SegmenterConfig(image_size=TINY_SIZE, batch_size=2))
    labels = LONG_LABELS[:12]  # 2 prompts
    rng = np.random.default_rng(5)
    images = [(rng.random((40 + 9 * i, 56, 3)) * 255).astype(np.uint8) for i in range(2)]
    assert model.num_prompts(labels) == 2
    reference = model.segment(images, labels, return_layer_maps=True)
    row = model.row_bytes(model.plan(all_layers=True).layers)
    assert row > model.row_bytes(model.plan().layers[:1])
    for rows in (2, 1):  # 2: one image per call; 1: each image's prompts in two passes
        model.unet_memory = rows * row
        assert model.rows_per_call(model.plan(all_layers=True).layers) == rows
        for got, want in zip(model.segment(images, labels, return_layer_maps=True), reference):
            assert np.array_equal(got.mask, want.mask)
            assert got.scores == pytest.approx(want.scores, abs=1e-5)
            for name, layer_map in want.layer_maps.items():
                np.testing.assert_allclose(got.layer_maps[name], layer_map, atol=2e-3)


def test_the_unet_memory_setting_reaches_the_model(tiny_model_dir):
    from labeler.jobs.models import load_stableseg

    spec = ModelSpec(str(tiny_model_dir), device="cpu", unet_memory=3)
    model = load_stableseg(spec, SegmenterConfig(image_size=TINY_SIZE))
    assert model.unet_memory == 3 * 2**20 and model.with_config(model.config).unet_memory
    assert model.rows_per_call(model.plan().layers) == max(
        1, 3 * 2**20 // model.row_bytes(model.plan().layers)
    )


# ---------------------------------------------------------------------- in-process backend
@pytest.fixture(scope="module")
def images_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("large-files")
    (root / "a.png").write_bytes(_png(7))
    (root / "big.png").write_bytes(compressible_png(BIG_SIDE, BIG_SIDE))
    return root


def _client(model_dir: Path, images_dir: Path, **limits: int):
    settings = BackendSettings(
        stableseg=ModelSettings(
            ModelSpec(str(model_dir), device="cpu"), SegmenterConfig(image_size=TINY_SIZE)
        ),
        local_files_document_root=str(images_dir),
        **limits,
    )
    return create_app(settings).test_client()


def _task(name: str, task_id: int = 1) -> dict:
    return {"id": task_id, "data": {"image": f"/data/local-files/?d={name}"}}


CAT_DOG = _config(["cat", "dog"])


def test_a_request_past_the_pixel_budget_is_refused_before_decoding(tiny_model_dir, images_dir):
    client = _client(tiny_model_dir, images_dir, max_request_pixels=50_000_000)
    started = time.monotonic()
    body = {"tasks": [_task("big.png")], "label_config": CAT_DOG}
    response = client.post("/predict", json=body)
    assert response.status_code == 413, response.get_json()
    assert "STABLESEG_MAX_REQUEST_PIXELS" in response.get_json()["detail"]
    assert time.monotonic() - started < 5  # the header was enough: nothing decoded


def test_cuda_out_of_memory_is_a_503_with_retry_after_and_the_model_serves_on(
    tiny_model_dir, images_dir, monkeypatch
):
    """The real torch.cuda.OutOfMemoryError raised by the model's pass (no GPU here):
    503, Retry-After, and the next request is answered."""
    client = _client(tiny_model_dir, images_dir)
    body = {"tasks": [_task("a.png")], "label_config": CAT_DOG}
    original = StableSeg.segment_pending
    failures = [1]

    def segment_pending(self, *args, **kwargs):
        if failures:
            failures.pop()
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(StableSeg, "segment_pending", segment_pending)
    response = client.post("/predict", json=body)
    assert response.status_code == 503, response.get_json()
    assert int(response.headers["Retry-After"]) > 0
    assert "out of memory" in response.get_json()["detail"]
    again = client.post("/predict", json=body)
    assert again.status_code == 200 and again.get_json()["results"][0]["result"]


def test_the_full_size_finish_runs_outside_the_model_lock(tiny_model_dir, images_dir, monkeypatch):
    from labeler.segmenter import PendingResult

    client = _client(tiny_model_dir, images_dir)
    held: list[bool] = []
    finish = PendingResult.finish

    def watched(self):
        held.append(cache.GPU_LOCK.locked())
        return finish(self)

    monkeypatch.setattr(PendingResult, "finish", watched)
    body = {"tasks": [_task("a.png", 1), _task("a.png", 2)], "label_config": CAT_DOG}
    response = client.post("/predict", json=body)
    assert response.status_code == 200 and held == [False, False]


# ---------------------------------------------------------------------- a real serve process
@pytest.fixture(scope="module")
def large_server(tmp_path_factory, tiny_model_dir, images_dir) -> Iterator[Served]:
    """One gunicorn worker with two threads; budgets of 150 MP and 48 prompt rows a request,
    UNet calls of a few rows (STABLESEG_UNET_MEMORY)."""
    env = {
        "STABLESEG_MAX_REQUEST_PIXELS": "150000000",
        "STABLESEG_MAX_PROMPT_ROWS": str(MAX_PROMPT_ROWS),
        "STABLESEG_UNET_MEMORY": "256",
    }
    with local_http_server(FakeLabelStudio) as label_studio:
        workspace = tmp_path_factory.mktemp("large-serve")
        yield from _serve(
            workspace, tiny_model_dir, images_dir, label_studio, "--workers", "1", env=env
        )


def _predict(server: Served, body: dict, timeout: float = 120) -> requests.Response:
    return requests.post(f"{server.url}/predict", json=body, timeout=timeout)


@pytest.mark.slow
def test_a_100_megapixel_16_bit_png_is_answered_and_memory_goes_back(large_server):
    """A 100 MP 16-bit RGBA PNG (under a megabyte on disk) within the 150 MP budget: a mask of
    the full size, and the worker's memory back within 300 MB of where it was before."""
    warm = _predict(large_server, {"tasks": [_task("a.png")], "label_config": CAT_DOG})
    assert warm.status_code == 200, warm.text
    before = large_server.rss_kb()
    response = _predict(large_server, {"tasks": [_task("big.png")], "label_config": CAT_DOG})
    assert response.status_code == 200, response.text
    results = response.json()["results"][0]["result"]
    assert results and results[0]["original_width"] == BIG_SIDE
    after = large_server.rss_kb()
    assert after - before < 300 * 1024, f"{before} kB before, {after} kB after"


@pytest.mark.slow
def test_254_long_labels_are_refused_past_the_row_budget_and_served_within_it(large_server):
    """254 labels of 8 tokens: 40 prompt rows a task. Two tasks pass STABLESEG_MAX_PROMPT_ROWS
    (a 413 that names it, before any UNet pass); one task is segmented in UNet calls of a
    few rows."""
    config = _config(LONG_LABELS)
    two = {"tasks": [_task("a.png", 1), _task("a.png", 2)], "label_config": config}
    refused = _predict(large_server, two)
    assert refused.status_code == 413, refused.text
    detail = refused.json()["detail"]
    assert "STABLESEG_MAX_PROMPT_ROWS" in detail and "80 UNet rows" in detail
    served = _predict(large_server, {"tasks": [_task("a.png")], "label_config": config})
    assert served.status_code == 200, served.text
    assert served.json()["errors"] == [] and served.json()["results"][0]["result"]
