"""Exporters: segmentation results -> indexed PNG, COCO RLE and polygon JSON, Label Studio, YOLO
segmentation, previews.

Every function here is pure: it returns arrays, images, dicts or strings, and the caller writes
them. Optional dependencies (pycocotools, label-studio-converter, OpenCV) are imported when
used.
"""

from exporters.coco import (
    build_coco,
    coco_annotations,
    coco_image,
    encode_rle,
    mask_annotations,
    polygon_annotations,
    result_to_coco_annotations,
)
from exporters.labelstudio import (
    brush_prediction,
    brush_prediction_json,
    brush_results,
    build_import_file,
    decode_brush_result,
    decode_polygon_result,
    image_url,
    import_task,
    mask_to_brush_rle,
    polygon_prediction,
    polygon_results,
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
from exporters.polygons import (
    MaskObject,
    joined_ring,
    label_objects,
    mask_objects,
    object_pixels,
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
from exporters.yolo import yolo_data_yaml, yolo_lines

__all__ = [
    "MaskObject",
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
    "decode_polygon_result",
    "encode_rle",
    "gallery_figure",
    "gallery_head",
    "gallery_html",
    "gallery_tail",
    "id_counts",
    "image_url",
    "import_task",
    "joined_ring",
    "label_color",
    "label_colours",
    "label_objects",
    "labelmap_text",
    "mask_annotations",
    "mask_objects",
    "mask_to_brush_rle",
    "mask_to_png",
    "object_pixels",
    "overlay",
    "png_to_mask",
    "polygon_annotations",
    "polygon_prediction",
    "polygon_results",
    "prediction",
    "present_ids",
    "result_to_coco_annotations",
    "task_score",
    "voc_palette",
    "yolo_data_yaml",
    "yolo_lines",
]
