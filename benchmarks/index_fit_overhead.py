"""In-fit gradient index collection: ``Trainer.fit`` with ``GradientIndexCallback`` ÷ the same fit without it.

The quickstart model (``configs/quickstart.yaml``: a Llama built from config, hidden 96, MLP 256, 2 layers,
4 heads; no downloads) is fine-tuned on the shipped facts data (QA format, max_length 64, batch 16, AdamW with
the quickstart's cosine schedule) for ``--steps`` steps (default one epoch, 33 steps: every training example
gets a row), plain and with ``GradientIndexCallback(stages=["fit"])`` over the MLP projections
(``*.mlp.*_proj``, 6 layers) in each variant of ``--variants``:

- ``index``: the defaults (k = 32 per side, learning-rate weighting, projected K-FAC curvature, float16 rows);
- ``no_curvature``: the same without the curvature sums;
- ``adam``: ``normalisation: adam`` (each example's gradient of each layer formed and divided by Adam's
  ``sqrt(v̂) + ε``; no curvature).

For each it prints the whole ``Trainer.fit`` time ÷ plain (goal ≤ 1.15; it includes the callback's set-up,
the first batch's check of the loss reduction and the merge and writing of the index at the end) and the
mean training-step time ÷ plain (steps after the first). Every timing is the fastest of ``--repeats``
interleaved runs (a slow spell on the shared CPUs hits every variant alike); the load average is recorded.
Results go to ``benchmarks/results/index_fit_overhead.json``.

Run: ``python benchmarks/index_fit_overhead.py`` (``--help`` for the options).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from _common import StepTimer, lit_attrib_commit, report_load, write_results
from lightning.pytorch import Trainer, seed_everything

from lit_attrib.callbacks import GradientIndexCallback
from lit_attrib.data import TextDataModule
from lit_attrib.modules import CausalLMModule

ROOT = Path(__file__).resolve().parents[1]
DATA, TOKENIZER = str(ROOT / "data/facts/facts.jsonl"), str(ROOT / "data/facts/tokenizer")
RESULTS = ROOT / "benchmarks" / "results" / "index_fit_overhead.json"
QUICKSTART = {"model_type": "llama", "hidden_size": 96, "intermediate_size": 256, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 128}
VARIANTS = {
    "index": {},
    "no_curvature": {"curvature": False},
    "adam": {"curvature": False, "normalisation": "adam"},
}


def fit(args, variant: str | None, folder: str) -> tuple[float, list[float], int]:
    """Whole-fit seconds, step times and indexed rows of one fit (plain for ``None``)."""
    seed_everything(0, workers=True)
    module = CausalLMModule(config=QUICKSTART, tokenizer=TOKENIZER, learning_rate=3e-3, weight_decay=0.01,
                            scheduler="cosine_with_restarts", num_cycles=1, warmup_steps=0.05)
    data = TextDataModule(path=DATA, tokenizer=TOKENIZER, format="qa", max_length=64, val_size=0.1, seed=42,
                          batch_size=args.batch_size)
    timer = StepTimer()
    callbacks = [timer]
    if variant is not None:
        callbacks.append(GradientIndexCallback(stages=["fit"], projection_dim=args.k, output_dir=folder,
                                               overwrite=True, **VARIANTS[variant]))
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                      enable_model_summary=False, max_steps=args.steps, limit_val_batches=0, callbacks=callbacks)
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - start
    rows = 0
    if variant is not None:
        import json

        rows = json.loads((Path(folder) / "index.json").read_text())["collection"]["rows_added"]
    return seconds, timer.times, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=33, help="training steps of each fit (33: one epoch)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--k", type=int, default=32, help="projection_dim")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    load = {"before": os.getloadavg()[0]}
    runs: dict = {name: [] for name in ["plain", *args.variants]}
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        fit(args, None, "")  # warm-up: imports, tokenizer, first allocations
        for _ in range(args.repeats):  # interleaved
            runs["plain"].append(fit(args, None, "")[:2])
            for variant in args.variants:
                seconds, times, rows[variant] = fit(args, variant, str(Path(tmp) / variant))
                runs[variant].append((seconds, times))
    load["after"] = os.getloadavg()[0]

    def whole(name):
        return min(seconds for seconds, _ in runs[name])

    def step(name):  # mean step of the fastest repeat; the first step (the reduction check's re-run) apart
        return min(statistics.mean(times[1:]) for _, times in runs[name])

    print(f"quickstart llama (hidden 96, MLP 256, 2 layers), batch {args.batch_size}, {args.steps} steps, k = {args.k}, "
          f"{args.threads} thread(s); plain fit {whole('plain'):.2f} s, step {step('plain') * 1e3:.1f} ms\n")
    print("| variant | rows | whole fit ÷ plain | step ÷ plain |")
    print("|---|---|---|---|")
    table = []
    for variant in args.variants:
        fit_ratio, step_ratio = whole(variant) / whole("plain"), step(variant) / step("plain")
        table.append({"variant": variant, "arguments": VARIANTS[variant], "rows": rows[variant],
                      "fit_s": round(whole(variant), 3), "fit_ratio": round(fit_ratio, 3),
                      "step_ms": round(step(variant) * 1e3, 2), "step_ratio": round(step_ratio, 3)})
        print(f"| {variant} | {rows[variant]} | {fit_ratio:.3f} | {step_ratio:.3f} |")
    report_load(load, args.threads)
    write_results({"commit": lit_attrib_commit(), "arguments": {k: str(v) for k, v in vars(args).items()},
                   "plain_fit_s": round(whole("plain"), 3), "plain_step_ms": round(step("plain") * 1e3, 2),
                   "variants": table, "runs": {name: [round(s, 3) for s, _ in values] for name, values in runs.items()},
                   "load": load}, args.output)


if __name__ == "__main__":
    main()
