#!/usr/bin/env bash
# Install a tool the tests talk to into a virtual environment of its own, apart from the
# project's, because it pins packages that must not mix with the project's dependencies
# (Label Studio pins Django and friends; datumaro pins pandas, pyarrow, pillow and OpenCV).
#
#   scripts/tool_env.sh VENV_DIR PIP_SPEC IMPORT_NAME
#
# Idempotent: an environment where `import IMPORT_NAME` works is left as it is. Progress goes
# to stderr; the environment's folder is printed on stdout.
set -euo pipefail

venv="$1"
spec="$2"
module="$3"
python="${PYTHON:-python3}"

if [[ -x "${venv}/bin/python" ]] && "${venv}/bin/python" -c "import ${module}" >/dev/null 2>&1; then
    echo "${spec} already installed in ${venv}" >&2
    echo "${venv}"
    exit 0
fi

echo "Installing ${spec} into ${venv} (a minute or more)" >&2
mkdir -p "$(dirname "${venv}")"
log="$(mktemp -t tool-install.XXXXXX.log)"
if ! {
    "${python}" -m venv --clear "${venv}" \
        && "${venv}/bin/python" -m pip install --upgrade pip \
        && "${venv}/bin/python" -m pip install "${spec}"
} >"${log}" 2>&1; then
    echo "Installing ${spec} failed; the end of pip's log (${log}):" >&2
    tail -n 40 "${log}" >&2
    exit 1
fi
rm -f "${log}"
"${venv}/bin/python" -c "import ${module}, sys; print('installed', '${spec}', getattr(${module}, '__version__', ''), file=sys.stderr)"
echo "${venv}"
