"""Exporters: PNG masks, COCO RLE, Label Studio brush results and previews."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from exporters import (
    brush_results,
    build_coco,
    build_import_file,
    classes_json,
    coco_annotations,
    coco_image,
    decode_brush_result,
    gallery_html,
    image_url,
    import_task,
    label_colours,
    labelmap_text,
    mask_to_png,
    overlay,
    png_to_mask,
    prediction,
    result_to_coco_annotations,
    voc_palette,
)
from labeler.result import SegmentationResult

LABELS = ["cat", "dog", "person"]


def _random_mask(shape: tuple[int, int], num_labels: int, seed: int) -> np.ndarray:
    """(H, W) uint8 blobs of ids 0..num_labels with a few 255 (ignore) pixels."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, num_labels + 1, (shape[0] // 4 + 1, shape[1] // 4 + 1))
    mask = coarse.repeat(4, axis=0).repeat(4, axis=1)[: shape[0], : shape[1]].astype(np.uint8)
    mask[rng.random(shape) < 0.03] = 255
    return mask


def _probs(mask: np.ndarray, num_labels: int, seed: int) -> np.ndarray:
    """(C, H, W) float32 probabilities that sum to 1 over C."""
    rng = np.random.default_rng(seed)
    raw = rng.random((num_labels, *mask.shape)).astype(np.float32)
    return raw / raw.sum(axis=0, keepdims=True)


# --- PNG ---------------------------------------------------------------------------------------


def test_voc_palette_known_colours() -> None:
    palette = voc_palette()
    assert len(palette) == 768
    colour = [tuple(palette[3 * i : 3 * i + 3]) for i in range(256)]
    assert colour[0] == (0, 0, 0)
    assert colour[1] == (128, 0, 0)  # aeroplane
    assert colour[2] == (0, 128, 0)
    assert colour[3] == (128, 128, 0)
    assert colour[4] == (0, 0, 128)
    assert colour[15] == (192, 128, 128)  # person
    assert colour[20] == (0, 64, 128)  # tvmonitor
    assert colour[255] == (224, 224, 192)  # ignore
    assert len(set(colour)) == 256
    assert voc_palette(3) == palette[:9]
    with pytest.raises(ValueError, match="257"):
        voc_palette(257)


def test_png_round_trip_through_file_bytes() -> None:
    mask = _random_mask((29, 41), 3, seed=0)
    image = mask_to_png(mask)
    assert image.mode == "P"
    assert image.size == (41, 29)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    reloaded = Image.open(io.BytesIO(buffer.getvalue()))
    assert reloaded.mode == "P"
    assert reloaded.getpalette()[:768] == voc_palette()
    np.testing.assert_array_equal(png_to_mask(reloaded), mask)
    # The RGB rendering shows the VOC colours.
    rgb = np.asarray(reloaded.convert("RGB"))
    np.testing.assert_array_equal(rgb[mask == 1][0], (128, 0, 0))


def test_png_accepts_wide_dtypes_and_grey_images() -> None:
    mask = np.array([[0, 254], [255, 7]], dtype=np.int64)
    np.testing.assert_array_equal(png_to_mask(mask_to_png(mask)), mask)
    grey = Image.fromarray(mask.astype(np.uint8))
    assert grey.mode == "L"
    np.testing.assert_array_equal(png_to_mask(grey), mask)


def test_png_rejects_bad_masks_and_rgb() -> None:
    with pytest.raises(ValueError, match="300"):
        mask_to_png(np.array([[0, 300]]))
    with pytest.raises(ValueError, match="-1"):
        mask_to_png(np.array([[0, -1]]))
    with pytest.raises(ValueError, match="integer"):
        mask_to_png(np.zeros((2, 2), dtype=np.float32))
    with pytest.raises(ValueError, match="'RGB'"):
        png_to_mask(Image.new("RGB", (2, 2)))


def test_labelmap_and_classes() -> None:
    text = labelmap_text(LABELS)
    lines = text.splitlines()
    assert lines[0].startswith("#")
    assert lines[1:] == [
        "background:0,0,0::",
        "cat:128,0,0::",
        "dog:0,128,0::",
        "person:128,128,0::",
    ]
    assert classes_json(LABELS) == {
        "0": "background",
        "1": "cat",
        "2": "dog",
        "3": "person",
        "255": "ignore",
    }
    # ':' separates the CVAT fields: it is escaped (with '%'), never dropped or refused.
    assert labelmap_text(["a:b", "50%"]).splitlines()[2:] == [
        "a%3Ab:128,0,0::",
        "50%25:0,128,0::",
    ]
    assert classes_json(["a:b"])["1"] == "a:b"
    with pytest.raises(ValueError, match="duplicate label 'cat'"):
        classes_json(["cat", "cat"])
    with pytest.raises(ValueError, match="at most 254"):
        classes_json([f"l{i}" for i in range(255)])


# --- COCO --------------------------------------------------------------------------------------


# pycocotools' decode trips a numpy 2 copy-keyword DeprecationWarning that is not ours.
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_coco_file_loads_and_masks_round_trip(tmp_path) -> None:
    from pycocotools.coco import COCO

    masks = [_random_mask((37, 53), 3, seed=1), _random_mask((20, 16), 3, seed=2)]
    masks[1][masks[1] == 2] = 0  # label 2 absent from the second image
    images, annotations = [], []
    for image_id, mask in enumerate(masks, start=1):
        images.append(coco_image(image_id, f"sub/img {image_id}.jpg", mask.shape[1], mask.shape[0]))
        annotations += coco_annotations(
            mask, image_id, len(annotations) + 1, len(LABELS), probs=_probs(mask, 3, image_id)
        )
    dataset = build_coco(images, annotations, LABELS)
    path = tmp_path / "coco.json"
    path.write_text(json.dumps(dataset))

    coco = COCO(str(path))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == LABELS
    assert sorted(coco.getImgIds()) == [1, 2]
    for image_id, mask in enumerate(masks, start=1):
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
        present = sorted(int(i) for i in np.unique(mask) if 1 <= i <= 3)
        assert sorted(a["category_id"] for a in anns) == present
        for ann in anns:
            expected = mask == ann["category_id"]
            np.testing.assert_array_equal(coco.annToMask(ann), expected)
            assert ann["area"] == int(expected.sum())
            assert ann["iscrowd"] == 0
    assert 2 not in [a["category_id"] for a in coco.loadAnns(coco.getAnnIds(imgIds=[2]))]
    assert [a["id"] for a in dataset["annotations"]] == list(range(1, len(annotations) + 1))


def test_coco_bbox_score_and_no_background_or_ignore() -> None:
    mask = np.zeros((10, 12), dtype=np.uint8)
    mask[2:5, 3:9] = 2  # rows 2..4, columns 3..8
    mask[7:, :] = 255
    probs = np.zeros((3, 10, 12), dtype=np.float32)
    probs[1] = 0.25
    probs[1, 2, 3] = 1.0  # mean over the 18 label pixels: (17 * 0.25 + 1) / 18
    (ann,) = coco_annotations(mask, image_id=5, first_ann_id=40, num_labels=3, probs=probs)
    assert ann["id"] == 40 and ann["image_id"] == 5 and ann["category_id"] == 2
    assert ann["bbox"] == [3.0, 2.0, 6.0, 3.0]
    assert ann["area"] == 18
    assert ann["score"] == pytest.approx((17 * 0.25 + 1.0) / 18)
    assert isinstance(ann["segmentation"]["counts"], str)
    assert ann["segmentation"]["size"] == [10, 12]

    with_scores = coco_annotations(mask, 5, 1, 3, scores=[0.1, 0.7, 0.2])
    assert with_scores[0]["score"] == pytest.approx(0.7)
    assert "score" not in coco_annotations(mask, 5, 1, 3)[0]
    assert coco_annotations(np.zeros((4, 4), np.uint8), 1, 1, 3) == []


def test_result_to_coco_annotations_uses_result_probs() -> None:
    mask = _random_mask((16, 24), 2, seed=3)
    probs = _probs(mask, 2, seed=3)
    result = SegmentationResult(mask=mask, probs=probs, labels=["a", "b"], scores={})
    anns = result_to_coco_annotations(result, image_id=1, first_ann_id=1)
    for ann in anns:
        pixels = mask == ann["category_id"]
        assert ann["score"] == pytest.approx(float(probs[ann["category_id"] - 1][pixels].mean()))


def test_coco_validation_errors() -> None:
    mask = np.array([[0, 1], [2, 4]], dtype=np.uint8)
    with pytest.raises(ValueError, match=r"mask ids \[4\]"):
        coco_annotations(mask, 1, 1, num_labels=3)
    with pytest.raises(ValueError, match="probs shape"):
        coco_annotations(mask, 1, 1, num_labels=4, probs=np.zeros((3, 2, 2)))
    with pytest.raises(ValueError, match="relative path"):
        coco_image(1, "/abs/x.jpg", 2, 2)
    anns = coco_annotations(np.ones((2, 2), np.uint8), 1, 1, num_labels=1)
    with pytest.raises(ValueError, match="unknown image 9"):
        build_coco([coco_image(1, "x.jpg", 2, 2)], [{**anns[0], "image_id": 9}], ["a"])
    with pytest.raises(ValueError, match="differs"):
        build_coco([coco_image(1, "x.jpg", 3, 2)], anns, ["a"])


# --- Label Studio ------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(37, 53), (1, 1), (5, 300)])
def test_brush_round_trip_odd_sizes(shape) -> None:
    mask = _random_mask(shape, 3, seed=shape[0] * shape[1])
    mask.flat[0] = 3  # at least one label present
    scores = {"cat": 0.9, "person": 0.4}
    results = brush_results(mask, LABELS, scores, from_name="seg", to_name="img")
    present = [int(i) for i in np.unique(mask) if 1 <= i <= 3]
    assert [r["value"]["brushlabels"] for r in results] == [[LABELS[i - 1]] for i in present]
    for label_id, result in zip(present, results, strict=True):
        assert result["type"] == "brushlabels"
        assert result["from_name"] == "seg" and result["to_name"] == "img"
        assert result["value"]["format"] == "rle"
        assert all(isinstance(v, int) and 0 <= v <= 255 for v in result["value"]["rle"])
        assert (result["original_height"], result["original_width"]) == shape
        assert result["image_rotation"] == 0
        label = LABELS[label_id - 1]
        assert result.get("score") == scores.get(label)
        np.testing.assert_array_equal(decode_brush_result(result), mask == label_id)


def test_brush_alpha_is_opaque_and_ids_are_stable() -> None:
    from label_studio_converter.brush import decode_rle

    mask = np.zeros((6, 7), dtype=np.uint8)
    mask[1:4, 2:5] = 1
    mask[5, :] = 2
    first = brush_results(mask, ["a", "b"])
    rgba = decode_rle(first[0]["value"]["rle"]).reshape(6, 7, 4)
    assert set(np.unique(rgba[..., 3])) == {0, 255}  # Label Studio draws alpha: 0 / 255
    again = brush_results(mask.copy(), ["a", "b"])
    assert [r["id"] for r in first] == [r["id"] for r in again]
    assert first[0]["id"] != first[1]["id"]
    assert brush_results(np.zeros((3, 3), np.uint8), ["a"]) == []
    with pytest.raises(ValueError, match=r"mask ids \[3\]"):
        brush_results(np.full((2, 2), 3), ["a", "b"])


def test_import_file_structure() -> None:
    mask = np.zeros((4, 4), dtype=np.uint8)
    mask[:2] = 1
    results = brush_results(mask, ["cat"], {"cat": 0.8})
    pred = prediction(results, model_version="stableseg-v1")
    assert pred == {"model_version": "stableseg-v1", "score": pytest.approx(0.8), "result": results}
    url = image_url("/data/local-files/?d=images", "a b/c.jpg")
    tasks = build_import_file([import_task(url, pred)])
    assert tasks == [{"data": {"image": url}, "predictions": [pred]}]
    assert json.loads(json.dumps(tasks)) == tasks  # JSON-serialisable as is
    with pytest.raises(ValueError, match="task 0"):
        build_import_file([{"image": url}])


@pytest.mark.parametrize(
    ("root", "relative", "expected"),
    [
        (
            "/data/local-files/?d=images",
            "a b/c#1.jpg",
            "/data/local-files/?d=images/a%20b/c%231.jpg",
        ),
        ("/data/local-files/?d=", "x.png", "/data/local-files/?d=x.png"),
        ("http://host/imgs/", "dir/ü?.png", "http://host/imgs/dir/%C3%BC%3F.png"),
        ("http://host/imgs", "x&y.png", "http://host/imgs/x%26y.png"),
    ],
)
def test_image_url(root, relative, expected) -> None:
    assert image_url(root, relative) == expected


@pytest.mark.parametrize("relative", ["/etc/x.png", "../x.png", ""])
def test_image_url_rejects_non_relative(relative) -> None:
    with pytest.raises(ValueError, match="relative_path"):
        image_url("http://host/", relative)


# --- previews ----------------------------------------------------------------------------------


def test_overlay_blends_colours_draws_boundaries_and_legend() -> None:
    image = Image.new("RGB", (120, 90), (100, 100, 100))
    mask = np.zeros((90, 120), dtype=np.uint8)
    mask[40:80, 60:110] = 1  # cat: the first of the distinct colours not near another label's
    cat = label_colours(["cat", "dog"])[0]
    plain = np.asarray(overlay(image, mask, ["cat", "dog"], alpha=0.5, legend=False))
    assert plain.shape == (90, 120, 3)
    inside = np.rint(0.5 * np.array((100, 100, 100)) + 0.5 * np.array(cat))
    np.testing.assert_allclose(plain[60, 85], inside, atol=1)  # grey and the label's colour
    np.testing.assert_array_equal(plain[85, 5], (100, 100, 100))  # background untouched
    np.testing.assert_array_equal(plain[40, 85], (255, 255, 255))  # boundary row
    no_edges = np.asarray(overlay(image, mask, ["cat", "dog"], boundaries=False, legend=False))
    np.testing.assert_allclose(no_edges[40, 85], inside, atol=1)

    with_legend = np.asarray(overlay(image, mask, ["cat", "dog"]))
    assert with_legend.shape[0] == 90 and with_legend.shape[1] > 120  # a panel beside it
    np.testing.assert_array_equal(with_legend[:, :120], plain)  # the picture is not covered
    panel = with_legend[:, 120:].reshape(-1, 3)
    assert (panel == cat).all(axis=1).any()  # swatch of the present label
    dog = label_colours(["cat", "dog"])[1]
    assert not (panel == dog).all(axis=1).any()  # dog is absent: no swatch


def test_overlay_rejects_size_mismatch() -> None:
    with pytest.raises(ValueError, match="does not match image size 4x3"):
        overlay(Image.new("RGB", (4, 3)), np.zeros((4, 3), np.uint8), ["a"])


def test_gallery_html_escapes_and_links() -> None:
    entries = [
        {"overlay": "overlays/a b.jpg", "file_name": "<script>x</script>.jpg", "labels": ["c&d"]},
        {"overlay": "overlays/b.jpg", "file_name": "b.jpg", "labels": []},
    ]
    page = gallery_html(entries, title="Run <1>")
    assert page.startswith("<!DOCTYPE html>")
    assert "<script>" not in page
    assert "&lt;script&gt;x&lt;/script&gt;.jpg" in page
    assert "c&amp;d" in page
    assert "<title>Run &lt;1&gt;</title>" in page
    assert len(re.findall(r"<figure>", page)) == 2
    assert 'href="overlays/a%20b.jpg"' in page
    with pytest.raises(ValueError, match="lacks"):
        gallery_html([{"file_name": "x.jpg"}])
