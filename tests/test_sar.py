"""CAPM and SAR against slow, direct reference implementations, and a planted-signal test."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from labeler.attention import AttentionStore, LayerInfo, RecordingAttnProcessor
from labeler.sar import ca_labels_at, self_attention_class_probs

from .attention_helpers import class_maps_from_tokens


def _heads(x: torch.Tensor, heads: int) -> np.ndarray:
    """(B, N, heads*d) -> (B, heads, N, d) float64 numpy."""
    b, n, inner = x.shape
    return x.reshape(b, n, heads, inner // heads).permute(0, 2, 1, 3).double().numpy()


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_cross_attention_recording_matches_explicit_attention_matrices():
    torch.manual_seed(0)
    heads, dim_head, context_dim, side, length = 4, 8, 24, 6, 10
    attn = Attention(
        query_dim=heads * dim_head, cross_attention_dim=context_dim, heads=heads, dim_head=dim_head
    ).eval()
    x = torch.randn(2, side * side, heads * dim_head)
    context = torch.randn(2, length, context_dim)
    # Labels: class 0 = token 2, class 1 = tokens 4 and 5, class 2 = token 7.
    token_index = torch.tensor([[2, 4, 5, 7]] * 2)
    token_class = torch.tensor([[0, 1, 1, 2]])
    layer = LayerInfo("layer", "cross", (side, side))
    store = AttentionStore(token_index=token_index)
    with torch.no_grad():
        recorded_out = RecordingAttnProcessor(store, layer)(attn, x, context)
        reference_out = AttnProcessor2_0()(attn, x, context)
        q = _heads(attn.to_q(x), heads)
        k = _heads(attn.to_k(context), heads)
    # The recording does not change the layer's output.
    torch.testing.assert_close(recorded_out, reference_out, rtol=1e-4, atol=1e-5)

    capm = class_maps_from_tokens(store.cross["layer"], token_class, 3, 1).numpy()
    for b in range(2):
        full = np.zeros((side * side, length))
        for h in range(heads):  # one explicit (N, L) attention matrix per head
            full += _softmax(q[b, h] @ k[b, h].T / np.sqrt(dim_head)) / heads
        per_class = np.stack([full[:, 2], full[:, [4, 5]].mean(axis=1), full[:, 7]], axis=0)
        per_class /= per_class.sum(axis=0, keepdims=True)
        np.testing.assert_allclose(capm[b].reshape(3, -1), per_class, rtol=1e-4, atol=1e-6)


def test_class_maps_concatenate_labels_over_prompts():
    # Two images, two prompts: labels 0, 1 in prompt 0, label 2 in prompt 1.
    torch.manual_seed(1)
    maps = torch.rand(4, 2, 3, 3)
    token_class = torch.tensor([[0, 1], [2, -1]])
    capm = class_maps_from_tokens(maps, token_class, 3, 2)
    for image in range(2):
        raw = torch.stack([maps[2 * image, 0], maps[2 * image, 1], maps[2 * image + 1, 0]])
        torch.testing.assert_close(capm[image], raw / raw.sum(0, keepdim=True))


def _reference_sapm(q, k, ca, num_classes, scale):
    """Loops over images, heads and classes; explicit (N, C) attention per head."""
    batch, heads, n, _ = q.shape
    out = np.zeros((batch, num_classes, n))
    for b in range(batch):
        present = [c for c in range(num_classes) if (ca[b] == c).any()]
        for h in range(heads):
            class_vectors = np.stack([k[b, h][ca[b] == c].mean(axis=0) for c in present])
            attention = _softmax(q[b, h] @ class_vectors.T * scale)  # (N, present)
            for j, c in enumerate(present):
                out[b, c] += attention[:, j] / heads
    return out


def test_sar_matches_reference_and_leaves_absent_classes_out():
    rng = np.random.default_rng(0)
    batch, heads, n, d, classes = 2, 3, 25, 8, 4
    q = rng.normal(size=(batch, heads, n, d))
    k = rng.normal(size=(batch, heads, n, d))
    ca = rng.integers(0, 3, size=(batch, n))  # class 3 never present
    ca[1][ca[1] == 1] = 0  # and class 1 absent from the second image
    scale = d**-0.5
    ours = (
        self_attention_class_probs(
            torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(ca), classes, scale
        )
        .double()
        .numpy()
    )
    np.testing.assert_allclose(ours, _reference_sapm(q, k, ca, classes, scale), atol=1e-6)
    assert np.all(ours[:, 3] == 0) and np.all(ours[1, 1] == 0)
    np.testing.assert_allclose(ours.sum(axis=1), 1.0, atol=1e-6)


@pytest.mark.parametrize("flip_fraction", [0.2, 0.4])
def test_planted_regions_are_recovered_from_a_noisy_ca_map(flip_fraction):
    """Each region's queries and keys share a direction; SAR must undo a noisy CA map."""
    rng = np.random.default_rng(42)
    side, heads, d, classes = 16, 2, 16, 3
    yy, xx = np.mgrid[:side, :side]
    truth = np.where(xx < 6, 0, np.where(yy < 8, 1, 2)).ravel()  # three planted regions
    directions = rng.normal(size=(heads, classes, d))
    directions /= np.linalg.norm(directions, axis=-1, keepdims=True)
    keys = 4.0 * directions[:, truth] + rng.normal(scale=0.5, size=(heads, truth.size, d))
    queries = 4.0 * directions[:, truth] + rng.normal(scale=0.5, size=(heads, truth.size, d))
    noisy = truth.copy()
    flip = rng.random(truth.size) < flip_fraction
    noisy[flip] = rng.integers(0, classes, size=flip.sum())
    sapm = self_attention_class_probs(
        torch.from_numpy(queries[None]),
        torch.from_numpy(keys[None]),
        torch.from_numpy(noisy[None]),
        classes,
        1.0,
    )
    recovered = sapm[0].argmax(dim=0).numpy()
    noisy_accuracy = (noisy == truth).mean()
    assert noisy_accuracy < 0.9
    assert (recovered == truth).mean() > 0.98


def test_the_ca_map_of_a_coarse_layer_labels_each_cell_by_what_covers_it():
    """Area pooling, not a nearest read of one pixel per cell: a small object in a cell's middle
    (away from its top-left pixel) still labels the cell when it covers most of it."""
    capm = torch.zeros(1, 2, 64, 64)
    capm[0, 0] = 1.0  # background label everywhere ...
    capm[0, 0, 9:15, 9:15], capm[0, 1, 9:15, 9:15] = 0.0, 1.0  # ... but a 6x6 object in cell (1, 1)
    coarse = ca_labels_at(capm, (8, 8))
    assert coarse[0, 1, 1] == 1  # 36 of the cell's 64 pixels
    assert int(coarse.sum()) == 1
    nearest = F.interpolate(capm.argmax(1, keepdim=True).float(), size=(8, 8), mode="nearest")
    assert nearest.sum() == 0  # what the legacy nearest resize read: the cell's top-left pixel
    torch.testing.assert_close(ca_labels_at(capm, (64, 64)), capm.argmax(dim=1))


def test_many_prompts_refine_one_prompt_at_a_time_with_the_same_result(tiny_parts):
    """Labels past one text context make several prompts; SAR averages the prompt rows' maps
    one at a time (memory linear in the labels) and gives what averaging them together gave."""
    from labeler import SegmenterConfig, StableSeg

    model = StableSeg(**tiny_parts, config=SegmenterConfig(image_size=64))
    labels = [f"w{i}" for i in range(90)]  # more than one CLIP context
    prompts = model._prompts(labels)
    assert prompts.batch.num_prompts > 1
    plan = model.plan()
    latents = model.encode_images(torch.zeros(2, 3, 64, 64))
    result = model._attention_pass(latents, prompts, plan)

    with model._recorder().recording(plan.layers, prompts.token_index.repeat(2, 1)) as store:
        rows = latents.repeat_interleave(prompts.batch.num_prompts, dim=0)
        context = prompts.embeddings.repeat(2, 1, 1)
        timestep = torch.full((rows.shape[0],), model.config.timestep)
        model.unet(rows, timestep, encoder_hidden_states=context, return_dict=False)
        queries, keys, scales = dict(store.queries), dict(store.keys), dict(store.scales)
    capm = result.layer_maps  # the cross maps are recomputed identically; take the pass's
    cross = {n: m for n, m in capm.items() if n not in queries}
    from labeler.sar import weighted_sum

    common = weighted_sum(cross, plan.cross, plan.common_size)
    sizes = {layer.name: layer.size for layer in plan.layers}
    for name, query in queries.items():
        labels_at = ca_labels_at(common, sizes[name]).flatten(1)
        together = self_attention_class_probs(
            query,
            keys[name],
            labels_at.repeat_interleave(prompts.batch.num_prompts, dim=0),
            len(labels),
            scales[name],
        )  # (B*P, C, N): every prompt row at once, as before
        expected = together.view(2, prompts.batch.num_prompts, len(labels), -1).mean(dim=1)
        torch.testing.assert_close(result.layer_maps[name].flatten(2), expected)
