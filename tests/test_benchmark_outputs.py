"""``benchmark``'s outputs for submission and Table 5: ``--save-masks`` in every preset's own
ids, and ``--student`` (a refine student scored on a dataset split)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from cli import main
from labeler.datasets import PRESETS, folder_preset

from .test_benchmark import _folder_args, folder_root  # noqa: F401 (a fixture)
from .test_refine_units import _save_student


# ---------------------------------------------------------------------- --save-masks' ids
@pytest.mark.parametrize("name", [*PRESETS, "folder"])
def test_predictions_are_written_in_each_datasets_own_ids(name: str) -> None:
    preset = PRESETS[name] if name != "folder" else folder_preset(["cat", "dog"], (7,))
    top = preset.num_classes
    pred = np.array([[0, 1, 2], [top, 1, 0]], np.uint8)  # project ids: 0 background
    raw = preset.encode_prediction(pred)
    # The file decodes back to the prediction (background where the dataset has none becomes
    # its ignored id: 255 after decoding).
    decoded = preset.decode(raw, preset.prediction_kind)
    background = 0 if preset.background_switchable else 255
    np.testing.assert_array_equal(decoded, np.where(pred == 0, background, pred))
    expected = {
        "voc": [[0, 1, 2], [20, 1, 0]],
        "voc21": [[0, 1, 2], [20, 1, 0]],
        "context59": [[0, 1, 2], [59, 1, 0]],
        "context60": [[0, 1, 2], [59, 1, 0]],
        "ade150": [[0, 1, 2], [150, 1, 0]],  # 1-based, 0 = other
        "cityscapes": [[0, 7, 8], [33, 7, 0]],  # labelIds (road 7, sidewalk 8, bicycle 33)
        "foodseg103": [[0, 1, 2], [103, 1, 0]],
        "uecfoodpix": [[0, 1, 2], [102, 1, 0]],  # in the red channel
        "camvid": [[11, 0, 1], [10, 0, 11]],  # 0-based, 11 = void
        "folder": [[0, 1, 2], [2, 1, 0]],
    }[name]
    if name == "uecfoodpix":
        assert raw.shape == (2, 3, 3) and not raw[..., 1:].any()
        raw = raw[..., 0]
    np.testing.assert_array_equal(raw, expected)
    with pytest.raises(ValueError, match="no id"):
        preset.encode_prediction(np.array([[top + 1]], np.uint8))


def test_a_refine_student_is_scored_on_a_split(
    folder_root,  # noqa: F811 (the fixture imported above)
    tiny_model_dir,
    tmp_path,
) -> None:
    student = tmp_path / "student"
    student.mkdir()
    _save_student(student, background=False)  # labels cat, dog, bird
    out, masks = tmp_path / "out", tmp_path / "masks"
    args = _folder_args(folder_root, tiny_model_dir, out, "--student", str(student))
    shown = CliRunner().invoke(main, [*args, "--save-masks", str(masks)])
    assert shown.exit_code == 0, shown.output
    report = json.loads((out / "benchmark.json").read_text())
    assert report["settings"]["student"] == str(student)
    assert report["method"].startswith("DeepLabV3+ student")
    assert report["images"] == 3 and 0 <= report["mIoU"] <= 100
    assert report["table"].splitlines()[2].startswith("| DeepLabV3+ student")
    assert len(list(masks.glob("*.png"))) == 3
    refused = CliRunner().invoke(main, [*args, "--sweep", "sar=on,off"])
    assert refused.exit_code != 0 and "no --sweep" in refused.output
