"""report.json: what a refine run did, assembled from its steps' records (``W/state.json``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..refine_options import FIRST_STAGE, STAGES
from .steps import stage_outputs, stage_parts

REPORT_FORMAT = "stableseg-refine-report/1"


def _miou(record: Mapping[str, Any] | None, name: str) -> float | None:
    metrics = ((record or {}).get("metrics") or {}).get(name)
    return None if metrics is None else metrics.get("mIoU")


def _part(record: Mapping[str, Any] | None, drop: Sequence[str] = ()) -> dict[str, Any] | None:
    if record is None:
        return None
    return {k: v for k, v in record.items() if k not in drop}


def assemble_report(
    steps: Mapping[str, Mapping[str, Any]],
    settings: Mapping[str, Any],
    stages: Sequence[str],
    finished: bool,
    pool_size: int,
    background: bool,
) -> dict[str, Any]:
    """report.json from the finished steps' records (``W/state.json``).

    Schema: ``format``, ``finished``, ``labels``, ``background``, ``pool_size``, ``settings``;
    ``stages.stableseg`` = {ran, seconds, images, skipped, mIoU, metrics, outputs};
    ``stages.plus`` = {ran, seconds, pseudo, train, predict, mIoU, outputs};
    ``stages.plusplus`` = the same plus ``fit`` (loss curve, initial/final loss, pixels),
    ``weights`` and ``initial_weights`` (layer -> weight), and in ``pseudo`` the version of its
    masks (``masks``: exact or cache) and, for exact ones, ``cache_disagreement`` (pixels, per
    image and in total, where the cache shortcut's masks differ); ``mIoU`` = the headline numbers
    {stableseg: StableSeg masks, plus / plusplus: the students' predictions} (None without
    ``--val-gt``). Every ``metrics`` entry is ``labeler.metrics.summarize`` plus ``images``.
    """
    first = steps.get(FIRST_STAGE)
    report_stages: dict[str, Any] = {
        FIRST_STAGE: {
            "ran": first is not None,
            "seconds": (first or {}).get("seconds"),
            "images": (first or {}).get("images"),
            "skipped": (first or {}).get("skipped", {}),
            "mIoU": _miou(first, "stableseg"),
            "metrics": ((first or {}).get("metrics") or {}).get("stableseg"),
            "outputs": stage_outputs(FIRST_STAGE),
        }
    }
    for stage in STAGES:
        parts = stage_parts(stage)
        records = {part: steps.get(f"{stage}.{part}") for part in parts}
        if stage not in stages and not any(records.values()):
            continue
        entry: dict[str, Any] = {
            "ran": all(r is not None for r in records.values()),
            "seconds": round(sum(r.get("seconds", 0.0) for r in records.values() if r), 3),
            "mIoU": _miou(records["predict"], "student"),
            "outputs": stage_outputs(stage),
        }
        for part, record in records.items():
            entry[part] = _part(record, drop=("weights", "initial_weights"))
        if stage == "plusplus":
            entry["weights"] = (records["fit"] or {}).get("weights")
            entry["initial_weights"] = (records["fit"] or {}).get("initial_weights")
        report_stages[stage] = entry
    return {
        "format": REPORT_FORMAT,
        "finished": finished,
        "labels": list(settings["labels"]),
        "background": background,
        "pool_size": pool_size,
        "settings": dict(settings),
        "stages": report_stages,
        "mIoU": {name: entry.get("mIoU") for name, entry in report_stages.items()},
    }
