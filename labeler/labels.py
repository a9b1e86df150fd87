"""What a label name may be: one rule for the CLI, the backend, the trainer and the core.

A label is what the model is prompted with and what every export names a class by, so it is
checked once, where it enters (a ``--labels`` option, a labels file, a Label Studio config), by
:func:`validate_labels`, before any model loads. The rules:

* Unicode is normalised to NFC, every run of whitespace (tabs, no-break spaces, ...) becomes one
  space, and leading and trailing whitespace is dropped.
* Control characters and invisible format characters (zero-width spaces and joiners, byte-order
  marks, bidirectional controls) are refused: they look like nothing on screen but change the
  tokens the model sees.
* A label is not empty, is at most :data:`MAX_LABEL_CHARS` characters, and does not start with
  ``#`` (a labels file's comment marker).
* Labels are unique, ignoring case; there are at most ``MAX_LABELS`` (254) of them, the ids an
  8-bit mask can hold next to background (0) and ignore (255).

Synonyms: a label may have more names, written after it and separated by ``|`` (``car | automobile
| sedan`` on a labels file's line, ``--labels "car|automobile, person"``). The first name is the
label's name in every output; every name is prompted, and the label's attention is the mean over
its names (:func:`labeler.sar.label_attention_from_tokens`). A label whose own name holds ``|``
writes it ``\\|``. A synonym follows the rules above; it may repeat its own label's name (a
repeat is prompted once), not another label's.

Any other character is allowed and carried unchanged into the prompt, COCO categories,
``classes.json`` and Label Studio results. ``labelmap.txt`` (the CVAT format, whose fields are
separated by ``:``) writes ``%`` as ``%25`` and ``:`` as ``%3A``; see :mod:`exporters.png`.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence
from typing import Any

from .result import MAX_LABELS

MAX_LABEL_CHARS = 200
"""Longest label accepted; CLIP's 77-token context holds far less than this anyway."""
COMMENT = "#"
SYNONYM_SEPARATOR = "|"
_SPACES = re.compile(r"\s+")
_UNESCAPED_BAR = re.compile(r"(?<!\\)\|")


class Label(str):
    """A label name (a ``str``, equal to and hashed as its name) with its synonyms: the other
    names it is prompted with (:func:`labeler.prompts.build_prompts`). Made by the parsers here
    and :mod:`ml_backend.label_config`, so synonyms travel with the labels through every
    product (options, the model stage, the backend) without another argument; a plain ``str``
    is a label without synonyms."""

    synonyms: tuple[str, ...]

    def __new__(cls, name: str, synonyms: Iterable[str] = ()) -> Label:
        label = super().__new__(cls, name)
        # A name given twice (the label's own included) is prompted once: a repeat would only
        # move the same word to another position of the prompt.
        seen = {name.strip().casefold()}
        kept = []
        for other in synonyms:
            if other.strip().casefold() not in seen:
                seen.add(other.strip().casefold())
                kept.append(other)
        label.synonyms = tuple(kept)
        return label

    def __repr__(self) -> str:
        return f"Label({str(self)!r}, synonyms={self.synonyms!r})"


def synonyms_of(label: str) -> tuple[str, ...]:
    """A label's synonyms (none for a plain ``str``)."""
    return getattr(label, "synonyms", ())


def labels_record(labels: Sequence[str], key: str = "labels") -> dict[str, Any]:
    """``{key: the label names}``, and ``"synonyms"``: label -> its synonyms when any label has
    some.

    Run files, the refine work dir's settings and ``benchmark.json`` record it: synonyms change
    the masks, so a rerun with other synonyms is another run, while a run without synonyms
    records what it did before they existed.
    """
    record: dict[str, Any] = {key: [str(label) for label in labels]}
    synonyms = {str(label): list(synonyms_of(label)) for label in labels if synonyms_of(label)}
    if synonyms:
        record["synonyms"] = synonyms
    return record


def normalise_label(text: str, where: str = "label") -> str:
    """One label in its canonical form (NFC, single spaces, stripped), or ``ValueError``.

    ``where`` names the label in messages, e.g. ``"label 3"`` or ``"line 7 of classes.txt"``.
    """
    if not isinstance(text, str):
        raise ValueError(f"{where} must be a string, got {type(text).__name__} {text!r}")
    text = _SPACES.sub(" ", unicodedata.normalize("NFC", text)).strip()
    for position, char in enumerate(text, start=1):
        category = unicodedata.category(char)
        if category in ("Cc", "Cf"):
            name = unicodedata.name(char, f"U+{ord(char):04X}")
            raise ValueError(
                f"{where} {text!r} holds an invisible or control character ({name}, "
                f"U+{ord(char):04X}) at position {position}; remove it"
            )
    if not text:
        raise ValueError(f"{where} is blank")
    if text.startswith(COMMENT):
        raise ValueError(
            f"{where} {text!r} starts with {COMMENT!r}, which marks a comment in a labels file; "
            "rename the label"
        )
    if len(text) > MAX_LABEL_CHARS:
        raise ValueError(
            f"{where} is {len(text)} characters long, more than {MAX_LABEL_CHARS}: {text[:40]!r}..."
        )
    return text


def validate_labels(
    labels: Sequence[str],
    where: Sequence[str] | None = None,
    max_labels: int | None = MAX_LABELS,
) -> list[str]:
    """A label list in canonical form: non-empty, at most 254, unique ignoring case; a
    :class:`Label` keeps its synonyms.

    Args:
        labels: the names, in mask-id order (label k gets id k).
        where: optional description of each label for messages (e.g. its line in a file).
        max_labels: the limit; the core's own checks pass None (``StableSeg.segment`` can
            return uint16 masks for more labels than any export takes).

    Raises:
        ValueError: naming the offending label and what to change.
    """
    if isinstance(labels, str):
        raise ValueError(f"labels must be a list of names, got the string {labels!r}")
    labels = list(labels)
    if not labels:
        raise ValueError("labels is empty: give at least one label name")
    if max_labels is not None and len(labels) > max_labels:
        raise ValueError(
            f"{len(labels)} labels given; at most {max_labels} fit a mask (ids 1..{MAX_LABELS}, "
            "with 0 for background and 255 for ignore)"
        )
    names = list(where) if where is not None else [f"label {i}" for i in range(1, len(labels) + 1)]
    clean: list[str] = []
    seen: dict[str, str] = {}
    for label, name in zip(labels, names, strict=True):
        text = normalise_label(label, name)
        key = text.casefold()
        if key in seen:
            raise ValueError(
                f"duplicate label {text!r} ({seen[key]} and {name}); every label must be unique, "
                "ignoring case"
            )
        seen[key] = name
        synonyms = synonyms_of(label)
        clean.append(Label(text, synonyms) if synonyms else text)
    return clean


def split_names(text: str) -> list[str]:
    """``"car | automobile"`` -> ``["car ", " automobile"]``: a label and its synonyms (split on
    every ``|`` not written ``\\|``; ``\\|`` becomes ``|``)."""
    return [part.replace("\\|", "|") for part in _UNESCAPED_BAR.split(text)]


def with_synonyms(
    labels: Sequence[str], synonyms: Sequence[Sequence[str]], where: Sequence[str] | None = None
) -> list[str]:
    """``labels`` (already valid) with ``synonyms[k]`` in canonical form attached to label k (a
    :class:`Label`; a label without synonyms stays a ``str``); a name that is another label's
    (or another label's synonym), ignoring case, is refused."""
    names = list(where) if where is not None else [f"label {k}" for k in range(1, len(labels) + 1)]
    owner = {label.casefold(): k for k, label in enumerate(labels)}
    result: list[str] = []
    for k, (label, others) in enumerate(zip(labels, synonyms, strict=True)):
        what = f"a synonym of {label!r} ({names[k]})"
        clean = tuple(normalise_label(name, what) for name in others)
        for name in clean:
            first = owner.setdefault(name.casefold(), k)
            if first != k:
                raise ValueError(
                    f"{name!r} ({names[k]}) names two labels, {labels[first]!r} and {label!r}; "
                    "a synonym must belong to one label"
                )
        named = Label(label, clean)
        result.append(named if named.synonyms else label)
    return result


def parse_labels_text(text: str) -> list[str]:
    """``--labels "car|automobile, person"`` -> the labels, with their synonyms."""
    parts = [split_names(item) for item in split_labels(text)]
    labels = validate_labels([names[0] for names in parts])
    return with_synonyms(labels, [names[1:] for names in parts])


def split_labels(text: str) -> list[str]:
    """``--labels "cat, dog,person"`` -> the raw names (validated by :func:`validate_labels`)."""
    return text.split(",")


def parse_labels_file(lines: Iterable[str], source: str = "the labels file") -> list[str]:
    """The labels of a labels file, with their synonyms (:class:`Label`): one label per line, its
    synonyms after it, separated by ``|``; blank lines and ``#`` comment lines skipped.

    A comment is a line whose first non-blank character is ``#``; labels cannot start with it, so
    no label is ever dropped silently. Label k is the k-th label line.
    """
    raw: list[list[str]] = []
    where: list[str] = []
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith(COMMENT):
            continue
        raw.append(split_names(line))
        where.append(f"line {number} of {source}")
    if not raw:
        raise ValueError(f"{source} has no label names (one per line; # starts a comment)")
    labels = validate_labels([names[0] for names in raw], where)
    return with_synonyms(labels, [names[1:] for names in raw], where)
