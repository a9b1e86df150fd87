#!/usr/bin/env bash
# Install datumaro, the reader the tests check the CVAT export with, into a virtual environment
# of its own (about 600 MB): it pins pandas, pyarrow, pillow and OpenCV versions of its own.
#
#   scripts/datumaro_env.sh [VENV_DIR]
#
# VENV_DIR defaults to $DATUMARO_VENV, else ~/.cache/stableseg/datumaro-venv; the version is
# $DATUMARO_VERSION (a pip specifier; default: the 1.13 series the export is tested with).
set -euo pipefail

venv="${1:-${DATUMARO_VENV:-${HOME}/.cache/stableseg/datumaro-venv}}"
exec "$(dirname "$0")/tool_env.sh" "${venv}" "datumaro${DATUMARO_VERSION:-~=1.13.0}" datumaro
