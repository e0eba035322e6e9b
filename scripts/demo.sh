#!/usr/bin/env bash
# The main job on the default model, end to end. Grows with the project.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-outputs/demo}
mkdir -p "$OUT"
echo "== 1. load SmolLM2-135M-Instruct and describe it"
$PY -m fedprune.cli info --model smollm2-135m
