"""GPU checks (fp16 / bf16 agree with fp32). Skipped where no CUDA device is present."""

import numpy as np
import pytest
import torch

from labeler import SegmenterConfig, StableSeg
from labeler.testing import tiny_components

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_on_cuda_matches_fp32(dtype):
    config = SegmenterConfig(image_size=64, batch_size=4)
    reference = StableSeg(**tiny_components(seed=0), config=config).to("cuda")
    half = StableSeg(**tiny_components(seed=0), config=config).to("cuda", dtype)
    rng = np.random.default_rng(0)
    images = [(rng.random((48, 40, 3)) * 255).astype(np.uint8) for _ in range(4)]
    labels = ["cat", "dog", "traffic light"]
    together = zip(
        reference.segment(images, labels, return_probs=True),
        half.segment(images, labels, return_probs=True),
    )
    for full, low in together:
        np.testing.assert_allclose(low.probs, full.probs, atol=0.02)
        assert (low.mask == full.mask).mean() > 0.97
