"""Options and helpers shared by the commands. Imports only click and the standard library."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

DEFAULT_MODEL = "runwayml/stable-diffusion-v1-5"


def model_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--model, --device and --dtype."""
    func = click.option(
        "--dtype",
        type=click.Choice(["fp16", "bf16", "fp32"]),
        default=None,
        help="Weights and activations dtype.  [default: fp16 on CUDA, fp32 on CPU]",
    )(func)
    func = click.option(
        "--device",
        default=None,
        help="torch device, e.g. cuda, cuda:1, cpu.  [default: cuda when present, else cpu]",
    )(func)
    func = click.option(
        "--model",
        default=DEFAULT_MODEL,
        show_default=True,
        help="Stable Diffusion 1.x/2.x in diffusers format: a hub id or a local folder "
        "with model_index.json (demo/model is the offline demo).",
    )(func)
    return func


def background_options(outcome: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """--background-threshold and --background-prompt; ``outcome`` says what becomes of the
    background pixels in this command (e.g. "a class the student learns too")."""

    def add(func: Callable[..., Any]) -> Callable[..., Any]:
        func = click.option(
            "--background-prompt",
            default=None,
            help='A word prompted after the labels as one more class (e.g. "background"); '
            f"the pixels it wins are background: {outcome}.  [default: none]",
        )(func)
        func = click.option(
            "--background-threshold",
            type=click.FloatRange(0, 1),
            default=None,
            help="Pixels whose best label probability is below this are background: "
            f"{outcome}.  [default: every pixel gets a label]",
        )(func)
        return func

    return add


def parse_labels(labels: str | None, labels_file: Path | None) -> list[str]:
    """--labels "a,b" or --labels-file (one per line, '#' comments): exactly one of them."""
    if (labels is None) == (labels_file is None):
        raise click.UsageError("give the label names with exactly one of --labels or --labels-file")
    if labels is not None:
        names = [name.strip() for name in labels.split(",")]
        if any(not name for name in names):
            raise click.BadParameter(f"blank label name in {labels!r}", param_hint="--labels")
    else:
        assert labels_file is not None
        lines = labels_file.read_text(encoding="utf-8").splitlines()
        names = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
        if not names:
            raise click.BadParameter(
                f"{labels_file} has no label names", param_hint="--labels-file"
            )
    from labeler.prompts import validate_labels

    try:
        return validate_labels(names)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--labels") from None


def labels_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--labels and --labels-file."""
    func = click.option(
        "--labels-file",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help="Text file with one label name per line (blank lines and # comments ignored).",
    )(func)
    func = click.option(
        "--labels",
        help='Comma-separated label names, e.g. "cat,dog,person". Mask value k is the k-th.',
    )(func)
    return func


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("PIL", "urllib3", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def progress_bar(desc: str, unit: str = "img") -> Callable[[int, int], Any]:
    """A factory for tqdm bars on stderr: images/s and time left."""

    def make(total: int, initial: int) -> Any:
        from tqdm.auto import tqdm

        return tqdm(
            total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr
        )

    return make
