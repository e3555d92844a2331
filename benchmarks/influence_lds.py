"""Linear datamodeling score (LDS) of lit_attrib's influence scores: EKFAC against K-FAC and identity.

A tiny Llama (built from config, no downloads) is trained on the training split of the shipped
facts data (``data/facts/facts.jsonl``, ``TextDataModule`` with ``val_size=0.1, seed=42``). Its
influence scores on validation queries (other paraphrases of the facts the training set holds) are
computed three ways, through the same code path (``KFACCollectorCallback`` in ``Trainer.predict``
over the training examples, then ``InfluenceCallback``):

- **EKFAC**: ``strategy="ekfac"`` factors, default damping ``0.1 · mean(Λ)`` per layer;
- **K-FAC**: ``strategy="kfac"`` factors, default damping ``0.1 · mean(Λ)`` per layer;
- **identity**: a factors artifact built from the EKFAC one with identity eigenvectors, ``Λ = 1`` and
  ``damping=0``, so that ``(H + λI)⁻¹ = I`` and a score is the plain gradient dot product
  ``∇L(z_q)ᵀ ∇L(z_m)`` over the same layers.

Then ``--subsets`` random subsets ``S_k`` of ``--fraction`` of the training rows (seeded) are each
trained from the same initial weights with the same recipe as the full model (AdamW with the
module's hyperparameters and schedule, fixed epochs, seeded data order), and each query's summed
answer NLL is measured. Scores are positive when the training example lowers the query's loss, so
the predicted loss of query ``q`` after training on ``S_k`` is ``const − Σ_{m ∈ S_k} score[q, m]``.
LDS = the mean over queries of the Spearman correlation, over the subsets, of predicted and actual
query loss (goal: EKFAC beats identity). A control with random scores (LDS ≈ 0) is also reported.

Training is a plain PyTorch loop over the module's ``per_token_loss`` (the token-mean loss of
``CausalLMModule.training_step``), not Lightning's ``Trainer.fit``: the retrains are many and small.
They run in ``--workers`` processes of one thread each.

Run: ``python benchmarks/influence_lds.py`` (``--help`` for the options).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # lit_attrib's passes show progress bars
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout: use this checkout's lit_attrib
    sys.path.insert(0, str(ROOT))

import torch

DATA, TOKENIZER = str(ROOT / "data/facts/facts.jsonl"), str(ROOT / "data/facts/tokenizer")
RESULTS = ROOT / "benchmarks" / "results" / "influence_lds.json"
TARGETS = ["*.mlp.*_proj", "*.self_attn.*_proj"]
METHODS = ("ekfac", "kfac", "identity")
COLUMNS = ("input_ids", "labels", "index")


def quiet() -> None:
    """Only this script's own output: no Lightning banners, warnings or progress bars."""
    import lightning.pytorch  # noqa: F401  (sets its loggers' levels when imported: import first, then lower them)

    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lit_attrib", "datasets", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass


# ---------------------------------------------------------------------------------------- set-up
def model_config(args: argparse.Namespace) -> dict:
    return {"model_type": "llama", "hidden_size": args.hidden_size, "intermediate_size": args.intermediate_size,
            "num_hidden_layers": args.layers, "num_attention_heads": 4, "num_key_value_heads": 4,
            "max_position_embeddings": 128}


def module_kwargs(args: argparse.Namespace) -> dict:
    return {"config": model_config(args), "tokenizer": TOKENIZER, "init_seed": args.init_seed,
            "learning_rate": args.learning_rate, "weight_decay": args.weight_decay, "scheduler": args.scheduler,
            "warmup_steps": args.warmup}


def build_module(kwargs: dict):
    from lit_attrib.modules import CausalLMModule

    module = CausalLMModule(**kwargs)
    module.configure_model()
    return module


def datamodule(args: argparse.Namespace):
    from lit_attrib.data import TextDataModule

    data = TextDataModule(path=DATA, tokenizer=TOKENIZER, format="qa", max_length=64, val_size=0.1, seed=42,
                          num_samples=args.num_samples, batch_size=args.batch_size, eval_batch_size=32,
                          predict_split="train", predict_content="examples", query_split="val",
                          query_num_samples=args.queries)
    data.setup("predict")
    data.query_dataloader()  # builds data.query_dataset
    return data


def rows(dataset) -> list[dict]:
    dataset = dataset.select_columns(list(COLUMNS))
    return [dataset[i] for i in range(len(dataset))]


# -------------------------------------------------------------------------------------- training
def train(module_args: dict, recipe: dict, train_rows: list[dict]):
    """The recipe every model gets: AdamW with the module's hyperparameters and schedule over
    ``recipe["epochs"]`` epochs of batches in a seeded order, from the module's initial weights."""
    from transformers import get_scheduler

    from lit_attrib.data import CausalLMCollator
    from lit_attrib.ops.loss import loss_mask

    module = build_module(module_args)
    module.train()
    hp = module.hparams
    decay = [p for p in module.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in module.parameters() if p.requires_grad and p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": hp.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=hp.learning_rate, betas=tuple(hp.betas), eps=hp.eps)
    batch_size = recipe["batch_size"]
    steps = recipe["epochs"] * math.ceil(len(train_rows) / batch_size)
    warmup = hp.warmup_steps
    warmup = int(warmup * steps) if isinstance(warmup, float) else int(warmup)
    scheduler = get_scheduler(hp.scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=steps)
    collate = CausalLMCollator(pad_token_id=recipe["pad_token_id"])
    generator = torch.Generator().manual_seed(recipe["order_seed"])
    for _ in range(recipe["epochs"]):
        order = torch.randperm(len(train_rows), generator=generator).tolist()
        for start in range(0, len(order), batch_size):
            batch = collate([train_rows[i] for i in order[start:start + batch_size]])
            loss = module.per_token_loss(batch).sum() / loss_mask(batch["labels"]).sum().clamp(min=1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    module.eval()
    return module


@torch.no_grad()
def example_losses(module, recipe: dict, examples: list[dict]) -> torch.Tensor:
    """Summed answer NLL of each example ``(N,)``: ``CausalLMModule.per_example_loss``."""
    from lit_attrib.data import CausalLMCollator

    collate = CausalLMCollator(pad_token_id=recipe["pad_token_id"])
    return torch.cat([module.per_example_loss(collate(examples[i:i + 64])) for i in range(0, len(examples), 64)])


def _worker_init() -> None:
    torch.set_num_threads(1)
    quiet()


def retrain(job: tuple) -> list[float]:
    """Train on one subset (positions into ``train_rows``) and return the query losses."""
    module_args, recipe, train_rows, query_rows, subset = job
    module = train(module_args, recipe, [train_rows[i] for i in subset])
    return example_losses(module, recipe, query_rows).tolist()


# ---------------------------------------------------------------------------------------- scores
def trainer(**kwargs):
    from lightning.pytorch import Trainer

    return Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, **kwargs)


def fit_factors(module, data, strategy: str, folder: Path) -> None:
    from lit_attrib.callbacks import KFACCollectorCallback

    callback = KFACCollectorCallback(target_modules=TARGETS, strategy=strategy, dtype="float32", output_dir=str(folder),
                                     plots=False, overwrite=True, stages=["predict"])
    trainer(callbacks=[callback]).predict(module, datamodule=data, return_predictions=False)


def identity_factors(source: Path, folder: Path) -> None:
    """The ``source`` artifact with ``Q_A = Q_G = I`` and ``Λ = 1``: with damping 0, ``(H + λI)⁻¹ = I``."""
    from lit_attrib.artifacts.factors import METADATA_FILE, load_factors, save_factors

    factors = load_factors(source)
    modules = {}
    for name, tensors in factors.modules.items():
        out_features, in_features = tensors["lambda"].shape
        modules[name] = {
            **{key: value.clone() for key, value in tensors.items()},
            "activation_eigenvectors": torch.eye(in_features, dtype=tensors["activation_eigenvectors"].dtype),
            "gradient_eigenvectors": torch.eye(out_features, dtype=tensors["gradient_eigenvectors"].dtype),
            "activation_eigenvalues": torch.ones(in_features, dtype=tensors["activation_eigenvalues"].dtype),
            "gradient_eigenvalues": torch.ones(out_features, dtype=tensors["gradient_eigenvalues"].dtype),
            "lambda": torch.ones(out_features, in_features, dtype=tensors["lambda"].dtype),
        }
    metadata = json.loads((source / METADATA_FILE).read_text())
    metadata.pop("format", None)
    metadata["name"] = "identity"
    metadata["arguments"] = {**metadata.get("arguments", {}), "strategy": "identity"}
    save_factors(folder, modules, metadata)


def influence(module, data, factors: Path, folder: Path, damping: float | None) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from lit_attrib.callbacks import InfluenceCallback

    callback = InfluenceCallback(factors=str(factors), queries="query", damping=damping, output_dir=str(folder),
                                 overwrite=True)
    trainer(callbacks=[callback]).predict(module, datamodule=data, return_predictions=False)
    return load_file(str(folder / "scores.safetensors"))


# ------------------------------------------------------------------------------------------- LDS
def spearman_per_query(predicted: torch.Tensor, actual: torch.Tensor) -> list[float]:
    """Spearman's ρ over the subsets (axis 0) for each query (axis 1)."""
    from scipy.stats import spearmanr

    return [float(spearmanr(predicted[:, q].numpy(), actual[:, q].numpy()).statistic) for q in range(actual.shape[1])]


def summary(values: list[float]) -> dict:
    tensor = torch.tensor(values, dtype=torch.float64)
    finite = tensor[torch.isfinite(tensor)]
    return {"mean": float(finite.mean()), "stderr": float(finite.std() / math.sqrt(len(finite))),
            "median": float(finite.median()), "queries": len(finite)}


def add_recipe_arguments(parser: argparse.ArgumentParser, hidden_size: int) -> None:
    """The model and training recipe of the retrained models (shared with index_accuracy.py)."""
    parser.add_argument("--hidden-size", type=int, default=hidden_size)
    parser.add_argument("--intermediate-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--scheduler", default="cosine")
    parser.add_argument("--warmup", type=float, default=0.05, help="warmup steps as a fraction of all steps")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--init-seed", type=int, default=0)
    parser.add_argument("--order-seed", type=int, default=0, help="seed of the training batches' order")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_recipe_arguments(parser, hidden_size=64)
    parser.add_argument("--train-seeds", type=int, default=1,
                        help="retrain each subset with this many data-order seeds (order-seed, +1, ...) and average")
    parser.add_argument("--num-samples", type=int, default=None, help="use only the first rows of the file")
    parser.add_argument("--queries", type=int, default=None, help="validation rows used as queries (all if unset)")
    parser.add_argument("--subsets", type=int, default=50)
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--subset-seed", type=int, default=0)
    parser.add_argument("--damping", type=float, default=None,
                        help="damping of EKFAC and K-FAC (default lit_attrib's 0.1 · mean(Λ) per layer)")
    parser.add_argument("--workers", type=int, default=2, help="processes (one thread each) for the retraining")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.subsets < 2:
        parser.error("--subsets must be at least 2")
    quiet()
    torch.set_num_threads(1)
    started = time.perf_counter()
    timings: dict[str, float] = {}

    data = datamodule(args)
    train_rows, query_rows = rows(data.train_dataset), rows(data.query_dataset)
    module_args = module_kwargs(args)
    recipe = {"epochs": args.epochs, "batch_size": args.batch_size, "order_seed": args.order_seed,
              "pad_token_id": data.tokenizer.pad_token_id}
    print(f"data: {len(train_rows)} training rows, {len(query_rows)} queries (validation paraphrases)", flush=True)

    # The full model, its factors and the three sets of scores.
    tick = time.perf_counter()
    module = train(module_args, recipe, train_rows)
    timings["train_full_s"] = time.perf_counter() - tick
    full_train_loss = float(example_losses(module, recipe, train_rows).mean())
    full_query_losses = example_losses(module, recipe, query_rows)
    base = build_module(module_args).eval()
    untrained_query_loss = float(example_losses(base, recipe, query_rows).mean())
    print(f"full model: {timings['train_full_s']:.1f} s; mean summed answer NLL train {full_train_loss:.3f}, "
          f"queries {float(full_query_losses.mean()):.3f} (untrained {untrained_query_loss:.3f})", flush=True)

    scores: dict[str, torch.Tensor] = {}
    with tempfile.TemporaryDirectory(prefix="influence_lds_") as tmp:
        tmp = Path(tmp)
        for strategy in ("ekfac", "kfac"):
            tick = time.perf_counter()
            fit_factors(module, data, strategy, tmp / f"factors_{strategy}")
            timings[f"factors_{strategy}_s"] = time.perf_counter() - tick
        identity_factors(tmp / "factors_ekfac", tmp / "factors_identity")
        for method in METHODS:
            tick = time.perf_counter()
            damping = 0.0 if method == "identity" else args.damping
            result = influence(module, data, tmp / f"factors_{method}", tmp / f"scores_{method}", damping)
            timings[f"scores_{method}_s"] = time.perf_counter() - tick
            train_index = torch.tensor([row["index"] for row in train_rows])
            query_index = torch.tensor([row["index"] for row in query_rows])
            assert torch.equal(result["train_indices"], train_index), "training columns out of dataset order"
            assert torch.equal(result["query_indices"], query_index), "query rows out of order"
            scores[method] = result["scores"].double()  # (Q, N)
    print("scores: " + ", ".join(f"{m} {timings[f'scores_{m}_s']:.1f} s" for m in METHODS)
          + f"; factors: ekfac {timings['factors_ekfac_s']:.1f} s, kfac {timings['factors_kfac_s']:.1f} s", flush=True)

    # Subsets and retraining.
    generator = torch.Generator().manual_seed(args.subset_seed)
    size = round(args.fraction * len(train_rows))
    subsets = [sorted(torch.randperm(len(train_rows), generator=generator)[:size].tolist())
               for _ in range(args.subsets)]
    order_seeds = [args.order_seed + s for s in range(args.train_seeds)]
    jobs = [(module_args, {**recipe, "order_seed": seed}, train_rows, query_rows, subset)
            for seed in order_seeds for subset in subsets]
    tick = time.perf_counter()
    if args.workers > 1:
        with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn"), initializer=_worker_init) as pool:
            losses = list(pool.map(retrain, jobs))
    else:
        losses = [retrain(job) for job in jobs]
    timings["retrain_s"] = time.perf_counter() - tick
    per_seed = torch.tensor(losses, dtype=torch.float64).view(len(order_seeds), len(subsets), len(query_rows))
    actual = per_seed.mean(0)  # (M, Q): each subset's query losses, averaged over the data-order seeds
    print(f"retrained {len(jobs)} models ({len(subsets)} subsets × {len(order_seeds)} data-order seed(s)) on {size} "
          f"rows each in {timings['retrain_s']:.1f} s ({args.workers} worker(s)); mean query loss "
          f"{float(actual.mean()):.3f}", flush=True)

    # LDS.
    membership = torch.zeros(len(subsets), len(train_rows), dtype=torch.float64)
    for k, subset in enumerate(subsets):
        membership[k, subset] = 1.0
    control = torch.randn(scores["ekfac"].shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    per_query, results = {}, {}
    for method, matrix in {**scores, "random (control)": control}.items():
        predicted = -(membership @ matrix.T)  # (M, Q): const − Σ_{m∈S_k} score[q, m]
        per_query[method] = spearman_per_query(predicted, actual)
        results[method] = summary(per_query[method])
    seed_agreement = None
    if len(order_seeds) > 1:  # how well one retraining predicts another: a ceiling for any attribution method
        seed_agreement = summary(spearman_per_query(per_seed[0], per_seed[1]))
        for method in METHODS:
            predicted = -(membership @ scores[method].T)
            results[method]["per_seed"] = [summary(spearman_per_query(predicted, per_seed[s]))["mean"]
                                           for s in range(len(order_seeds))]
    timings["total_s"] = time.perf_counter() - started

    print()
    print(f"{'curvature':<18} {'LDS':>7} {'± s.e.':>8} {'median':>8}")
    for method, result in results.items():
        print(f"{method:<18} {result['mean']:7.3f} {result['stderr']:8.3f} {result['median']:8.3f}")
    beats = results["ekfac"]["mean"] > results["identity"]["mean"]
    paired = torch.tensor(per_query["ekfac"]) - torch.tensor(per_query["identity"])
    paired_se = float(paired.std() / math.sqrt(len(paired)))
    print(f"EKFAC − identity per query: mean {float(paired.mean()):+.3f} ± {paired_se:.3f}"
          f" (s.e.), EKFAC higher on {int((paired > 0).sum())}/{len(paired)} queries -> goal "
          f"{'met' if beats else 'NOT met'}")
    if seed_agreement is not None:
        print(f"retraining noise: Spearman of query losses between data-order seeds {order_seeds[0]} and "
              f"{order_seeds[1]} over the subsets {seed_agreement['mean']:.3f} ± {seed_agreement['stderr']:.3f}; "
              + ", ".join(f"{m} per seed {', '.join(f'{v:.3f}' for v in results[m]['per_seed'])}" for m in METHODS))
    print(f"total {timings['total_s']:.0f} s")

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "settings": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                     "model_config": model_config(args), "target_modules": TARGETS, "data": "data/facts/facts.jsonl",
                     "datamodule": {"format": "qa", "max_length": 64, "val_size": 0.1, "seed": 42,
                                    "query_split": "val"},
                     "damping_identity": 0.0, "loss": "summed answer NLL (CausalLMModule.per_example_loss)",
                     "prediction": "const - sum over the subset of score[q, m]; Spearman over subsets per query, "
                                   "mean over queries"},
        "num_train": len(train_rows), "num_queries": len(query_rows), "subset_size": size,
        "full_model": {"train_loss": full_train_loss, "query_loss": float(full_query_losses.mean()),
                       "untrained_query_loss": untrained_query_loss},
        "lds": results,
        "ekfac_minus_identity": {"mean": float(paired.mean()), "stderr": float(paired.std() / math.sqrt(len(paired))),
                                 "queries_higher": int((paired > 0).sum())},
        "goal_ekfac_beats_identity": beats,
        "seed_agreement": seed_agreement,
        "per_query": per_query,
        "query_indices": [row["index"] for row in query_rows],
        "retrained_query_losses": actual.tolist(),
        "retrained_query_losses_per_seed": per_seed.tolist() if len(order_seeds) > 1 else None,
        "subsets_dataset_indices": [[train_rows[i]["index"] for i in subset] for subset in subsets],
        "timings": timings,
        "load_average_at_end": load,
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
    }, indent=1) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
