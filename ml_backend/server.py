"""The Flask app: label-studio-ml's ``init_app`` with the routes StableSeg needs done differently.

label-studio-ml 1.0.9 serves one model instance made by the last ``/setup``, spawns a process
per webhook, drops ``START_TRAINING``, answers ``/versions`` on POST only (Label Studio GETs it)
and crashes ``/is_training`` before the first ``/setup``. This module keeps its app and
replaces those views:

* ``/setup`` answers the model version without loading the model (Label Studio waits 3 s);
* ``/predict`` reads the labeling config of the request itself, so several projects can share
  one backend, and answers a clear 400 for a config without BrushLabels;
* ``/webhook`` acknowledges every event and routes ``START_TRAINING`` to the refine trainer,
  and so does the older ``/train`` (Label Studio posts there while its webhook flag is off);
* ``/health``, ``/versions`` and ``/is_training`` report the StableSeg model.

HTTP basic auth (``BASIC_AUTH_USER`` / ``BASIC_AUTH_PASS``) guards every route when set.
"""

from __future__ import annotations

import hmac
import logging
import threading
from collections import OrderedDict
from typing import Any

from flask import Flask, Response, current_app, jsonify, request

from . import cache, free_text, training
from .config import LabelConfigError
from .model import StableSegBackend
from .settings import BackendSettings

logger = logging.getLogger(__name__)

_SETTINGS_KEY = "STABLESEG_SETTINGS"
_MAX_PROJECTS = 256
# project uid -> (hostname, access_token) that Label Studio sent to /setup, for /predict
_setup_context: OrderedDict[str, tuple[str, str]] = OrderedDict()
_context_lock = threading.Lock()


def create_app(settings: BackendSettings | None = None, warm_up: bool = False) -> Flask:
    """The backend's WSGI app. ``warm_up`` loads the model in a background thread right away.

    The app object is label-studio-ml's module-level Flask app, so a later call reconfigures
    the same app (its settings are replaced, its routes registered once).
    """
    from label_studio_ml.api import init_app

    settings = settings or BackendSettings.from_env()
    app = init_app(model_class=StableSegBackend)
    app.config[_SETTINGS_KEY] = settings
    if not app.config.get("STABLESEG_ROUTES"):
        _install_routes(app)
        app.config["STABLESEG_ROUTES"] = True
    if warm_up:
        threading.Thread(target=_warm_up, args=(settings,), name="warm-up", daemon=True).start()
    logger.info("StableSeg ML backend for model %s", settings.model.source)
    return app


def _install_routes(app: Flask) -> None:
    replaced = {
        "_setup": setup,
        "_predict": predict,
        "webhook": webhook,
        "_train": train,
        "health": health,
        "_is_training": is_training,
        "get_version": versions,
    }
    known = {rule.endpoint for rule in app.url_map.iter_rules()}
    missing = sorted(set(replaced) - known)
    if missing:  # label-studio-ml is pinned to 1.0.9; another release names its views otherwise
        raise RuntimeError(f"label-studio-ml has no endpoints {missing}; expected release 1.0.9")
    app.view_functions.update(replaced)
    app.add_url_rule("/versions", "stableseg_versions", versions, methods=["GET"])
    app.before_request(check_basic_auth)


def _settings() -> BackendSettings:
    return current_app.config[_SETTINGS_KEY]


def _warm_up(settings: BackendSettings) -> None:
    try:
        cache.get_segmenter(settings)
    except Exception:
        logger.exception("warm-up: loading %s failed; requests will retry", settings.model.source)


def error(status: int, detail: str, **extra: Any) -> tuple[Response, int]:
    """A JSON error in label-studio-ml's shape: ``{"status": ..., "detail": ...}``."""
    return jsonify({"status": status, "detail": detail, **extra}), status


def _json_body() -> dict[str, Any] | None:
    body = request.get_json(silent=True)
    return body if isinstance(body, dict) else None


# ---------------------------------------------------------------------- auth
def check_basic_auth() -> Response | None:
    """Refuse any request without the configured basic-auth user and password."""
    settings = _settings()
    if not settings.basic_auth_user:
        return None
    auth = request.authorization
    user_ok = auth is not None and hmac.compare_digest(
        (auth.username or "").encode(), settings.basic_auth_user.encode()
    )
    pass_ok = auth is not None and hmac.compare_digest(
        (auth.password or "").encode(), (settings.basic_auth_pass or "").encode()
    )
    if user_ok and pass_ok:
        return None
    response = jsonify({"status": 401, "detail": "basic authentication required"})
    response.status_code = 401
    response.headers["WWW-Authenticate"] = 'Basic realm="stableseg-ml-backend"'
    return response


# ---------------------------------------------------------------------- views
def setup() -> Any:
    """Label Studio connects a project: check its config, answer the model version."""
    body = _json_body() or {}
    project_id = str(body.get("project") or "").split(".")[0]
    settings = training.project_settings(_settings(), project_id)
    model = StableSegBackend(label_config=body.get("schema"), settings=settings)
    if model.config_error:
        logger.error("/setup for project %s: %s", body.get("project"), model.config_error)
        return error(400, model.config_error)
    project = str(body.get("project") or "")
    if project:
        with _context_lock:
            _setup_context[project] = (body.get("hostname") or "", body.get("access_token") or "")
            _setup_context.move_to_end(project)
            while len(_setup_context) > _MAX_PROJECTS:
                _setup_context.popitem(last=False)
    try:
        version = model.model_version
    except ValueError as err:  # e.g. an unreadable STABLESEG_WEIGHTS
        logger.error("/setup: %s", err)
        return error(500, str(err))
    return jsonify({"model_version": version})


def predict() -> Any:
    """Predictions for the tasks of one request, all images in UNet batches."""
    body = _json_body()
    if body is None:
        return error(400, "the request body must be a JSON object with 'tasks'")
    tasks = body.get("tasks")
    if not isinstance(tasks, list):
        return error(400, f"'tasks' must be a list of tasks, got {type(tasks).__name__}")
    project = str(body.get("project") or "")
    with _context_lock:
        hostname, access_token = _setup_context.get(project, ("", ""))
    model = StableSegBackend(
        label_config=body.get("label_config"),
        settings=training.project_settings(_settings(), project.split(".")[0]),
        hostname=hostname,
        access_token=access_token,
    )
    try:
        # Free-text prompts (interactive pre-annotations): see ml_backend.free_text.
        outcome = free_text.predict_phrase(model, tasks, body.get("params"))
        outcome = outcome or model.predict_tasks(tasks)
    except (LabelConfigError, free_text.FreeTextError) as err:
        return error(400, str(err))
    except Exception as err:
        logger.exception("/predict failed")
        return error(500, f"{type(err).__name__}: {err}")
    return jsonify(
        {
            "results": outcome.predictions,
            "model_version": outcome.model_version,
            "errors": [e.to_dict() for e in outcome.errors],
        }
    )


def _context(project_id: str) -> dict[str, str]:
    """hostname and access_token that /setup recorded for this project (keys are 'ID.TIME')."""
    with _context_lock:
        for key in reversed(_setup_context):
            if key.split(".")[0] == project_id:
                hostname, access_token = _setup_context[key]
                return {"hostname": hostname, "access_token": access_token}
    return {}


def webhook() -> Any:
    """Acknowledge every Label Studio event; ``START_TRAINING`` starts the refine trainer."""
    body = _json_body()
    if body is None or not body.get("action"):
        return error(400, "a webhook body must be a JSON object with an 'action'")
    action = str(body["action"])
    project = body.get("project") if isinstance(body.get("project"), dict) else {}
    if action != "START_TRAINING":
        logger.info("webhook %s acknowledged", action)
        return jsonify({"status": "ok", "action": action, "detail": "acknowledged"}), 201
    project_id = str(project.get("id", ""))
    if not project_id:
        return error(400, "START_TRAINING needs the project: {'project': {'id': ...}}")
    model = StableSegBackend(
        label_config=project.get("label_config"), settings=_settings(), **_context(project_id)
    )
    status = model.start_training(project_id, body)
    return jsonify({"action": action, **status}), 201


def train() -> Any:
    """Label Studio's older Start Training call: the same route as ``START_TRAINING``."""
    body = _json_body()
    if body is None:
        return error(400, "the request body must be a JSON object")
    project_id = str(body.get("project") or "").split(".")[0]
    if not project_id:
        return error(400, "/train needs the project: {'project': 'ID.TIMESTAMP', ...}")
    annotations = body.get("annotations")
    tasks = annotations if isinstance(annotations, list) else []
    model = StableSegBackend(
        label_config=body.get("label_config"), settings=_settings(), **_context(project_id)
    )
    status = model.start_training(project_id, {"tasks": tasks})
    return jsonify({"action": "START_TRAINING", "job": None, **status}), 201


def health() -> Any:
    settings = _settings()
    return jsonify(
        {
            "status": "UP",
            "model_class": StableSegBackend.__name__,
            "model_dir": settings.model.source,
            "model_loaded": settings.model.source in cache.loaded_models(),
            "v2": True,
        }
    )


def versions() -> Any:
    settings = _settings()
    try:
        version = cache.model_version(settings)
    except ValueError as err:
        return error(500, str(err))
    return jsonify({"versions": [version], "model_dir": settings.model.source, "v2": True})


def is_training() -> Any:
    project = (request.args.get("project") or "").split(".")[0]
    return jsonify(
        {
            "is_training": training.is_training(project),
            "backend": "none",
            "model_version": cache.model_version(training.project_settings(_settings(), project)),
        }
    )
