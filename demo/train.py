"""Train the demo model: a tiny Stable Diffusion over the synthetic scenes of ``demo.scenes``.

    python -m demo.train --out demo/model --steps 6000

What is trained, in order (all seeded by ``--seed``; scene ``i`` comes from ``demo.scenes``):

1. **VAE** (``AutoencoderKL``, 64 px -> 16x16x4 latents): ``--vae-steps`` steps of pixel MSE plus
   a tiny KL term, as Stable Diffusion's VAE. Its ``scaling_factor`` is then set to
   1 / std of the latents, as for SD.
2. **Text encoder**: a ``CLIPTextModel`` that is never trained. It is random, with its token
   embeddings multiplied by ``--embed-scale`` (32) so that the position embeddings and the
   causal mixing do not wash the words out: colour words stay distinct (cosine 0.1-0.5).
   A text encoder trained jointly from scratch collapses its words onto each other and
   nothing binds (measured in issue 6). The tokenizer is a CLIP BPE tokenizer over the scene
   vocabulary.
3. **UNet** (``UNet2DConditionModel``, cross-attention at 16x16 and 8x8, mid block at 4x4):
   ``--steps`` steps of epsilon prediction with the DDPM schedule of SD 1.x and uniform
   timesteps, AdamW with warm-up, and an exponential moving average of the weights (EMA) that
   is what gets saved.

The result is written with ``StableDiffusionPipeline.save_pretrained`` (model_index.json,
unet/, vae/, text_encoder/, tokenizer/, scheduler/), so ``StableSeg.from_pretrained(out)``
takes the same path as a real checkpoint, plus ``stableseg.json`` with the segmenter settings
recommended for this model.

Resumable: the full training state (weights, EMA, optimiser, step) is written atomically to
``--state`` (default ``<out>.state.pt``) every ``--save-every`` steps; rerunning the same
command continues from it, and batches, noise and timesteps are drawn from (seed, step), so a
resumed run matches an uninterrupted one. Rerunning with a larger ``--steps`` trains further.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch
import torch.nn.functional as F

from demo.scenes import BACKGROUND_WORD, TRAIN_SEED, VOCABULARY, SceneConfig, make_scenes
from labeler.testing import tiny_clip_tokenizer

log = logging.getLogger("demo.train")

# Text context of the demo tokenizer: the longest caption is 11 tokens + BOS/EOS. A short
# context keeps padding from soaking up the cross-attention (77 pads took ~80% of it).
CONTEXT_LENGTH = 16
# Scene indices of the UNet stage start here, after those the VAE stage can use.
_UNET_SCENE_OFFSET = 10_000_000
# Held-out scenes for the probes logged while training (neither training nor evaluation).
PROBE_SEED = 2000
# The StableSeg settings recommended for this model, written to <out>/stableseg.json. With no
# attention in the mid block, the default cross sizes are the two smallest grids: 8 and 16.
RECOMMENDED_SEGMENTER = {
    "image_size": 64,
    "cross_sizes": None,
    "self_sizes": None,
    "use_sar": True,
    "background_threshold": None,
    "background_prompt": BACKGROUND_WORD,
    "batch_size": 16,
}


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run (saved in the state; see module docstring)."""

    seed: int = TRAIN_SEED
    steps: int = 8000
    vae_steps: int = 400
    batch_size: int = 32
    lr: float = 1e-3
    vae_lr: float = 1e-3
    warmup: int = 200
    ema_decay: float = 0.999
    embed_scale: float = 32.0
    image_size: int = 64
    text_width: int = 64
    unet_channels: tuple[int, int, int] = (32, 64, 64)
    vae_channels: tuple[int, int, int] = (16, 32, 64)
    kl_weight: float = 1e-6
    texture_prob: float = 0.3
    save_every: int = 250
    probe_every: int = 500

    # Fields that may differ when a run is resumed.
    RESUMABLE_CHANGES = ("steps", "save_every", "probe_every")


_DEFAULTS = TrainConfig()


# ---------------------------------------------------------------------- components
def build_tokenizer(words: tuple[str, ...] = VOCABULARY, context: int = CONTEXT_LENGTH) -> Any:
    """A CLIP BPE tokenizer in which every word of ``words`` is exactly one token (any other
    text tokenises into several)."""
    return tiny_clip_tokenizer(words, model_max_length=context)


def write_bpe_files(tokenizer: Any, folder: Path) -> None:
    """Also write ``vocab.json`` and ``merges.txt`` next to ``tokenizer.json``.

    transformers 5 saves only ``tokenizer.json``; the slow ``CLIPTokenizer`` of transformers 4
    needs these two files, so the demo model loads with both.
    """
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
    merges = [" ".join(pair) if isinstance(pair, list) else pair for pair in model["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def build_text_encoder(tokenizer: Any, config: TrainConfig) -> torch.nn.Module:
    """The frozen random CLIP text encoder, token embeddings scaled by ``embed_scale``."""
    from transformers import CLIPTextConfig, CLIPTextModel

    model = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=config.text_width,
            intermediate_size=2 * config.text_width,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(config.embed_scale)
    return model.requires_grad_(False).eval()


def build_vae(config: TrainConfig) -> torch.nn.Module:
    """AutoencoderKL with three levels: 4x downsampling, 4 latent channels, no attention."""
    from diffusers import AutoencoderKL

    levels = len(config.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=config.vae_channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=config.image_size,
        mid_block_add_attention=False,
    )


def build_unet(config: TrainConfig, latent_side: int) -> torch.nn.Module:
    """UNet2DConditionModel: cross-attention at the first two levels (16 and 8 for 64 px).

    The mid block (4x4) has no attention: its maps do not bind, and without it StableSeg's
    default cross sizes (the two smallest) are the ones that do.
    """
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=latent_side,
        in_channels=4,
        out_channels=4,
        block_out_channels=config.unet_channels,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        mid_block_type="UNetMidBlock2D",
        cross_attention_dim=config.text_width,
        attention_head_dim=2,
        norm_num_groups=16,
    )


def build_scheduler() -> Any:
    """The DDPM noise schedule of Stable Diffusion 1.x."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
        steps_offset=1,
    )


# ---------------------------------------------------------------------- the trainer
def _scene_config(config: TrainConfig) -> SceneConfig:
    return SceneConfig(size=config.image_size, texture_prob=config.texture_prob)


def scene_batch(config: TrainConfig, start: int) -> tuple[torch.Tensor, list[str]]:
    """Scenes ``start .. start + batch_size - 1``: pixels (B, 3, S, S) in [-1, 1], captions."""
    scenes = make_scenes(config.seed, start, config.batch_size, _scene_config(config))
    images = np.stack([scene.image for scene in scenes])  # (B, S, S, 3) uint8
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (B, 3, S, S)
    return pixels, [scene.caption for scene in scenes]


def _generator(config: TrainConfig, stage: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(config.seed * 1_000_003 + stage * 100_000_007 + step)


def _lr_factor(step: int, warmup: int) -> float:
    return min(1.0, (step + 1) / max(1, warmup))


class Trainer:
    """Holds the components and the optimiser state; ``run`` trains up to ``config.steps``."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        torch.manual_seed(config.seed)
        self.tokenizer = build_tokenizer()
        self.text_encoder = build_text_encoder(self.tokenizer, config)
        self.vae = build_vae(config)
        scale = 2 ** (len(config.vae_channels) - 1)
        self.latent_side = config.image_size // scale
        self.unet = build_unet(config, self.latent_side)
        self.ema = copy.deepcopy(self.unet).requires_grad_(False).eval()
        self.scheduler = build_scheduler()
        self.vae_opt = torch.optim.AdamW(self.vae.parameters(), lr=config.vae_lr)
        self.unet_opt = torch.optim.AdamW(self.unet.parameters(), lr=config.lr, weight_decay=0.0)
        self.vae_step = 0
        self.unet_step = 0
        self.history: list[dict[str, Any]] = []
        self._text_cache: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            "vae_step": self.vae_step,
            "unet_step": self.unet_step,
            "scaling_factor": float(self.vae.config.scaling_factor),
            "text_encoder": self.text_encoder.state_dict(),
            "vae": self.vae.state_dict(),
            "unet": self.unet.state_dict(),
            "ema": self.ema.state_dict(),
            "vae_opt": self.vae_opt.state_dict(),
            "unet_opt": self.unet_opt.state_dict(),
            "history": self.history,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = TrainConfig(**_tuples(state["config"]))
        changed = [
            f.name
            for f in fields(TrainConfig)
            if f.name not in TrainConfig.RESUMABLE_CHANGES
            and getattr(saved, f.name) != getattr(self.config, f.name)
        ]
        if changed:
            detail = ", ".join(
                f"{name}: saved {getattr(saved, name)!r}, asked {getattr(self.config, name)!r}"
                for name in changed
            )
            raise ValueError(
                f"the saved training state was made with other settings ({detail}); only "
                f"{list(TrainConfig.RESUMABLE_CHANGES)} may change on resume. Use the same "
                "settings or another --state"
            )
        self.text_encoder.load_state_dict(state["text_encoder"])
        self.vae.load_state_dict(state["vae"])
        self.vae.register_to_config(scaling_factor=state["scaling_factor"])
        self.unet.load_state_dict(state["unet"])
        self.ema.load_state_dict(state["ema"])
        self.vae_opt.load_state_dict(state["vae_opt"])
        self.unet_opt.load_state_dict(state["unet_opt"])
        self.vae_step = int(state["vae_step"])
        self.unet_step = int(state["unet_step"])
        self.history = list(state.get("history", []))

    def save_state(self, path: Path) -> None:
        """Atomic write: a killed run leaves either the old or the new state."""
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        torch.save(self.state_dict(), partial)
        os.replace(partial, path)

    # ------------------------------------------------------------------ steps
    def encode_text(self, captions: list[str]) -> torch.Tensor:
        """(B, 77, D) frozen text embeddings, cached per caption."""
        missing = [c for c in dict.fromkeys(captions) if c not in self._text_cache]
        if missing:
            ids = self.tokenizer(
                missing,
                padding="max_length",
                max_length=self.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids  # (M, 77)
            with torch.no_grad():
                states = self.text_encoder(ids)[0]  # (M, 77, D)
            self._text_cache.update(zip(missing, states, strict=True))
        return torch.stack([self._text_cache[c] for c in captions])  # (B, 77, D)

    def vae_train_step(self) -> float:
        config, step = self.config, self.vae_step
        pixels, _ = scene_batch(config, step * config.batch_size)  # (B, 3, S, S)
        self.vae.train()
        posterior = self.vae.encode(pixels).latent_dist
        noise = torch.randn(
            posterior.mean.shape, generator=_generator(config, 1, step)
        )  # (B, 4, s, s)
        latents = posterior.mean + posterior.std * noise
        recon = self.vae.decode(latents).sample  # (B, 3, S, S)
        loss = F.mse_loss(recon, pixels) + config.kl_weight * posterior.kl().mean()
        self.vae_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.vae_opt.step()
        self.vae_step += 1
        return float(loss.detach())

    @torch.no_grad()
    def set_scaling_factor(self, batches: int = 8) -> float:
        """Scale latents to unit variance, as SD's 0.18215 does for its VAE."""
        self.vae.eval()
        means = []
        for i in range(batches):
            pixels, _ = scene_batch(
                self.config, (self.config.vae_steps + i) * self.config.batch_size
            )
            means.append(self.vae.encode(pixels).latent_dist.mean)
        factor = 1.0 / float(torch.cat(means).std())
        self.vae.register_to_config(scaling_factor=factor)
        return factor

    def unet_train_step(self) -> float:
        config, step = self.config, self.unet_step
        start = _UNET_SCENE_OFFSET + step * config.batch_size
        pixels, captions = scene_batch(config, start)  # (B, 3, S, S)
        with torch.no_grad():
            self.vae.eval()
            latents = self.vae.encode(pixels).latent_dist.mean * self.vae.config.scaling_factor
        context = self.encode_text(captions)  # (B, 77, D)
        gen = _generator(config, 2, step)
        noise = torch.randn(latents.shape, generator=gen)  # (B, 4, s, s)
        timesteps = torch.randint(
            0, self.scheduler.config.num_train_timesteps, (latents.shape[0],), generator=gen
        )  # (B,) uniform
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        self.unet.train()
        for group in self.unet_opt.param_groups:
            group["lr"] = config.lr * _lr_factor(step, config.warmup)
        pred = self.unet(noisy, timesteps, encoder_hidden_states=context).sample  # (B, 4, s, s)
        loss = F.mse_loss(pred, noise)
        self.unet_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), 1.0)
        self.unet_opt.step()
        decay = min(config.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema_p, p in zip(self.ema.parameters(), self.unet.parameters(), strict=True):
                ema_p.lerp_(p, 1.0 - decay)
        self.unet_step += 1
        return float(loss.detach())

    # ------------------------------------------------------------------ outputs
    def export(self, out: Path) -> Path:
        """Write the EMA model as a diffusers StableDiffusionPipeline folder + stableseg.json."""
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(
            vae=self.vae.eval(),
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.ema,
            scheduler=self.scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        # Written beside ``out`` and swapped in, so a run killed while exporting leaves the
        # previous export whole.
        partial = out.with_name(out.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        pipe.save_pretrained(partial, safe_serialization=True)
        if hasattr(self.tokenizer, "backend_tokenizer"):
            write_bpe_files(self.tokenizer, partial / "tokenizer")
        settings = {
            "about": "StableSeg settings recommended for this demo model (see demo/README.md)",
            "segmenter": RECOMMENDED_SEGMENTER,
            "training": {
                "config": asdict(self.config),
                "vae_steps_done": self.vae_step,
                "unet_steps_done": self.unet_step,
            },
        }
        (partial / "stableseg.json").write_text(json.dumps(settings, indent=2) + "\n")
        previous = out.with_name(out.name + ".previous")
        if out.exists():
            shutil.rmtree(previous, ignore_errors=True)
            out.rename(previous)
        partial.rename(out)
        shutil.rmtree(previous, ignore_errors=True)
        return out

    def probe(self, count: int = 48) -> dict[str, Any]:
        """Held-out colour binding and mIoU of the EMA model (see demo.evaluate)."""
        from demo.evaluate import probe_components
        from labeler import SegmenterConfig

        result = probe_components(
            unet=self.ema,
            vae=self.vae.eval(),
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            config=SegmenterConfig(**RECOMMENDED_SEGMENTER),
            seed=PROBE_SEED,
            count=count,
        )
        return {"step": self.unet_step, **result}


def _tuples(config: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}


def run(
    config: TrainConfig,
    out: Path,
    state_path: Path,
    progress: bool = True,
    time_limit: float | None = None,
) -> Trainer:
    """Train (or resume) up to ``config.steps`` UNet steps and export to ``out``.

    With ``time_limit`` (seconds) the run stops early after the step that crosses it, saves
    its state and exports: rerunning continues, and ``--steps`` of the step reached
    reproduces the exported model exactly.
    """
    deadline = time.time() + time_limit if time_limit else None
    from tqdm.auto import tqdm

    new_bar = partial(tqdm, disable=not progress, mininterval=10)

    trainer = Trainer(config)
    if state_path.exists():
        trainer.load_state_dict(torch.load(state_path, map_location="cpu", weights_only=False))
        log.info(
            "resumed from %s at VAE step %d, UNet step %d",
            state_path,
            trainer.vae_step,
            trainer.unet_step,
        )

    if trainer.vae_step < config.vae_steps:
        bar = new_bar(total=config.vae_steps, initial=trainer.vae_step, desc="vae")
        while trainer.vae_step < config.vae_steps:
            loss = trainer.vae_train_step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if trainer.vae_step % config.save_every == 0 or trainer.vae_step == config.vae_steps:
                if trainer.vae_step == config.vae_steps:
                    factor = trainer.set_scaling_factor()
                    log.info("VAE done; latent scaling_factor %.4f", factor)
                trainer.save_state(state_path)
        bar.close()

    bar = new_bar(total=config.steps, initial=trainer.unet_step, desc="unet")
    started, losses = time.time(), []
    while trainer.unet_step < config.steps:
        losses.append(trainer.unet_train_step())
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        step = trainer.unet_step
        if config.probe_every and step % config.probe_every == 0:
            record = trainer.probe()
            record["loss"] = float(np.mean(losses[-config.probe_every :]))
            record["minutes"] = round((time.time() - started) / 60, 1)
            trainer.history.append(record)
            log.info("probe %s", json.dumps(record))
        out_of_time = deadline is not None and time.time() > deadline
        if step % config.save_every == 0 or step == config.steps or out_of_time:
            trainer.save_state(state_path)
            trainer.export(out)
        if out_of_time:
            log.info("time limit reached at UNet step %d; rerun to continue", step)
            break
    bar.close()
    trainer.export(out)
    return trainer


@click.command()
@click.option("--out", type=click.Path(file_okay=False), default="demo/model", show_default=True)
@click.option(
    "--state",
    type=click.Path(dir_okay=False),
    default=None,
    help="Training state for resuming [default: <out>.state.pt].",
)
@click.option("--steps", type=click.IntRange(min=0), default=_DEFAULTS.steps, show_default=True)
@click.option(
    "--vae-steps", type=click.IntRange(min=1), default=_DEFAULTS.vae_steps, show_default=True
)
@click.option(
    "--batch-size", type=click.IntRange(min=1), default=_DEFAULTS.batch_size, show_default=True
)
@click.option("--lr", type=float, default=_DEFAULTS.lr, show_default=True)
@click.option("--seed", type=int, default=_DEFAULTS.seed, show_default=True)
@click.option("--embed-scale", type=float, default=_DEFAULTS.embed_scale, show_default=True)
@click.option(
    "--save-every", type=click.IntRange(min=1), default=_DEFAULTS.save_every, show_default=True
)
@click.option(
    "--probe-every",
    type=click.IntRange(min=0),
    default=_DEFAULTS.probe_every,
    show_default=True,
    help="Log held-out colour binding and mIoU every N steps (0: never).",
)
@click.option(
    "--time-limit",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Stop (saved, resumable) after this many minutes.",
)
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def cli(
    out: str,
    state: str | None,
    steps: int,
    vae_steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    embed_scale: float,
    save_every: int,
    probe_every: int,
    time_limit: float | None,
    threads: int,
    quiet: bool,
) -> None:
    """Train the demo Stable Diffusion on synthetic scenes (resumable: rerun to continue)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(threads)
    config = TrainConfig(
        seed=seed,
        steps=steps,
        vae_steps=vae_steps,
        batch_size=batch_size,
        lr=lr,
        embed_scale=embed_scale,
        save_every=save_every,
        probe_every=probe_every,
    )
    out_path = Path(out)
    state_path = Path(state) if state else out_path.with_name(out_path.name + ".state.pt")
    began = time.time()
    try:
        limit = time_limit * 60 if time_limit else None
        run(config, out_path, state_path, progress=not quiet, time_limit=limit)
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    log.info("done in %.1f min; model in %s", (time.time() - began) / 60, out_path)


if __name__ == "__main__":
    cli()
