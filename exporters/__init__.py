"""Exporters: segmentation results -> indexed PNG, COCO RLE JSON, Label Studio, previews.

Every function here is pure: it returns arrays, images, dicts or strings, and the caller writes
them. Optional dependencies (pycocotools, label-studio-converter) are imported when used.
"""

from exporters.coco import (
    build_coco,
    coco_annotations,
    coco_image,
    encode_rle,
    mask_annotations,
    result_to_coco_annotations,
)
from exporters.labelstudio import (
    brush_prediction,
    brush_prediction_json,
    brush_results,
    build_import_file,
    decode_brush_result,
    image_url,
    import_task,
    mask_to_brush_rle,
    prediction,
    task_score,
)
from exporters.mask_ids import id_counts, present_ids
from exporters.png import (
    classes_json,
    label_color,
    labelmap_text,
    mask_to_png,
    png_to_mask,
    voc_palette,
)
from exporters.preview import (
    comparison_strip,
    gallery_figure,
    gallery_head,
    gallery_html,
    gallery_tail,
    label_colours,
    overlay,
)

__all__ = [
    "brush_prediction",
    "brush_prediction_json",
    "brush_results",
    "build_coco",
    "build_import_file",
    "classes_json",
    "coco_annotations",
    "coco_image",
    "comparison_strip",
    "decode_brush_result",
    "encode_rle",
    "gallery_figure",
    "gallery_head",
    "gallery_html",
    "gallery_tail",
    "id_counts",
    "image_url",
    "import_task",
    "label_color",
    "label_colours",
    "labelmap_text",
    "mask_annotations",
    "mask_to_brush_rle",
    "mask_to_png",
    "overlay",
    "png_to_mask",
    "prediction",
    "present_ids",
    "result_to_coco_annotations",
    "task_score",
    "voc_palette",
]
