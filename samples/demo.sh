#!/usr/bin/env bash
# README's first command: set up, then answer a sample question offline with the embedded default model.
set -euo pipefail
cd "$(dirname "$0")/.."
source .ci/env.sh
model="${POCKETVLM_DEMO_MODEL:-${XDG_CACHE_HOME:-$HOME/.cache}/pocketvlm/models/tiny}"
if [ ! -f "$model/pocketvlm.json" ]; then
    pocketvlm make-model "$model" --preset tiny --force
fi
echo "Q: What color is the circle?  (samples/images/red_circle.png, model: $model)" >&2
pocketvlm ask "$model" --image samples/images/red_circle.png "What color is the circle?" --max-tokens 24
echo "(random weights: the words are noise until the trained micro model lands; the pipeline is real)" >&2
