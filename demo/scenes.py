"""Synthetic scenes for the demo model: coloured shapes on grey backdrops, with exact masks.

A scene is drawn from ``(seed, index)`` alone, so a training run can ask for scene ``i`` at any
step (and resume), and the evaluation set is reproduced bit for bit from its seed.

Each scene has 1-3 objects (circle, square, triangle, cross), each in a distinct colour (red,
green, blue, yellow), on a grey backdrop that is plain or lightly noisy (or, in the training
stream only, a smooth multi-coloured texture). Objects are flat colour with hard edges and do
not overlap, so the masks are exact: ``colour_mask`` holds the 1-based index of the object's
colour in :data:`COLOURS` (0 = background), ``shape_mask`` the 1-based index of its shape in
:data:`SHAPES`. The caption names every object and a grey backdrop, e.g.
``"a red circle, a blue square and a green cross, background"``.

Run ``python -m demo.scenes --out demo/scenes --count 100 --seed 1000`` to write an
evaluation set (images/, masks/ by colour, shape_masks/, colours.txt, shapes.txt,
scenes.jsonl with the captions and objects).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import click
import numpy as np
from PIL import Image

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 45, 40),
    "green": (45, 165, 65),
    "blue": (45, 75, 210),
    "yellow": (230, 205, 45),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
# Every word a caption can hold, for the demo model's tokenizer.
BACKGROUND_WORD = "background"
VOCABULARY: tuple[str, ...] = ("a", "and", *COLOUR_NAMES, *SHAPES, BACKGROUND_WORD)
TRAIN_SEED = 0
EVAL_SEED = 1000


@dataclass(frozen=True)
class SceneConfig:
    """How scenes are drawn; sizes are fractions of the image side so any size works.

    Attributes:
        size: image side in pixels.
        min_objects, max_objects: objects per scene (fewer when they do not fit).
        radius: (low, high) half-extent of an object as a fraction of ``size``.
        background: (low, high) grey level of the background.
        tint: the background's channels differ from its grey level by at most this much.
        noise_prob: probability that the background is noisy.
        noise_std: (low, high) standard deviation of the background noise, in grey levels.
        colour_jitter: an object's colour differs per channel from its named colour by at
            most this much.
        texture_prob: probability that the backdrop is a smooth multi-coloured texture instead
            of grey (the training stream uses 0.3, the evaluation set 0). The caption names a
            grey backdrop with the word "background" and says nothing about a texture, so the
            word tells the model something and the backdrop's pixels learn to attend to it.
        texture_cells: the texture is bilinearly upsampled from this many random cells a side.
    """

    size: int = 64
    min_objects: int = 1
    max_objects: int = 3
    radius: tuple[float, float] = (0.12, 0.22)
    background: tuple[int, int] = (40, 215)
    tint: int = 8
    noise_prob: float = 0.5
    noise_std: tuple[float, float] = (2.0, 8.0)
    colour_jitter: int = 12
    texture_prob: float = 0.0
    texture_cells: int = 6

    def __post_init__(self) -> None:
        if self.size < 16:
            raise ValueError(f"size must be at least 16 pixels, got {self.size}")
        if not 1 <= self.min_objects <= self.max_objects <= len(COLOURS):
            raise ValueError(
                f"need 1 <= min_objects <= max_objects <= {len(COLOURS)}, "
                f"got {self.min_objects} and {self.max_objects}"
            )
        if not 0.0 < self.radius[0] <= self.radius[1] < 0.5:
            raise ValueError(f"radius must be 0 < low <= high < 0.5, got {self.radius}")


@dataclass(frozen=True)
class SceneObject:
    """One object: its names, where it is (pixels) and its exact colour."""

    colour: str
    shape: str
    centre: tuple[float, float]  # (x, y)
    radius: float
    rgb: tuple[int, int, int]


@dataclass
class Scene:
    """One image with its exact masks and caption.

    Attributes:
        image: (H, W, 3) uint8 RGB.
        colour_mask: (H, W) uint8, 0 = background, k = ``COLOUR_NAMES[k - 1]``.
        shape_mask: (H, W) uint8, 0 = background, k = ``SHAPES[k - 1]``.
        objects: the objects, in the order the caption names them.
        caption: e.g. ``"a red circle and a blue square, background"``.
        textured: the backdrop is a texture (and the caption does not say "background").
    """

    image: np.ndarray
    colour_mask: np.ndarray
    shape_mask: np.ndarray
    objects: list[SceneObject] = field(default_factory=list)
    caption: str = ""
    textured: bool = False

    @property
    def colours(self) -> list[str]:
        """The colour names present, in caption order."""
        return [obj.colour for obj in self.objects]


def shape_region(shape: str, size: int, centre: tuple[float, float], radius: float) -> np.ndarray:
    """(size, size) bool: the pixels (by their centres) that a shape covers.

    Every shape lies inside the box ``centre +- radius``.
    """
    coords = np.arange(size, dtype=np.float32) + 0.5
    dx = coords[None, :] - centre[0]  # (1, W)
    dy = coords[:, None] - centre[1]  # (H, 1)
    if shape == "circle":
        return dx * dx + dy * dy <= radius * radius
    if shape == "square":
        half = 0.85 * radius
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "triangle":
        # Apex up at (0, -r), base corners at (+-r, 0.8r); inside = on the inner side of all edges.
        top, base = -radius, 0.8 * radius
        slope = (base - top) / radius  # dy per dx along the two slanted edges
        return (dy <= base) & (dy - top >= slope * np.abs(dx))
    if shape == "cross":
        bar = 0.3 * radius
        ax, ay = np.abs(dx), np.abs(dy)
        return ((ax <= bar) & (ay <= radius)) | ((ay <= bar) & (ax <= radius))
    raise KeyError(f"unknown shape {shape!r}; valid shapes: {list(SHAPES)}")


def caption_for(objects: Sequence[SceneObject], background: bool = True) -> str:
    """Name every object, then the grey backdrop when there is one.

    "a red circle, background", "a red circle and a blue square, background",
    "a red circle, a blue square and a green cross" (textured backdrop).
    """
    names = [f"a {obj.colour} {obj.shape}" for obj in objects]
    text = ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else "".join(names)
    if background:
        text = f"{text}, {BACKGROUND_WORD}" if text else BACKGROUND_WORD
    return text


def _place(
    rng: np.random.Generator, config: SceneConfig, count: int
) -> list[tuple[tuple[float, float], float]]:
    """Up to ``count`` (centre, radius) pairs whose boxes lie in the image and do not touch."""
    size = config.size
    placed: list[tuple[tuple[float, float], float]] = []
    for _ in range(count):
        for _attempt in range(50):
            radius = float(rng.uniform(*config.radius)) * size
            low, high = radius + 1.0, size - radius - 1.0
            centre = (float(rng.uniform(low, high)), float(rng.uniform(low, high)))
            apart = all(
                max(abs(centre[0] - c[0]), abs(centre[1] - c[1])) > radius + r + 1.0
                for c, r in placed
            )
            if apart:
                placed.append((centre, radius))
                break
    return placed


def make_scene(seed: int, index: int, config: SceneConfig | None = None) -> Scene:
    """Scene number ``index`` of the stream drawn from ``seed`` (deterministic)."""
    config = config or SceneConfig()
    size = config.size
    rng = np.random.default_rng([seed, index])

    textured = bool(rng.random() < config.texture_prob)
    if textured:
        cells = rng.uniform(0, 255, size=(config.texture_cells, config.texture_cells, 3))
        texture = Image.fromarray(cells.astype(np.uint8)).resize(
            (size, size), Image.Resampling.BILINEAR
        )
        image = np.asarray(texture, dtype=np.float32)  # (H, W, 3)
    else:
        grey = rng.uniform(*config.background)
        tint = rng.uniform(-config.tint, config.tint, size=3)
        image = np.broadcast_to(grey + tint, (size, size, 3)).astype(np.float32)  # (H, W, 3)
        if rng.random() < config.noise_prob:
            std = rng.uniform(*config.noise_std)
            image = image + rng.normal(0.0, std, size=(size, size, 3)).astype(np.float32)
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)  # (H, W, 3)

    count = int(rng.integers(config.min_objects, config.max_objects + 1))
    colours = rng.permutation(len(COLOUR_NAMES))[:count]
    colour_mask = np.zeros((size, size), dtype=np.uint8)  # (H, W)
    shape_mask = np.zeros((size, size), dtype=np.uint8)  # (H, W)
    objects: list[SceneObject] = []
    for colour_index, (centre, radius) in zip(colours, _place(rng, config, count), strict=False):
        shape_index = int(rng.integers(len(SHAPES)))
        name = COLOUR_NAMES[colour_index]
        jitter = rng.integers(-config.colour_jitter, config.colour_jitter + 1, size=3)
        rgb = tuple(int(v) for v in np.clip(np.array(COLOURS[name]) + jitter, 0, 255))
        region = shape_region(SHAPES[shape_index], size, centre, radius)  # (H, W)
        image[region] = rgb
        colour_mask[region] = colour_index + 1
        shape_mask[region] = shape_index + 1
        objects.append(SceneObject(name, SHAPES[shape_index], centre, radius, rgb))  # type: ignore[arg-type]
    caption = caption_for(objects, background=not textured)
    return Scene(image, colour_mask, shape_mask, objects, caption, textured)


def make_scenes(
    seed: int, start: int, count: int, config: SceneConfig | None = None
) -> list[Scene]:
    """Scenes ``start .. start + count - 1`` of the stream drawn from ``seed``."""
    return [make_scene(seed, index, config) for index in range(start, start + count)]


# ---------------------------------------------------------------------- evaluation set files
def make_mosaic(seed: int, index: int, grid: int, config: SceneConfig | None = None) -> Scene:
    """``grid`` x ``grid`` scenes stitched into one image, masks stitched alike: the mosaic
    tier, a stand-in for a photo larger than the model's side (each scene keeps its pixels, so
    squeezing the mosaic to the model's side shrinks every object ``grid`` times).

    Mosaic ``index`` holds scenes ``index * grid**2`` to ``(index + 1) * grid**2 - 1`` of
    ``seed``, row by row; its objects are theirs, moved to the mosaic's pixels, and its caption
    joins theirs with "; ".
    """
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    scenes = make_scenes(seed, index * grid * grid, grid * grid, config)
    side = scenes[0].image.shape[0]

    def stitch(parts: list[np.ndarray]) -> np.ndarray:
        rows = [np.concatenate(parts[r * grid : (r + 1) * grid], axis=1) for r in range(grid)]
        return np.concatenate(rows, axis=0)

    objects = [
        SceneObject(
            obj.colour,
            obj.shape,
            (obj.centre[0] + (i % grid) * side, obj.centre[1] + (i // grid) * side),
            obj.radius,
            obj.rgb,
        )
        for i, scene in enumerate(scenes)
        for obj in scene.objects
    ]
    return Scene(
        image=stitch([scene.image for scene in scenes]),
        colour_mask=stitch([scene.colour_mask for scene in scenes]),
        shape_mask=stitch([scene.shape_mask for scene in scenes]),
        objects=objects,
        caption="; ".join(scene.caption for scene in scenes),
        textured=any(scene.textured for scene in scenes),
    )


def scene_name(index: int) -> str:
    return f"scene_{index:03d}"


def write_scene_set(
    root: str | Path,
    count: int = 100,
    seed: int = EVAL_SEED,
    config: SceneConfig | None = None,
    mosaic: int = 1,
) -> list[Scene]:
    """Write ``count`` scenes under ``root`` as an evaluation set; returns the scenes.

    With ``mosaic`` > 1 each image is a :func:`make_mosaic` of ``mosaic`` x ``mosaic`` scenes.

    Layout: ``images/NAME.png`` (RGB), ``masks/NAME.png`` (indexed, ids of colours.txt),
    ``shape_masks/NAME.png`` (indexed, ids of shapes.txt), ``colours.txt`` and ``shapes.txt``
    (one label a line), ``scenes.jsonl`` (name, caption, objects, one scene a line).
    """
    from exporters.png import mask_to_png

    root = Path(root)
    for sub in ("images", "masks", "shape_masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "colours.txt").write_text("\n".join(COLOUR_NAMES) + "\n")
    (root / "shapes.txt").write_text("\n".join(SHAPES) + "\n")
    if mosaic > 1:
        scenes = [make_mosaic(seed, index, mosaic, config) for index in range(count)]
    else:
        scenes = make_scenes(seed, 0, count, config)
    lines = []
    for index, scene in enumerate(scenes):
        name = scene_name(index)
        Image.fromarray(scene.image).save(root / "images" / f"{name}.png")
        mask_to_png(scene.colour_mask).save(root / "masks" / f"{name}.png")
        mask_to_png(scene.shape_mask).save(root / "shape_masks" / f"{name}.png")
        record = {
            "name": name,
            "caption": scene.caption,
            "objects": [asdict(obj) for obj in scene.objects],
        }
        lines.append(json.dumps(record))
    (root / "scenes.jsonl").write_text("\n".join(lines) + "\n")
    return scenes


def read_scene_set(
    root: str | Path, masks: str = "masks", labels_file: str = "colours.txt"
) -> tuple[list[str], list[np.ndarray], list[np.ndarray], list[str]]:
    """Read an evaluation set: (names, RGB images (H, W, 3), id masks (H, W), labels)."""
    from exporters.png import png_to_mask

    root = Path(root)
    labels = [line.strip() for line in (root / labels_file).read_text().splitlines()]
    labels = [label for label in labels if label]
    paths = sorted((root / "images").glob("*.png"))
    if not paths:
        raise FileNotFoundError(f"no images/*.png under {root}")
    names = [path.stem for path in paths]
    images = [np.asarray(Image.open(path).convert("RGB")) for path in paths]
    gts = [png_to_mask(Image.open(root / masks / f"{name}.png")) for name in names]
    return names, images, gts, labels


@click.command()
@click.option("--out", type=click.Path(file_okay=False), default="demo/scenes", show_default=True)
@click.option("--count", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--seed", type=int, default=EVAL_SEED, show_default=True)
@click.option("--size", type=click.IntRange(min=16), default=64, show_default=True)
@click.option(
    "--mosaic",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Stitch N x N scenes into each image (the mosaic tier: 4 gives 256 px images).",
)
def cli(out: str, count: int, seed: int, size: int, mosaic: int) -> None:
    """Write an evaluation set of synthetic scenes with exact masks."""
    if seed == TRAIN_SEED:
        raise click.BadParameter(
            f"seed {seed} is the training seed; pick another", param_hint="--seed"
        )
    write_scene_set(out, count, seed, SceneConfig(size=size), mosaic=mosaic)
    click.echo(f"wrote {count} {'mosaics' if mosaic > 1 else 'scenes'} to {out}")


if __name__ == "__main__":
    cli()
