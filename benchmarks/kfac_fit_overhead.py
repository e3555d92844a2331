"""In-fit K-FAC collection: overhead against a plain fit, and factor error, per collection rate.

A Llama built from config (no downloads) is fine-tuned on the shipped facts data for ``--steps`` steps,
once without callbacks and once with ``KFACCollectorCallback(strategy="kfac", every_n_batches=n)`` for
each ``n`` of ``--rates``. For each rate the script reports

1. overhead: training-step time with the collector ÷ without it (goal ≤ 1.15 at a rate whose factor
   error is ≤ 5 %). Step time is the mean over the steps after the first (the collector's first batch
   also re-runs ``training_step`` once to check the loss reduction; that one-off is reported apart);
2. factor error: ‖A_n − A_1‖_F / ‖A_1‖_F and the same for G, the largest over the tracked layers, against
   full-rate collection (``n = 1``) of the same run (same seed, so the same batches and weights).

Every timing is the fastest of ``--repeats`` interleaved runs (shared CPUs; the load average is recorded).

Run: ``python benchmarks/kfac_fit_overhead.py`` (``--help`` for the options).
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
from _common import lit_attrib_commit, report_load, write_results
from lightning.pytorch import Callback, Trainer, seed_everything

from lit_attrib.artifacts import load_factors
from lit_attrib.callbacks import KFACCollectorCallback
from lit_attrib.data import TextDataModule
from lit_attrib.modules import CausalLMModule

ROOT = Path(__file__).resolve().parents[1]
DATA, TOKENIZER = str(ROOT / "data/facts/facts.jsonl"), str(ROOT / "data/facts/tokenizer")
RESULTS = ROOT / "benchmarks" / "results" / "kfac_fit_overhead.json"


class StepTimer(Callback):
    """Wall time of each training step (batch start to batch end)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self._start)


def fit(args, rate: int | None, folder: str) -> tuple[list[float], dict | None]:
    """Step times of one fit (with the collector at ``rate``, or plain for ``None``) and its factors."""
    seed_everything(0, workers=True)
    config = {"model_type": "llama", "hidden_size": args.width, "intermediate_size": 4 * args.width,
              "num_hidden_layers": args.layers, "num_attention_heads": 4, "num_key_value_heads": 4,
              "max_position_embeddings": 256}
    module = CausalLMModule(config=config, tokenizer=TOKENIZER, learning_rate=1e-3)
    data = TextDataModule(path=DATA, tokenizer=TOKENIZER, batch_size=args.batch_size, val_size=0, seed=0)
    timer = StepTimer()
    callbacks = [timer]
    if rate is not None:
        callbacks.append(KFACCollectorCallback(target_modules=["*.mlp.*", "*.self_attn.*_proj"], strategy="kfac",
                                               every_n_batches=rate, plots=False, output_dir=folder, overwrite=True))
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                      enable_model_summary=False, max_steps=args.steps, limit_val_batches=0, callbacks=callbacks)
    trainer.fit(module, datamodule=data)
    return timer.times, (load_factors(folder) if rate is not None else None)


def relative_error(factors, reference, key: str) -> float:
    return max(float(torch.linalg.norm(factors[name][key].double() - reference[name][key].double())
                     / torch.linalg.norm(reference[name][key].double())) for name in reference)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=48, help="training steps of each fit")
    parser.add_argument("--rates", type=int, nargs="+", default=[1, 2, 4, 8], help="every_n_batches values")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    load = {"before": os.getloadavg()[0]}
    runs: dict = {"plain": []} | {rate: [] for rate in args.rates}
    factors = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):  # interleaved: a slow spell hits every variant alike
            runs["plain"].append(fit(args, None, "")[0])
            for rate in args.rates:
                times, factors[rate] = fit(args, rate, str(Path(tmp) / f"rate{rate}"))
                runs[rate].append(times)
    load["after"] = os.getloadavg()[0]

    def step_median(times_list):  # mean step of the fastest repeat; the first step (warm-up, check's re-run) apart
        return min(statistics.mean(times[1:]) for times in times_list)

    plain = step_median(runs["plain"])
    first_plain = min(times[0] for times in runs["plain"])
    rows = []
    print(f"llama width {args.width}, {args.layers} layers, batch {args.batch_size}, {args.steps} steps; "
          f"plain step {plain * 1e3:.1f} ms\n")
    print("| every_n_batches | step time ÷ plain | first step ÷ plain first step | A error | G error |")
    print("|---|---|---|---|---|")
    for rate in args.rates:
        ratio = step_median(runs[rate]) / plain
        first = min(times[0] for times in runs[rate]) / first_plain
        a_error = relative_error(factors[rate], factors[args.rates[0]], "activation_covariance")
        g_error = relative_error(factors[rate], factors[args.rates[0]], "gradient_covariance")
        rows.append({"every_n_batches": rate, "step_ratio": round(ratio, 3), "first_step_ratio": round(first, 2),
                     "activation_error": round(a_error, 4), "gradient_error": round(g_error, 4)})
        print(f"| {rate} | {ratio:.2f} | {first:.2f} | {a_error:.1%} | {g_error:.1%} |")
    report_load(load, args.threads)
    write_results({"commit": lit_attrib_commit(), "arguments": {k: str(v) for k, v in vars(args).items()},
                   "plain_step_s": plain, "rates": rows, "load": load}, args.output)


if __name__ == "__main__":
    main()
