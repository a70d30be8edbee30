#!/usr/bin/env bash
# Sets up .venv and runs the main job on the embedded default model (SmolLM2-135M-Instruct):
# convert it to a multi-mode checkpoint, then decode speculatively with it and print the stats.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/specq demo "$@"
