"""Class names -> prompt token ids, with the token positions of every label.

The prompt is assembled from separately tokenised pieces (template prefix, label, separator,
label, ..., template suffix), so the positions of each label's tokens are known exactly. CLIP's
pre-tokeniser splits on spaces and punctuation first, so tokenising the pieces gives the same
ids as tokenising the whole sentence. Labels that do not fit one context are spread over several
prompts, which run as one batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .labels import normalise_label, synonyms_of, validate_labels

__all__ = ["PromptBatch", "build_prompts", "validate_labels"]


@dataclass(frozen=True)
class PromptBatch:
    """Several prompts that together name every label once.

    Attributes:
        texts: the prompts as text, for logs.
        input_ids: (P, L) token ids, padded to the text encoder's context length L.
        token_index: (P, T) positions of label tokens in each prompt, padded with 0.
        token_class: (P, T) 0-based label index of each of those tokens; -1 on padding.
        spans: for each label, (prompt index, first position, end position) of its first name.
        token_weight: (P, T) each token's weight in its label's attention: 1 / (the name's
            tokens x the label's names), so a label's weights sum to 1 and each of its names
            (synonyms) counts once, whatever its length; 0 on padding.
    """

    texts: list[str]
    input_ids: torch.Tensor
    token_index: torch.Tensor
    token_class: torch.Tensor
    spans: list[tuple[int, int, int]]
    token_weight: torch.Tensor

    @property
    def num_prompts(self) -> int:
        return int(self.input_ids.shape[0])


def _ids(tokenizer: Any, text: str) -> list[int]:
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def build_prompts(
    tokenizer: Any,
    labels: Sequence[str],
    template: str = "{}",
    separator: str = ", ",
) -> PromptBatch:
    """Tokenise the labels into as few prompts as fit the tokenizer's context.

    A label's synonyms (:class:`labeler.labels.Label`) are prompted as names of their own, next
    to the label's; their tokens carry the label's index, so the label's attention is the mean
    over its names (``token_weight``).

    Raises:
        ValueError: for an invalid label list, or a single label too long for any prompt.
    """
    labels = validate_labels(labels, max_labels=None)
    names = [
        (k, normalise_label(name, f"a synonym of {label!r}"), 1 + len(synonyms_of(label)))
        for k, label in enumerate(labels)
        for name in (label, *synonyms_of(label))
    ]
    prefix, suffix = template.split("{}")
    prefix_ids, suffix_ids = _ids(tokenizer, prefix.rstrip()), _ids(tokenizer, suffix.lstrip())
    sep_ids = _ids(tokenizer, separator.strip())
    context = int(tokenizer.model_max_length)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    # Room for label tokens once BOS, EOS, prefix and suffix are in.
    capacity = context - 2 - len(prefix_ids) - len(suffix_ids)

    chunks: list[list[tuple[int, list[int], int, str]]] = [[]]
    used = 0
    for k, label, count in names:
        label_ids = _ids(tokenizer, label.strip())
        if not label_ids:
            raise ValueError(f"label {label!r} produced no tokens")
        if len(label_ids) > capacity:
            raise ValueError(
                f"label {label!r} has {len(label_ids)} tokens, more than the {capacity} "
                f"that fit one prompt of the text encoder (context {context})"
            )
        need = len(label_ids) + (len(sep_ids) if chunks[-1] else 0)
        if chunks[-1] and used + need > capacity:
            chunks.append([])
            used, need = 0, len(label_ids)
        chunks[-1].append((k, label_ids, count, label))
        used += need

    rows, texts, positions, classes, weights = [], [], [], [], []
    spans: list[tuple[int, int, int] | None] = [None] * len(labels)
    for p, chunk in enumerate(chunks):
        ids = [bos, *prefix_ids]
        pos: list[int] = []
        cls: list[int] = []
        wts: list[float] = []
        for j, (k, label_ids, count, _) in enumerate(chunk):
            if j:
                ids.extend(sep_ids)
            start = len(ids)
            ids.extend(label_ids)
            if spans[k] is None:
                spans[k] = (p, start, len(ids))
            pos.extend(range(start, len(ids)))
            cls.extend([k] * len(label_ids))
            wts.extend([1.0 / (len(label_ids) * count)] * len(label_ids))
        ids.extend([*suffix_ids, eos])
        ids.extend([pad] * (context - len(ids)))
        rows.append(ids)
        positions.append(pos)
        classes.append(cls)
        weights.append(wts)
        texts.append(template.format(separator.join(name for *_, name in chunk)))

    width = max(len(p) for p in positions)
    token_index = torch.zeros(len(chunks), width, dtype=torch.long)
    token_class = torch.full((len(chunks), width), -1, dtype=torch.long)
    token_weight = torch.zeros(len(chunks), width, dtype=torch.float32)
    for p, (pos, cls, wts) in enumerate(zip(positions, classes, weights, strict=True)):
        token_index[p, : len(pos)] = torch.tensor(pos)
        token_class[p, : len(cls)] = torch.tensor(cls)
        token_weight[p, : len(wts)] = torch.tensor(wts)
    return PromptBatch(
        texts=texts,
        input_ids=torch.tensor(rows, dtype=torch.long),  # (P, L)
        token_index=token_index,  # (P, T)
        token_class=token_class,  # (P, T)
        spans=[span for span in spans if span is not None],
        token_weight=token_weight,  # (P, T)
    )
