import pytest

from labeler.prompts import build_prompts, validate_labels
from labeler.testing import DEFAULT_WORDS, tiny_clip_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_clip_tokenizer()


def test_spans_point_at_each_labels_tokens(tokenizer):
    prompts = build_prompts(tokenizer, ["cat", "traffic light", "zebra"], "a photo of {}")
    assert prompts.num_prompts == 1
    ids = prompts.input_ids[0].tolist()
    assert ids[0] == tokenizer.bos_token_id
    for label, (p, start, end) in zip(["cat", "traffic light", "zebra"], prompts.spans):
        assert p == 0
        assert ids[start:end] == tokenizer(label, add_special_tokens=False)["input_ids"]
    # "traffic light" is two words, "zebra" is not in the vocabulary: both are multi-token.
    lengths = [end - start for _, start, end in prompts.spans]
    assert lengths == [1, 2, 5]
    # The assembled ids are what the tokenizer makes of the whole sentence.
    whole = tokenizer(prompts.texts[0], padding="max_length", max_length=77)["input_ids"]
    assert ids == whole


def test_token_index_and_class_agree_with_spans(tokenizer):
    prompts = build_prompts(tokenizer, ["dog", "traffic light"])
    index, classes = prompts.token_index[0].tolist(), prompts.token_class[0].tolist()
    assert list(zip(index, classes)) == [(1, 0), (3, 1), (4, 1)]


def test_labels_past_the_context_spread_over_prompts():
    tokenizer = tiny_clip_tokenizer(model_max_length=12)
    labels = ["cat", "dog", "person", "car", "tree", "sky", "road", "grass", "bird"]
    prompts = build_prompts(tokenizer, labels, "a {}")
    assert prompts.num_prompts > 1
    assert prompts.input_ids.shape == (prompts.num_prompts, 12)
    # Every label appears exactly once over all prompts, at its span.
    seen = sorted(int(c) for c in prompts.token_class.flatten() if c >= 0)
    assert seen == list(range(len(labels)))
    for k, (p, start, end) in enumerate(prompts.spans):
        row = prompts.input_ids[p].tolist()
        assert row[start:end] == tokenizer(labels[k], add_special_tokens=False)["input_ids"]
        assert row[1] == tokenizer("a", add_special_tokens=False)["input_ids"][0]


def test_label_longer_than_any_prompt_is_an_error():
    tokenizer = tiny_clip_tokenizer(model_max_length=8)
    with pytest.raises(ValueError, match="qwertyuiop"):
        build_prompts(tokenizer, ["cat", "qwertyuiop"])


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ([], "empty"),
        (["cat", ""], "blank"),
        (["cat", "   "], "blank"),
        (["cat", "dog", "Cat"], "duplicate label 'Cat'"),
        ("cat,dog", "string"),
    ],
)
def test_invalid_label_lists(labels, message):
    with pytest.raises(ValueError, match=message):
        validate_labels(labels)


def test_the_tiny_tokenizer_makes_each_listed_word_one_token(tokenizer):
    # Words sharing merges with earlier ones ("triangle", "cross") once split into pieces.
    split = {w: tokenizer.tokenize(w) for w in DEFAULT_WORDS if len(tokenizer.tokenize(w)) != 1}
    assert split == {}
    assert len(tokenizer.tokenize("zebra")) > 1  # other words still tokenise, in pieces
