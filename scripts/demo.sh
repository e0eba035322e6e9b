#!/usr/bin/env bash
# The main job on the default model, end to end, at demo sizes (about four minutes on 2 idle CPU cores):
#   evaluate SmolLM2-135M -> prune it 20% with COMP -> evaluate the pruned model ->
#   a short federated LoRA run -> export the pruned model to GGUF and generate with llama.cpp.
set -euo pipefail
cd "$(dirname "$0")/.."
FP="${PY:-.venv/bin/python} -m fedprune.cli"
OUT=${OUT:-outputs/demo}
mkdir -p "$OUT"

echo "== 1/6 the default model, as the adapters see it"
$FP info --model smollm2-135m | head -8

echo "== 2/6 evaluate the dense model (--limit 40: first 40 WikiText-2 windows of 512 tokens, first 40 PIQA / ARC-Easy examples)"
$FP eval --model smollm2-135m --tasks wikitext2,piqa,arc_easy --limit 40 --output "$OUT/dense_eval.json" --overwrite

echo "== 3/6 prune 20% of the parameters with COMP (calibration: 16 C4 samples x 256 tokens)"
$FP prune --model smollm2-135m --method comp --ratio 0.2 --nsamples 16 --seq-len 256 --output "$OUT/comp20" --overwrite

echo "== 4/6 evaluate the pruned model"
$FP eval --model "$OUT/comp20" --tasks wikitext2,piqa,arc_easy --limit 40 --output "$OUT/comp20_eval.json" --overwrite

echo "== 5/6 a short federated LoRA run (FedIT, 2 rounds, 2 of 10 Dolly clients per round)"
rm -rf "$OUT/fedit"
$FP federate --config configs/federated/fedit.yaml federation.rounds=2 federation.clients_per_round=2 \
  train.local_steps=4 eval.loss_examples=16 eval.rouge_examples=2 --output "$OUT/fedit"
$FP report "$OUT/fedit"

echo "== 6/6 export the pruned model to GGUF and generate on the device runtime (llama.cpp)"
$FP export --model "$OUT/comp20" --format gguf --outtype f16 --output "$OUT/comp20.gguf" --overwrite
$FP generate --model "$OUT/comp20.gguf" --prompt "The three primary colors are" --max-new-tokens 32
echo "demo outputs are in $OUT"
