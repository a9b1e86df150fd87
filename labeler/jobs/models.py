"""Loading StableSeg from a :class:`~labeler.model_settings.ModelSpec`: one place for every entry
point; and ``refine``'s trained student as a model of the stage (:class:`StudentSegmenter`).

``pseudo-label``, ``refine``, ``benchmark``, the Label Studio backend and Start Training all load
their model here, so they share the checks done before anything expensive (a local-looking path
that does not exist fails at once, instead of being tried as a hub id for half a minute), the
quiet loading (our progress bars, not the libraries'), and one lock: diffusers and transformers
cannot load two models at the same moment in one process (two Start Training runs once failed with
"Cannot copy out of meta tensor").
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from labeler.model_settings import ModelSpec, SegmenterConfig, torch_dtype

if TYPE_CHECKING:
    from labeler import StableSeg

log = logging.getLogger(__name__)

LOAD_LOCK = threading.Lock()
"""Held while weights load: one ``from_pretrained`` at a time per process."""

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")
_MODEL_PARTS = ("unet", "vae", "text_encoder", "tokenizer")


def resolve_source(source: str) -> str:
    """A local diffusers folder (absolute path) or a hub id, checked without loading anything.

    A path that exists must be a diffusers folder. A string is taken for a local path, which
    must then exist, when it cannot be a hub id (it starts with ``/``, ``.`` or ``~``, has more
    than one ``/``, or characters hub ids do not allow) or when its first part is an existing
    local folder (``demo/modl`` beside a ``demo/`` folder is a typo, not a hub id).

    Raises:
        ValueError: saying which of the two it was taken for and what is missing.
    """
    path = Path(os.path.expanduser(source))
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"--model {source}: is a file; give a diffusers folder or a hub id")
        missing = [part for part in _MODEL_PARTS if not (path / part).is_dir()]
        if missing:
            raise ValueError(
                f"--model {source}: the folder is not a diffusers Stable Diffusion (missing "
                f"{', '.join(f'{m}/' for m in missing)}); expected model_index.json with unet/, "
                "vae/, text_encoder/ and tokenizer/ beside it"
            )
        return str(path.resolve())
    first = Path(source.split("/", 1)[0])
    local = source.startswith(("/", ".", "~")) or not _HUB_ID.match(source)
    if local or ("/" in source and first.is_dir()):
        raise ValueError(
            f"--model {source}: no such folder (it is not a hub id either: those look like "
            "'organisation/name')"
        )
    return source


HUB_PROBE_TIMEOUT_S = 10.0
"""How long the one request that checks the Hugging Face hub answers may take."""


def hub_load_options(source: str) -> dict[str, Any]:
    """What ``from_pretrained`` needs to load ``source`` (a resolved --model) without the
    libraries' retries: one request asks the Hugging Face hub for the model's
    ``model_index.json`` first.

    A local folder needs nothing; with ``HF_HUB_OFFLINE`` set the libraries read the cache
    alone. When the hub answers (even "not found" or "gated") the load goes on and says what
    it found. When it cannot be reached, a model already in the Hugging Face cache is loaded
    from there (``local_files_only``); otherwise loading would retry for half a minute and then
    report a missing ``config.json``, which reads like a broken model: this says what happened.

    Raises:
        ValueError: the hub cannot be reached and the model is not in the cache.
    """
    if os.path.isdir(source):
        return {}
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub import try_to_load_from_cache as cached_file
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if constants.HF_HUB_OFFLINE:
        return {}
    url = hf_hub_url(source, "model_index.json", endpoint=constants.ENDPOINT)
    try:
        get_hf_file_metadata(url, timeout=HUB_PROBE_TIMEOUT_S)
    except (HfHubHTTPError, OfflineModeIsEnabled):
        return {}  # the hub answered, or the libraries are offline: their load says the rest
    except Exception as err:  # DNS, refused, timeout, proxy: nothing answered
        if isinstance(cached_file(source, "model_index.json"), str):
            log.warning(
                "could not reach the Hugging Face hub (%s); loading %s from the cache",
                err,
                source,
            )
            return {"local_files_only": True}
        raise ValueError(
            f"--model {source}: could not reach the Hugging Face hub at {constants.ENDPOINT} "
            "\u2014 offline? pass a local folder (a diffusers Stable Diffusion such as "
            "demo/model) with --model, or set HF_HUB_OFFLINE=1 to use the models already in "
            f"the Hugging Face cache ({type(err).__name__}: {err})"
        ) from None
    return {}


def quiet_model_loading() -> None:
    """Hide diffusers' and transformers' per-file loading bars (ours show the run)."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def load_stableseg(
    spec: ModelSpec, config: SegmenterConfig | None = None, device: str | None = None
) -> StableSeg:
    """StableSeg from ``spec`` with ``config``; ``device`` (e.g. a distributed rank's GPU) wins
    over ``spec.device`` when given.

    Raises:
        ValueError: a bad local path, a hub that cannot be reached (:func:`hub_load_options`),
            an image size the VAE cannot take, or weights that cannot be loaded (the message
            says what was tried).
    """
    from labeler import StableSeg

    source = resolve_source(spec.source)
    quiet_model_loading()
    started = time.monotonic()
    load_options = hub_load_options(source)
    with LOAD_LOCK:
        try:
            model = StableSeg.from_pretrained(
                source,
                device=device or spec.device,
                dtype=torch_dtype(spec.dtype),
                config=config,
                **load_options,
            )
        except OSError as err:
            where = "the local folder" if os.path.isdir(source) else "the Hugging Face hub"
            raise ValueError(f"cannot load --model {spec.source} from {where}: {err}") from None
    if spec.unet_memory is not None:
        model.unet_memory = spec.unet_memory * 2**20
    if spec.compile:
        model.compile()
    log.info("loaded %s in %.1f s", spec.source, time.monotonic() - started)
    return model


class StudentSegmenter:
    """A trained DeepLabV3+ (``refine``'s output folder) as a model of the stage
    (:class:`labeler.jobs.stage.StageModel`), for ``pseudo-label --student``.

    The student takes images at any size: ``input_size`` is None, ``prepare`` gives the
    full-size RGB array, and it runs at the size it was trained at (``--image-size`` applies to
    StableSeg). ``model_version`` is a digest of the folder's files.
    """

    input_size = None

    def __init__(self, folder: Path, device: str | None, batch_size: int) -> None:
        from labeler.train.student import load_student

        folder = Path(folder)
        self.student = load_student(folder, device=device)
        self.batch_size = batch_size
        digest = hashlib.sha256()
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
        self.model_version = f"student-{digest.hexdigest()[:12]}"

    def prepare(self, image: Any, size: tuple[int, int] | None = None) -> Any:
        """Any image (PIL or array, any mode) -> (H, W, 3) uint8 at its own size."""
        from labeler.images import to_rgb_array

        return to_rgb_array(image)

    def segment(self, images: Any, labels: Sequence[str], return_probs: bool = False) -> list[Any]:
        """One :class:`~labeler.result.SegmentationResult` per image, at its size; the
        probabilities only when asked for."""
        from labeler.train.student import student_segment

        results = student_segment(self.student, images, labels)
        if not return_probs:
            for result in results:
                result.probs = None
        return results


def load_student_segmenter(
    folder: Path, config: SegmenterConfig, device: str | None = None
) -> StudentSegmenter:
    """The student of ``folder`` on ``device``, taking ``config.batch_size`` images a call."""
    return StudentSegmenter(folder, device, config.batch_size)


def save_diffusers_folder(parts: dict[str, Any], root: Path, dtype: str | None = None) -> Path:
    """Components (``unet``, ``vae``, ``text_encoder``, ``tokenizer``) written as a diffusers
    Stable Diffusion folder, with a scheduler and ``model_index.json``, as a checkpoint is laid
    out: what ``--model`` and :func:`load_stableseg` read (tests, benchmarks, the demo).

    Args:
        dtype: ``"fp16"``, ``"bf16"`` or ``"fp32"`` to store the weights in; None as they are.
    """
    import json

    from diffusers import DDPMScheduler

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for name in ("unet", "vae", "text_encoder"):
        module = parts[name] if dtype is None else parts[name].to(torch_dtype(dtype))
        module.save_pretrained(root / name)
    parts["tokenizer"].save_pretrained(root / "tokenizer")
    DDPMScheduler().save_pretrained(root / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.27.0",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDPMScheduler"],
    }
    (root / "model_index.json").write_text(json.dumps(index, indent=2))
    return root
