#!/usr/bin/env bash
# Install Label Studio into a virtual environment of its own (about 1 GB), apart from the
# project's: it pins Django and friends that must not mix with the backend's dependencies.
#
#   scripts/labelstudio_env.sh [VENV_DIR]
#
# VENV_DIR defaults to $LABEL_STUDIO_VENV, else ~/.cache/stableseg/ls-venv. Idempotent: an
# environment whose Label Studio imports is left as it is. The version installed is
# $LABEL_STUDIO_VERSION (a pip specifier; default: the 1.23 series the backend is tested with).
# Progress goes to stderr; the environment's folder is printed on stdout.
set -euo pipefail

venv="${1:-${LABEL_STUDIO_VENV:-${HOME}/.cache/stableseg/ls-venv}}"
exec "$(dirname "$0")/tool_env.sh" "${venv}" "label-studio${LABEL_STUDIO_VERSION:-~=1.23.0}" label_studio
