#!/usr/bin/env bash
# The GPU check (DESIGN: "Lightning's FSDP needs CUDA: check it when a GPU is lent"). On a machine with one CUDA
# GPU, from the repository root:
#   1. the test suite (all but the multi-process DDP tests) with every in-process Trainer on the GPU
#      (tests/conftest.py: LIT_ATTRIB_TEST_DEVICE=cuda); the tests that ask for bf16-mixed get it there;
#   2. the reference tests of the callbacks under Lightning's FSDP strategy on that GPU (LIT_ATTRIB_TEST_DEVICE=fsdp);
#   3. benchmarks/analysis_floor.py on a SmolLM2-135M-shaped model on the GPU, in float32 and in bf16-mixed.
# Logs and JSON go to $OUT (default ./gpu_check). Optional environment:
#   SMOLLM2_SHAPE=DIR   a folder with SmolLM2's config.json and tokenizer files: when models/SmolLM2-135M-Instruct is
#                       missing, a randomly initialised model of that shape is saved there (timings need no weights).
#   WHEELS=DIR          wheels to install into /tmp/site first (a machine without the registries).
#   WORKERS=N           pytest-xdist workers (default 12; 0 runs in one process).
#   MARKERS=EXPR        the GPU run's markers (default "not multiprocess and not slow"); CUDA_LIMIT, FSDP_LIMIT,
#   FLOOR_LIMIT         seconds for each step; FSDP_MORE: test files beyond test_kfac, test_influence and
#                       test_foreign_modules for FSDP; SKIP_FLOORS=1: tests only.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
if [ -n "${WHEELS:-}" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
workers=${WORKERS:-12}
xdist=""
[ "$workers" -gt 0 ] && xdist="-n $workers"

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, lightning, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'lightning', lightning.__version__, 'transformers', transformers.__version__)"; } 2>&1 | tee "$OUT/versions.txt"

step() {  # name seconds command...: run with a time limit, log to $OUT/name.log, note the exit code
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc in $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
    tail -n 25 "$OUT/$name.log"
}

# -v and LIT_ATTRIB_TEST_FAILURES: each result and each failure's traceback is logged as it comes, so a run
# stopped at its limit still says what failed and why
step pytest_cuda "${CUDA_LIMIT:-150}" env LIT_ATTRIB_TEST_DEVICE=cuda LIT_ATTRIB_TEST_FAILURES="$OUT/cuda_failures.txt" python3 -m pytest -v --tb=short \
    -m "${MARKERS:-not multiprocess and not slow}" $xdist --timeout 120 -o addopts="-ra -p no:cacheprovider"
step pytest_fsdp "${FSDP_LIMIT:-90}" env LIT_ATTRIB_TEST_DEVICE=fsdp LIT_ATTRIB_TEST_FAILURES="$OUT/fsdp_failures.txt" python3 -m pytest -v --tb=short \
    -m "not multiprocess" $xdist --timeout 120 -o addopts="-ra -p no:cacheprovider" \
    tests/test_kfac.py tests/test_influence.py tests/test_foreign_modules.py ${FSDP_MORE:-tests/test_gradient_index.py \
    tests/test_sdi.py tests/test_lora.py}
[ -n "${SKIP_FLOORS:-}" ] && { cat "$OUT/summary.txt"; exit 0; }

if [ ! -f models/SmolLM2-135M-Instruct/model.safetensors ] && [ -n "${SMOLLM2_SHAPE:-}" ]; then
    python3 - "$SMOLLM2_SHAPE" <<'EOF'
import shutil, sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

source, target = Path(sys.argv[1]), Path("models/SmolLM2-135M-Instruct")
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source))
model.save_pretrained(target)
for path in source.iterdir():
    if path.name != "config.json":
        shutil.copy(path, target / path.name)
print("SmolLM2-shaped model, random weights:", sum(p.numel() for p in model.parameters()), "parameters")
EOF
fi
floor="python3 benchmarks/analysis_floor.py --model smollm2 --accelerator cuda --threads 8 --examples 192"
step floor_fp32 "${FLOOR_LIMIT:-120}" $floor --output "$OUT/floor_cuda_fp32.json" \
    --passes factors pairwise token kfac_fit
step floor_bf16 "${FLOOR_LIMIT:-80}" $floor --precision bf16-mixed --output "$OUT/floor_cuda_bf16.json" \
    --passes factors pairwise
cat "$OUT/summary.txt"
