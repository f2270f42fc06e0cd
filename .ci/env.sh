# Source this: builds (once) or reuses pocketvlm's Python environment, points it at this checkout, activates it.
#
# The environment lives outside the clone, in ${POCKETVLM_ENV_ROOT:-~/.cache/pocketvlm}/env-<hash>, keyed by a hash
# of everything that decides what gets installed; a run that dies half-way leaves no .complete marker, and the next
# run starts that environment over. Installing from nothing takes a few minutes (torch is a local CPU wheel).
_pv_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_pv_extras="${POCKETVLM_EXTRAS:-dev,mlx,bench,gguf,onnx,coreml}"
_pv_key="$(cat "$_pv_root/pyproject.toml" "$_pv_root/.ci/constraints.txt" "$_pv_root/.ci/env.sh" \
           <(echo "$_pv_extras") <(python3 --version 2>&1) | sha256sum | cut -c1-16)"
POCKETVLM_ENV="${POCKETVLM_ENV_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/pocketvlm}/env-$_pv_key"
export POCKETVLM_ENV

_pv_pip() { "$POCKETVLM_ENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }

if [ ! -f "$POCKETVLM_ENV/.complete" ]; then
    echo "pocketvlm: building the environment in $POCKETVLM_ENV (once; a few minutes)" >&2
    rm -rf "$POCKETVLM_ENV"
    mkdir -p "$(dirname "$POCKETVLM_ENV")"
    python3 -m venv "$POCKETVLM_ENV" || return 1 2>/dev/null || exit 1
    # torch first and pinned, so no later requirement can pull a multi-GB CUDA build
    _pv_pip install -c "$_pv_root/.ci/constraints.txt" torch==2.13.0 setuptools || return 1 2>/dev/null || exit 1
    _pv_pip install -c "$_pv_root/.ci/constraints.txt" --no-build-isolation -e "$_pv_root[$_pv_extras]" \
        || return 1 2>/dev/null || exit 1
    touch "$POCKETVLM_ENV/.complete"
else
    # the cached environment may point at another clone: re-point it here (no downloads)
    _pv_pip install --no-deps --no-build-isolation -e "$_pv_root" || return 1 2>/dev/null || exit 1
fi
# shellcheck disable=SC1091
source "$POCKETVLM_ENV/bin/activate"
unset _pv_root _pv_extras _pv_key
