"""``pseudo-label --engine ray`` on a local Ray (two CPUs, started once for the module): the
same files as the local engine, an actor killed mid-run, and the missing extra's message."""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import sys
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from labeler.jobs.pseudo_label import PseudoLabelOptions, load_model, run
from labeler.labels import parse_labels_file
from labeler.model_settings import ModelSpec, SegmenterConfig

from . import test_storage
from .pipeline_golden import assert_same_outputs, digest_run

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "demo" / "scenes" / "images"
LABELS = ROOT / "demo" / "scenes" / "colours.txt"
GOLDEN = json.loads((ROOT / "tests" / "golden" / "pseudo_label_demo.json").read_text())


def demo_options(images: Path, out: Path, **changes) -> PseudoLabelOptions:
    """The demo's run of the golden file (tests/pipeline_golden.py): 64 px, a background
    prompt, every export, previews."""
    options = PseudoLabelOptions(
        images_dir=images,
        out_dir=out,
        labels=parse_labels_file(LABELS.read_text().splitlines()),
        model=ModelSpec(source=str(ROOT / "demo" / "model"), device="cpu"),
        segmenter=SegmenterConfig(image_size=64, background_prompt="background"),
        formats=("coco", "png", "labelstudio"),
        preview=True,
        workers=1,
    )
    return replace(options, **changes)


def files(out: Path) -> dict[str, bytes]:
    return {
        path.relative_to(out).as_posix(): path.read_bytes()
        for path in sorted(out.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def s3_server():
    """tests/test_storage.py's S3 server (moto's, on loopback) and its variables: one of this
    module's own."""
    yield from test_storage.s3_server.__wrapped__()


def _reset_moto(s3_server: dict[str, str]) -> None:
    """Empty moto's S3 (its buckets live in the process, whichever server started them)."""
    url = s3_server["AWS_ENDPOINT_URL"] + "/moto-api/reset"
    urllib.request.urlopen(urllib.request.Request(url, method="POST"), timeout=30).close()
    test_storage._forget_clients()


@pytest.fixture(scope="module")
def bucket(s3_server):
    """The first demo scenes in s3://inbox/scenes, and an empty outbox bucket (as
    tests/test_storage.py's), in an S3 emptied before and after."""
    _reset_moto(s3_server)
    yield test_storage.bucket.__wrapped__(s3_server)
    _reset_moto(s3_server)


@pytest.fixture(scope="module")
def ray_cluster(s3_server):
    """One local Ray for the module (two CPUs, as CI); the engine joins it. Started after the
    S3 server, so that its workers have the variables that point them at it."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_the_ray_engine_writes_the_local_engines_files(ray_cluster, tmp_path):
    """Masks, records, COCO (ids included), Label Studio, label files and gallery: what the
    local engine writes for the demo (its golden digest, which tests/test_pipeline.py checks
    the local engine against); a rerun resumes with nothing left to do."""
    out = tmp_path / "ray"
    summary = run(demo_options(DEMO, out, engine="ray"))
    assert (summary.labelled, summary.skipped) == (100, [])
    assert_same_outputs(digest_run(out), GOLDEN)
    written = files(out)

    again = run(demo_options(DEMO, out, engine="ray"))
    assert (again.labelled, again.already_done) == (0, 100)
    assert files(out) == written


class KilledOnce:
    """The demo model, whose actor process is killed (SIGKILL) at its second batch, once per
    run (a marker file says it happened): the actor Ray starts again finishes the run."""

    def __init__(self, options: PseudoLabelOptions, marker: Path) -> None:
        self.model = load_model(options, "cpu")
        self.marker = marker
        self.calls = 0
        self.model_version = self.model.model_version
        self.batch_size = self.model.batch_size
        self.input_size = self.model.input_size

    def prepare(self, image, size=None):
        return self.model.prepare(image, size)

    def segment(self, images, labels, **kwargs):
        self.calls += 1
        if self.calls == 2 and not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return self.model.segment(images, labels, **kwargs)


@pytest.mark.slow
def test_a_killed_actor_is_replaced_and_every_image_is_labelled_once(ray_cluster, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    names = sorted(path.name for path in DEMO.iterdir())[:12]
    for name in names:
        shutil.copy(DEMO / name, images / name)
    out, marker = tmp_path / "out", tmp_path / "killed"
    options = demo_options(images, out, engine="ray")
    summary = run(options, model=functools.partial(KilledOnce, options, marker))
    assert marker.exists()  # an actor was killed in the middle of the run
    assert (summary.labelled, summary.skipped) == (12, [])
    records = sorted(path.name for path in (out / "records").iterdir())
    assert records == sorted(name.replace(".png", ".json") for name in names)
    coco = json.loads((out / "coco.json").read_text())
    assert sorted(image["file_name"] for image in coco["images"]) == names
    assert [image["id"] for image in coco["images"]] == list(range(1, 13))
    tasks = json.loads((out / "labelstudio.json").read_text())
    assert len(tasks) == 12
    masks = digest_run(out)["masks"]
    for name in names:  # the local engine's masks, those of the killed batch too
        assert masks[name] == GOLDEN["masks"][name], name


@pytest.mark.slow
def test_bucket_to_bucket_through_ray(ray_cluster, bucket, tmp_path):
    """The demo scenes from an S3 bucket to another through Ray's workers: the local engine's
    outputs (the golden digest, cut to the scenes in the bucket)."""
    from labeler.commands.pseudo_label import pseudo_label
    from labeler.jobs import storage

    args = [*test_storage._args(bucket, "s3://outbox/ray"), "--engine", "ray"]
    result = CliRunner().invoke(pseudo_label, args)
    assert result.exit_code == 0, result.output
    local = tmp_path / "ray"
    storage.filesystem("s3").get("outbox/ray/", str(local), recursive=True)
    found = digest_run(local)
    coco = json.loads((local / "coco.json").read_text())
    names = [image["file_name"] for image in coco["images"]]
    assert names == sorted(path.name for path in DEMO.iterdir())[: len(names)]
    del found["coco"]["images"]
    expected = test_storage._golden_first(
        len(names), len(coco["annotations"]), len(found["labelstudio"]["scores"])
    )
    assert_same_outputs(found, expected)


def test_without_the_extra_the_command_fails_at_once_with_the_install_line(monkeypatch, tmp_path):
    from labeler.commands.pseudo_label import pseudo_label

    for name in [name for name in sys.modules if name == "ray" or name.startswith("ray.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails, as when not installed
    out = tmp_path / "out"
    result = CliRunner().invoke(
        pseudo_label,
        [str(DEMO), "--labels", "red,green", "--model", str(ROOT / "demo" / "model"),
         "--engine", "ray", "--out", str(out)],
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "--engine ray needs the 'ray' package, which is not installed" in result.output
    assert 'pip install "stableseg-labeler[ray]"' in result.output
    assert 'pip install -e ".[ray]"' in result.output
    assert not out.exists()  # nothing written
