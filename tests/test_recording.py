"""Recording processors installed once per UNet: reuse, shared views, restore, failure, compile."""

import gc

import numpy as np
import pytest
import torch

from labeler import SegmenterConfig, StableSeg
from labeler.attention import RecordingAttnProcessor, recorder_for
from labeler.result import SHARE_SUFFIX
from labeler.testing import tiny_components

from .conftest import TINY_SIZE

LABELS = ["cat", "dog", "traffic light"]


def _images(count=3, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.random((40 + i, 56 - i, 3)) * 255).astype(np.uint8) for i in range(count)]


def _model(config=None) -> StableSeg:
    config = config or SegmenterConfig(image_size=TINY_SIZE, batch_size=2)
    return StableSeg(**tiny_components(seed=0), config=config)


def _count_installs(unet) -> list:
    """Record every set_attn_processor call (the real method still runs)."""
    calls = []
    method = unet.set_attn_processor

    def counted(processors):
        calls.append(len(processors) if isinstance(processors, dict) else 1)
        return method(processors)

    unet.set_attn_processor = counted
    return calls


def _same_processors(unet, originals) -> bool:
    current = unet.attn_processors
    return current.keys() == originals.keys() and all(current[k] is originals[k] for k in originals)


def _assert_same_results(got, expected):
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a.mask, b.mask)
        np.testing.assert_array_equal(a.probs, b.probs)
        assert a.scores == b.scores


def test_processors_are_installed_once_and_restored_on_close():
    model = _model()
    unet = model.unet
    originals = dict(unet.attn_processors)
    calls = _count_installs(unet)
    for labels in (LABELS, ["cat", "dog"], LABELS):
        model.segment(_images(), labels)
    assert len(calls) == 1  # three segment() calls, five passes, one installation
    recorded = [p for p in unet.attn_processors.values() if isinstance(p, RecordingAttnProcessor)]
    assert len(recorded) == len(model.plan().layers) and not any(p.active for p in recorded)

    # A view that records every layer (the StableSeg++ cache) widens the set once.
    cache = model.with_config(model.config)
    cache.segment(_images(1), LABELS, return_layer_maps=True)
    for _ in range(2):
        model.segment(_images(1), LABELS)
        cache.segment(_images(1), LABELS, return_layer_maps=True)
    assert len(calls) == 2

    model.close()
    assert _same_processors(unet, originals) and len(calls) == 3
    model.segment(_images(1), LABELS)  # still usable: installs again
    assert len(calls) == 4
    with model:
        model.segment(_images(1), LABELS)
    assert _same_processors(unet, originals) and len(calls) == 5


def test_views_with_different_layers_share_one_unet_and_each_gets_its_own_result():
    """Interleaved passes of views that record different layers (and one at another image
    size) give exactly what each configuration gives on a UNet of its own."""
    configs = [
        SegmenterConfig(image_size=TINY_SIZE, batch_size=2),
        SegmenterConfig(image_size=TINY_SIZE, use_sar=False, cross_sizes=(32,)),
        SegmenterConfig(image_size=TINY_SIZE // 2, self_sizes=(16,)),
    ]
    images = _images(2)
    alone = [_model(config).segment(images, LABELS, return_probs=True) for config in configs]
    shared = _model(configs[0])
    views = [shared] + [shared.with_config(config) for config in configs[1:]]
    for _ in range(2):
        for view, expected in zip(views, alone, strict=True):
            _assert_same_results(view.segment(images, LABELS, return_probs=True), expected)
    layer_maps = views[1].segment(images[:1], LABELS, return_layer_maps=True)[0].layer_maps
    maps = {name for name in layer_maps if not name.endswith(SHARE_SUFFIX)}
    assert maps == {layer.name for layer in views[1].attention_layers()}
    _assert_same_results(views[2].segment(images, LABELS, return_probs=True), alone[2])


def test_the_last_segmenter_garbage_collected_restores_the_processors():
    model = _model()
    unet = model.unet
    originals = dict(unet.attn_processors)
    model.segment(_images(1), LABELS)
    view = model.with_config(model.config.replace(use_sar=False))
    view.segment(_images(1), LABELS)
    del view
    gc.collect()
    assert not _same_processors(unet, originals)  # the first segmenter still uses them
    del model
    gc.collect()
    assert _same_processors(unet, originals)


class _Boom(RuntimeError):
    pass


def test_a_failing_pass_leaves_the_unet_usable():
    model = _model()
    unet = model.unet
    originals = dict(unet.attn_processors)
    latents, context = torch.randn(1, 4, 32, 32), torch.randn(1, 77, 32)
    with torch.inference_mode():
        plain = unet(latents, 1, encoder_hidden_states=context).sample
    expected = model.segment(_images(2), LABELS, return_probs=True)

    def explode(module, args):
        raise _Boom("a failure in the middle of the UNet")

    hook = unet.mid_block.register_forward_pre_hook(explode)
    with pytest.raises(_Boom):
        model.segment(_images(2), LABELS)
    hook.remove()

    store = recorder_for(unet).store
    assert not (store.cross or store.queries or store.keys) and store.token_index is None
    processors = unet.attn_processors.values()
    assert not any(p.active for p in processors if isinstance(p, RecordingAttnProcessor))
    with torch.inference_mode():
        after = unet(latents, 1, encoder_hidden_states=context).sample
    torch.testing.assert_close(after, plain, rtol=0, atol=0)  # plain attention, nothing kept
    _assert_same_results(model.segment(_images(2), LABELS, return_probs=True), expected)
    model.close()
    assert _same_processors(unet, originals)


def test_compile_traces_the_recording_processors_once():
    """torch.compile's graph capture (dynamo) with the recording processors, on the CPU with
    a backend that runs the captured graphs as they are (inductor's C++ build takes minutes
    here; the GPU test below uses it). The second call reuses the graphs."""
    images = _images(2)
    expected = _model().segment(images, LABELS, return_probs=True)
    graphs = []

    def keep_graph(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    model = _model().compile(backend=keep_graph)
    try:
        first = model.segment(images, LABELS, return_probs=True)
        traced = len(graphs)
        again = model.segment(images, LABELS, return_probs=True)
        assert traced >= 1 and len(graphs) == traced  # no retrace for the next batch
        _assert_same_results(first, expected)
        _assert_same_results(again, expected)
    finally:
        torch._dynamo.reset()


@pytest.mark.gpu
def test_compile_with_inductor_on_cuda():
    config = SegmenterConfig(image_size=TINY_SIZE, batch_size=2)
    images = _images(4)
    expected = _model(config).to("cuda").segment(images, LABELS, return_probs=True)
    model = _model(config).to("cuda").compile()
    try:
        for _ in range(2):
            for got, want in zip(model.segment(images, LABELS, return_probs=True), expected):
                np.testing.assert_allclose(got.probs, want.probs, atol=1e-4)
                assert (got.mask == want.mask).mean() > 0.999
    finally:
        torch._dynamo.reset()
