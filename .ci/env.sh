# Source this: builds (once) or reuses pocketvlm's Python environment, points it at this checkout, activates it.
#
# The work is done by .ci/bootstrap.py (standard-library Python: the same on Linux and macOS, no GNU tools); this
# file only finds python3, asks it for the environment's folder and activates it. It must stay portable to
# macOS's bash 3.2: no associative arrays, no ${var,,}, no mapfile (tests/test_setup.py checks).
_pv_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_pv_python="${POCKETVLM_PYTHON:-python3}"
if ! command -v "$_pv_python" >/dev/null 2>&1; then
    echo "pocketvlm: setup failed: no $_pv_python on PATH; install Python 3.10 or newer (with venv)" >&2
    unset _pv_root _pv_python
    return 1 2>/dev/null || exit 1
fi
if ! POCKETVLM_ENV="$("$_pv_python" "$_pv_root/.ci/bootstrap.py" ensure)"; then
    unset _pv_root _pv_python
    return 1 2>/dev/null || exit 1
fi
export POCKETVLM_ENV
# shellcheck disable=SC1091
. "$POCKETVLM_ENV/bin/activate"
unset _pv_root _pv_python
