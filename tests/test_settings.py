"""One declaration per setting: the generated options, variables, docs table and serve's hand-off;
labels checked once; usage errors before any work."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from labeler.commands import main
from labeler.labels import parse_labels_file, validate_labels
from labeler.model_settings import (
    ModelSettings,
    ModelSpec,
    SegmenterConfig,
    parse_dtype,
    parse_sizes,
    select_sizes,
)
from labeler.settings import (
    build,
    by_name,
    integer,
    read_env,
    setting,
    settings_group,
    settings_of,
    to_env,
)
from ml_backend.backend_settings import BackendSettings
from ml_backend.training import refine_options

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- the declarations
def settings_from_env(env: dict[str, str]) -> ModelSettings:
    return build(ModelSettings, read_env(ModelSettings, env))


def test_every_segmenter_and_model_field_is_declared_once():
    declared = {(s.owner, s.field) for s in settings_of(ModelSettings)}
    assert len(declared) == len(settings_of(ModelSettings))
    segmenter = {f.name for f in fields(SegmenterConfig)} - {"label_separator", "map_weights"}
    model = {f.name for f in fields(ModelSpec)}
    assert {f for o, f in declared if o is SegmenterConfig} == segmenter
    assert {f for o, f in declared if o is ModelSpec} == model
    assert {f for o, f in declared if o is ModelSettings} == {"weights"}


def test_environment_round_trip_gives_the_same_settings(tmp_path):
    from labeler.weights import map_weights_to_bytes

    weights = tmp_path / "w.safetensors"
    weights.write_bytes(map_weights_to_bytes({"layer": 1.5}))
    values = {
        "model": "org/name",
        "device": "cpu",
        "dtype": "bf16",
        "compile": True,
        "unet_memory": 512,
        "image_size": 64,
        "batch_size": 3,
        "timestep": 50,
        "cross_sizes": (8, 16),
        "self_sizes": "<=32",
        "sar": True,
        "self_only": True,
        "prompt_template": "a photo of {}",
        "background_prompt": "background",
        "background_threshold": 0.25,
        "presence_threshold": 0.9,
        "reprompt": True,
        "flip": True,
        "ensemble_timesteps": (50, 100),
        "ensemble_templates": ("a {}", "the {}"),
        "sar_rounds": 2,
        "tiles": 2.5,
        "tile_overlap": 0.5,
        "tile_gate": 0.2,
        "weights": str(weights),
    }
    assert set(values) == set(by_name(ModelSettings))  # the test covers every setting
    settings = build(ModelSettings, values)
    again = settings_from_env(to_env(settings))
    assert again == settings
    assert again.segmenter.map_weights == {"layer": 1.5}
    assert to_env(settings)["STABLESEG_SELF_SIZES"] == "<=32"


def test_bad_values_name_the_variable():
    with pytest.raises(ValueError, match="STABLESEG_TIMESTEP 'soon'"):
        settings_from_env({"STABLESEG_TIMESTEP": "soon"})
    with pytest.raises(ValueError, match="multiple of 8"):
        settings_from_env({"STABLESEG_IMAGE_SIZE": "63"})
    with pytest.raises(ValueError, match="STABLESEG_SAR 'maybe'"):
        settings_from_env({"STABLESEG_SAR": "maybe"})
    assert settings_from_env({"MODEL_DIR": "a/b"}).model.source == "a/b"
    assert settings_from_env({"MODEL_DIR": "a/b", "STABLESEG_MODEL": "c/d"}).model.source == "c/d"


def test_size_notation_and_dtype_spellings():
    assert parse_sizes("16, 8") == (8, 16)
    assert parse_sizes("<= 32") == "<=32" and parse_sizes("ALL") == "all"
    assert select_sizes("<=32", [8, 16, 32, 64], None) == {8, 16, 32}
    assert select_sizes(None, [8, 16, 32, 64], 2) == {8, 16}
    with pytest.raises(ValueError, match="valid sizes"):
        select_sizes((12,), [8, 16], None)
    with pytest.raises(ValueError, match="cannot read sizes"):
        parse_sizes("big")
    assert [parse_dtype(v) for v in ("half", "float16", "BF16", "float32", "auto")] == [
        "fp16",
        "fp16",
        "bf16",
        "fp32",
        None,
    ]
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        parse_dtype("int8")


def test_table_3_sizes_reach_the_model(tiny_parts):
    from labeler import StableSeg

    model = StableSeg(**tiny_parts, config=SegmenterConfig(image_size=64))
    sides = sorted({layer.side for layer in model.attention_layers()})
    plan = model.with_config(model.config.replace(cross_sizes="<=16", self_sizes="all")).plan()
    chosen = {layer.side for layer in model.attention_layers() if plan.cross.get(layer.name)}
    assert chosen == {s for s in sides if s <= 16}


# ---------------------------------------------------------------------------- labels
def test_labels_are_normalised_and_checked_once():
    assert validate_labels(["  cat ", "hot\u00a0 dog", "Caf\u0065\u0301"]) == [
        "cat",
        "hot dog",
        "Caf\u00e9",  # NFC
    ]
    with pytest.raises(ValueError, match="ZERO WIDTH SPACE"):
        validate_labels(["cat", "d\u200bog"])
    with pytest.raises(ValueError, match="duplicate label 'CAT'"):
        validate_labels(["cat", "CAT"])
    with pytest.raises(ValueError, match="at most 254"):
        validate_labels([f"l{i}" for i in range(255)])
    with pytest.raises(ValueError, match="starts with '#'"):
        validate_labels(["#1"])
    assert validate_labels(["a:b", "a,b"]) == ["a:b", "a,b"]  # carried, not refused


def test_labels_file_comments_and_line_numbers():
    lines = ["# classes", "cat", "", "  # still a comment", "dog  house", "\tbird"]
    assert parse_labels_file(lines, "f.txt") == ["cat", "dog house", "bird"]
    with pytest.raises(ValueError, match=r"line 3 of f\.txt"):
        parse_labels_file(["cat", "dog", "c\x07at"], "f.txt")
    with pytest.raises(ValueError, match="no label names"):
        parse_labels_file(["# only", ""], "f.txt")


# ---------------------------------------------------------------------------- entry points
@pytest.fixture
def images(tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray((rng.random((20, 24, 3)) * 255).astype(np.uint8)).save(folder / name)
    return folder


def _invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def test_usage_errors_come_before_any_model_loads_or_file_is_written(images, tmp_path):
    out = tmp_path / "out"
    base = ["pseudo-label", str(images), "--labels", "cat,dog", "--out", str(out)]
    odd = _invoke(*base, "--model", "demo/model", "--image-size", "63")
    assert odd.exit_code == 2 and "multiple of 8" in odd.output
    started = time.monotonic()
    typo = _invoke(*base, "--model", str(ROOT / "demo" / "modl"))
    assert typo.exit_code == 2 and "no such folder" in typo.output
    relative = _invoke(*base, "--model", "demo/modl")  # demo/ exists: a local path, not a hub id
    assert relative.exit_code == 2 and "no such folder" in relative.output
    assert time.monotonic() - started < 10  # no hub retries
    many = _invoke(*base[:3], ",".join(f"l{i}" for i in range(300)), *base[4:])
    assert many.exit_code == 2 and "at most 254" in many.output
    invisible = _invoke(*base[:3], "cat,d\u200bog", *base[4:])
    assert invisible.exit_code == 2 and "U+200B" in invisible.output
    sizes = _invoke(*base, "--model", "demo/model", "--cross-sizes", "big")
    assert sizes.exit_code == 2 and "cannot read sizes" in sizes.output
    assert not out.exists()


def test_an_empty_image_folder_is_a_usage_error(tmp_path):
    (tmp_path / "empty").mkdir()
    result = _invoke(
        "pseudo-label",
        str(tmp_path / "empty"),
        "--labels",
        "cat",
        "--model",
        "demo/model",
        "--out",
        str(tmp_path / "out"),
    )
    assert result.exit_code == 2 and "no images under" in result.output
    assert not (tmp_path / "out").exists()


def test_a_model_that_cannot_load_writes_nothing(images, tmp_path):
    broken = tmp_path / "broken-model"
    for part in ("unet", "vae", "text_encoder", "tokenizer"):
        (broken / part).mkdir(parents=True)
    result = _invoke(
        "pseudo-label",
        str(images),
        "--labels",
        "cat",
        "--model",
        str(broken),
        "--out",
        str(tmp_path / "out"),
    )
    assert result.exit_code == 1 and "cannot load --model" in result.output
    assert not (tmp_path / "out").exists()  # the corrected rerun is not refused


def test_labels_with_colons_are_carried_through_every_export(images, tmp_path, tiny_model_dir):
    import json

    out = tmp_path / "out"
    labels = "cat: tabby,dog"
    result = _invoke(
        "pseudo-label",
        str(images),
        "--labels",
        labels,
        "--model",
        str(tiny_model_dir),
        "--image-size",
        "64",
        "--format",
        "coco",
        "--format",
        "labelstudio",
        "--out",
        str(out),
    )
    assert result.exit_code == 0, result.output
    coco = json.loads((out / "coco.json").read_text())
    assert [c["name"] for c in coco["categories"]] == ["cat: tabby", "dog"]
    assert json.loads((out / "classes.json").read_text())["1"] == "cat: tabby"
    assert "cat%3A tabby:128,0,0::" in (out / "labelmap.txt").read_text()
    tasks = json.loads((out / "labelstudio.json").read_text())
    names = {r["value"]["brushlabels"][0] for t in tasks for r in t["predictions"][0]["result"]}
    assert names <= {"cat: tabby", "dog"} and names


def test_start_training_uses_the_segmenter_settings_that_serve_predicts_with():
    env = {
        "STABLESEG_MODEL": "org/name",
        "STABLESEG_IMAGE_SIZE": "256",
        "STABLESEG_BATCH_SIZE": "2",
        "STABLESEG_TIMESTEP": "20",
        "STABLESEG_CROSS_SIZES": "<=16",
        "STABLESEG_SELF_SIZES": "16,32",
        "STABLESEG_PROMPT_TEMPLATE": "a photo of {}",
        "STABLESEG_BACKGROUND_PROMPT": "background",
        "STABLESEG_BACKGROUND_THRESHOLD": "0.3",
        "STABLESEG_DTYPE": "fp32",
    }
    settings = BackendSettings.from_env(env)
    options = refine_options(settings, ["cat", "dog"])
    assert options.segmenter == settings.stableseg.segmenter
    assert options.segmenter.background_prompt == "background"  # once dropped
    assert options.model == settings.model


def test_serve_hands_its_workers_one_validated_settings_object(tmp_path):
    """serve reads its options and the environment once and hands gunicorn's workers the result
    as one JSON object (os.execve is stopped to see what the workers would get)."""
    from labeler.weights import map_weights_to_bytes
    from ml_backend.backend_settings import SETTINGS_VARIABLE

    weights = tmp_path / "w.safetensors"
    weights.write_bytes(map_weights_to_bytes({"layer": 2.0}))
    code = (
        "import json, os, sys\n"
        "def stop(path, args, env):\n"
        f"    print(json.dumps({{'handed': env['{SETTINGS_VARIABLE}'], 'args': args}}))\n"
        "    sys.exit(0)\n"
        "os.execve = stop\n"
        "from labeler.commands import main\n"
        "main(['serve', '--model', 'demo/model', '--image-size', '64', '--timestep', '5',\n"
        f"      '--no-sar', '--cross-sizes', '<=16', '--weights', {str(weights)!r}])\n"
    )
    env = {
        **os.environ,
        "STABLESEG_BATCH_SIZE": "3",
        "STABLESEG_TIMESTEP": "9",
        "STABLESEG_MAX_TASKS": "7",
        "STABLESEG_REFINE_EPOCHS": "2",
        "LOCAL_FILES_DOCUMENT_ROOT": "demo",
    }
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    import json

    assert done.returncode == 0, done.stderr
    handed = json.loads(done.stdout.strip().splitlines()[-1])["handed"]
    worker = BackendSettings.load({SETTINGS_VARIABLE: handed, "STABLESEG_TIMESTEP": "77"})
    assert worker.model.source == str(ROOT / "demo" / "model")  # absolute for the workers
    segmenter = worker.stableseg.segmenter
    assert segmenter.timestep == 5  # the command line wins over the environment
    assert segmenter.batch_size == 3  # the environment fills what is not given
    assert not segmenter.use_sar and segmenter.cross_sizes == "<=16"
    assert segmenter.map_weights == {"layer": 2.0}  # read once, by serve
    assert worker.stableseg.weights == weights.resolve()
    assert worker.max_tasks == 7 and worker.student.epochs == 2
    assert worker.local_files_document_root == str(ROOT / "demo")
    assert worker.warm_up == "sync"  # a CPU: the model loads before gunicorn forks
    assert worker == BackendSettings.load({SETTINGS_VARIABLE: worker.to_json()})  # round trip


def test_serve_refuses_bad_settings_before_starting_anything():
    from labeler.commands.serve import serve

    bad = CliRunner().invoke(serve, ["--image-size", "63"], env={"STABLESEG_MAX_TASKS": "0"})
    assert bad.exit_code == 2 and "STABLESEG_MAX_TASKS '0'" in bad.output
    odd = CliRunner().invoke(serve, ["--image-size", "63"])
    assert odd.exit_code == 2 and "multiple of 8" in odd.output


def test_the_console_script_works_from_any_folder(tmp_path):
    script = Path(sys.executable).with_name("stableseg")
    if not script.exists():
        pytest.skip("the package is not installed with its console script")
    done = subprocess.run(
        [str(script), "pseudo-label", "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and "--cross-sizes" in done.stdout


def test_model_settings_are_what_the_commands_receive():
    seen = {}

    import click

    from labeler.commands.common import segmenter_options

    @click.command()
    @segmenter_options
    def probe(settings: ModelSettings) -> None:
        seen["settings"] = settings

    result = CliRunner().invoke(
        probe, ["--image-size", "128", "--self-only", "--dtype", "half", "--timestep", "3"]
    )
    assert result.exit_code == 2  # click.Choice: half is not one of the choices
    result = CliRunner().invoke(
        probe, ["--image-size", "128", "--self-only", "--dtype", "fp16", "--timestep", "3"]
    )
    assert result.exit_code == 0, result.output
    settings = seen["settings"]
    assert settings.model == ModelSpec(dtype="fp16")
    assert settings.segmenter == SegmenterConfig(image_size=128, self_only=True, timestep=3)
    bad = CliRunner().invoke(probe, ["--no-sar", "--self-only"])
    assert bad.exit_code == 2 and "--self-only needs --sar" in bad.output


# ---------------------------------------------------------------------------- one declaration
COMMAND_INPUTS = {
    # What a command works on rather than how: arguments, labels, folders, its own switches.
    # Every other parameter must come from a declaration (labeler.settings).
    "pseudo-label": {"images_dir", "labels", "labels_file", "verbose"},
    "refine": {
        "images_dir",
        "labels",
        "labels_file",
        "work_dir",
        "labels_from_gt",
        "image_labels",
        "verbose",
    },
    "serve": {"host", "port", "workers", "threads", "dev_server", "log_level"},
    "label-studio predict": {"verbose"},
    # benchmark's and evaluate's own options are their jobs' (not declared yet); their model
    # and segmenter options are.
    "benchmark": {
        "dataset",
        "root",
        "split",
        "protocol",
        "limit",
        "out",
        "background",
        "labels",
        "labels_file",
        "gt",
        "ignore_index",
        "sweep",
        "preview",
        "save_masks",
        "student",
        "verbose",
    },
    "evaluate": {
        "pred_dir",
        "gt_dir",
        "labels",
        "labels_file",
        "json_path",
        "ignore_index",
        "exclude_background",
        "pred_ignore",
    },
}


def test_every_option_of_every_command_comes_from_a_declaration():
    """Both ways: each parameter is a declared setting or one of the command's inputs, and each
    group a command uses has every one of its command-line settings there, once."""
    from labeler.commands.settings_table import commands

    seen = set()
    for name, command in commands():
        seen.add(name)
        params = [p for p in command.params if p.name != "help"]
        own = {p.name for p in params if getattr(p, "setting", None) is None}
        assert own == COMMAND_INPUTS[name], name
        declared = [p for p in params if getattr(p, "setting", None) is not None and not p.hidden]
        flags = [p.opts[0] for p in declared]
        assert len(flags) == len(set(flags)), f"{name}: a flag is declared twice"
        for group in {p.settings_group for p in declared}:
            wanted = {s.flag for s in settings_of(group) if s.option}
            got = {p.opts[0] for p in declared if p.settings_group is group}
            assert got == wanted, (name, group.__name__)
        for param in declared:
            assert param.opts[0] == param.setting.flag
            shown = param.setting.shown_default()
            if shown is not None:
                assert f"default: {shown}" in (param.help or ""), param.opts[0]
    assert seen == set(COMMAND_INPUTS)


def test_every_backend_variable_comes_from_the_declaration():
    """Both ways: each declared variable is read by BackendSettings.from_env, and the backend
    reads no other variable of ours by hand (only LOG_LEVEL, for logging before the settings,
    and the CA bundles of the TLS stack)."""
    import ast
    import re

    from ml_backend.backend_settings import SETTINGS_VARIABLE

    declared = {s.env for s in settings_of(BackendSettings) if s.env}
    for item in settings_of(BackendSettings):
        assert item.env is not None, item.name
        try:
            values = read_env(BackendSettings, {item.env: "7"})
        except ValueError as err:
            assert item.env in str(err)
        else:
            assert list(values) == [item.name]
    known = declared | {SETTINGS_VARIABLE}
    for item in settings_of(BackendSettings):
        known |= set(item.declaration.aliases) | set(item.deprecated_env)
    by_hand = set()
    mentioned = set()
    name = re.compile(r"\b(STABLESEG_[A-Z0-9_]+|LABEL_STUDIO_[A-Z0-9_]+|BASIC_AUTH_[A-Z]+)\b")
    for path in [
        *(ROOT / "ml_backend").glob("*.py"),
        *(ROOT / "labeler" / "commands").glob("*.py"),
    ]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                mentioned |= set(name.findall(node.value))
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and ast.unparse(node.func) in ("os.environ.get", "os.getenv")
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                by_hand.add(node.args[0].value)
    assert by_hand == {"LOG_LEVEL", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"}
    flask_config_keys = {"STABLESEG_SETTINGS", "STABLESEG_ROUTES"}
    prefixes = {m for m in mentioned if m.endswith("_")}  # "STABLESEG_REFINE_*" in prose
    assert all(any(k.startswith(p) for k in known) for p in prefixes)
    assert mentioned - prefixes - flask_config_keys <= known


def test_the_docs_settings_table_is_generated_from_the_declarations():
    from labeler.commands.settings_table import END, START, with_table

    page = (ROOT / "docs" / "settings.md").read_text(encoding="utf-8")
    assert START in page and END in page
    assert with_table(page) == page, (
        "docs/settings.md's table differs from the declarations; regenerate it with "
        "`python -m labeler.commands.settings_table --write docs/settings.md`"
    )


def test_the_old_crop_size_variable_still_works_for_one_release_and_says_so(caplog):
    with caplog.at_level("WARNING", logger="labeler.settings"):
        old = BackendSettings.from_env({"STABLESEG_REFINE_IMAGE_SIZE": "64"})
    assert old.student.crop_size == 64
    assert "STABLESEG_REFINE_IMAGE_SIZE is deprecated" in caplog.text
    assert "use STABLESEG_REFINE_CROP_SIZE" in caplog.text
    both = {"STABLESEG_REFINE_IMAGE_SIZE": "64", "STABLESEG_REFINE_CROP_SIZE": "96"}
    assert BackendSettings.from_env(both).student.crop_size == 96  # the new name wins
    new = BackendSettings.from_env({"STABLESEG_REFINE_CROP_SIZE": "128"})
    assert new.student.crop_size == 128
    options = refine_options(new, ["cat"])
    assert options.student.crop_size == 128  # Start Training trains at that crop


def test_other_tools_names_are_read_after_ours():
    env = {"LABEL_STUDIO_HOST": "http://a", "LABEL_STUDIO_ACCESS_TOKEN": "t"}
    settings = BackendSettings.from_env(env)
    assert settings.label_studio_url == "http://a" and settings.label_studio_api_key == "t"
    ours = BackendSettings.from_env({**env, "LABEL_STUDIO_URL": "http://b"})
    assert ours.label_studio_url == "http://b"


@settings_group("probe", env_prefix="PROBE_")
@dataclass(frozen=True)
class _Probe:
    crop_size: int = field(
        default=8,
        metadata=setting(
            "A renamed setting.", parse=integer(minimum=1), deprecated=("--image-size", "PROBE_OLD")
        ),
    )


def test_a_renamed_flag_still_works_for_one_release_and_says_so():
    import click

    from labeler.commands.common import settings_options

    seen = {}

    @click.command()
    @settings_options(_Probe, "probe", environment=True)
    def probe(probe: _Probe) -> None:
        seen["probe"] = probe

    result = CliRunner().invoke(probe, ["--image-size", "16"])
    assert result.exit_code == 0, result.output
    assert seen["probe"].crop_size == 16
    assert "--image-size is deprecated" in result.output and "use --crop-size" in result.output
    assert CliRunner().invoke(probe, ["--crop-size", "24"]).exit_code == 0
    assert seen["probe"].crop_size == 24
    assert CliRunner().invoke(probe, [], env={"PROBE_OLD": "32"}).exit_code == 0
    assert seen["probe"].crop_size == 32
    shown = CliRunner().invoke(probe, ["--help"]).output
    assert "--crop-size" in shown and "--image-size" not in shown  # the old spelling is hidden


def test_backend_settings_round_trip_through_json(tmp_path):
    from labeler.weights import map_weights_to_bytes

    weights = tmp_path / "w.safetensors"
    weights.write_bytes(map_weights_to_bytes({"layer": 0.5}))
    env = {
        "STABLESEG_MODEL": "org/name",
        "STABLESEG_DTYPE": "bf16",
        "STABLESEG_CROSS_SIZES": "8,16",
        "STABLESEG_WEIGHTS": str(weights),
        "LABEL_STUDIO_URL": "http://ls",
        "LABEL_STUDIO_API_KEY": "secret",
        "STABLESEG_ALLOWED_HOSTS": "10.0.0.0/8,images.local",
        "BASIC_AUTH_USER": "u",
        "BASIC_AUTH_PASS": "p",
        "STABLESEG_REFINE_ENCODER_WEIGHTS": "none",
        "STABLESEG_REFINE_LR": "0.5",
        "STABLESEG_MAX_TASKS": "3",
        "STABLESEG_WARM_UP": "off",
    }
    settings = BackendSettings.from_env(env)
    assert settings.student.encoder_weights is None and settings.student.lr == 0.5
    again = BackendSettings.load({"STABLESEG_SETTINGS_JSON": settings.to_json()})
    assert again == settings
    assert again.stableseg.segmenter.map_weights == {"layer": 0.5}
    assert again.stableseg.weights_stamp == settings.stableseg.weights_stamp
    assert "secret" not in repr(settings)  # secrets stay out of logs
    with pytest.raises(ValueError, match="STABLESEG_SETTINGS_JSON"):
        BackendSettings.load({"STABLESEG_SETTINGS_JSON": "{not json"})


def test_the_backend_takes_the_weights_serve_read_and_reads_a_changed_file_again(
    tmp_path, monkeypatch
):
    import labeler
    from labeler.weights import load_map_weights, map_weights_to_bytes
    from ml_backend import cache

    weights = tmp_path / "w.safetensors"
    weights.write_bytes(map_weights_to_bytes({"layer": 2.0}))
    settings = BackendSettings(stableseg=build(ModelSettings, {"weights": weights}))  # read here
    monkeypatch.setattr(cache, "_weights", {})

    def read_again(path):
        raise AssertionError(f"{path} read again")

    monkeypatch.setattr(labeler, "load_map_weights", read_again)
    assert cache.segmenter_config(settings).map_weights == {"layer": 2.0}
    time.sleep(0.01)
    weights.write_bytes(map_weights_to_bytes({"layer": 3.0, "other": 1.0}))  # retrained
    monkeypatch.setattr(labeler, "load_map_weights", load_map_weights)
    assert cache.segmenter_config(settings).map_weights == {"layer": 3.0, "other": 1.0}
