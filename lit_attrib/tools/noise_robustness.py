"""Seed 004's experiment: models × noisy GSM8K datasets × {zero-shot, after SFT}, plus attention allocation.

``lit-attrib noise-robustness -c configs/noise_robustness_quick.yaml`` runs, for every model:

1. **zero-shot**: Pass@1 (greedy decoding, final-answer extraction) of the model as given, on every
   dataset (``clean``, ``inf``, ``rcs``, ``sd``) with :class:`~lit_attrib.modules.EvalModule`;
2. **SFT**: fine-tunes it on the clean training problems (:class:`~lit_attrib.modules.CausalLMModule`,
   loss on the answer), then Pass@1 again on every dataset;
3. **attention**: :class:`~lit_attrib.callbacks.AttentionCaptureCallback` on every dataset (the SFT
   model when there is one): where the answer's attention goes (math / noise / other), and a
   side-by-side figure of the models per dataset.

It writes ``results.csv``, ``results.md`` and ``results.png`` (grouped bars), ``attention.md`` and
``attention_<dataset>.png`` into ``output_dir``, plus each step's own outputs below it. Every step
whose outputs exist and were made with the same arguments (``step.json`` beside them) is reused, so a
run that stopped (Ctrl-C, a crash) resumes where it was; a step whose arguments changed runs again,
and ``overwrite`` runs everything again.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path
from typing import Any, Literal

import torch

from lit_attrib.errors import DataError, ModelError
from lit_attrib.io import atomic_open, atomic_path, write_json

__all__ = ["MODES", "noise_robustness"]

# seed 004's sizes: evaluation problems per dataset and SFT problems (None: all)
MODES = {"quick": {"max_samples": 20, "sft_samples": 100}, "medium": {"max_samples": 100, "sft_samples": 1000},
         "full": {"max_samples": None, "sft_samples": None}}
NOISE_TYPES = ("clean", "inf", "rcs", "sd")


def noise_robustness(
    models: dict[str, dict[str, Any]],
    data: dict[str, Any],
    sft_data: dict[str, Any] | None = None,
    datasets: list[str] | None = None,
    mode: Literal["quick", "medium", "full"] = "quick",
    max_samples: int | None = None,
    sft_samples: int | None = None,
    sft_epochs: int = 1,
    sft: dict[str, Any] | None = None,
    max_new_tokens: int = 256,
    stop: list[str] | None = None,
    attention: dict[str, Any] | None = None,
    skip_zero_shot: bool = False,
    skip_sft: bool = False,
    skip_attention: bool = False,
    trainer: dict[str, Any] | None = None,
    output_dir: str = "runs/noise_robustness",
    seed: int = 0,
    overwrite: bool = False,
) -> list[dict]:
    """Run seed 004's DiffLlama-vs-Llama noise-robustness experiment.

    Args:
        models: name → the base model, as ``CausalLMModule`` arguments: ``{pretrained: reyllama/Llama_375M}``
            or ``{config: {model_type: diffllama, ...}}`` (plus e.g. ``dtype``, ``attn_implementation``).
        data: ``NoisyGSM8KDataModule`` arguments of the evaluation problems (``tokenizer``, ``path``,
            ``split``, templates, ``max_length``, ``eval_batch_size``...); ``noise`` is set per dataset.
        sft_data: ``NoisyGSM8KDataModule`` arguments of the SFT problems (default: ``data`` with the
            ``train`` split); always clean.
        datasets: noise types to evaluate: ``clean``, ``inf`` (irrelevant facts), ``rcs`` (redundant
            calculation steps), ``sd`` (semantically related distraction). Default: all four.
        mode: ``quick`` (20 problems per dataset, 100 for SFT), ``medium`` (100 / 1000), ``full`` (all).
        max_samples: evaluation problems per dataset (overrides ``mode``).
        sft_samples: SFT problems (overrides ``mode``).
        sft_epochs: SFT epochs.
        sft: more ``CausalLMModule`` arguments for SFT (``learning_rate``, ``warmup_steps``, ...).
        max_new_tokens: the longest generated answer.
        stop: strings that end a generation (e.g. ``["Question:"]``: a base model otherwise goes on with
            a question of its own, whose numbers the last-number rule would pick).
        attention: ``AttentionCaptureCallback`` arguments (``layers``, ``heads``, ``queries``, ``max_examples``).
        skip_zero_shot: skip step 1.
        skip_sft: skip step 2 (attention then looks at the models as given).
        skip_attention: skip step 3.
        trainer: ``lightning.Trainer`` arguments of every step (``accelerator``, ``devices``,
            ``precision``...).
        output_dir: where everything goes.
        seed: global seed (SFT order and initial weights of ``config`` models).
        overwrite: run every step again, even where its outputs exist.

    Returns:
        The result rows (``model``, ``dataset``, ``setting``, ``pass@1``, ``correct``, ``count``).
    """
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    from lit_attrib.artifacts.attention import load_attention
    from lit_attrib.callbacks import AttentionCaptureCallback
    from lit_attrib.data import NoisyGSM8KDataModule
    from lit_attrib.modules import CausalLMModule, EvalModule

    datasets = list(NOISE_TYPES) if datasets is None else list(datasets)
    problems = []
    unknown = [d for d in datasets if d not in NOISE_TYPES]
    if unknown:
        problems.append(f"unknown datasets {unknown}; choose from {list(NOISE_TYPES)}")
    if not models:
        problems.append("give at least one model: models: {name: {pretrained: ...} or {config: {...}}}")
    if mode not in MODES:
        problems.append(f"unknown mode '{mode}'; choose one of {list(MODES)}")
    if "tokenizer" not in data:
        problems.append("data needs a tokenizer (hub id or path), e.g. data: {tokenizer: ..., path: openai/gsm8k}")
    if problems:
        raise ModelError("invalid noise-robustness arguments:\n  - " + "\n  - ".join(problems))
    sizes = MODES[mode]
    max_samples = sizes["max_samples"] if max_samples is None else max_samples
    sft_samples = sizes["sft_samples"] if sft_samples is None else sft_samples
    out = Path(output_dir)
    trainer_args = {"accelerator": "auto", "devices": 1, "enable_model_summary": False, **(trainer or {})}
    sft_data = {**data, "split": "train", **(sft_data or {})}
    if not skip_sft and Path(str(sft_data.get("path", ""))).is_file() and \
            Path(str(sft_data["path"])).resolve() == Path(str(data.get("path", ""))).resolve():
        raise DataError(f"SFT would train on the evaluation file '{data['path']}' (a local file has one split); "
                        f"give sft_data.path, e.g. the training problems' file")

    def make_trainer(name: str, **extra) -> L.Trainer:
        logger = TensorBoardLogger(save_dir=str(out / "tensorboard"), name=name, version="")
        return L.Trainer(logger=logger, **{**trainer_args, **extra})

    def evaluate(model_name: str, setting: str, dataset: str, model_args: dict, weights: str | None = None) -> dict:
        folder = out / "eval" / model_name / setting / dataset
        data_args = {**data, "noise": dataset, "val_size": 1.0, "num_samples": max_samples}
        step = {"model": model_args, "weights": weights, "data": data_args, "max_new_tokens": max_new_tokens,
                "stop": stop, "trainer": trainer_args, "seed": seed}
        if overwrite or not _done(folder, "metrics.json", step):
            L.seed_everything(seed, verbose=False)
            module = EvalModule(**model_args, task="generation", max_new_tokens=max_new_tokens, stop=stop,
                                output_dir=str(folder), tag=f"{model_name}/{dataset}/{setting}", overwrite=True)
            make_trainer(f"{model_name}/{setting}/{dataset}").validate(
                module, datamodule=NoisyGSM8KDataModule(**data_args), verbose=False)
            _record(folder, step)
        return json.loads((folder / "metrics.json").read_text())

    rows: list[dict] = []
    checkpoints: dict[str, Path] = {}
    for name, model_args in models.items():
        model_args = dict(model_args)
        if not skip_zero_shot:
            for dataset in datasets:
                rows.append(_row(name, dataset, "zero-shot", evaluate(name, "zero-shot", dataset, model_args)))
        if not skip_sft:
            folder = out / "sft" / name
            checkpoint = folder / "last.ckpt"
            data_args = {"val_size": 0.05, **sft_data, "noise": "clean", "num_samples": sft_samples}
            step = {"model": model_args, "sft": sft or {}, "data": data_args, "epochs": sft_epochs,
                    "trainer": trainer_args, "seed": seed}
            if overwrite or not _done(folder, "last.ckpt", step):
                shutil.rmtree(folder, ignore_errors=True)  # a stale last.ckpt would become last-v1.ckpt's sibling
                L.seed_everything(seed, verbose=False)
                module = CausalLMModule(**model_args, **(sft or {}))
                saver = ModelCheckpoint(dirpath=str(folder), save_last=True, save_top_k=0,
                                        enable_version_counter=False)
                make_trainer(f"{name}/sft", max_epochs=sft_epochs, callbacks=[saver], num_sanity_val_steps=0).fit(
                    module, datamodule=NoisyGSM8KDataModule(**data_args))
                _record(folder, step)
            checkpoints[name] = checkpoint
            # the fine-tuned weights, evaluated with the model's own settings (dtype, attention kernel)
            tuned = {**model_args, "checkpoint": str(checkpoint)}
            for dataset in datasets:
                metrics = evaluate(name, "sft", dataset, tuned, weights=_stamp(checkpoint))
                rows.append(_row(name, dataset, "sft", metrics))
    write_results(out, rows)

    if not skip_attention:
        captures: dict[str, dict[str, Any]] = {dataset: {} for dataset in datasets}
        for name, model_args in models.items():
            ckpt_path = str(checkpoints[name]) if name in checkpoints else None
            for dataset in datasets:
                folder = out / "attention" / name / dataset
                data_args = {**data, "noise": dataset, "val_size": 1.0, "num_samples": max_samples}
                step = {"model": model_args, "checkpoint": ckpt_path and _stamp(Path(ckpt_path)), "data": data_args,
                        "attention": attention or {}, "trainer": trainer_args}
                if overwrite or not _done(folder, "allocation.json", step):
                    callback = AttentionCaptureCallback(**{**(attention or {}), "output_dir": str(folder),
                                                           "overwrite": True})
                    make_trainer(f"{name}/attention/{dataset}", callbacks=[callback]).validate(
                        CausalLMModule(**model_args), datamodule=NoisyGSM8KDataModule(**data_args),
                        ckpt_path=ckpt_path, verbose=False)
                    _record(folder, step)
                captures[dataset][name] = load_attention(folder)
        write_attention_summary(out, captures, tokenizer=data["tokenizer"])
    return rows


def _done(folder: Path, output: str, step: dict) -> bool:
    """Whether ``folder`` holds ``output`` made with the same arguments (``step.json``): a step to reuse."""
    record = folder / "step.json"
    if not (folder / output).is_file() or not record.is_file():
        return False
    return json.loads(record.read_text()) == json.loads(json.dumps(step, default=str))


def _record(folder: Path, step: dict) -> None:
    """Mark a finished step with its arguments (written last: a step that stopped half-way runs again)."""
    write_json(folder / "step.json", json.loads(json.dumps(step, default=str)))


def _stamp(path: Path) -> str:
    """A checkpoint's identity for ``step.json``: path, size and modification time."""
    stat = path.stat()
    return f"{path}:{stat.st_size}:{stat.st_mtime_ns}"


def _row(model: str, dataset: str, setting: str, metrics: dict) -> dict:
    return {"model": model, "dataset": dataset, "setting": setting, "pass@1": metrics["value"],
            "correct": metrics["correct"], "count": metrics["count"]}


def write_results(out: Path, rows: list[dict]) -> None:
    """``results.csv``, ``results.md`` and the grouped bar plot ``results.png``."""
    if not rows:
        return
    from lit_attrib.plotting import noise_robustness_figure, plt

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    with atomic_open(out / "results.csv") as handle:
        handle.write(buffer.getvalue())
    datasets = list(dict.fromkeys(row["dataset"] for row in rows))
    lines = ["| model | setting | " + " | ".join(datasets) + " |", "|---|---|" + "---|" * len(datasets)]
    for model, setting in dict.fromkeys((row["model"], row["setting"]) for row in rows):
        cells = {row["dataset"]: row for row in rows if row["model"] == model and row["setting"] == setting}
        lines.append(f"| {model} | {setting} | " + " | ".join(
            f"{100 * cells[d]['pass@1']:.1f} % ({cells[d]['correct']}/{cells[d]['count']})" if d in cells else "–"
            for d in datasets) + " |")
    with atomic_open(out / "results.md") as handle:
        handle.write("# Pass@1 on noisy GSM8K\n\n" + "\n".join(lines) + "\n")
    figure = noise_robustness_figure(rows)
    with atomic_path(out / "results.png") as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    plt.close(figure)
    print("\n".join(lines))


def write_attention_summary(out: Path, captures: dict[str, dict[str, Any]], tokenizer: str | None = None) -> None:
    """``attention.md`` (each model's allocation per dataset, pooled over layers and heads) and a
    side-by-side figure per dataset (``attention_<dataset>.png``: the first common example, last layer)."""
    from lit_attrib.data import load_tokenizer
    from lit_attrib.plotting import attention_comparison_figure, plt

    tok = load_tokenizer(tokenizer) if tokenizer else None
    lines = []
    for dataset, by_model in captures.items():
        for name, (meta, tensors) in by_model.items():
            parts = ("signed", "positive", "negative") if meta["differential"] else ("signed",)
            cells = []
            for p, part in enumerate(parts):
                mass = tensors["mass"][p].double().sum((0, 1))
                share = mass / mass.sum() if mass.sum() != 0 else torch.full_like(mass, float("nan"))
                cells.append(" / ".join(f"{100 * float(s):.1f}" for s in share))
            lines.append(f"| {name} | {dataset} | " + " | ".join(cells + ["–"] * (3 - len(cells))) + " |")
        common = set.intersection(*(set(meta["examples"]) for meta, _ in by_model.values())) if by_model else set()
        if not common:
            continue
        layer = max(next(iter(by_model.values()))[0]["layers"])
        figure = attention_comparison_figure(by_model, index=min(common), layer=layer, tokenizer=tok)
        with atomic_path(out / f"attention_{dataset}.png") as tmp:
            figure.savefig(tmp, format="png", dpi=110)
        plt.close(figure)
    if not lines:
        raise DataError("no attention captures to summarise")
    classes = " / ".join(next(iter(next(iter(captures.values())).values()))[0]["classes"])
    header = (f"| model | dataset | signed ({classes}, %) | positive part (%) | negative part (%) |\n"
              "|---|---|---|---|---|\n")
    with atomic_open(out / "attention.md") as handle:
        handle.write("# Attention allocation of the answer (pooled over layers and heads)\n\n" + header
                     + "\n".join(lines) + "\n")
    print(header + "\n".join(lines))
