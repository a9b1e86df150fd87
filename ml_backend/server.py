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

Every request first meets :class:`ml_backend.guard.RequestGuard` (basic auth when
``BASIC_AUTH_USER`` is set, then the body's size limit and deadline), before Flask or
label-studio-ml touch it; label-studio-ml's hooks that log every request's headers and body are
removed (they would write the basic-auth header to the log). The views then check the body's
types and the limits of :mod:`ml_backend.limits` before any model work; every error, unexpected
ones included, is a JSON ``{"status": ..., "detail": ...}``, never an HTML page.

Nothing depends on state one worker keeps between requests: ``/setup`` only checks the config
and answers the version, and the Label Studio server and key come from ``LABEL_STUDIO_URL`` and
``LABEL_STUDIO_API_KEY`` alone (never from the ``hostname`` and ``access_token`` that ``/setup``
carries), so any number of gunicorn workers answer alike.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from flask import Flask, Response, current_app, jsonify, request
from werkzeug.exceptions import HTTPException

from . import cache, free_text, limits, training
from .backend_settings import BackendSettings
from .guard import RequestGuard
from .limits import RequestError, json_error
from .model import StableSegBackend

logger = logging.getLogger(__name__)

_SETTINGS_KEY = "STABLESEG_SETTINGS"


def create_app(settings: BackendSettings | None = None, warm_up: bool = False) -> Flask:
    """The backend's WSGI app. ``warm_up`` loads the model in a background thread right away.

    The app object is label-studio-ml's module-level Flask app, so a later call reconfigures
    the same app (its settings are replaced, its routes and guard installed once). Flask's debug
    mode stays off whatever ``FLASK_DEBUG`` says.
    """
    from label_studio_ml.api import init_app

    settings = settings or BackendSettings.load()
    app = init_app(model_class=StableSegBackend)
    app.config[_SETTINGS_KEY] = settings
    app.debug = False
    if not app.config.get("STABLESEG_ROUTES"):
        _install_routes(app)
        _install_guard(app)
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
    app.register_error_handler(RequestError, lambda err: err.response())
    app.register_error_handler(HTTPException, _http_error)
    # label-studio-ml answers these with text pages; every other exception too gets JSON.
    for kind in (Exception, AssertionError, IndexError, FileNotFoundError):
        app.register_error_handler(kind, _internal_error)


def _install_guard(app: Flask) -> None:
    """Auth and body limits in front of everything; label-studio-ml's logging hooks removed."""
    for hooks in (app.before_request_funcs, app.after_request_funcs):
        for key, funcs in hooks.items():
            hooks[key] = [f for f in funcs if f.__module__ != "label_studio_ml.api"]
    app.wsgi_app = RequestGuard(app.wsgi_app, lambda: app.config[_SETTINGS_KEY])


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


def _http_error(err: HTTPException) -> Response:
    return json_error(err.code or 500, err.description or err.name)


def _internal_error(err: Exception) -> Response:
    logger.error("%s %s failed", request.method, request.path, exc_info=err)
    return json_error(500, f"internal error ({type(err).__name__}); the backend's log has details")


def _body() -> dict[str, Any]:
    """The request body as a JSON object (the guard has already bounded its size)."""
    return limits.json_object(request.get_data(cache=True))


def _project(value: Any) -> int | None:
    """The project id of a request, None when absent (400 when malformed)."""
    return None if value in (None, "") else _project_id(value)


def _project_id(value: Any) -> int:
    """The project id a request must carry (400 when missing or malformed)."""
    try:
        return training.parse_project_id(value)
    except ValueError as err:
        raise RequestError(400, str(err)) from None


def _model(label_config: Any, settings: BackendSettings) -> StableSegBackend:
    """The backend model for a labeling config; 400 (logged) when it cannot be served."""
    model = StableSegBackend(label_config=label_config, settings=settings)
    if model.config_error:
        logger.error("%s: %s", request.path, model.config_error)
        raise RequestError(400, model.config_error)
    return model


# ---------------------------------------------------------------------- views
def setup() -> Any:
    """Label Studio connects a project: check its config, answer the model version."""
    body = _body()
    project = _project(body.get("project"))
    model = _model(body.get("schema"), training.project_settings(_settings(), project))
    try:
        version = model.model_version
    except ValueError as err:  # e.g. an unreadable STABLESEG_WEIGHTS
        logger.error("/setup: %s", err)
        return error(500, str(err))
    return jsonify({"model_version": version})


def predict() -> Any:
    """Predictions for the tasks of one request, all images in UNet batches."""
    body = _body()
    tasks = limits.field(body, "tasks", list, required=True)
    limits.check_tasks(tasks, _settings())
    project = _project(body.get("project"))
    model = _model(body.get("label_config"), training.project_settings(_settings(), project))
    out_of_memory = False
    try:
        # Free-text prompts (interactive pre-annotations): see ml_backend.free_text.
        outcome = free_text.predict_phrase(model, tasks, body.get("params"))
        outcome = outcome or model.predict_tasks(tasks)
    except free_text.FreeTextError as err:
        return error(400, str(err))
    except RequestError:
        raise  # a request budget (ml_backend.limits): its own 4xx
    except Exception as err:
        if not cache.is_out_of_memory(err):
            logger.exception("/predict failed")
            return error(500, f"{type(err).__name__}: {err}")
        logger.warning("/predict: CUDA out of memory (%s); answered 503", err)
        out_of_memory = True
    finally:
        if not out_of_memory:
            cache.give_back_memory()
    if out_of_memory:  # outside the handler: the error and its frames are gone
        cache.give_back_memory(device_cache=True)
        return limits.out_of_memory()
    return jsonify(
        {
            "results": outcome.predictions,
            "model_version": outcome.model_version,
            "errors": [e.to_dict() for e in outcome.errors],
        }
    )


def webhook() -> Any:
    """Acknowledge every Label Studio event; ``START_TRAINING`` starts the refine trainer."""
    body = _body()
    action = body.get("action")
    if not isinstance(action, str) or not action:
        return error(400, "a webhook body must be a JSON object with an 'action'")
    if action != "START_TRAINING":
        logger.info("webhook %s acknowledged", action)
        return jsonify({"status": "ok", "action": action, "detail": "acknowledged"}), 201
    project = limits.field(body, "project", dict, required=True)
    project_id = _project_id(project.get("id"))
    return _start_training(action, project_id, project.get("label_config"))


def train() -> Any:
    """Label Studio's older Start Training call: the same route as ``START_TRAINING``.

    Its ``annotations`` are ignored: the run lists the project's tasks through Label Studio.
    """
    body = _body()
    project_id = _project_id(body.get("project"))
    return _start_training("START_TRAINING", project_id, body.get("label_config"), job=None)


def _start_training(action: str, project_id: int, label_config: Any, **extra: Any) -> Any:
    model = _model(label_config, _settings())
    status_code, status = model.start_training(project_id)
    return jsonify({"action": action, **extra, **status}), status_code


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
    project = _project(request.args.get("project"))
    return jsonify(
        {
            "is_training": project is not None and training.is_training(project, _settings()),
            "backend": "none",
            "model_version": cache.model_version(training.project_settings(_settings(), project)),
        }
    )
