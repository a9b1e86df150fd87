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
spec="label-studio${LABEL_STUDIO_VERSION:-~=1.23.0}"
python="${PYTHON:-python3}"

if [[ -x "${venv}/bin/label-studio" ]] \
    && "${venv}/bin/python" -c "import label_studio" >/dev/null 2>&1; then
    echo "Label Studio already installed in ${venv}" >&2
    echo "${venv}"
    exit 0
fi

echo "Installing ${spec} into ${venv} (about 1 GB, a minute or more)" >&2
mkdir -p "$(dirname "${venv}")"
log="$(mktemp -t labelstudio-install.XXXXXX.log)"
if ! {
    "${python}" -m venv --clear "${venv}" \
        && "${venv}/bin/python" -m pip install --upgrade pip \
        && "${venv}/bin/python" -m pip install "${spec}"
} >"${log}" 2>&1; then
    echo "Installing Label Studio failed; the end of pip's log (${log}):" >&2
    tail -n 40 "${log}" >&2
    exit 1
fi
rm -f "${log}"
"${venv}/bin/python" -c "import label_studio, sys; print('installed label-studio', label_studio.__version__, file=sys.stderr)"
echo "${venv}"
