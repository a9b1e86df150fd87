"""Synonyms per label: parsing (labels files, --labels, Label Studio configs) and the label's map
as the mean over its names on the tiny model."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from labeler import StableSeg
from labeler.labels import Label, parse_labels_file, parse_labels_text, synonyms_of
from labeler.sar import label_attention_from_tokens
from ml_backend.label_config import LabelConfigError, parse_label_config


def test_labels_file_synonyms_and_escapes() -> None:
    labels = parse_labels_file(
        ["# comment | not a label", "car | automobile |  sedan ", "a \\| b", "", "person"]
    )
    assert labels == ["car", "a | b", "person"]
    assert synonyms_of(labels[0]) == ("automobile", "sedan")
    assert synonyms_of(labels[1]) == synonyms_of(labels[2]) == ()
    # A label keeps its synonyms through pickling (the Ray engine's workers) and a repeat of the
    # label's own name is dropped.
    assert synonyms_of(pickle.loads(pickle.dumps(labels))[0]) == ("automobile", "sedan")
    assert parse_labels_file(["car | Car | car"]) == ["car"]
    assert type(parse_labels_file(["car | Car"])[0]) is str
    with pytest.raises(ValueError, match="names two labels"):
        parse_labels_file(["car | person", "person"])
    with pytest.raises(ValueError, match=r"synonym of 'car'.*blank"):
        parse_labels_file(["car | "])


def test_runs_record_synonyms_beside_the_label_names() -> None:
    from labeler.jobs.refine_options import RefineOptions
    from labeler.labels import labels_record

    labels = parse_labels_text("cat|kitty, dog")
    assert labels_record(labels) == {"labels": ["cat", "dog"], "synonyms": {"cat": ["kitty"]}}
    assert labels_record(["cat", "dog"], key="classes") == {"classes": ["cat", "dog"]}
    # The refine work dir's settings: the names as before, the synonyms beside them (and no
    # key at all without synonyms, so the work dirs made before synonyms still resume).
    settings = RefineOptions(labels=tuple(labels)).settings()
    assert settings["labels"] == ["cat", "dog"] and settings["synonyms"] == {"cat": ["kitty"]}
    assert "synonyms" not in RefineOptions(labels=("cat", "dog")).settings()


def test_labels_option_synonyms() -> None:
    labels = parse_labels_text("cat|kitty, dog")
    assert labels == ["cat", "dog"] and synonyms_of(labels[0]) == ("kitty",)


def test_label_studio_synonyms_attribute() -> None:
    config = (
        '<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
        '<Label value="Car" prompt="car" synonyms="automobile, sedan"/><Label value="Road"/>'
        "</BrushLabels></View>"
    )
    target = parse_label_config(config)
    assert target.labels == ("Car", "Road") and target.prompts == ("car", "Road")
    assert synonyms_of(target.prompts[0]) == ("automobile", "sedan")
    assert synonyms_of(target.prompts[1]) == ()
    with pytest.raises(LabelConfigError, match="names two labels"):
        parse_label_config(config.replace("automobile", "road"))


def test_a_label_attention_is_the_mean_over_its_names() -> None:
    # One prompt: label 0 = a one-token name and a two-token synonym, label 1 = one token.
    token_maps = torch.tensor([1.0, 2.0, 4.0, 8.0]).view(1, 4, 1, 1)  # (B*P, T, h, w)
    token_class = torch.tensor([[0, 0, 0, 1]])
    token_weight = torch.tensor([[0.5, 0.25, 0.25, 1.0]])
    maps = label_attention_from_tokens(token_maps, token_class, 2, 1, token_weight)
    assert maps.flatten().tolist() == [(1.0 + (2.0 + 4.0) / 2) / 2, 8.0]


def test_synonyms_on_the_tiny_model(tiny_model: StableSeg) -> None:
    image = np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    labels = ["car", "tree", "sky"]
    (plain,) = tiny_model.segment(image, labels, return_probs=True)
    # Every name is prompted (the prompt holds the synonym), the output knows the label only.
    named = [Label("car", ["road", "building"]), "tree", "sky"]
    batch, _ = tiny_model.encode_prompts(named)
    assert "road" in batch.texts[0] and len(batch.spans) == 3
    (merged,) = tiny_model.segment(image, named, return_probs=True)
    assert merged.labels == labels and merged.probs.shape == plain.probs.shape
    assert set(np.unique(merged.mask)) <= {0, 1, 2, 3}
    assert not np.allclose(merged.probs, plain.probs, atol=1e-4)  # the synonyms took part
    # "car | car" is the label alone.
    (same,) = tiny_model.segment(image, parse_labels_file(["car | car", "tree", "sky"]))
    np.testing.assert_array_equal(same.mask, plain.mask)
