"""The polygon core (exporters.polygons) and the polygon formats, on hand-made masks: a mask
with a hole, a mask in three parts, random masks against OpenCV's components and pycocotools'
rasteriser."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_api

from exporters.polygons import joined_ring, label_objects, mask_objects, object_pixels

HOLED, PARTS = 1, 2  # label 1: a square with a square hole; label 2: three blobs


def hand_mask() -> np.ndarray:
    """(40, 48) ids: label 1 a 16 x 16 square with a 6 x 6 hole, label 2 in three parts
    (a bar, a diagonal staircase, a lone pixel), 255 somewhere."""
    mask = np.zeros((40, 48), dtype=np.uint8)
    mask[4:20, 4:20] = HOLED
    mask[9:15, 9:15] = 0
    mask[26:30, 2:30] = PARTS  # a bar
    for step in range(10):  # a staircase, 8-connected only through corners
        mask[24 + step, 34 + step] = PARTS
    mask[2, 40] = PARTS  # a lone pixel
    mask[35:38, 5:8] = 255
    return mask


def polygon_pixels(rings: list[np.ndarray], height: int, width: int) -> np.ndarray:
    """pycocotools' union of the filled rings (edge coordinates), (H, W) bool."""
    flat = [ring.ravel().tolist() for ring in rings]
    return mask_api.decode(mask_api.merge(mask_api.frPyObjects(flat, height, width))) > 0


def object_raster(obj, height: int, width: int) -> np.ndarray:
    pixels = polygon_pixels([obj.outer], height, width)
    for hole in obj.holes:
        pixels &= ~polygon_pixels([hole], height, width)
    return pixels


def test_hole_and_three_parts():
    mask = hand_mask()
    (square,) = label_objects(mask, HOLED)
    assert square.area == 16 * 16 - 6 * 6
    assert square.bbox == (4, 4, 16, 16)
    assert len(square.holes) == 1 and len(square.outer) == 4
    assert sorted(map(tuple, square.holes[0].astype(int))) == [(9, 9), (9, 15), (15, 9), (15, 15)]
    parts = label_objects(mask, PARTS)
    assert sorted(p.area for p in parts) == [1, 10, 4 * 28]
    for obj in [square, *parts]:
        assert (object_raster(obj, *mask.shape) == object_pixels(mask, obj)).all()
    assert [o.label_id for o in mask_objects(mask, [1, 2])] == [1, 2, 2, 2]


def test_min_area_drops_objects_and_fills_small_holes():
    mask = hand_mask()
    assert sorted(p.area for p in label_objects(mask, PARTS, min_area=10)) == [10, 112]
    (square,) = label_objects(mask, HOLED, min_area=37)  # the 36-pixel hole is filled
    assert square.holes == () and square.area == 16 * 16
    assert label_objects(mask, HOLED, min_area=16 * 16 + 1) == []


def test_random_masks_round_trip_exactly():
    """Unsimplified and at the default tolerance, rings rasterise back to the pixels; the
    objects are the components CVAT's object masks number."""
    from exporters.polygons import label_components

    rng = np.random.default_rng(0)
    for _ in range(60):
        height, width = (int(v) for v in rng.integers(3, 24, 2))
        binary = (rng.random((height, width)) < rng.uniform(0.2, 0.8)).astype(np.uint8)
        count, components = label_components(binary > 0)
        for tolerance in (0.0, 0.5):
            objects = label_objects(binary, 1, tolerance=tolerance)
            assert len(objects) == count
            assert sum(o.area for o in objects) == binary.sum()
            union = np.zeros(binary.shape, bool)
            for obj in objects:
                pixels = object_pixels(binary, obj)
                x, y = obj.seed
                assert (pixels == (components == components[y, x])).all()
                assert (object_raster(obj, height, width) == pixels).all()
                union |= pixels
            assert (union == binary.astype(bool)).all()


def test_joined_ring_keeps_the_hole_when_filled():
    import cv2

    mask = hand_mask()
    (square,) = label_objects(mask, HOLED)
    ring = joined_ring(square)
    assert len(ring) == len(square.outer) + len(square.holes[0]) + 2
    # filled at 10x (pixel centres), as Ultralytics rasterises its polygons
    scale = 10
    canvas = np.zeros((mask.shape[0] * scale, mask.shape[1] * scale), np.uint8)
    cv2.fillPoly(canvas, [np.round(ring * scale).astype(np.int32)], 1)
    small = canvas[scale // 2 :: scale, scale // 2 :: scale].astype(bool)
    expected = mask == HOLED
    assert (small & expected).sum() / (small | expected).sum() > 0.95
    assert not small[10:14, 10:14].any()  # the hole stays empty


@pytest.mark.parametrize("bad", [np.zeros((2, 2, 2), np.uint8)])
def test_bad_mask(bad):
    with pytest.raises(ValueError, match="2-D"):
        label_objects(bad, 1)


# ---------------------------------------------------------------------- the formats
LABELS = ["ring", "parts"]


def ids_from(layers: list[tuple[int, np.ndarray]], shape: tuple[int, int]) -> np.ndarray:
    ids = np.zeros(shape, np.uint8)
    for label_id, pixels in layers:
        ids[pixels] = label_id
    return ids


def test_coco_polygons_decode_to_the_mask():
    from exporters import mask_objects, polygon_annotations

    mask = hand_mask()
    height, width = mask.shape
    annotations = polygon_annotations(mask, mask_objects(mask, [1, 2]), scores=[0.25, 0.5])
    assert [type(a["segmentation"]).__name__ for a in annotations] == ["dict", *["list"] * 3]
    assert [a["area"] for a in annotations] == [220, 112, 10, 1]
    layers = []
    for annotation in annotations:
        segmentation = annotation["segmentation"]
        if isinstance(segmentation, dict):  # the holed object: RLE
            rle = {"size": segmentation["size"], "counts": segmentation["counts"].encode()}
        else:
            rle = mask_api.merge(mask_api.frPyObjects(segmentation, height, width))
        layers.append((annotation["category_id"], mask_api.decode(rle) > 0))
        assert annotation["score"] == [0.25, 0.5][annotation["category_id"] - 1]
    expected = np.where(mask == 255, 0, mask)
    assert (ids_from(layers, mask.shape) == expected).all()


def test_labelstudio_polygons_decode_to_the_mask():
    from exporters import decode_polygon_result, mask_objects, polygon_prediction

    mask = hand_mask()
    objects = mask_objects(mask, [1, 2])
    found = polygon_prediction(mask, objects, LABELS, {"ring": 0.5, "parts": 0.9}, "v1")
    results = found["result"]
    assert [r["value"]["polygonlabels"] for r in results] == [["ring"]] + [["parts"]] * 3
    assert all(r["type"] == "polygonlabels" and r["value"]["closed"] for r in results)
    assert len({r["id"] for r in results}) == 4
    layers = [(LABELS.index(r["value"]["polygonlabels"][0]) + 1, decode_polygon_result(r))
              for r in results]  # fmt: skip
    assert (ids_from(layers, mask.shape) == np.where(mask == 255, 0, mask)).all()
    assert found["score"] == pytest.approx((220 * 0.5 + 123 * 0.9) / 343)


def ultralytics_masks(data_yaml: Path, side: int = 640) -> dict[str, np.ndarray]:
    """Ultralytics' own loader over a YOLO folder: each image's polygons filled at
    ``side`` x ``side`` (class + 1 ids), by image stem."""
    import os

    from PIL import Image

    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_AUTOINSTALL", "false")  # never pip-installs from a test
    pil_open = Image.open
    try:
        from ultralytics.data import YOLODataset
        from ultralytics.data.utils import check_det_dataset, polygon2mask
    finally:
        # Importing ultralytics replaces PIL's Image.open with one that, on a file PIL cannot
        # identify, tries to install a HEIF plugin: every later test in this process would
        # get that instead of PIL's UnidentifiedImageError.
        Image.open = pil_open

    data = check_det_dataset(str(data_yaml), autodownload=False)
    dataset = YOLODataset(img_path=data["train"], imgsz=side, data=data, task="segment")
    assert len(dataset) == len(dataset.labels) > 0
    filled = {}
    for label in dataset.labels:
        ids = np.zeros((side, side), np.uint8)
        for cls, segment in zip(label["cls"].ravel(), label["segments"]):
            ids[polygon2mask((side, side), [segment * side], 1, 1) > 0] = int(cls) + 1
        filled[Path(label["im_file"]).stem] = ids
    return filled


def scaled_iou(mask: np.ndarray, ids: np.ndarray) -> float:
    """IoU of the labelled pixels of ``mask`` (resized, nearest) and ``ids`` (same ids)."""
    from PIL import Image

    side = ids.shape[0]
    ours = np.asarray(Image.fromarray(mask).resize((side, side), Image.Resampling.NEAREST))
    ours = np.where(ours == 255, 0, ours)
    union = ((ours > 0) | (ids > 0)).sum()
    return float(((ours == ids) & (ours > 0)).sum() / union) if union else 1.0


def test_yolo_folder_loads_in_ultralytics(tmp_path):
    """The hand-made mask as a YOLO folder: Ultralytics loads it, the hole stays empty, the
    three parts are three lines."""
    from PIL import Image

    from exporters import mask_objects, yolo_data_yaml, yolo_lines

    mask = hand_mask()
    height, width = mask.shape
    root = tmp_path / "yolo"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    Image.fromarray(np.zeros((height, width, 3), np.uint8)).save(root / "images" / "hand.png")
    lines = yolo_lines(mask_objects(mask, [1, 2]), width, height)
    assert [line.split()[0] for line in lines] == ["0", "1", "1", "1"]
    (root / "labels" / "hand.txt").write_text("".join(f"{line}\n" for line in lines))
    (root / "data.yaml").write_text(yolo_data_yaml(["ring", "parts ✓"]))
    filled = ultralytics_masks(root / "data.yaml")["hand"]
    assert scaled_iou(mask, filled) >= 0.95
    hole = (
        slice(9 * 640 // 40 + 2, 15 * 640 // 40 - 2),
        slice(9 * 640 // 48 + 2, 15 * 640 // 48 - 2),
    )
    assert not filled[hole].any()


# ---------------------------------------------------------------------- pseudo-label
POLYGON_FORMATS = ("png", "coco-polygons", "yolo-seg", "labelstudio-polygons")


def pseudo_label(images: Path, out: Path, formats: tuple[str, ...], **options):
    from bench.stand_in import StandInSegmenter
    from labeler.jobs.pseudo_label import PseudoLabelOptions, run
    from labeler.model_settings import SegmenterConfig

    settings = PseudoLabelOptions(
        images_dir=images,
        out_dir=out,
        labels=["cat", "dog", "bird"],
        segmenter=SegmenterConfig(image_size=64, batch_size=4),
        formats=formats,
        **options,
    )
    return run(settings, model=StandInSegmenter(image_size=64, finish="cpu", batch_size=4))


def coco_ids(coco_file: Path, image_dir: Path) -> dict[str, np.ndarray]:
    """Each image's annotations decoded by pycocotools into one id mask, by file name."""
    from pycocotools.coco import COCO

    coco = COCO(str(coco_file))
    decoded = {}
    for image in coco.dataset["images"]:
        ids = np.zeros((image["height"], image["width"]), np.uint8)
        for annotation in coco.loadAnns(coco.getAnnIds(imgIds=image["id"])):
            ids[coco.annToMask(annotation) > 0] = annotation["category_id"]
        decoded[image["file_name"]] = ids
    return decoded


def stored_masks(out: Path) -> dict[str, np.ndarray]:
    from PIL import Image

    masks = {}
    for path in sorted((out / "masks").glob("*.png")):
        with Image.open(path) as png:
            masks[path.stem] = np.asarray(png)
    return masks


def test_pseudo_label_streams_the_polygon_formats_and_resumes(tmp_path):
    """The polygon formats from a run, equal to those made later from the masks; another
    --min-area remakes them; each decodes to the masks."""
    from exporters import decode_polygon_result

    from .test_pipeline import save_random_images

    images = tmp_path / "images"
    save_random_images(images, 5, shape=(40, 56), seed=3)
    full = tmp_path / "full"
    summary = pseudo_label(images, full, POLYGON_FORMATS)
    assert summary.labelled == 5 and not summary.skipped
    later = tmp_path / "later"
    pseudo_label(images, later, ("png",))
    again = pseudo_label(images, later, POLYGON_FORMATS)
    assert again.labelled == 0 and again.already_done == 5
    for name in ("coco-polygons.json", "labelstudio-polygons.json", "yolo/data.yaml"):
        assert (later / name).read_bytes() == (full / name).read_bytes(), name
    for label_file in (full / "yolo" / "labels").glob("*.txt"):
        assert (later / "yolo" / "labels" / label_file.name).read_text() == label_file.read_text()
    assert sorted(p.name for p in (full / "yolo" / "images").iterdir()) == [
        f"{i:03d}.png" for i in range(5)
    ]

    masks = stored_masks(full)
    decoded = coco_ids(full / "coco-polygons.json", images)
    assert all((decoded[f"{stem}.png"] == mask).all() for stem, mask in masks.items())
    tasks = json.loads((full / "labelstudio-polygons.json").read_text())
    for task in tasks:
        stem = Path(task["data"]["image"]).stem
        results = task["predictions"][0]["result"]
        layers = [(["cat", "dog", "bird"].index(r["value"]["polygonlabels"][0]) + 1,
                   decode_polygon_result(r)) for r in results]  # fmt: skip
        assert (ids_from(layers, masks[stem].shape) == masks[stem]).all()
    filled = ultralytics_masks(full / "yolo" / "data.yaml")
    assert min(scaled_iou(masks[stem], ids) for stem, ids in filled.items()) >= 0.95

    lines = sum(len(p.read_text().splitlines()) for p in (full / "yolo/labels").glob("*.txt"))
    coarser = pseudo_label(images, full, POLYGON_FORMATS, min_area=40)
    assert coarser.labelled == 0
    header = json.loads((full / "pieces" / "000.jsonl").read_text().splitlines()[0])
    assert header["polygons"] == {"min_area": 40, "tolerance": 0.5}
    fewer = sum(len(p.read_text().splitlines()) for p in (full / "yolo/labels").glob("*.txt"))
    assert fewer < lines
    annotations = json.loads((full / "coco-polygons.json").read_text())["annotations"]
    assert min(a["area"] for a in annotations) >= 40


@pytest.mark.slow
def test_demo_scenes_through_pycocotools_and_ultralytics(tmp_path):
    """The demo model on six demo scenes: COCO polygons decode to the PNG masks (IoU >=
    0.98, exact in fact), Ultralytics' polygons filled at 640 px match them (IoU >= 0.95)."""
    import shutil

    from labeler.jobs.pseudo_label import PseudoLabelOptions, run
    from labeler.model_settings import ModelSpec, SegmenterConfig

    root = Path(__file__).resolve().parents[1]
    images = tmp_path / "images"
    images.mkdir()
    for path in sorted((root / "demo" / "scenes" / "images").glob("*.png"))[:6]:
        shutil.copy(path, images / path.name)
    labels = (root / "demo" / "scenes" / "colours.txt").read_text().split()
    out = tmp_path / "out"
    options = PseudoLabelOptions(
        images_dir=images,
        out_dir=out,
        labels=labels,
        model=ModelSpec(source=str(root / "demo" / "model"), device="cpu"),
        segmenter=SegmenterConfig(image_size=64, background_prompt="background"),
        formats=("png", "coco-polygons", "yolo-seg"),
    )
    summary = run(options)
    assert summary.labelled == 6 and not summary.skipped
    masks = stored_masks(out)
    decoded = coco_ids(out / "coco-polygons.json", images)
    for stem, mask in masks.items():
        ours, theirs = np.where(mask == 255, 0, mask), decoded[f"{stem}.png"]
        union = ((ours > 0) | (theirs > 0)).sum()
        assert union == 0 or ((ours == theirs) & (ours > 0)).sum() / union >= 0.98, stem
    filled = ultralytics_masks(out / "yolo" / "data.yaml")
    assert sorted(filled) == sorted(masks)
    for stem, ids in filled.items():
        assert scaled_iou(masks[stem], ids) >= 0.95, stem


def test_label_config_with_polygon_labels():
    from ml_backend.label_config import LabelConfigError, parse_label_config

    image = '<Image name="img" value="$photo"/>'
    polygons = '<PolygonLabels name="poly" toName="img"><Label value="Car"/></PolygonLabels>'
    brushes = '<BrushLabels name="brush" toName="img"><Label value="Road"/></BrushLabels>'
    target = parse_label_config(f"<View>{image}{polygons}</View>")
    assert (target.kind, target.from_name, target.to_name, target.data_key, target.labels) == (
        "polygonlabels", "poly", "img", "photo", ("Car",)
    )  # fmt: skip
    both = parse_label_config(f"<View>{image}{polygons}{brushes}</View>")
    assert (both.kind, both.from_name) == ("brushlabels", "brush")
    with pytest.raises(LabelConfigError, match='PolygonLabels name="poly"> has no <Label>'):
        parse_label_config(f'<View>{image}<PolygonLabels name="poly" toName="img"/></View>')
    with pytest.raises(LabelConfigError, match="no <BrushLabels> or <PolygonLabels>"):
        parse_label_config(f"<View>{image}</View>")
