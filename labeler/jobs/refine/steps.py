"""The refine job as a table of steps: what each step does, what it writes, what gets scored.

:data:`STEPS` is read by the driver (which steps a run has, in order), the report (each stage's
outputs and parts) and the result (where the students and weights are); nothing else imports
this module. Each step's ``work`` runs in every process (the per-image steps take their share
of the pool); its ``finish`` runs in process 0 once every process is done (counts, checks).
``scored`` names the mask folders the step's record scores against ``--val-gt``.

The steps themselves: :mod:`.first_stage` (StableSeg masks and the attention cache),
:mod:`.cached_maps` (pseudo-masks from the cache), :mod:`.students` (train, predict) and
:mod:`.plusplus` (the StableSeg++ weight fit and its exact pseudo-masks).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

from ..refine_options import FIRST_STAGE
from .cached_maps import pseudo, pseudo_finish
from .first_stage import stableseg, stableseg_finish
from .plusplus import fit, plusplus_pseudo, plusplus_pseudo_finish
from .students import predict, train
from .workdir import CACHE, WEIGHTS

if TYPE_CHECKING:
    from .workdir import RefineRun


@dataclass(frozen=True)
class Step:
    """One step of a refine run.

    Attributes:
        name: ``stage`` or ``stage.part`` (``stableseg``, ``plus.train``, ...).
        work: does the step in every process; returns the step's record (process 0 keeps it).
        finish: process 0, after every process has finished ``work``: completes the record.
        outputs: report name -> path in the work dir, for the report's ``outputs``.
        scored: metric name -> mask folder in the work dir scored against ``--val-gt``.
        temporaries: paths in the work dir removed once the step's record is saved (a
            checkpoint that lets an interrupted step resume).
    """

    name: str
    work: Callable[[RefineRun], dict[str, Any]]
    finish: Callable[[RefineRun, dict[str, Any]], None] | None = None
    outputs: Mapping[str, str] = field(default_factory=dict)
    scored: Mapping[str, str] = field(default_factory=dict)
    temporaries: tuple[str, ...] = ()

    @property
    def stage(self) -> str:
        return self.name.partition(".")[0]

    @property
    def part(self) -> str:
        return self.name.partition(".")[2]


def _stage_steps(stage: str) -> list[Step]:
    """The pseudo-mask, training and prediction steps every self-training stage has."""
    if stage == "plusplus":
        work, finish = plusplus_pseudo, plusplus_pseudo_finish
    else:
        work, finish = partial(pseudo, stage=stage), partial(pseudo_finish, stage=stage)
    return [
        Step(
            f"{stage}.pseudo",
            work,
            finish,
            outputs={
                **({"stableseg_masks": "plusplus/stableseg"} if stage == "plusplus" else {}),
                "pseudo_masks": f"{stage}/pseudo",
            },
            scored={
                "pseudo_masks": f"{stage}/pseudo",
                **({"stableseg": "plusplus/stableseg"} if stage == "plusplus" else {}),
            },
        ),
        Step(
            f"{stage}.train",
            partial(train, stage=stage),
            outputs={"student": f"{stage}/student"},
            temporaries=(f"{stage}/checkpoint.pt",),
        ),
        Step(
            f"{stage}.predict",
            partial(predict, stage=stage),
            outputs={"predictions": f"{stage}/pred"},
            scored={"student": f"{stage}/pred"},
        ),
    ]


STEPS: tuple[Step, ...] = (
    Step(
        FIRST_STAGE,
        stableseg,
        stableseg_finish,
        outputs={"masks": "stableseg/masks", "cache": CACHE},
        scored={"stableseg": "stableseg/masks"},
    ),
    *_stage_steps("plus"),
    Step("plusplus.fit", fit, outputs={"weights": WEIGHTS}),
    *_stage_steps("plusplus"),
)
BY_NAME = {step.name: step for step in STEPS}


def steps_of(stages: tuple[str, ...]) -> list[Step]:
    """The steps of a run with these stages (the first stage always), in order."""
    chosen = {FIRST_STAGE, *stages}
    return [step for step in STEPS if step.stage in chosen]


def stage_outputs(stage: str) -> dict[str, str]:
    """Every output of a stage's steps, in step order (the report's ``outputs``)."""
    found: dict[str, str] = {}
    for step in STEPS:
        if step.stage == stage:
            found.update(step.outputs)
    return found


def stage_parts(stage: str) -> list[str]:
    """The parts of a self-training stage, in order (``pseudo``, ``train``, ...)."""
    return [step.part for step in STEPS if step.stage == stage and step.part]
