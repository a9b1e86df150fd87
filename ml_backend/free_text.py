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

**A phrase that cannot be used** (no label found, unknown label, empty, too long, invisible
characters, the background prompt itself) is logged at WARNING with what to type, and answered
where Label Studio 1.23.2 shows it to the annotator. Its ``interactive-annotating`` view passes a
backend's non-2xx answer on only as ``requests``' "400 Client Error: BAD REQUEST for url: ..."
(the body is dropped: ``ml/api_connector.py`` appends ``response.text`` only when the response
is truthy, which a 4xx never is), under ``errors``, and its labeling page ignores ``errors``
altogether: it loads ``data.result`` as suggestions and nothing else. So the refusal comes back
as HTTP 200 with, for each task, a prediction holding one ``textarea`` region on the TextArea the
phrase was typed in, whose text is the message (it appears under the box, where the annotator
typed; they delete it and type again), and the reason in the answer's ``errors``, as for any task
without a mask. A refusal that does not come from a TextArea (an API caller's unknown brush
label) stays a 400 with the message in ``detail``. The length (:data:`MAX_LABEL_CHARS`) is
checked before anything normalises the text, so a phrase of megabytes is refused at once.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from labeler.jobs.io import Failure
from labeler.labels import MAX_LABEL_CHARS, validate_labels

from .label_config import BrushTarget, PromptArea, parse_prompt_areas

if TYPE_CHECKING:
    from .backend_settings import BackendSettings
    from .model import Outcome, StableSegBackend

logger = logging.getLogger(__name__)

DEFAULT_BACKGROUND_PROMPT = "background"


class FreeTextError(ValueError):
    """A free-text request that cannot be answered; the message is for the annotator.

    ``area`` is the TextArea the phrase was typed in (None when it came from elsewhere).
    """

    def __init__(self, message: str, area: str | None = None) -> None:
        super().__init__(message)
        self.area = area


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
    if texts:
        _check_length(*texts[-1])
    for label in brush_labels:
        if label not in target.labels:
            raise FreeTextError(
                f"unknown brush label {label!r}; the labels are {', '.join(target.labels)}"
            )
    chosen = brush_labels[-1] if brush_labels else None
    if not texts:
        assert chosen is not None
        phrase = target.prompts[target.labels.index(chosen)]
        background = settings_background or DEFAULT_BACKGROUND_PROMPT
        return PhraseRequest(_check_phrase(phrase, background), chosen, background)
    text, area = texts[-1]  # the newest submission
    background = area.background_prompt or settings_background or DEFAULT_BACKGROUND_PROMPT
    try:
        phrase, label = _split_label(text, target)
        label = label or chosen or _label_for(phrase, target)
        return PhraseRequest(_check_phrase(phrase, background), label, background)
    except FreeTextError as err:
        raise FreeTextError(str(err), area.name) from None


def refusal(error: FreeTextError, tasks: list[Any], target: BrushTarget, version: str) -> Outcome:
    """What a refused phrase is answered with (see the module): for each task, the message as a
    suggestion on the TextArea ``error.area``, and the reason among the errors."""
    from .model import Outcome, task_id

    message = str(error)
    region = {
        "from_name": error.area,
        "to_name": target.to_name,
        "type": "textarea",
        "value": {"text": [f"Not painted: {message}"]},
    }
    prediction = {"result": [region], "score": 0.0, "model_version": version}
    ids = [task_id(task, index) for index, task in enumerate(tasks)]
    return Outcome(
        predictions=[prediction for _ in tasks],
        errors=[Failure(item, message, "task") for item in ids],
        model_version=version,
    )


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

    A phrase typed in a TextArea that cannot be used gets :func:`refusal`'s answer.

    Raises:
        LabelConfigError: the project's config has no BrushLabels on an Image.
        FreeTextError: an unusable request that did not come from a TextArea (see
            :func:`phrase_request`).
    """
    context = context_of(params)
    if context is None:
        return None
    target = model.require_target()
    background = model.settings.stableseg.segmenter.background_prompt
    try:
        request = phrase_request(context, model.label_config, target, background)
    except FreeTextError as err:
        logger.warning("free-text prompt refused: %s", err)
        if err.area is None:
            raise
        return refusal(err, tasks, target, model.model_version)
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


def _check_length(text: str, area: PromptArea) -> None:
    """Refuse a text too long for any label and phrase before anything else reads it."""
    if len(text) > 2 * MAX_LABEL_CHARS + 1:  # "Label:phrase", each at most MAX_LABEL_CHARS
        raise FreeTextError(
            f"the text is {len(text)} characters long; type a label, a colon and a phrase of "
            f"at most {MAX_LABEL_CHARS} characters, e.g. 'Car: red car'",
            area.name,
        )


def _check_phrase(phrase: str, background: str) -> str:
    """The phrase in canonical form, checked by the one label rule (labeler.labels: no
    invisible characters, at most 200 characters, not the background prompt); its length is
    checked first, before anything normalises it."""
    if not phrase:
        raise FreeTextError("the phrase is empty: type what to segment after the label's colon")
    if len(phrase) > MAX_LABEL_CHARS:
        raise FreeTextError(
            f"the phrase is {len(phrase)} characters long, more than {MAX_LABEL_CHARS}: type a "
            f"shorter one after the label's colon, e.g. 'Car: red car'"
        )
    try:
        phrase, _ = validate_labels(
            [phrase, background], where=["the phrase", "the background prompt"], max_labels=None
        )
    except ValueError as err:
        raise FreeTextError(str(err)) from None
    return phrase
