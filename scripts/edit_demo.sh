#!/usr/bin/env bash
# Seed 003's curvature edit against memorization, end to end on a CPU (2.5 minutes on 2 cores):
#   1. generate grammar text + 32 random canaries, and train a tiny Llama until it has memorized them;
#   2. fit K-FAC factors of its MLPs on the general text only;
#   3. find what it memorized in its training text (the canaries, deduplicated);
#   4. edit gate and up of both blocks at each rho of the sweep, and measure canary memorization,
#      held-out perplexity and nDCG@10 against the unedited model.
set -euo pipefail
cd "$(dirname "$0")/.."
export TOKENIZERS_PARALLELISM=false

python -m lit_attrib.data.canaries --out runs/edit_demo/data
lit-attrib fit -c configs/edit_demo_train.yaml
lit-attrib predict -c configs/edit_demo_train.yaml -c configs/edit_demo_factors.yaml \
  --ckpt_path runs/edit_demo/checkpoints/last.ckpt
lit-attrib predict -c configs/edit_demo.yaml
lit-attrib validate -c configs/edit_demo.yaml

echo
echo "Memorized set: runs/edit_demo/memorized/memorized.jsonl"
echo "Results: runs/edit_demo/edit/results.jsonl; plot: runs/edit_demo/edit/results.png"
