"""The project's labeling config -> what StableSeg paints: a BrushLabels tag on an Image, or
a PolygonLabels tag (then each object of a label comes back as one polygon region).

``<BrushLabels name="tag" toName="image">`` (or ``<PolygonLabels ...>``) with
``<Label value="Car" prompt="red car"/>`` children, pointing at
``<Image name="image" value="$image"/>``. A config with both predicts for its first
BrushLabels. The model sees each label's
prompt: its ``prompt`` attribute, else the first of its ``predicted_values``, else the label
itself (its ``alias`` when it has one, as Label Studio stores the alias in results). A label's
``synonyms`` attribute (``<Label value="Car" synonyms="automobile, sedan"/>``, comma-separated)
gives more names the model is prompted with for it, averaged into its map
(:class:`labeler.labels.Label`); like ``prompt`` it is the backend's own attribute, which Label
Studio ignores (its ``alias`` renames the label in results and ``hint`` is a tooltip, so neither
is taken for this).

Prompts follow the one label rule (:func:`labeler.labels.validate_labels`: NFC, single spaces,
no invisible characters, unique ignoring case); label values stay exactly as the config spells
them, since results must name them so. A project has at most ``max_labels`` labels
(``STABLESEG_MAX_LABELS``, 254 by default): the count is checked while the labels are read,
before any of them reaches the model.

A config comes from whoever can reach the backend, so it is parsed by :func:`parse_xml`:
defusedxml's parser with DTDs refused (no entities, internal or external: no "billion laughs",
no file reads) and at most :data:`MAX_CONFIG_DEPTH` nested elements, checked while parsing, so a
config nested 500,000 deep is refused after its first hundred tags. Label Studio's own configs
are a few levels deep and never carry a DTD.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from xml.etree import ElementTree

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import iterparse

from labeler.labels import validate_labels, with_synonyms
from labeler.result import MAX_LABELS

logger = logging.getLogger(__name__)


MAX_CONFIG_DEPTH = 100
"""Elements nested in a labeling config at most (Label Studio's are a few levels deep)."""


class LabelConfigError(ValueError):
    """The labeling config has nothing StableSeg can predict; the message says what to add."""


def parse_xml(label_config: str) -> ElementTree.Element:
    """The config's root element, parsed without DTDs and at most :data:`MAX_CONFIG_DEPTH`
    deep (see the module).

    Raises:
        LabelConfigError: malformed XML, a DTD or entity, or nesting deeper than the limit.
    """
    depth = 0
    root: ElementTree.Element | None = None
    try:
        for event, element in iterparse(
            io.StringIO(label_config), events=("start", "end"), forbid_dtd=True
        ):
            if event == "end":
                depth -= 1
                continue
            depth += 1
            root = element if root is None else root
            if depth > MAX_CONFIG_DEPTH:
                raise LabelConfigError(
                    f"the labeling config nests elements more than {MAX_CONFIG_DEPTH} deep; "
                    "Label Studio's configs are a few levels deep"
                )
    except DefusedXmlException as err:
        raise LabelConfigError(
            f"the labeling config must not have a DTD or entities ({type(err).__name__})"
        ) from None
    except ElementTree.ParseError as err:
        raise LabelConfigError(f"the labeling config is not valid XML: {err}") from None
    if root is None:
        raise LabelConfigError("the labeling config is not valid XML: no element")
    return root


EXAMPLE_CONFIG = (
    '<View><Image name="image" value="$image"/>'
    '<BrushLabels name="tag" toName="image"><Label value="Car"/><Label value="Road"/>'
    "</BrushLabels></View>"
)


CONTROL_TYPES = {"BrushLabels": "brushlabels", "PolygonLabels": "polygonlabels"}
"""The control tags StableSeg predicts for, in order of preference, and their result type."""


@dataclass(frozen=True)
class BrushTarget:
    """Where predictions go and what the model is asked for.

    Attributes:
        from_name: the BrushLabels (or PolygonLabels) tag's ``name``.
        to_name: the Image tag's ``name``.
        data_key: the task data field holding the image URL (``$image`` -> ``image``).
        labels: label values as results store them, in config order.
        prompts: what the model is prompted with for each label (same order).
        kind: the results' type: ``"brushlabels"`` (a mask per label) or
            ``"polygonlabels"`` (a polygon per object).
    """

    from_name: str
    to_name: str
    data_key: str
    labels: tuple[str, ...]
    prompts: tuple[str, ...]
    kind: str = "brushlabels"


def parse_label_config(label_config: Any, max_labels: int = MAX_LABELS) -> BrushTarget:
    """Find the first BrushLabels control on an Image (else the first PolygonLabels) and its
    labels' prompts.

    Raises:
        LabelConfigError: not a string, empty or malformed XML, no BrushLabels or
            PolygonLabels on an Image, no
            labels, more than ``max_labels`` labels, two labels with the same prompt, or a
            prompt the label rule refuses.
    """
    if label_config is not None and not isinstance(label_config, str):
        raise LabelConfigError(
            f"the labeling config must be an XML string, got {type(label_config).__name__}"
        )
    if not label_config or not label_config.strip():
        raise LabelConfigError(
            "the project has no labeling config; set one with a <BrushLabels> on an <Image>, "
            f"for example {EXAMPLE_CONFIG}"
        )
    root = parse_xml(label_config)
    images = {
        tag.get("name"): tag
        for tag in root.iter("Image")
        if tag.get("name") and tag.get("value", "").startswith("$")
    }
    brushes = [tag for control in CONTROL_TYPES for tag in root.iter(control) if tag.get("name")]
    targets = [
        (brush, images[to_name])
        for brush in brushes
        for to_name in [n.strip() for n in brush.get("toName", "").split(",")][:1]
        if to_name in images
    ]
    if not targets:
        what = (
            '<BrushLabels> or <PolygonLabels> pointing at an <Image value="$...">'
            if brushes
            else "<BrushLabels> or <PolygonLabels>"
        )
        found = sorted({tag.tag for tag in root.iter() if tag.get("name")}) or ["no named tags"]
        raise LabelConfigError(
            f"the labeling config has no {what} (found: {', '.join(found)}); StableSeg paints "
            f"brush masks (or polygons), so add one, for example {EXAMPLE_CONFIG}"
        )
    if len(targets) > 1:
        logger.warning(
            "the labeling config has %d BrushLabels / PolygonLabels tags; predicting for the "
            "first, %r",
            len(targets),
            targets[0][0].get("name"),
        )
    brush, image = targets[0]
    from_name = brush.get("name", "")
    labels: list[str] = []
    prompts: list[str] = []
    synonyms: list[list[str]] = []
    for tag in brush.iter("Label"):
        label = (tag.get("alias") or tag.get("value") or "").strip()
        if label and label not in labels:
            if len(labels) == max_labels:
                raise LabelConfigError(
                    f'<{brush.tag} name="{from_name}"> has more than {max_labels} labels, the '
                    "limit of this backend (STABLESEG_MAX_LABELS; at most "
                    f"{MAX_LABELS}, what a mask holds); split the classes over projects"
                )
            labels.append(label)
            prompts.append(_prompt(label, tag.attrib))
            synonyms.append([n for n in tag.get("synonyms", "").split(",") if n.strip()])
    if not labels:
        raise LabelConfigError(
            f'<{brush.tag} name="{from_name}"> has no <Label> children; add the classes to '
            'predict, for example <Label value="Car"/>'
        )
    where = [f"the prompt of label {label!r}" for label in labels]
    try:
        prompts = validate_labels(prompts, where, max_labels=max_labels)
        prompts = with_synonyms(prompts, synonyms, where)
    except ValueError as err:
        hint = ""
        if str(err).startswith("duplicate"):
            hint = (
                ": two labels have the same prompt; give one of them a prompt of its own, e.g. "
                '<Label value="..." prompt="..."/>'
            )
        raise LabelConfigError(f"labeling config: {err}{hint}") from None
    return BrushTarget(
        from_name=from_name,
        to_name=image.get("name", ""),
        data_key=image.get("value", "")[1:],
        labels=tuple(labels),
        prompts=tuple(prompts),
        kind=CONTROL_TYPES[brush.tag],
    )


def _prompt(label: str, attrs: Mapping[str, str]) -> str:
    prompt = attrs.get("prompt", "").strip()
    if prompt:
        return prompt
    predicted = [v.strip() for v in attrs.get("predicted_values", "").split(",") if v.strip()]
    if predicted:
        return predicted[0]
    return label


# ---------------------------------------------------------------------- free-text prompts
@dataclass(frozen=True)
class PromptArea:
    """A ``<TextArea>`` on the brush target's image where the annotator types what to paint.

    Attributes:
        name: the TextArea's ``name`` (the ``from_name`` of its results).
        background_prompt: its ``backgroundPrompt`` attribute: what the phrase is segmented
            against (None: the backend's setting, else ``"background"``).
    """

    name: str
    background_prompt: str | None = None


def parse_prompt_areas(label_config: str | None, target: BrushTarget) -> dict[str, PromptArea]:
    """The TextAreas of the config that point at ``target``'s image, by name ({} for none).

    ``<TextArea name="prompt" toName="image" backgroundPrompt="sky"/>`` beside
    ``<BrushLabels name="tag" toName="image">`` makes "prompt" a free-text prompt for "tag".
    """
    if not label_config:
        return {}
    try:
        root = parse_xml(label_config)
    except LabelConfigError:
        return {}
    areas: dict[str, PromptArea] = {}
    for tag in root.iter("TextArea"):
        name = (tag.get("name") or "").strip()
        to_names = [n.strip() for n in (tag.get("toName") or "").split(",")]
        if name and target.to_name in to_names and name not in areas:
            background = (tag.get("backgroundPrompt") or "").strip() or None
            areas[name] = PromptArea(name=name, background_prompt=background)
    return areas
