#!/usr/bin/env python
"""Throughput and memory of StableSeg against a bare VAE + text + UNet pass.

Builds Stable Diffusion 1.5-shaped UNet, VAE and text encoder with random weights (the same
compute as the real model; no download) and prints JSON:

* seconds per image of ``segment()`` and of the bare pass on the same input, and their ratio;
* peak memory of each (CUDA: max allocated; CPU: peak RSS growth, sampled);
* the recording's own memory per image at the benchmark size and at 512 px.

    python bench/bench_segment.py                 # CPU: 256 px, batch 1
    python bench/bench_segment.py --device cuda   # GPU: 512 px, batches 1, 8, 32, fp16
    python bench/bench_segment.py --device cuda --dtype bf16 --compile
    python bench/bench_segment.py --tiny --image-size 64   # the tiny model: checks the script
    python bench/bench_segment.py --device cuda --variant tiles=2 \
        --variant "presence=0.5 reprompt=on"
"""

from __future__ import annotations

import json
import os
import threading
import time
from contextlib import contextmanager
from functools import partial
from typing import Any

import click
import numpy as np
import torch


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def peak_memory(device: torch.device):
    """Yields a dict that holds ``peak_bytes`` after the block."""
    out: dict[str, int] = {}
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        yield out
        torch.cuda.synchronize()
        out["peak_bytes"] = torch.cuda.max_memory_allocated() - base
        return
    base, peak, stop = _rss(), [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        stop.set()
        thread.join()
        out["peak_bytes"] = max(0, peak[0] - base)


def recording_bytes(model: Any, num_label_tokens: int) -> dict[str, int]:
    """What the recording keeps per image: Q and K of the chosen self-attention layers (model
    dtype) and the label-token columns of the chosen cross-attention layers (fp32)."""
    modules = dict(model.unet.named_modules())
    item = torch.finfo(model.dtype).bits // 8
    self_bytes = cross_bytes = 0
    for layer in model.plan().layers:
        tokens = layer.size[0] * layer.size[1]
        if layer.kind == "self":
            inner = modules[layer.name].to_q.out_features
            self_bytes += 2 * tokens * inner * item
        else:
            cross_bytes += tokens * num_label_tokens * 4
    return {"self_qk_bytes": self_bytes, "cross_bytes": cross_bytes}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def segment_uncached(model: Any, images: list[np.ndarray], labels: list[str]) -> None:
    """``segment()`` with its prompt-embedding cache emptied first, so that it encodes the text
    as the bare pass does and the ratio measures the recording and SAR alone (in real runs the
    cache spares the text encoder on every batch after the first)."""
    model._embedding_cache.clear()
    model.segment(images, labels)


def bare_pass(model: Any, pixels: torch.Tensor, labels: list[str]) -> None:
    """VAE encode + text encode + UNet pass, default processors, nothing recorded: one UNet
    row per (image, prompt), as StableSeg runs them (many labels take several prompts)."""
    from labeler.prompts import build_prompts

    with torch.inference_mode():
        latents = model.encode_images(pixels)
        ids = build_prompts(model.tokenizer, labels).input_ids.to(model.device)
        embeddings = model.text_encoder(ids)[0]  # (P, L, D)
        rows = latents.repeat_interleave(embeddings.shape[0], dim=0)  # (B * P, c, h, w)
        context = embeddings.repeat(latents.shape[0], 1, 1)  # (B * P, L, D)
        timestep = torch.full((rows.shape[0],), 1, device=model.device)
        model.unet(rows, timestep, encoder_hidden_states=context, return_dict=False)


def peak_bytes(fn, device: torch.device) -> int:
    """Peak memory of one call of ``fn`` (after a warm-up call)."""
    fn()
    sync(device)
    with peak_memory(device) as mem:
        fn()
        sync(device)
    return mem["peak_bytes"]


def interleaved_seconds(fns: dict[str, Any], device: torch.device, repeats: int) -> dict:
    """Median seconds of each function, timed in alternation (A, B, A, B, ...).

    Alternating means a slow phase of a shared machine (another job, thermal throttling) costs
    both sides alike, instead of skewing the ratio of two runs timed one after the other.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(values)) for name, values in times.items()}


@click.command()
@click.option("--device", default="cpu", show_default=True)
@click.option("--image-size", type=int, default=None, help="[default: 256 on CPU, 512 on CUDA]")
@click.option("--batch-sizes", default=None, help="Comma list. [default: 1 on CPU, 1,8,32 on CUDA]")
@click.option("--dtype", type=click.Choice(["fp16", "bf16", "fp32"]), default=None)
@click.option("--repeats", type=int, default=3, show_default=True)
@click.option("--labels", default="cat,dog,person,car,tree", show_default=True)
@click.option(
    "--compile",
    "compile_unet",
    is_flag=True,
    help="torch.compile the UNet (StableSeg.compile) before timing; warm-up calls compile.",
)
@click.option("--tiny", is_flag=True, help="The tiny random model instead of SD-1.5's shapes.")
@click.option(
    "--variant",
    "variants",
    multiple=True,
    help="Segmenter settings to time besides the paper's method, by option name as benchmark "
    "--sweep takes them, e.g. 'tiles=2' or 'presence=0.5 reprompt=on' (repeatable).",
)
def main(
    device, image_size, batch_sizes, dtype, repeats, labels, compile_unet, tiny, variants
) -> None:
    import diffusers

    from labeler import SegmenterConfig, StableSeg
    from labeler.images import to_model_input
    from labeler.testing import sd15_components, tiny_components

    diffusers.utils.logging.set_verbosity_error()  # the dtype cast below is deliberate
    device = torch.device(device)
    cuda = device.type == "cuda"
    image_size = image_size or (512 if cuda else 256)
    sizes = [int(b) for b in (batch_sizes or ("1,8,32" if cuda else "1")).split(",")]
    from labeler.model_settings import torch_dtype as dtype_of

    torch_dtype = dtype_of(dtype or ("fp16" if cuda else "fp32"))
    names = labels.split(",")
    if compile_unet and not hasattr(StableSeg, "compile"):
        raise click.UsageError("this StableSeg has no compile(); --compile needs it")
    parts = tiny_components(seed=0) if tiny else sd15_components()
    model = StableSeg(**parts, config=SegmenterConfig(image_size=image_size))
    model.to(device, torch_dtype)
    rng = np.random.default_rng(0)
    label_tokens = int((model.encode_prompts(names)[0].token_class >= 0).sum())
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "threads": torch.get_num_threads(),
        "dtype": str(torch_dtype).removeprefix("torch."),
        "compile": compile_unet,
        "model": "tiny" if tiny else "sd15-shaped random",
        "image_size": image_size,
        "labels": len(names),
        "recording_per_image": recording_bytes(model, label_tokens),
        "runs": [],
    }
    if image_size != 512:
        at512 = model.with_config(SegmenterConfig(image_size=512))
        report["recording_per_image_at_512"] = recording_bytes(at512, label_tokens)
    from labeler.jobs.sweep import parse_sweep, sweep_points

    runs = [
        ("paper", batch, SegmenterConfig(image_size=image_size, batch_size=batch))
        for batch in sizes
    ]
    for text in variants:
        for batch in sizes:
            base = SegmenterConfig(image_size=image_size, batch_size=batch)
            (point,) = sweep_points(base, parse_sweep([text]))
            runs.append((text, batch, point.config))
    for variant, batch, config in runs:
        seg_model = model.with_config(config)
        if compile_unet:
            seg_model.compile()  # the warm-up call in peak_bytes compiles
        images = [
            (rng.random((image_size, image_size, 3)) * 255).astype(np.uint8) for _ in range(batch)
        ]
        pixels = to_model_input(images, image_size)
        fns = {
            "segment": partial(segment_uncached, seg_model, images, names),
            "bare": partial(bare_pass, model, pixels, names),
        }
        # peak_bytes also warms both up before the timed rounds.
        seg_mem, bare_mem = (peak_bytes(fn, device) for fn in fns.values())
        seconds = interleaved_seconds(fns, device, repeats)
        seg_s, bare_s = seconds["segment"], seconds["bare"]
        report["runs"].append(
            {
                "variant": variant,
                "batch_size": batch,
                "segment_s_per_image": seg_s / batch,
                "bare_s_per_image": bare_s / batch,
                "ratio": seg_s / bare_s,
                "segment_images_per_s": batch / seg_s,
                "bare_images_per_s": batch / bare_s,
                "segment_peak_bytes": seg_mem,
                "bare_peak_bytes": bare_mem,
            }
        )
        click.echo(json.dumps(report["runs"][-1]), err=True)
    click.echo(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
