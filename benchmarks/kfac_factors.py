"""EKFAC factors: lit_attrib's KFACCollectorCallback against kronfluence's ``Analyzer.fit_all_factors``.

For a GPT-2 and a Llama model built from config (no downloads), both libraries fit EKFAC factors of
the same layers on the same examples, in the same batches, in float32 (eigendecompositions in
float64). The script reports

1. speed: wall time of ``Trainer.predict`` with the callback ÷ wall time of ``fit_all_factors``
   (goal ≤ 0.5), each timed after a small warm-up run of its own;
2. agreement: ‖ours − theirs‖_F / ‖theirs‖_F of A, G and Λ, the maximum over modules (goal ≤ 1e-4).
   kronfluence stores un-normalised sums and their counts; they are divided here (A and G by the
   non-padding token count, Λ by the example count), which is lit_attrib's convention;
3. overhead in training: ``Trainer.fit`` of N steps with ``KFACCollectorCallback(strategy="kfac")``
   ÷ the same fit without it (goal ≤ 1.3, report only).

Every timing is the fastest of ``--repeats`` interleaved runs: the CPUs are shared, and a run that
overlaps another process can be several times slower (the load average is recorded and checked).

kronfluence only tracks ``nn.Linear``: for GPT-2 it gets a copy of the model whose ``Conv1D`` layers
are replaced by equivalent ``nn.Linear`` layers (logits checked to match first).

Run: ``python benchmarks/kfac_factors.py`` (``--help`` for the options).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import datasets
import kronfluence
import torch
import torch.nn.functional as F
from kronfluence import Analyzer, FactorArguments, Task, prepare_model
from kronfluence.utils.dataset import DataLoaderKwargs
from lightning.pytorch import Callback, Trainer
from torch import nn
from transformers.pytorch_utils import Conv1D

from lit_attrib.artifacts import load_factors
from lit_attrib.callbacks import KFACCollectorCallback
from lit_attrib.data import CausalLMCollator, TextDataModule
from lit_attrib.modules import CausalLMModule

ROOT = Path(__file__).resolve().parents[1]
DATA, TOKENIZER = str(ROOT / "data/facts/facts.jsonl"), str(ROOT / "data/facts/tokenizer")
RESULTS = ROOT / "benchmarks" / "results" / "kfac_factors.json"
QUANTITIES = ("activation_covariance", "gradient_covariance", "lambda")
TARGETS = {
    "gpt2": ["*.mlp.c_fc", "*.mlp.c_proj", "*.attn.c_attn", "*.attn.c_proj"],
    "llama": ["*.mlp.*", "*.self_attn.*_proj"],
}


def model_config(kind: str, width: int, layers: int) -> dict:
    """A small config of ``kind`` (dropout off, so that both libraries see the same deterministic model)."""
    if kind == "gpt2":
        return {"model_type": "gpt2", "n_embd": width, "n_layer": layers, "n_head": 4, "n_positions": 256,
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    return {"model_type": "llama", "hidden_size": width, "intermediate_size": 4 * width, "num_hidden_layers": layers,
            "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 256}


def build_module(config: dict, **kwargs) -> CausalLMModule:
    module = CausalLMModule(config=config, tokenizer=TOKENIZER, **kwargs)
    module.configure_model()
    return module


def datamodule(examples: int, batch_size: int, max_length: int) -> TextDataModule:
    """The first ``examples`` rows, all of them in the prediction set as whole examples, in file order."""
    data = TextDataModule(path=DATA, tokenizer=TOKENIZER, num_samples=examples, val_size=0, batch_size=batch_size,
                          max_length=max_length, predict_split="train", predict_content="examples")
    data.setup("predict")
    return data


def rows_and_collator(data: TextDataModule) -> tuple:
    """The tokenized rows and the collator that ``data``'s own loaders use (same padding, same batches)."""
    rows = data.train_dataset.select_columns(["input_ids", "labels", "index"])
    return rows, CausalLMCollator(pad_token_id=data.tokenizer.pad_token_id)


def trainer(**kwargs) -> Trainer:
    return Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                   enable_model_summary=False, **kwargs)


# ------------------------------------------------------------------------------------ lit_attrib
def fit_ours(module: CausalLMModule, data: TextDataModule, kind: str, folder: str) -> tuple[float, dict]:
    """Seconds of ``Trainer.predict`` with the callback (the analysis pass of configs/factors_quickstart.yaml:
    the module generates nothing), and the factors keyed by the HF model's names."""
    callback = KFACCollectorCallback(target_modules=TARGETS[kind], strategy="ekfac", dtype="float32",
                                     output_dir=folder, plots=False, overwrite=True)
    run = trainer(callbacks=[callback])
    start = time.perf_counter()
    run.predict(module, datamodule=data, return_predictions=False)
    seconds = time.perf_counter() - start
    factors = load_factors(folder)
    return seconds, {
        name.removeprefix("model."): {key: factors[name][key].double() for key in QUANTITIES} for name in factors
    }


# ------------------------------------------------------------------------------------ kronfluence
class SummedNLLTask(Task):
    """Summed next-token NLL over the label tokens (labels -100 carry no loss); padding masked."""

    def __init__(self, modules: list[str]) -> None:
        self.modules = modules

    def compute_train_loss(self, batch: dict, model: nn.Module, sample: bool = False) -> torch.Tensor:
        assert not sample, "this benchmark uses the empirical Fisher"
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100,
                               reduction="sum")

    def compute_measurement(self, batch: dict, model: nn.Module) -> torch.Tensor:
        return self.compute_train_loss(batch, model)

    def get_influence_tracked_modules(self) -> list[str]:
        return self.modules

    def get_attention_mask(self, batch: dict) -> torch.Tensor:
        return batch["attention_mask"]


def linearised(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every GPT-2 ``Conv1D`` (``y = x W + b``, ``W (in, out)``) as an ``nn.Linear``."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, Conv1D):
            in_features, out_features = module.weight.shape
            linear = nn.Linear(in_features, out_features, bias=module.bias is not None)
            with torch.no_grad():
                linear.weight.copy_(module.weight.T)
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, linear)
    return model


def kronfluence_analyzer(module: CausalLMModule, modules: list[str], batch: dict, folder: str) -> Analyzer:
    """An Analyzer over a Linear-only copy of the HF model, after checking that the copy's logits match."""
    model = linearised(module.model).eval()
    with torch.no_grad():
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
        expected, got = module.model.eval()(**inputs).logits, model(**inputs).logits
    if not torch.allclose(expected, got, atol=1e-5, rtol=1e-5):
        raise RuntimeError(f"the Linear copy's logits differ by {float((expected - got).abs().max()):.3g}")
    task = SummedNLLTask(modules)
    return Analyzer("kfac_factors", prepare_model(model, task), task, cpu=True, disable_tqdm=True, output_dir=folder)


def fit_theirs(analyzer: Analyzer, data: TextDataModule, batch_size: int, name: str) -> tuple[float, dict]:
    """Seconds of ``fit_all_factors``, and its A, G, Λ divided by kronfluence's own counts."""
    arguments = FactorArguments(strategy="ekfac", use_empirical_fisher=True, amp_dtype=None,
                                activation_covariance_dtype=torch.float32, gradient_covariance_dtype=torch.float32,
                                eigendecomposition_dtype=torch.float64, per_sample_gradient_dtype=torch.float32,
                                lambda_dtype=torch.float32, covariance_max_examples=None, lambda_max_examples=None)
    dataset, collate = rows_and_collator(data)
    loader = DataLoaderKwargs(collate_fn=collate)
    start = time.perf_counter()
    analyzer.fit_all_factors(name, dataset, per_device_batch_size=batch_size, dataloader_kwargs=loader,
                             factor_args=arguments, overwrite_output_dir=True)
    seconds = time.perf_counter() - start
    raw = {**analyzer.load_covariance_matrices(name), **analyzer.load_lambda_matrices(name)}
    normalised = {}
    for module, lambda_sum in raw["lambda_matrix"].items():
        normalised[module] = {
            "activation_covariance": raw["activation_covariance"][module].double()
            / float(raw["num_activation_covariance_processed"][module]),
            "gradient_covariance": raw["gradient_covariance"][module].double()
            / float(raw["num_gradient_covariance_processed"][module]),
            "lambda": lambda_sum.double() / float(raw["num_lambda_processed"][module]),
        }
    return seconds, normalised


# ------------------------------------------------------------------------------------- comparison
def relative_differences(ours: dict, theirs: dict) -> dict[str, dict[str, float]]:
    """``{quantity: {module: ‖ours − theirs‖_F / ‖theirs‖_F}}``."""
    if set(ours) != set(theirs):
        raise RuntimeError(f"different modules: ours only {sorted(set(ours) - set(theirs))}, "
                           f"theirs only {sorted(set(theirs) - set(ours))}")
    return {key: {name: float(torch.linalg.norm(ours[name][key] - theirs[name][key])
                              / torch.linalg.norm(theirs[name][key])) for name in sorted(ours)}
            for key in QUANTITIES}


def compare_model(kind: str, args: argparse.Namespace) -> dict:
    """Warm up both sides, then ``repeats`` interleaved timed fits of each; the fastest of each is reported."""
    config = model_config(kind, args.width, args.layers)
    module = build_module(config)
    data = datamodule(args.examples, args.batch_size, args.max_length)
    warmup = datamodule(args.warmup_examples, args.batch_size, args.max_length)
    times = {"ours_s": [], "kronfluence_s": []}
    with tempfile.TemporaryDirectory() as folder:
        _, warm = fit_ours(module, warmup, kind, f"{folder}/ours_warmup")
        rows, collate = rows_and_collator(warmup)
        first_batch = collate([rows[i] for i in range(min(args.batch_size, len(rows)))])
        analyzer = kronfluence_analyzer(module, sorted(warm), first_batch, f"{folder}/kronfluence")
        fit_theirs(analyzer, warmup, args.batch_size, "warmup")
        for repeat in range(args.repeats):
            seconds, ours = fit_ours(module, data, kind, f"{folder}/ours_{repeat}")
            times["ours_s"].append(seconds)
            seconds, theirs = fit_theirs(analyzer, data, args.batch_size, f"factors_{repeat}")
            times["kronfluence_s"].append(seconds)
    differences = relative_differences(ours, theirs)
    best = {key: min(values) for key, values in times.items()}
    return {
        "config": config, "modules": len(ours), **best, "runs": times,
        "time_ratio": best["ours_s"] / best["kronfluence_s"],
        "max_relative_difference": {key: max(values.values()) for key, values in differences.items()},
        "relative_difference": differences,
    }


class StepTimer(Callback):
    """Wall time of every training step (forward, backward with the collector's hooks, optimizer)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seconds.append(time.perf_counter() - self._start)


def fit_seconds(args: argparse.Namespace, folder: str | None) -> tuple[float, float]:
    """Wall time of ``Trainer.fit`` for ``fit_steps`` steps (one epoch), with the collector when ``folder``,
    and the median time of one step.

    The model is built and the data tokenized before the clock starts; the whole-fit time includes the
    collector's one-off end-of-epoch eigendecompositions and writing the factors, the step time does not.
    """
    module = build_module(model_config("llama", args.width, args.layers), learning_rate=1e-4)
    data = TextDataModule(path=DATA, tokenizer=TOKENIZER, num_samples=args.fit_steps * args.batch_size, val_size=0,
                          batch_size=args.batch_size, max_length=args.max_length)
    data.setup("fit")  # tokenize before the clock starts
    timer = StepTimer()
    callbacks = [timer] if folder is None else [timer, KFACCollectorCallback(
        target_modules=TARGETS["llama"], strategy="kfac", dtype="float32", output_dir=folder, plots=False,
        overwrite=True)]
    run = trainer(callbacks=callbacks, max_steps=args.fit_steps, max_epochs=1, limit_val_batches=0)
    start = time.perf_counter()
    run.fit(module, datamodule=data)
    return time.perf_counter() - start, statistics.median(timer.seconds[1:])


def fit_overhead(args: argparse.Namespace) -> dict:
    """``repeats`` interleaved fits without and with the collector; the fastest of each is compared."""
    runs = {"without_s": [], "with_s": [], "without_step_s": [], "with_step_s": []}
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(args.repeats):
            for label, target in (("without", None), ("with", folder)):
                total, step = fit_seconds(args, target)
                runs[f"{label}_s"].append(total)
                runs[f"{label}_step_s"].append(step)
    best = {key: min(values) for key, values in runs.items()}
    return {**best, "runs": runs, "steps": args.fit_steps, "repeats": args.repeats,
            "ratio": best["with_s"] / best["without_s"],
            "step_ratio": best["with_step_s"] / best["without_step_s"]}


def print_table(results: dict) -> None:
    print(f"\nEKFAC factors, {results['settings']['examples']} examples in batches of "
          f"{results['settings']['batch_size']}, float32 ({torch.get_num_threads()} threads)")
    print(f"{'model':<7}{'modules':>8}{'ours s':>9}{'kronfl. s':>11}{'ratio':>8}{'max rel A':>12}"
          f"{'max rel G':>12}{'max rel Λ':>12}")
    for kind, row in results["models"].items():
        diff = row["max_relative_difference"]
        differences = "".join(f"{diff[key]:>12.2e}" for key in QUANTITIES)
        print(f"{kind:<7}{row['modules']:>8}{row['ours_s']:>9.2f}{row['kronfluence_s']:>11.2f}"
              f"{row['time_ratio']:>8.3f}{differences}")
    print("goals: ratio ≤ 0.5, max relative difference ≤ 1e-4 (kronfluence's sums divided by its counts: "
          "A, G per non-padding token, Λ per example)")
    for kind, row in results["models"].items():
        runs = row["runs"]
        print(f"  {kind} runs: ours {_seconds(runs['ours_s'])}, kronfluence {_seconds(runs['kronfluence_s'])}")
    fit = results.get("fit_overhead")
    if fit:
        print(f"\nfit with collector ÷ without (llama, {fit['steps']} steps, min of {fit['repeats']}): "
              f"{fit['with_s']:.2f} s / {fit['without_s']:.2f} s = {fit['ratio']:.3f}  (goal ≤ 1.3)")
        print(f"  runs: with {_seconds(fit['runs']['with_s'])}, without {_seconds(fit['runs']['without_s'])}")
        print(f"  per step (median, without the one-off end-of-pass eigendecompositions and writing): "
              f"{fit['with_step_s'] * 1e3:.1f} ms / {fit['without_step_s'] * 1e3:.1f} ms = {fit['step_ratio']:.3f}")
    load = results["load_average_1min"]
    if max(load.values()) > results["settings"]["threads"] + 0.5:
        print(f"\nWARNING: 1-minute load average {load['before']:.1f} before, {load['after']:.1f} after: other "
              f"processes shared the CPUs, so the timings are unreliable; rerun on an idle machine")


def _seconds(values: list[float]) -> str:
    return "/".join(f"{value:.2f}" for value in values) + " s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(TARGETS), default=["gpt2", "llama"])
    parser.add_argument("--width", type=int, default=128, help="d_model of both models")
    parser.add_argument("--layers", type=int, default=4, help="transformer blocks of both models")
    parser.add_argument("--examples", type=int, default=256, help="examples the factors are fitted on")
    parser.add_argument("--warmup-examples", type=int, default=16, help="examples of each side's warm-up run")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--fit-steps", type=int, default=30, help="training steps of the fit overhead runs (0 skips)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each side (the fastest counts)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    rows = sum(1 for line in open(DATA) if line.strip())
    if max(args.examples, args.warmup_examples, args.fit_steps * args.batch_size) > rows:
        parser.error(f"{DATA} has {rows} rows: --examples and --fit-steps × --batch-size must not exceed them")

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers|bottleneck).*")
    warnings.filterwarnings("ignore", category=FutureWarning, module="kronfluence")
    datasets.disable_progress_bars()
    for name in ("lightning", "lightning.pytorch", "kronfluence", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)

    load_before = os.getloadavg()[0]
    results = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "versions": {"torch": torch.__version__, "kronfluence": kronfluence.__version__},
               "models": {kind: compare_model(kind, args) for kind in args.models}}
    if args.fit_steps > 0:
        results["fit_overhead"] = fit_overhead(args)
    results["load_average_1min"] = {"before": load_before, "after": os.getloadavg()[0]}
    print_table(results)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwritten to {args.output}")


if __name__ == "__main__":
    main()
