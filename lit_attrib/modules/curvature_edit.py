"""CurvatureEditModule: edit MLP weights along the K-FAC curvature spectrum and measure what it does.

Seed 003 (Merullo et al. 2025, https://arxiv.org/abs/2510.24256): project a weight onto the eigen-pairs
of its K-FAC factors that hold a fraction ρ of the curvature mass (:mod:`lit_attrib.ops.edit`). Rote
memorization lives mostly in low-curvature directions, so it goes first, before general ability.

``lit-attrib validate`` runs it: the edit is applied in ``setup``, and the validation pass measures
the baseline (unless ``skip_baseline``) and every edited variant on the same batches by swapping the
edited weights in and out (only those are held twice); ``results.jsonl`` gets one row per model.
``lit-attrib predict`` does not edit: it finds the unedited model's memorized set with
:class:`~lit_attrib.callbacks.MemorizedSetCallback`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
import torchmetrics
from lightning.pytorch import LightningModule
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lit_attrib.artifacts.factors import load_factors
from lit_attrib.errors import ArtifactError, ConfigError, ModelError
from lit_attrib.io import atomic_path, default_permissions, write_jsonl
from lit_attrib.metrics import Memorization, NDCGAtK
from lit_attrib.modules.edit_spec import parse_layer_spec, spec_targets
from lit_attrib.modules.loading import configure_base_model, module_tokenizer, record_datamodule_tokenizer
from lit_attrib.ops.edit import EigenCache, curvature_mass_mask, curvature_project
from lit_attrib.plotting import edit_sweep_figure, plt

__all__ = ["CurvatureEditModule", "greedy_continuation"]

_EIGEN = EigenCache()  # shared by every module in the process: a ρ sweep or a second run reuses it


@torch.no_grad()
def greedy_continuation(model: PreTrainedModel, prefix: torch.Tensor, steps: int) -> torch.Tensor:
    """``(B, steps)`` greedy (argmax) continuation of equal-length prefixes ``(B, P)``, with the KV cache.

    No token is special: an end-of-sequence argmax is kept like any other (``generate`` with
    ``min_new_tokens`` would forbid it and change the continuation).
    """
    output = model(input_ids=prefix, use_cache=True)
    tokens = [output.logits[:, -1].argmax(-1, keepdim=True)]
    for _ in range(steps - 1):
        output = model(input_ids=tokens[-1], past_key_values=output.past_key_values, use_cache=True)
        tokens.append(output.logits[:, -1].argmax(-1, keepdim=True))
    return torch.cat(tokens, 1)


class CurvatureEditModule(LightningModule):
    """Apply seed 003's curvature-mass edit to a causal LM and evaluate baseline and edited models.

    Validation batches are of two kinds (see :class:`~lit_attrib.data.MemorizationDataModule`):
    window batches (with ``prefix_len``) measure memorization (greedy continuation of ``suffix_len``
    tokens: strict and loose accuracy, normalised edit distance); other batches (``labels``) measure
    token-mean perplexity and nDCG@k of the edited models' next-token top-k against the baseline's.

    Perplexity is torchmetrics' token mean, ``exp(Σ NLL / number of label tokens)`` over the whole
    set. A mean of per-batch ``exp(loss)`` is larger (Jensen) and weights batches of few tokens as
    much as long ones; the two agree only when every batch has the same mean loss.

    Args:
        factors: folder of K-FAC factors (``KFACCollectorCallback``) of the projections in ``layers``.
        layers: seed 003's spec as JSON text, a JSON file or a mapping: ``{"31": {"gate": 0.8, "up": 0.8}}``
            (layer index → projection → ρ, the fraction of curvature mass kept).
        pretrained: hub id or local path of the base model (``allenai/OLMo-2-0425-1B``, ...).
        config: instead of ``pretrained``, a config dict of a fresh model (tiny demos).
        checkpoint: a Lightning checkpoint of a ``CausalLMModule`` to take the weights from; without
            ``pretrained`` and ``config``, the model is built as the checkpoint's hyperparameters say.
        trust_checkpoint: unpickle a ``checkpoint`` that holds more than tensors and plain containers
            (``torch.load(weights_only=False)``, which runs code stored in the file); only for files you trust.
        tokenizer: tokenizer hub id or path; defaults to the datamodule's, then ``pretrained``.
        init_seed: seed of the initial weights of a ``config`` model.
        dtype: dtype of the weights (the edit itself is computed in float64).
        attn_implementation: ``eager``, ``sdpa`` or ``flash_attention_2``.
        rhos: a sweep: one edited model per value, each replacing every ρ of ``layers``.
        skip_baseline: do not evaluate the unedited model (no nDCG then; the original weights are not kept).
        loose_threshold: loose memorization counts ``1 − d/L ≥ loose_threshold``.
        ndcg_k: the k of nDCG@k.
        output_dir: where ``results.jsonl`` (and the sweep plot) go; default ``<trainer.log_dir>/edit``.
        save_edited: save the edited model (and tokenizer) here with ``save_pretrained`` (one edited model only).
        overwrite: replace existing results and saved models.
    """

    run_name = "edit"  # its TensorBoard run in validate/test

    def __init__(
        self,
        factors: str,
        layers: str | dict,
        pretrained: str | None = None,
        config: dict[str, Any] | None = None,
        checkpoint: str | None = None,
        trust_checkpoint: bool = False,
        tokenizer: str | None = None,
        init_seed: int = 0,
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        attn_implementation: str | None = None,
        rhos: list[float] | None = None,
        skip_baseline: bool = False,
        loose_threshold: float = 0.75,
        ndcg_k: int = 10,
        output_dir: str | None = None,
        save_edited: str | None = None,
        overwrite: bool = False,
    ) -> None:
        super().__init__()
        problems = []
        if pretrained is not None and config is not None:
            problems.append("give one of `pretrained` (hub id or path) and `config` (dict with model_type), not both")
        if pretrained is None and config is None and checkpoint is None:
            problems.append("give the base model: `pretrained` (hub id or path), `config` (dict with model_type), "
                            "or a `checkpoint` of a CausalLMModule (which names its own)")
        if rhos is not None and (not rhos or any(not 0.0 <= float(r) <= 1.0 for r in rhos)):
            problems.append(f"rhos must be a non-empty list of numbers in [0, 1]; got {rhos}")
        if save_edited is not None and rhos is not None and len(rhos) > 1:
            problems.append("save_edited saves one edited model: give a single rho (or none) when saving")
        if ndcg_k < 1:
            problems.append(f"ndcg_k must be at least 1; got {ndcg_k}")
        if problems:
            raise ConfigError("invalid CurvatureEditModule arguments:\n  - " + "\n  - ".join(problems))
        self.spec = parse_layer_spec(dict(layers) if isinstance(layers, Mapping) else layers)
        self.save_hyperparameters()
        self.model: PreTrainedModel | None = None
        self.variants = [{"model": "baseline", "rho": None, "spec": self.spec}] if not skip_baseline else []
        for rho in rhos if rhos is not None else [None]:
            spec = self.spec if rho is None else {layer: dict.fromkeys(p, float(rho)) for layer, p in self.spec.items()}
            self.variants.append({"model": "edited", "rho": None if rho is None else float(rho), "spec": spec})
        self.metrics = nn.ModuleList(
            nn.ModuleDict({
                "memorization": Memorization(loose_threshold=loose_threshold),
                # float64 sums: a large evaluation adds up millions of log-probabilities
                "perplexity": torchmetrics.text.Perplexity(ignore_index=-100).set_dtype(torch.float64),
                "tokens": torchmetrics.SumMetric().set_dtype(torch.float64),
                "ndcg": NDCGAtK(k=ndcg_k),
            })
            for _ in self.variants
        )
        self._weights: list[dict[str, torch.Tensor]] = []
        self._current: int | None = None
        self._folder: Path | None = None
        self._targets: dict[str, nn.Module] = {}

    # ------------------------------------------------------------------------------- building
    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer: ``tokenizer``, else the datamodule's, else ``pretrained``'s."""
        return module_tokenizer(self)

    def configure_model(self) -> None:
        if self.model is None:
            configure_base_model(self)

    def setup(self, stage: str) -> None:
        record_datamodule_tokenizer(self)
        if self.trainer.ckpt_path is not None:
            raise ModelError("CurvatureEditModule edits the weights in setup, which --ckpt_path would overwrite "
                             f"afterwards; pass the checkpoint as model.checkpoint={self.trainer.ckpt_path} instead")
        if isinstance(self.trainer.strategy, FSDPStrategy):
            raise ModelError("CurvatureEditModule swaps whole weights between baseline and edited models, which FSDP "
                             "shards; use strategy ddp (or one device)")
        if stage == "predict":  # discovery of the memorized set runs on the unedited model
            self.configure_model()
            if self._weights:  # a pass before this one edited the model
                if self.variants[0]["model"] != "baseline":
                    raise ModelError("this CurvatureEditModule kept no unedited weights (skip_baseline=true), so it "
                                     "cannot run the unedited model in predict; use a new module for discovery")
                self._load(0)
            return
        if self._folder is None:  # every process asks: trainer.log_dir is a collective
            self._folder = self.output_folder()
            self.check_outputs()
        if not self._weights:
            self.configure_model()
            self.apply_edit()

    def check_outputs(self) -> None:
        """Refuse to replace earlier results (or a saved model) unless ``overwrite``: nothing is lost. Checked
        once per module, so that a second pass of the same module replaces its own results."""
        hp = self.hparams
        if hp.overwrite:
            return
        existing = [path for path in (self._folder / "results.jsonl", hp.save_edited)
                    if path is not None and Path(path).exists()]
        if existing:
            raise ArtifactError(f"{existing[0]} already exists; choose another output_dir / save_edited, or set "
                                f"model.overwrite=true to replace it")

    def output_folder(self) -> Path:
        """``output_dir``, else ``<trainer.log_dir>/edit`` (call on every process: ``log_dir`` broadcasts)."""
        if self.hparams.output_dir is not None:
            return Path(self.hparams.output_dir)
        return Path(self.trainer.log_dir or self.trainer.default_root_dir) / "edit"

    # ----------------------------------------------------------------------------------- edit
    @torch.no_grad()
    def apply_edit(self) -> None:
        """Compute every variant's edited weights; the model is left holding the first edited variant."""
        path = Path(self.hparams.factors)
        factors = load_factors(path)
        modules = dict(self.named_modules())
        targets = spec_targets(self.spec, modules, factors.modules)
        identity = (str(path.resolve()), os.stat(path / "factors.safetensors").st_mtime_ns)
        # the eigendecompositions and projections run on the device the model will run on (float64)
        device = self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
        self._targets = {name: modules[name] for name in targets}
        self._weights = [{} for _ in self.variants]
        for variant in self.variants:
            if variant["model"] == "edited":
                variant["modules"] = {}
        for name in targets:  # one projection at a time: only its bases are on the device at once
            module = modules[name]
            weight = self._augmented(module).detach()
            gradient = factors[name]["gradient_covariance"].to(device)
            activation = factors[name]["activation_covariance"].to(device)
            if (gradient.shape[0], activation.shape[0]) != tuple(weight.shape):
                bias = " (bias column appended)" if getattr(module, "bias", None) is not None else ""
                raise ArtifactError(
                    f"the factors of '{name}' are for a weight of (out, in) = ({gradient.shape[0]}, "
                    f"{activation.shape[0]}), but the model's is {tuple(weight.shape)}{bias}; collect the factors "
                    f"on this model"
                )
            lam, u_g = _EIGEN((*identity, name, "gradient"), gradient)
            mu, u_a = _EIGEN((*identity, name, "activation"), activation)
            for position, variant in enumerate(self.variants):
                if variant["model"] == "baseline":
                    self._weights[position][name] = weight.clone()
                    continue
                rho = targets[name] if variant["rho"] is None else variant["rho"]  # a sweep's ρ replaces the spec's
                mask = curvature_mass_mask(lam, mu, rho)
                self._weights[position][name] = curvature_project(weight.to(device), u_g, u_a, mask)
                variant["modules"][name] = {"rho": rho, "kept_coefficients": float(mask.double().mean())}
            del lam, u_g, mu, u_a, gradient, activation
        self._load(self._first_edited())
        rank_zero_info(f"CurvatureEditModule: edited {len(targets)} projections ({', '.join(targets)}) for "
                       f"{sum(v['model'] == 'edited' for v in self.variants)} edited model(s)")

    def _first_edited(self) -> int:
        return next(i for i, variant in enumerate(self.variants) if variant["model"] == "edited")

    @staticmethod
    def _augmented(module: nn.Module) -> torch.Tensor:
        """``(out, in)`` weight, with the bias as a last column when the layer has one (the factors' layout)."""
        weight = module.weight
        bias = getattr(module, "bias", None)
        return torch.cat([weight, bias[:, None]], 1) if bias is not None else weight

    def _load(self, position: int) -> None:
        """Put variant ``position``'s weights into the model (only the edited projections change)."""
        if position == self._current:
            return
        for name, tensor in self._weights[position].items():
            module = self._targets[name]
            columns = module.weight.shape[1]
            module.weight.data.copy_(tensor[:, :columns])
            if getattr(module, "bias", None) is not None and tensor.shape[1] > columns:
                module.bias.data.copy_(tensor[:, columns])
        self._current = position

    # ---------------------------------------------------------------------------- evaluation
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def on_validation_start(self) -> None:
        for weights in self._weights:
            for name, tensor in weights.items():
                weights[name] = tensor.to(self.device)
        for metrics in self.metrics:
            for metric in metrics.values():
                metric.reset()

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        if "prefix_len" in batch:
            prefix_len = int(batch["prefix_len"])
            prefix, suffix = batch["input_ids"][:, :prefix_len], batch["input_ids"][:, prefix_len:]
            for position, metrics in enumerate(self.metrics):
                self._load(position)
                metrics["memorization"].update(greedy_continuation(self.model, prefix, suffix.shape[1]), suffix)
            return
        labels = batch["labels"]
        mask = labels[:, 1:] != -100
        baseline = None
        for position, (variant, metrics) in enumerate(zip(self.variants, self.metrics)):
            self._load(position)
            logits = self(batch["input_ids"], batch.get("attention_mask"))[:, :-1].float()
            metrics["perplexity"].update(logits, labels[:, 1:])
            metrics["tokens"].update(mask.sum())
            if variant["model"] == "baseline":
                baseline = logits
            elif baseline is not None:
                metrics["ndcg"].update(logits, baseline, mask)

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self.validation_step(batch, batch_idx, dataloader_idx)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Analysis passes (e.g. :class:`~lit_attrib.callbacks.MemorizedSetCallback`) do the work."""
        return None

    def on_validation_epoch_end(self) -> None:
        rows = [self._result(variant, metrics) for variant, metrics in zip(self.variants, self.metrics)]
        for row in rows:
            tag = row["model"] if row["rho"] is None else f"{row['model']}_rho{row['rho']:g}"
            for key in ("strict_accuracy", "loose_accuracy", "distance", "perplexity", f"ndcg@{self.hparams.ndcg_k}"):
                if row.get(key) is not None:
                    self.log(f"edit/{tag}/{key}", float(row[key]), rank_zero_only=True, add_dataloader_idx=False)
        self.results = rows
        if self.trainer.is_global_zero and not self.trainer.sanity_checking:
            self._write(rows)

    def on_test_epoch_end(self) -> None:
        self.on_validation_epoch_end()

    def on_test_start(self) -> None:
        self.on_validation_start()

    def _result(self, variant: dict, metrics: nn.ModuleDict) -> dict:
        """One ``results.jsonl`` row. Every metric is computed (synced) on every process, whatever it saw:
        computing is a collective, so skipping it on one process would hang the others."""
        hp = self.hparams
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*compute.*before.*update.*")
            values = {name: metric.compute() for name, metric in metrics.items()}
        memorization = values["memorization"]
        examples, tokens = int(memorization.pop("count")), int(values["tokens"])
        row = {"model": variant["model"], "rho": variant["rho"],
               "spec": {str(layer): projections for layer, projections in variant["spec"].items()}}
        row.update({key: float(value) if examples else None for key, value in memorization.items()})
        row["perplexity"] = float(values["perplexity"]) if tokens else None
        has_ndcg = tokens and variant["model"] == "edited" and not hp.skip_baseline
        row[f"ndcg@{hp.ndcg_k}"] = float(values["ndcg"]) if has_ndcg else None
        row.update({"memorization_examples": examples, "perplexity_tokens": tokens,
                    "modules": variant.get("modules", {}), "factors": hp.factors,
                    "base_model": hp.pretrained or hp.checkpoint or "config"})
        return row

    def _write(self, rows: list[dict]) -> None:
        folder = self._folder
        write_jsonl(folder / "results.jsonl", rows)
        edited = [row for row in rows if row["model"] == "edited" and row["rho"] is not None]
        if len(edited) > 1:
            figure = edit_sweep_figure(rows)
            with atomic_path(folder / "results.png") as tmp:
                figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
            experiment = getattr(self.logger, "experiment", None)
            if hasattr(experiment, "add_figure"):
                experiment.add_figure("edit/sweep", figure, global_step=self.global_step, close=False)
            plt.close(figure)
        rank_zero_info("\n" + results_table(rows, self.hparams.ndcg_k) + f"\nresults: {folder / 'results.jsonl'}")

    def on_validation_end(self) -> None:
        target = self.hparams.save_edited
        self._load(self._first_edited())
        if target is None or self.trainer.sanity_checking:
            return
        if self.trainer.is_global_zero:
            save_pretrained_atomic(self.model, self.tokenizer, target, overwrite=self.hparams.overwrite)
            rank_zero_info(f"CurvatureEditModule: saved the edited model to {target}")
        self.trainer.strategy.barrier("curvature_edit_saved")  # no process returns before the model is on disk

    def on_test_end(self) -> None:
        self.on_validation_end()


def results_table(rows: list[dict], k: int) -> str:
    """A Markdown table of ``results.jsonl`` rows."""
    def number(value, spec):
        return "–" if value is None else format(value, spec)

    lines = [f"| model | rho | strict | loose | distance | perplexity | nDCG@{k} |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['model']} | {number(row['rho'], 'g')} | {number(row['strict_accuracy'], '.3f')} | "
                     f"{number(row['loose_accuracy'], '.3f')} | {number(row['distance'], '.3f')} | "
                     f"{number(row['perplexity'], '.3f')} | {number(row.get(f'ndcg@{k}'), '.3f')} |")
    return "\n".join(lines)


def save_pretrained_atomic(model: PreTrainedModel, tokenizer, target: str | os.PathLike, overwrite: bool) -> None:
    """``save_pretrained`` of model and tokenizer into a temporary sibling folder, then moved into place."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    default_permissions(tmp, 0o777)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            if not overwrite:
                raise ArtifactError(f"{target} already exists; set overwrite=true to replace it")
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(tmp)
        raise

