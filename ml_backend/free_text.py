"""Free-text prompts: the annotator types a phrase ("red car", "Mario") and gets its mask.

The labeling config puts a ``<TextArea>`` beside the ``<BrushLabels>`` on the same image::

    <View>
      <Image name="image" value="$image"/>
      <BrushLabels name="tag" toName="image">
        <Label value="Car"/><Label value="Person"/>
      </BrushLabels>
      <TextArea name="prompt" toName="image" editable="true" rows="1"
                showSubmitButton="true" placeholder="Label: phrase, e.g. Car: red car"/>
    </View>

With the model connected with *Interactive preannotations* on and **Auto-Annotation** on in the
labeling page, submitting the TextArea makes Label Studio 1.23 post ``/api/ml/ID/
interactive-annotating`` with ``{"task": ID, "context": {"result": [<the TextArea's result>]}}``
(its data manager sends the serialized results of the region that finished and of the regions
"connected" to it; for a TextArea, its own result and those of the other per-image
classifications, which are ignored here: ``{"from_name": "prompt", "to_name": "image", "type":
"textarea", "value": {"text": ["Car: red car"]}}``), and Label Studio forwards that to the
backend's ``/predict`` as ``params.context``. The browser does not send which brush label is
selected, so the label comes from the request, in this order:

1. the text before a first ``:`` when it is one of the labels ("Car: red car" paints "red car"
   as Car);
2. a ``brushlabels`` result in the context (an API caller's way to name it; Label Studio sends
   one when the annotator paints a stroke with the smart brush, without a phrase: then the
   label's own prompt is the phrase);
3. the label whose value or prompt is the phrase itself;
4. the only label of the config.

StableSeg then segments the phrase as the single label against a background prompt (the
TextArea's ``backgroundPrompt`` attribute, else the backend's ``--background-prompt``, else
"background"), and the phrase's pixels come back as one brush region under the label.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from labeler.labels import validate_labels

from .label_config import BrushTarget, PromptArea, parse_prompt_areas

if TYPE_CHECKING:
    from .backend_settings import BackendSettings
    from .model import Outcome, StableSegBackend

logger = logging.getLogger(__name__)

DEFAULT_BACKGROUND_PROMPT = "background"


class FreeTextError(ValueError):
    """A free-text request that cannot be answered; the message is for the annotator."""


@dataclass(frozen=True)
class PhraseRequest:
    """What one interactive request asks for.

    Attributes:
        phrase: what StableSeg is prompted with.
        label: the brush label the phrase's pixels are stored under.
        background_prompt: what the phrase is segmented against.
    """

    phrase: str
    label: str
    background_prompt: str


def context_of(params: Any) -> dict[str, Any] | None:
    """``params.context`` of a ``/predict`` body (Label Studio's interactive requests), or None."""
    if not isinstance(params, Mapping):
        return None
    context = params.get("context")
    return context if isinstance(context, dict) and context else None


def phrase_request(
    context: Mapping[str, Any] | None,
    label_config: str | None,
    target: BrushTarget,
    settings_background: str | None = None,
) -> PhraseRequest | None:
    """The phrase and label an interactive request asks for; None when it names neither.

    Raises:
        FreeTextError: a phrase without a label the rules above can find, an unknown label, an
            empty, too long or invalid phrase, or a phrase equal to the background prompt.
    """
    results = context.get("result") if isinstance(context, Mapping) else None
    if not isinstance(results, list):
        return None
    areas = parse_prompt_areas(label_config, target)
    texts: list[tuple[str, PromptArea]] = []
    brush_labels: list[str] = []
    for result in results:
        if not isinstance(result, Mapping) or not isinstance(result.get("value"), Mapping):
            continue
        kind, name, value = result.get("type"), result.get("from_name"), result["value"]
        if kind == "textarea" and name in areas:
            texts += [(t, areas[name]) for t in value.get("text") or [] if isinstance(t, str)]
        elif kind == "brushlabels" and name == target.from_name:
            brush_labels += [v for v in value.get("brushlabels") or [] if isinstance(v, str)]
    texts = [(text.strip(), area) for text, area in texts if text.strip()]
    if not texts and not brush_labels:
        return None
    for label in brush_labels:
        if label not in target.labels:
            raise FreeTextError(
                f"unknown brush label {label!r}; the labels are {', '.join(target.labels)}"
            )
    chosen = brush_labels[-1] if brush_labels else None
    if texts:
        text, area = texts[-1]  # the newest submission
        phrase, label = _split_label(text, target)
        label = label or chosen or _label_for(phrase, target)
        background = area.background_prompt
    else:
        assert chosen is not None
        label = chosen
        phrase = target.prompts[target.labels.index(label)]
        background = None
    background = background or settings_background or DEFAULT_BACKGROUND_PROMPT
    return PhraseRequest(_check_phrase(phrase, background), label, background)


def phrase_target(target: BrushTarget, request: PhraseRequest) -> BrushTarget:
    """The target with the phrase as the only prompt, stored under the request's label."""
    return dataclasses.replace(target, labels=(request.label,), prompts=(request.phrase,))


def phrase_settings(settings: BackendSettings, request: PhraseRequest) -> BackendSettings:
    """The settings with the request's background prompt."""
    stableseg = settings.stableseg
    segmenter = stableseg.segmenter.replace(background_prompt=request.background_prompt)
    return dataclasses.replace(
        settings, stableseg=dataclasses.replace(stableseg, segmenter=segmenter)
    )


def predict_phrase(model: StableSegBackend, tasks: list[Any], params: Any) -> Outcome | None:
    """The phrase's mask for each task, when ``params`` holds a free-text request; else None.

    Raises:
        LabelConfigError: the project's config has no BrushLabels on an Image.
        FreeTextError: see :func:`phrase_request`.
    """
    context = context_of(params)
    if context is None:
        return None
    target = model.require_target()
    background = model.settings.stableseg.segmenter.background_prompt
    request = phrase_request(context, model.label_config, target, background)
    if request is None:
        return None
    logger.info(
        "free-text prompt %r as %r against %r for %d task(s)",
        request.phrase,
        request.label,
        request.background_prompt,
        len(tasks),
    )
    phrase_model = type(model)(
        label_config=model.label_config, settings=phrase_settings(model.settings, request)
    )
    phrase_model.target = phrase_target(target, request)
    return phrase_model.predict_tasks(tasks)


# ---------------------------------------------------------------------- steps
def _split_label(text: str, target: BrushTarget) -> tuple[str, str | None]:
    """``"Car: red car"`` -> ("red car", "Car") when "Car" is a label; else (text, None)."""
    head, colon, rest = text.partition(":")
    if colon:
        wanted = head.strip().casefold()
        for label in target.labels:
            if label.casefold() == wanted:
                return rest.strip(), label
    return text, None


def _label_for(phrase: str, target: BrushTarget) -> str:
    """The label a bare phrase belongs to: the one it names, else the only label."""
    wanted = phrase.casefold()
    for label, prompt in zip(target.labels, target.prompts, strict=True):
        if wanted in (label.casefold(), prompt.casefold()):
            return label
    if len(target.labels) == 1:
        return target.labels[0]
    example = f"{target.labels[0]}: {phrase}"
    raise FreeTextError(
        f"which label should {phrase!r} be painted as? Start the text with a label and a colon, "
        f"e.g. {example!r} (labels: {', '.join(target.labels)})"
    )


def _check_phrase(phrase: str, background: str) -> str:
    """The phrase in canonical form, checked by the one label rule (labeler.labels: no
    invisible characters, at most 200 characters, not the background prompt)."""
    if not phrase:
        raise FreeTextError("the phrase is empty: type what to segment after the label's colon")
    try:
        phrase, _ = validate_labels(
            [phrase, background], where=["the phrase", "the background prompt"], max_labels=None
        )
    except ValueError as err:
        raise FreeTextError(str(err)) from None
    return phrase
