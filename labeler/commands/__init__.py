"""The ``stableseg`` command line (also ``python cli.py``): a click group of lazy subcommands.

Each command lives in its own module of this package and is imported only when it runs (or when
its help is shown), so ``--help`` stays fast: torch and diffusers load inside the commands.
"""

from __future__ import annotations

import importlib

import click

# command name -> "module:function" of its click command
COMMANDS = {
    "benchmark": "labeler.commands.benchmark:benchmark",
    "pseudo-label": "labeler.commands.pseudo_label:pseudo_label",
    "evaluate": "labeler.commands.evaluate:evaluate",
    "refine": "labeler.commands.refine:refine",
    "serve": "labeler.commands.serve:serve",
    "label-studio": "labeler.commands.label_studio:label_studio",
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use."""

    def __init__(self, *args, lazy: dict[str, str] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy:
            module_name, attribute = self.lazy[name].split(":")
            return getattr(importlib.import_module(module_name), attribute)
        return super().get_command(ctx, name)


@click.group(cls=LazyGroup, lazy=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option("0.1.0", prog_name="stableseg-labeler")
def main() -> None:
    """StableSeg Labeler: zero-shot segmentation masks from Stable Diffusion attention.

    \b
    benchmark     mIoU on a dataset by the paper's protocol; the paper's tables
    pseudo-label  label a folder of images -> COCO JSON, PNG masks, Label Studio import file
    evaluate      mIoU of predicted masks against ground-truth masks
    refine        StableSeg+ / StableSeg++ self-training on an unlabelled pool
    serve         Label Studio ML backend that pre-annotates tasks with brush masks
    label-studio  predict: pre-annotate a whole Label Studio project from the CLI

    Every command that runs a model takes --model (a hub id such as
    stable-diffusion-v1-5/stable-diffusion-v1-5, or a local diffusers folder)
    and --device.
    """
