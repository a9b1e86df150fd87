"""The paper's tables as Markdown: Table 1's row for one measured dataset, and sweep grids.

Table 1 has one column per dataset (VOC-20, Context-59, ADE-150, Cityscapes, FoodPix,
FoodSeg103); a benchmark fills the column of the dataset it measured and leaves the others
empty. A dataset the paper does not report (VOC-21, PC-60, CamVid, a folder of one's own) gets a
column of its own after those six. Sweeps print as the paper's ablation tables: two axes make a
grid (rows = first axis, columns = second: Table 3), one axis a single row (Tables 2 and 4),
more axes one line per combination.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

TABLE1_COLUMNS: dict[str, str] = {
    "voc": "VOC-20",
    "context59": "Context-59",
    "ade150": "ADE-150",
    "cityscapes": "Cityscapes",
    "uecfoodpix": "FoodPix",
    "foodseg103": "FoodSeg103",
}
"""Dataset preset -> its column in the paper's Table 1, in the table's order."""

PAPER_TABLE1: dict[str, dict[str, float]] = {
    "StableSeg": {
        "voc": 50.3,
        "context59": 36.2,
        "ade150": 23.6,
        "cityscapes": 15.1,
        "uecfoodpix": 63.3,
        "foodseg103": 49.1,
    },
    "StableSeg w/o SAR": {
        "voc": 47.2,
        "context59": 31.0,
        "ade150": 19.4,
        "cityscapes": 12.7,
        "uecfoodpix": 53.8,
        "foodseg103": 39.3,
    },
}
"""The paper's mIoU (SD 1.5, each image prompted with its ground-truth classes)."""


def paper_figures(dataset: str) -> dict[str, float]:
    """The paper's Table 1 figures for a dataset preset ({} when the paper has none)."""
    return {row: figures[dataset] for row, figures in PAPER_TABLE1.items() if dataset in figures}


def percent(value: float | None) -> str:
    """``50.27`` -> ``50.3``; None (nothing to average) -> ``-``."""
    return "-" if value is None else f"{value:.1f}"


def _escape(text: str) -> str:
    return str(text).replace("|", "\\|")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(_escape(h) for h in header) + " |"]
    lines.append("|" + "|".join(" --- " for _ in header) + "|")
    lines += ["| " + " | ".join(_escape(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def table1_markdown(dataset: str, column: str, method: str, miou: float | None) -> str:
    """Table 1's header and one row: ``method`` with ``miou`` in the dataset's column.

    Args:
        dataset: the preset name (picks the column among :data:`TABLE1_COLUMNS`).
        column: the column title for a dataset the paper does not report.
        method: the row's label.
    """
    columns = dict(TABLE1_COLUMNS)
    if dataset not in columns:
        columns[dataset] = column
    cells = [percent(miou) if name == dataset else "" for name in columns]
    return _table(["Method", *columns.values()], [[method, *cells]])


def method_name(config: Mapping[str, Any]) -> str:
    """The row label of a segmenter configuration (``SegmenterConfig.mask_settings()``)."""
    if config.get("map_weights"):
        name = "StableSeg (learned map weights)"
    elif not config.get("use_sar", True):
        name = "StableSeg w/o SAR"
    elif config.get("self_only"):
        name = "StableSeg, SAR map only"
    else:
        name = "StableSeg"
    if config.get("tiles"):
        name += f", tiles {config['tiles']:g}"
    return name


def sweep_grid(
    keys: Sequence[str], values: Mapping[str, Sequence[str]], results: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """The sweep's mIoU arranged as the paper's tables arrange it (JSON-ready).

    Args:
        keys: the axes, in sweep order.
        values: each axis's values as written.
        results: one per point, each with ``values`` (key -> value) and ``mIoU``.

    Returns:
        ``{"rows": key, "columns": key, "row_values", "column_values", "mIoU": [[...]]}`` for
        two axes, ``{"columns": key, "column_values", "mIoU": [...]}`` for one, and
        ``{"keys", "points": [{key: value, ..., "mIoU"}]}`` for more.
    """
    found = {tuple(r["values"][k] for k in keys): r.get("mIoU") for r in results}
    if len(keys) == 1:
        (key,) = keys
        return {
            "columns": key,
            "column_values": list(values[key]),
            "mIoU": [found.get((v,)) for v in values[key]],
        }
    if len(keys) == 2:
        rows, columns = keys
        return {
            "rows": rows,
            "columns": columns,
            "row_values": list(values[rows]),
            "column_values": list(values[columns]),
            "mIoU": [[found.get((r, c)) for c in values[columns]] for r in values[rows]],
        }
    return {
        "keys": list(keys),
        "points": [{**r["values"], "mIoU": r.get("mIoU")} for r in results],
    }


def grid_markdown(grid: Mapping[str, Any]) -> str:
    """Markdown of a :func:`sweep_grid` (mIoU in percent, one decimal)."""
    if "rows" in grid:
        header = [f"{grid['rows']} \\ {grid['columns']}", *grid["column_values"]]
        rows = [
            [str(r), *(percent(v) for v in line)]
            for r, line in zip(grid["row_values"], grid["mIoU"], strict=True)
        ]
        return _table(header, rows)
    if "columns" in grid:
        header = [grid["columns"], *grid["column_values"]]
        return _table(header, [["mIoU", *(percent(v) for v in grid["mIoU"])]])
    keys = grid["keys"]
    rows = [[*(str(p[k]) for k in keys), percent(p["mIoU"])] for p in grid["points"]]
    return _table([*keys, "mIoU"], rows)
