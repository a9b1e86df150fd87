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

from .labels import validate_labels

__all__ = ["PromptBatch", "build_prompts", "validate_labels"]


@dataclass(frozen=True)
class PromptBatch:
    """Several prompts that together name every label once.

    Attributes:
        texts: the prompts as text, for logs.
        input_ids: (P, L) token ids, padded to the text encoder's context length L.
        token_index: (P, T) positions of label tokens in each prompt, padded with 0.
        token_class: (P, T) 0-based label index of each of those tokens; -1 on padding.
        spans: for each label, (prompt index, first position, end position).
    """

    texts: list[str]
    input_ids: torch.Tensor
    token_index: torch.Tensor
    token_class: torch.Tensor
    spans: list[tuple[int, int, int]]

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

    Raises:
        ValueError: for an invalid label list, or a single label too long for any prompt.
    """
    labels = validate_labels(labels, max_labels=None)
    prefix, suffix = template.split("{}")
    prefix_ids, suffix_ids = _ids(tokenizer, prefix.rstrip()), _ids(tokenizer, suffix.lstrip())
    sep_ids = _ids(tokenizer, separator.strip())
    context = int(tokenizer.model_max_length)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    # Room for label tokens once BOS, EOS, prefix and suffix are in.
    capacity = context - 2 - len(prefix_ids) - len(suffix_ids)

    chunks: list[list[tuple[int, list[int]]]] = [[]]
    used = 0
    for k, label in enumerate(labels):
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
        chunks[-1].append((k, label_ids))
        used += need

    rows, texts, positions, classes = [], [], [], []
    spans: list[tuple[int, int, int]] = [(0, 0, 0)] * len(labels)
    for p, chunk in enumerate(chunks):
        ids = [bos, *prefix_ids]
        pos: list[int] = []
        cls: list[int] = []
        for j, (k, label_ids) in enumerate(chunk):
            if j:
                ids.extend(sep_ids)
            start = len(ids)
            ids.extend(label_ids)
            spans[k] = (p, start, len(ids))
            pos.extend(range(start, len(ids)))
            cls.extend([k] * len(label_ids))
        ids.extend([*suffix_ids, eos])
        ids.extend([pad] * (context - len(ids)))
        rows.append(ids)
        positions.append(pos)
        classes.append(cls)
        texts.append(template.format(separator.join(labels[k] for k, _ in chunk)))

    width = max(len(p) for p in positions)
    token_index = torch.zeros(len(chunks), width, dtype=torch.long)
    token_class = torch.full((len(chunks), width), -1, dtype=torch.long)
    for p, (pos, cls) in enumerate(zip(positions, classes, strict=True)):
        token_index[p, : len(pos)] = torch.tensor(pos)
        token_class[p, : len(cls)] = torch.tensor(cls)
    return PromptBatch(
        texts=texts,
        input_ids=torch.tensor(rows, dtype=torch.long),  # (P, L)
        token_index=token_index,  # (P, T)
        token_class=token_class,  # (P, T)
        spans=spans,
    )
