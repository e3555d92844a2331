#!/usr/bin/env bash
# The quickstart, end to end on a tiny Llama built from config (no downloads; minutes on 2 CPU cores):
#   1. fine-tune it on the shipped fictitious-facts QA data (validation perplexity, checkpoints, TensorBoard);
#   2. answer the held-out questions with the fine-tuned model and its untrained base, side by side;
#   3. fit EKFAC curvature factors of the fine-tuned model on its training data, with spectrum plots;
#   4. influence: which training examples helped (and hurt) the model on held-out questions;
#   5. token scores: which tokens of the forget set (the last 10% of the people, TOFU's layout) move
#      along forget-minus-retain, coloured on an HTML page;
#   6. gradient index: every training example's projected gradient stored once, then asked which training
#      examples made the model give its own answers of step 2 (only those answers go through the model).
set -euo pipefail
cd "$(dirname "$0")/.."
export TOKENIZERS_PARALLELISM=false
ckpt=runs/quickstart/checkpoints/last.ckpt

lit-attrib fit -c configs/quickstart.yaml
lit-attrib predict -c configs/quickstart.yaml -c configs/compare_generation.yaml --ckpt_path $ckpt
run=$(ls -td runs/quickstart/tensorboard/compare* | head -1)  # runs are named after what they did
lit-attrib predict -c configs/quickstart.yaml -c configs/factors_quickstart.yaml --ckpt_path $ckpt
lit-attrib predict -c configs/quickstart.yaml -c configs/influence_quickstart.yaml --ckpt_path $ckpt
lit-attrib predict -c configs/quickstart.yaml -c configs/token_influence_quickstart.yaml --ckpt_path $ckpt
lit-attrib predict -c configs/quickstart.yaml -c configs/index_quickstart.yaml --ckpt_path $ckpt
lit-attrib index-query -c configs/quickstart.yaml -c configs/index_quickstart.yaml --ckpt_path $ckpt \
  --queries $run/generated.jsonl

python - <<'PY'
import json
for path, title, label in [
    ("runs/quickstart/influence/topk.jsonl", "Most helpful training examples for two held-out questions", "query"),
    ("runs/quickstart/index_query/topk.jsonl", "Training examples behind two of the model's own answers", "answer"),
]:
    print(f"\n{title} ({path}):")
    for row in [json.loads(line) for line in open(path)][:2]:
        print(f"  {label}:", row["query"].replace("\n", " "))
        for hit in row["helpful"][:3]:
            print(f"    {hit['score']:+.3g}  #{hit['index']}  {hit['text'].replace(chr(10), ' ')}")
PY

echo
echo "Done. Base vs fine-tuned answers: $run/comparison.md (all rows: $run/generated.jsonl)"
echo "EKFAC factors: runs/quickstart/factors/ (plots: runs/quickstart/factors/plots/*.png)"
echo "Influence: runs/quickstart/influence/{scores.safetensors,topk.jsonl}"
echo "Token scores: open runs/quickstart/token_influence/token_scores.html"
echo "Gradient index: runs/quickstart/index/; its answer for the model's own answers: runs/quickstart/index_query/topk.jsonl"
echo "Checkpoints: runs/quickstart/checkpoints/   Curves, top-k and top tokens: tensorboard --logdir runs/quickstart"
