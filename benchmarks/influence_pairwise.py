"""Pairwise influence: lit_attrib's InfluenceCallback against kronfluence's ``Analyzer.compute_pairwise_scores``.

For a Llama and a GPT-2 model built from config (no downloads), both libraries fit EKFAC factors of the
same layers on the same training examples (each its own: they agree to ~1e-6, see ``kfac_factors.py``,
and the agreement is recorded here too), then score every training example against every query, in
the same batches, in float32, with the same damping ``λ = 0.1 · mean(Λ)`` per layer (lit_attrib's
default ``damping=None``; kronfluence's ``damping_factor=None``, whose heuristic is the same; its own
default is a fixed 1e-8). Two configurations: full-rank preconditioned query gradients, and query
gradients cut to rank r (lit_attrib's ``query_gradient_rank``; kronfluence's ``query_gradient_low_rank``
with ``use_full_svd=True``, the same truncated SVD). The script reports

1. speed: wall time of ``Trainer.predict`` with ``InfluenceCallback`` over the training set ÷ wall time
   of ``compute_pairwise_scores`` (goal ≤ 0.5), each timed after a small warm-up run of its own. Both
   include loading the factors, the query gradients and their preconditioning, the pass over the
   training set and writing the scores. kronfluence gets its fastest setting for many queries:
   ``query_gradient_accumulation_steps`` covering all query batches, so that it passes over the
   training set once (as lit_attrib does) rather than once per query batch;
2. agreement: the Pearson correlation between the two ``(N_query, N_train)`` score matrices (goal
   ≥ 0.99), the smallest per-query Pearson correlation, ``max |ours − theirs| / max |theirs|`` and
   ``‖ours − theirs‖_F / ‖theirs‖_F``. Both sides use the summed NLL over the answer tokens as the
   training loss and the measurement, so both scores are ``∇L(z_q)ᵀ (H + λI)⁻¹ ∇L(z_m)``: positive =
   helpful in both, no sign flip. Rows and columns are matched by dataset index.

Every timing is the fastest of ``--repeats`` interleaved runs; the load average is recorded and checked.

Run: ``python benchmarks/influence_pairwise.py`` (``--help`` for the options).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import datasets
import kronfluence
import torch
from _common import lit_attrib_commit, write_results
from kronfluence import Analyzer, ScoreArguments
from kronfluence.utils.dataset import DataLoaderKwargs
from safetensors.torch import load_file

from lit_attrib.callbacks import InfluenceCallback
from lit_attrib.data import TextDataModule

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kfac_factors import (  # the factors benchmark's model, data, Task and fitting helpers
    DATA,
    ROOT,
    TARGETS,
    TOKENIZER,
    build_module,
    fit_ours,
    fit_theirs,
    kronfluence_analyzer,
    model_config,
    relative_differences,
    rows_and_collator,
    trainer,
)

RESULTS = ROOT / "benchmarks" / "results" / "influence_pairwise.json"


def datamodule(examples: int, queries: int, batch_size: int, max_length: int,
               predict_limit: int | None = None) -> TextDataModule:
    """``examples`` training rows (the prediction set, as whole examples) and ``queries`` validation rows
    (the queries), from the first ``examples + queries`` rows of the file; ``predict_limit`` keeps only
    the first rows of the prediction set (the warm-up runs)."""
    data = TextDataModule(path=DATA, tokenizer=TOKENIZER, num_samples=examples + queries, val_size=queries,
                          batch_size=batch_size, max_length=max_length, predict_split="train",
                          predict_content="examples", predict_num_samples=predict_limit, query_split="val")
    data.setup("predict")
    return data


# ------------------------------------------------------------------------------------ lit_attrib
def scores_ours(module, data: TextDataModule, factors: str, folder: str, rank: int | None) -> tuple[float, dict]:
    """Seconds of ``Trainer.predict`` with ``InfluenceCallback``, and its scores keyed by dataset index."""
    callback = InfluenceCallback(factors=factors, queries="query", output_dir=folder, overwrite=True,
                                 query_gradient_rank=rank, damping=None)
    run = trainer(callbacks=[callback])
    start = time.perf_counter()
    run.predict(module, datamodule=data, return_predictions=False)
    seconds = time.perf_counter() - start
    saved = load_file(f"{folder}/scores.safetensors")
    return seconds, {"scores": saved["scores"].double(), "query_indices": saved["query_indices"],
                     "train_indices": saved["train_indices"]}


# ------------------------------------------------------------------------------------ kronfluence
def score_arguments(rank: int | None, queries: int, batch_size: int) -> ScoreArguments:
    return ScoreArguments(
        damping_factor=None,  # 0.1 · mean(Λ) per module, Λ per example: lit_attrib's default (kronfluence's is 1e-8)
        query_gradient_low_rank=rank, use_full_svd=True,  # the truncated SVD lit_attrib uses
        query_gradient_accumulation_steps=math.ceil(queries / batch_size),  # one pass over the training set
        amp_dtype=None, query_gradient_svd_dtype=torch.float32, per_sample_gradient_dtype=torch.float32,
        precondition_dtype=torch.float32, score_dtype=torch.float32,
    )


def scores_theirs(analyzer: Analyzer, data: TextDataModule, batch_size: int, rank: int | None, name: str,
                  train_limit: int | None = None) -> tuple[float, dict]:
    """Seconds of ``compute_pairwise_scores`` (queries and training rows in the datamodule's order and
    batches), and its scores with the dataset indices of their rows and columns."""
    train, collate = rows_and_collator(data)
    if train_limit is not None:
        train = train.select(range(train_limit))
    data.query_dataloader()  # builds data.query_dataset
    query = data.query_dataset.select_columns(["input_ids", "labels", "index"])
    arguments = score_arguments(rank, len(query), batch_size)
    start = time.perf_counter()
    analyzer.compute_pairwise_scores(name, "factors", query_dataset=query, train_dataset=train,
                                     per_device_query_batch_size=batch_size, per_device_train_batch_size=batch_size,
                                     dataloader_kwargs=DataLoaderKwargs(collate_fn=collate), score_args=arguments,
                                     overwrite_output_dir=True)
    seconds = time.perf_counter() - start
    scores = analyzer.load_pairwise_scores(name)["all_modules"]
    return seconds, {"scores": scores.double(), "query_indices": torch.as_tensor(query["index"]),
                     "train_indices": torch.as_tensor(train["index"])}


# ------------------------------------------------------------------------------------- comparison
def aligned(result: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The score matrix with its rows and columns sorted by dataset index, and the sorted indices."""
    rows, columns = torch.argsort(result["query_indices"]), torch.argsort(result["train_indices"])
    return (result["scores"][rows][:, columns], result["query_indices"][rows], result["train_indices"][columns])


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.flatten() - x.mean(), y.flatten() - y.mean()
    return float((x @ y) / (x.norm() * y.norm()))


def agreement(ours: dict, theirs: dict) -> dict:
    a, query_a, train_a = aligned(ours)
    b, query_b, train_b = aligned(theirs)
    if not (torch.equal(query_a, query_b) and torch.equal(train_a, train_b)):
        raise RuntimeError("the two score matrices cover different queries or training examples")
    return {
        "pearson": pearson(a, b),
        "min_pearson_per_query": min(pearson(a[q], b[q]) for q in range(a.shape[0])),
        "max_abs_diff_over_max_abs": float((a - b).abs().max() / b.abs().max()),
        "frobenius_relative": float(torch.linalg.norm(a - b) / torch.linalg.norm(b)),
        "shape": list(a.shape),
    }


def compare_model(kind: str, args: argparse.Namespace) -> dict:
    """Fit both sides' factors, then per configuration warm up both sides and time ``repeats`` interleaved
    score passes of each; the fastest of each is reported."""
    config = model_config(kind, args.width, args.layers)
    module = build_module(config)
    data = datamodule(args.examples, args.queries, args.batch_size, args.max_length)
    warmup = datamodule(args.examples, args.queries, args.batch_size, args.max_length, args.warmup_examples)
    result = {"config": config, "configurations": {}}
    with tempfile.TemporaryDirectory() as folder:
        factors = f"{folder}/ours_factors"
        _, our_factors = fit_ours(module, data, kind, factors)
        rows, collate = rows_and_collator(data)
        first_batch = collate([rows[i] for i in range(args.batch_size)])
        analyzer = kronfluence_analyzer(module, sorted(our_factors), first_batch, f"{folder}/kronfluence")
        _, their_factors = fit_theirs(analyzer, data, args.batch_size, "factors")
        differences = relative_differences(our_factors, their_factors)
        result["modules"] = len(our_factors)
        result["factors_max_relative_difference"] = {key: max(v.values()) for key, v in differences.items()}
        for label, rank in (("full rank", None), (f"rank {args.rank}", args.rank)):
            scores_ours(module, warmup, factors, f"{folder}/ours_warmup", rank)
            scores_theirs(analyzer, warmup, args.batch_size, rank, "warmup", train_limit=args.warmup_examples)
            times = {"ours_s": [], "kronfluence_s": []}
            for repeat in range(args.repeats):
                seconds, ours = scores_ours(module, data, factors, f"{folder}/ours_{repeat}", rank)
                times["ours_s"].append(seconds)
                seconds, theirs = scores_theirs(analyzer, data, args.batch_size, rank, f"scores_{repeat}")
                times["kronfluence_s"].append(seconds)
            best = {key: min(values) for key, values in times.items()}
            result["configurations"][label] = {
                "query_gradient_rank": rank, **best, "runs": times,
                "time_ratio": best["ours_s"] / best["kronfluence_s"], **agreement(ours, theirs),
            }
    return result


def print_table(results: dict) -> None:
    s = results["settings"]
    print(f"\nPairwise influence, {s['queries']} queries × {s['examples']} training examples in batches of "
          f"{s['batch_size']}, float32, damping 0.1·mean(Λ) per layer ({torch.get_num_threads()} threads)")
    print(f"{'model':<7}{'config':<11}{'ours s':>8}{'kronfl. s':>11}{'ratio':>8}{'pearson':>10}"
          f"{'min q r':>10}{'max rel':>11}{'frob rel':>11}")
    for kind, model in results["models"].items():
        for label, row in model["configurations"].items():
            print(f"{kind:<7}{label:<11}{row['ours_s']:>8.2f}{row['kronfluence_s']:>11.2f}{row['time_ratio']:>8.3f}"
                  f"{row['pearson']:>10.6f}{row['min_pearson_per_query']:>10.6f}"
                  f"{row['max_abs_diff_over_max_abs']:>11.2e}{row['frobenius_relative']:>11.2e}")
    print("goals: ratio ≤ 0.5, Pearson ≥ 0.99 (max rel = max |ours − theirs| / max |theirs|, "
          "frob rel = ‖ours − theirs‖_F / ‖theirs‖_F)")
    for kind, model in results["models"].items():
        factors = ", ".join(f"{key} {value:.1e}" for key, value in model["factors_max_relative_difference"].items())
        print(f"  {kind}: {model['modules']} modules; factors' max relative difference: {factors}")
        for label, row in model["configurations"].items():
            runs = row["runs"]
            print(f"    {label} runs: ours {_seconds(runs['ours_s'])}, kronfluence {_seconds(runs['kronfluence_s'])}")
    load = results["load_average_1min"]
    print(f"1-minute load average: {load['before']:.2f} before, {load['after']:.2f} after")
    if max(load.values()) > s["threads"] + 0.5:
        print("\nWARNING: other processes shared the CPUs, so the timings are unreliable; rerun on an idle machine")


def _seconds(values: list[float]) -> str:
    return "/".join(f"{value:.2f}" for value in values) + " s"



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(TARGETS), default=["llama", "gpt2"])
    parser.add_argument("--width", type=int, default=128, help="d_model of both models")
    parser.add_argument("--layers", type=int, default=4, help="transformer blocks of both models")
    parser.add_argument("--examples", type=int, default=256, help="training examples scored (and fitted on)")
    parser.add_argument("--queries", type=int, default=32, help="queries (the validation split)")
    parser.add_argument("--rank", type=int, default=32, help="query gradient rank of the low-rank configuration")
    parser.add_argument("--warmup-examples", type=int, default=16, help="training examples of each warm-up run")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each side (the fastest counts)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    with open(DATA) as handle:
        rows = sum(1 for line in handle if line.strip())
    if args.examples + args.queries > rows:
        parser.error(f"{DATA} has {rows} rows: --examples + --queries must not exceed them")
    if args.warmup_examples > args.examples:
        parser.error("--warmup-examples must not exceed --examples")

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers|bottleneck).*")
    warnings.filterwarnings("ignore", category=FutureWarning, module="kronfluence")
    datasets.disable_progress_bars()
    for name in ("lightning", "lightning.pytorch", "kronfluence", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)

    load_before = os.getloadavg()[0]
    results = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "versions": {"torch": torch.__version__, "kronfluence": kronfluence.__version__,
                            "lit_attrib_commit": lit_attrib_commit()},
               "models": {kind: compare_model(kind, args) for kind in args.models}}
    results["load_average_1min"] = {"before": load_before, "after": os.getloadavg()[0]}
    print_table(results)
    write_results(results, args.output)


if __name__ == "__main__":
    main()
