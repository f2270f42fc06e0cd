#!/usr/bin/env bash
# README's first command: set up (once), then run the main job offline on the embedded micro model:
# export it to every format and quant this machine can produce and answer the held-out questions through each.
set -euo pipefail
cd "$(dirname "$0")/.."
source .ci/env.sh
python -m pocketvlm.export.gguf fetch-converter --quiet   # llama.cpp's converter, cached after the first run
pocketvlm demo "$@"
