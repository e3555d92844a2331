#!/usr/bin/env bash
# The quickstart, end to end on a tiny Llama built from config (no downloads; minutes on 2 CPU cores):
#   1. fine-tune it on the shipped fictitious-facts QA data (validation perplexity, checkpoints, TensorBoard);
#   2. answer the held-out questions with the fine-tuned model and its untrained base, side by side;
#   3. fit EKFAC curvature factors of the fine-tuned model on its training data, with spectrum plots.
set -euo pipefail
cd "$(dirname "$0")/.."
export TOKENIZERS_PARALLELISM=false

lit-attrib fit -c configs/quickstart.yaml
lit-attrib predict -c configs/quickstart.yaml -c configs/compare_generation.yaml \
  --ckpt_path runs/quickstart/checkpoints/last.ckpt

run=$(ls -td runs/quickstart/tensorboard/version_* | head -1)
lit-attrib predict -c configs/quickstart.yaml -c configs/factors_quickstart.yaml \
  --ckpt_path runs/quickstart/checkpoints/last.ckpt

echo
echo "Done. Base vs fine-tuned answers: $run/comparison.md (all rows: $run/generated.jsonl)"
echo "EKFAC factors: runs/quickstart/factors/ (plots: runs/quickstart/factors/plots/*.png)"
echo "Checkpoints: runs/quickstart/checkpoints/   Curves: tensorboard --logdir runs/quickstart"
