"""Images and outputs in object storage: a real S3 server (moto's, on loopback) holds the demo
scenes and receives ``--out``; a run killed part-way resumes against it with every image
labelled once and the same outputs as a run on local folders; a missing client says what to
install; URLs in messages carry no secrets."""

from __future__ import annotations

import contextlib
import http.server
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from labeler.commands.pseudo_label import pseudo_label
from labeler.jobs import storage
from labeler.jobs.extras import MissingExtraError
from labeler.jobs.io import (
    atomic_writer,
    image_input,
    list_images,
    read_json,
    remove_tree,
    stored_stems,
)
from labeler.jobs.storage import RemotePath, as_location, redact_url

from .pipeline_golden import assert_same_outputs, digest_run

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden" / "pseudo_label_demo.json"
SCENES = ROOT / "demo" / "scenes" / "images"
MODEL = ROOT / "demo" / "model"
COUNT = 24  # demo scenes in the bucket
ONE_AT_A_TIME = ("--batch-size", "1", "--workers", "1")


@pytest.fixture(scope="module")
def s3_server() -> Iterator[dict[str, str]]:
    """moto's S3 server on 127.0.0.1 (a free port) and the variables that point clients at it
    with dummy keys. Clients cached by earlier tests are dropped, before and after."""
    pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line a request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "test-key-id",
        "AWS_SECRET_ACCESS_KEY": "test-secret-key",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
    }
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    _forget_clients()
    try:
        yield env
    finally:
        _forget_clients()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.stop()


def _forget_clients() -> None:
    import s3fs

    storage._filesystems.clear()
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def bucket(s3_server: dict[str, str]) -> str:
    """``s3://inbox/scenes``: the first COUNT demo scenes; an empty ``outbox`` bucket."""
    fs = storage.filesystem("s3")
    fs.mkdir("inbox")
    fs.mkdir("outbox")
    for path in sorted(SCENES.glob("*.png"))[:COUNT]:
        fs.put_file(str(path), f"inbox/scenes/{path.name}")
    fs.pipe_file("inbox/scenes/.hidden/skip.png", b"not listed")
    fs.pipe_file("inbox/scenes/notes.txt", b"not an image")
    return "s3://inbox/scenes"


def _args(images: str, out: str) -> list[str]:
    return [
        images,
        "--labels-file",
        str(ROOT / "demo" / "scenes" / "colours.txt"),
        "--model",
        str(MODEL),
        "--image-size",
        "64",
        "--background-prompt",
        "background",
        "--format",
        "coco",
        "--format",
        "labelstudio",
        "--format",
        "cvat-mask",
        "--image-root-url",  # as the golden run's labelstudio.json (demo/scenes/images)
        "/data/local-files/?d=images",
        "--out",
        out,
    ]


def test_listing_and_whole_object_writes(bucket):
    names = list_images(bucket)
    assert [p.as_posix() for p in names] == [f"scene_{i:03d}.png" for i in range(COUNT)]
    fs = storage.filesystem("s3")
    fs.put_file(str(SCENES / "scene_000.png"), "inbox/odd/a b%20c.png")
    odd = as_location("s3://inbox/odd")
    assert list_images(odd) == [Path("a b%20c.png")]  # keys are not URL-quoted
    assert image_input(odd / "a b%20c.png") == (SCENES / "scene_000.png").read_bytes()
    out = as_location("s3://outbox/unit")
    with atomic_writer(out / "a" / "b.json") as handle:
        handle.write('{"one": ')
        assert not (out / "a" / "b.json").exists()  # nothing visible before the upload
        handle.write("1}")
    assert read_json(out / "a" / "b.json") == {"one": 1}
    with pytest.raises(RuntimeError), atomic_writer(out / "c.json") as handle:
        handle.write("{")
        raise RuntimeError("killed")
    assert not (out / "c.json").exists()
    assert stored_stems(out, ".json") == {PurePosixPath("a/b")}
    fs.pipe_file("outbox/unit/aX/c.json", b"{}")  # a neighbour whose name starts the same
    remove_tree(out / "a")
    remove_tree(out / "nothing")
    assert stored_stems(out, ".json") == {PurePosixPath("aX/c")}


def test_refine_pool_from_a_bucket(bucket, tmp_path):
    from labeler.jobs.refine.files import labels_from_jsonl, load_rgb, pool_from_folder

    pool = pool_from_folder(bucket)
    assert [item.key for item in pool] == [f"scene_{i:03d}" for i in range(COUNT)]
    assert str(pool[3].path) == f"{bucket}/scene_003.png"
    rgb = load_rgb(pool[3].path, 32)
    with Image.open(SCENES / "scene_003.png") as image:
        assert rgb.shape == (32, 32, 3) and image.size == (64, 64)
    listing = tmp_path / "labels.jsonl"
    listing.write_text('{"image": "scene_003.png", "labels": ["red"]}\n')
    found = labels_from_jsonl(pool, bucket, listing, ["red", "green"])
    assert found.ids == {"scene_003": (1,)}


def test_label_studio_local_files_from_a_bucket(bucket):
    from labeler.images import ImageError
    from ml_backend.backend_settings import BackendSettings
    from ml_backend.images import ImageLoader

    loader = ImageLoader(BackendSettings(local_files_document_root=bucket))
    image = loader.load("/data/local-files/?d=scene_002.png")
    with Image.open(SCENES / "scene_002.png") as expected:
        assert np.array_equal(np.asarray(image), np.asarray(expected.convert("RGB")))
    for relative, reason in (("../secret.png", "without '..'"), ("nope.png", "cannot read")):
        with pytest.raises(ImageError, match=reason):
            loader.load(f"/data/local-files/?d={relative}")
    small = ImageLoader(BackendSettings(local_files_document_root=bucket, max_image_bytes=100))
    with pytest.raises(ImageError, match="larger than 100 bytes"):
        small.load("/data/local-files/?d=scene_002.png")


def _count_records(fs, prefix: str) -> int:
    fs.invalidate_cache()
    with contextlib.suppress(FileNotFoundError):
        return len([k for k in fs.find(prefix) if k.endswith(".json")])
    return 0


def _masks(read, names) -> dict[str, np.ndarray]:
    import io

    return {name: np.asarray(Image.open(io.BytesIO(read(name)))) for name in names}


def _golden_first(count: int, annotations: int, task_scores: int) -> dict:
    """The golden digest of the demo scenes (tests/pipeline_golden.py), cut to the first
    ``count`` scenes (their ``annotations`` COCO annotations and the ``task_scores`` scores of
    their Label Studio tasks come first) and without the previews; ids count from 1 in sorted
    order, so the first scenes keep theirs."""
    golden = json.loads(GOLDEN.read_text())
    keep = {f"scene_{i:03d}" for i in range(count)}

    def first(digests: dict) -> dict:
        return {k: v for k, v in digests.items() if k.rsplit(".", 1)[0] in keep}

    coco, tasks = golden["coco"], golden["labelstudio"]
    return {
        "masks": first(golden["masks"]),
        "records": first(golden["records"]),
        "record_scores": first(golden["record_scores"]),
        "files": {k: v for k, v in golden["files"].items() if not k.startswith("preview")},
        "previews": {},
        "coco": {
            "info": coco["info"],
            "categories": coco["categories"],
            "annotations": coco["annotations"][:annotations],
            "scores": coco["scores"][:annotations],
        },
        "labelstudio": {"tasks": tasks["tasks"][:count], "scores": tasks["scores"][:task_scores]},
    }


@pytest.mark.slow
def test_bucket_to_bucket_resumes_after_a_kill_with_the_local_outputs(bucket, s3_server, tmp_path):
    out = "s3://outbox/run"
    fs = storage.filesystem("s3")
    args = _args(bucket, out)
    # Killed part-way (one image a batch and one reader: slow enough to be caught).
    env = {**os.environ, **s3_server, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "cli.py"), "pseudo-label", *args, *ONE_AT_A_TIME],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if _count_records(fs, "outbox/run/records") >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = _count_records(fs, "outbox/run/records")
    assert 3 <= first < COUNT, "the run must be killed part-way"

    # What a kill between two uploads can leave, and what an upload cut short leaves: a mask
    # object without its record, and a multipart upload of a record never completed. Neither
    # is a result: the resumed run labels both images.
    records = as_location(out) / "records"
    done_before = stored_stems(records, ".json")
    names = [f"scene_{i:03d}" for i in range(COUNT)]
    pending = [name for name in names if PurePosixPath(name) not in done_before]
    fs.pipe_file(f"outbox/run/masks/{pending[0]}.png", b"\x89PNG torn")
    import boto3

    client = boto3.client("s3")
    key = f"run/records/{pending[1]}.json"
    upload = client.create_multipart_upload(Bucket="outbox", Key=key)
    client.upload_part(
        Bucket="outbox", Key=key, UploadId=upload["UploadId"], PartNumber=1, Body=b'{"file": '
    )
    assert stored_stems(records, ".json") == done_before

    resumed = CliRunner().invoke(pseudo_label, args)
    assert resumed.exit_code == 0, resumed.output
    summary = f"labelled {COUNT - first}, skipped 0, already done {first} (of {COUNT})"
    assert summary in resumed.output
    assert "test-secret-key" not in resumed.output

    # Every image once, and the outputs of a local run of the same scenes (the golden file).
    assert stored_stems(records, ".json") == {PurePosixPath(name) for name in names}
    assert not fs.exists("outbox/run/.parts")
    assert fs.cat_file("outbox/run/skipped.jsonl") == b""
    assert read_json(as_location(out) / "run.json")["images_dir"] == bucket
    local = tmp_path / "run"
    fs.get("outbox/run/", str(local), recursive=True)
    with zipfile.ZipFile(local / "cvat-mask.zip") as archive:  # a whole object, uploaded once
        entries = archive.namelist()
    for folder in ("SegmentationClass", "SegmentationObject"):
        assert sorted(e for e in entries if e.startswith(folder)) == [
            f"{folder}/{name}.png" for name in names
        ]
    coco = json.loads((local / "coco.json").read_text())
    assert [(i["id"], i["file_name"]) for i in coco["images"]] == [
        (n, f"{name}.png") for n, name in enumerate(names, start=1)
    ]
    found = digest_run(local)
    del found["coco"]["images"]
    expected = _golden_first(COUNT, len(coco["annotations"]), len(found["labelstudio"]["scores"]))
    # Scores to 1e-5: the resumed run batches its images from where the kill stopped the first
    # one, not as the golden run did, and a score's float sums depend on its batch (masks do
    # not: they are compared exactly).
    for part in ("coco", "labelstudio"):
        got, want = found[part].pop("scores"), expected[part].pop("scores")
        assert np.allclose(got, want, rtol=0, atol=1e-5), part
        found[part]["scores"] = expected[part]["scores"] = want
    for name, scores in expected["record_scores"].items():
        got = [found["record_scores"][name][label] for label in scores]
        assert np.allclose(got, list(scores.values()), rtol=0, atol=1e-5), name
    found["record_scores"] = expected["record_scores"]
    assert_same_outputs(found, expected)


def test_a_missing_client_says_what_to_install(tmp_path):
    with contextlib.suppress(ImportError):
        import gcsfs  # noqa: F401

        pytest.skip("gcsfs is installed here")
    with pytest.raises(MissingExtraError, match=r'pip install -e "\.\[gcs\]"'):
        as_location("gs://bucket/images")
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (8, 8)).save(images / "a.png")
    for argv in (
        ["gs://bucket/images", "--labels", "cat", "--out", str(tmp_path / "out")],
        [str(images), "--labels", "cat", "--out", "az://container/run"],
    ):
        result = CliRunner().invoke(pseudo_label, argv)
        assert result.exit_code == 2, result.output
        extra = "gcs" if argv[0].startswith("gs:") else "azure"
        assert f'pip install -e ".[{extra}]"' in result.output
        assert not (tmp_path / "out").exists()


def test_outputs_only_where_uploads_are_atomic(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (8, 8)).save(images / "a.png")
    result = CliRunner().invoke(
        pseudo_label,
        [str(images), "--labels", "cat", "--model", str(MODEL), "--out", "https://host/run"],
    )
    assert result.exit_code != 0
    assert "not atomic" in result.output
    pytest.importorskip("s3fs")
    result = CliRunner().invoke(
        pseudo_label,
        [str(images), "--labels", "cat", "--format", "hf", "--out", "s3://outbox/hf"],
    )
    assert result.exit_code == 1 and "--format hf writes folders" in result.output


def test_urls_in_messages_carry_no_secrets():
    signed = "https://user:pa55@example.com/b/a.png?X-Amz-Signature=abc&X-Amz-Credential=AKIA"
    assert redact_url(signed) == "https://example.com/b/a.png"
    location = as_location(signed)
    assert isinstance(location, RemotePath) and location.url == signed
    assert "pa55" not in str(location) and "abc" not in repr(location)
    assert storage.redact_text(f"403, message='Forbidden', url='{signed}'") == (
        "403, message='Forbidden', url='https://example.com/b/a.png'"
    )
    with pytest.raises(ValueError, match="query string") as raised:
        location / "b.png"
    assert "abc" not in str(raised.value)
    assert as_location("file:///tmp/a%20b") == Path("/tmp/a b")
    assert as_location("~/x") == Path.home() / "x"


def test_images_listed_by_a_web_server(tmp_path):
    pytest.importorskip("aiohttp")
    folder = tmp_path / "site"
    (folder / "sub").mkdir(parents=True)
    for name in ("a.png", "sub/b c.jpg"):
        Image.new("RGB", (8, 8), "red").save(folder / name)
    (folder / "readme.txt").write_text("not an image")

    handler = type(
        "Quiet",
        (http.server.SimpleHTTPRequestHandler,),
        {"log_message": lambda *a: None},
    )
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), lambda *a: handler(*a, directory=str(folder))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        root = f"http://127.0.0.1:{server.server_port}/"
        names = list_images(root)
        assert [p.as_posix() for p in names] == ["a.png", "sub/b c.jpg"]
        from labeler.images import decode_image

        _image, size = decode_image(image_input(as_location(root) / names[1]))
        assert size == (8, 8)
        with pytest.raises(Exception, match="cannot read") as raised:
            image_input(as_location(root) / "missing.png")
        assert type(raised.value).__name__ == "ImageError"
    finally:
        server.shutdown()
        server.server_close()
