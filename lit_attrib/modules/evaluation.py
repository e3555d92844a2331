"""EvalModule: the evaluation harness, Pass@1 of generated final answers or multiple-choice accuracy.

Seed 004 reports Pass@1 on GSM8K: greedy decoding of each problem, the generated final answer
compared with the reference's as exact numbers (:mod:`lit_attrib.metrics.answers`). Seed 002 reports
MMLU accuracy by answer log-likelihood: each choice's continuation tokens are scored and the best
choice is the answer (:class:`~lit_attrib.data.MultipleChoiceDataModule`).

``lit-attrib validate`` (or ``test``) runs it on any model: a hub id or ``save_pretrained`` folder
(an edited model saved by ``CurvatureEditModule.save_edited`` included), a tiny ``config``, or a
``CausalLMModule`` checkpoint. Rank zero writes ``predictions.jsonl`` (dataset order, whatever the
number of processes) and ``metrics.json``.
"""

from __future__ import annotations

import inspect
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lit_attrib.errors import ArtifactError, ConfigError, DataError, ModelError
from lit_attrib.io import write_json, write_jsonl
from lit_attrib.metrics import MultipleChoiceAccuracy, PassAtOne, grade_answers
from lit_attrib.modules.loading import configure_base_model, module_tokenizer, record_datamodule_tokenizer
from lit_attrib.ops.loss import IGNORE_INDEX

__all__ = ["EvalModule", "TASK_METRICS"]

TASK_METRICS = {"generation": "pass@1", "multiple_choice": "accuracy"}
"""The metric of each task: logged as ``eval/<metric>`` and named in ``metrics.json``."""
PREDICTIONS_FILE, METRICS_FILE = "predictions.jsonl", "metrics.json"


def _left_pad(prompts: list[torch.Tensor], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` ``(B, P)`` of 1-D prompts, padded on the left (for generation)."""
    length = max(len(prompt) for prompt in prompts)
    input_ids = prompts[0].new_full((len(prompts), length), pad_token_id)
    attention_mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):
        input_ids[row, length - len(prompt):] = prompt
        attention_mask[row, length - len(prompt):] = 1
    return input_ids, attention_mask


class EvalModule(LightningModule):
    """Evaluate a causal LM: Pass@1 of greedy generations (``task: generation``) or multiple-choice
    accuracy by continuation log-likelihood (``task: multiple_choice``).

    **generation** batches come from a :class:`~lit_attrib.data.TextDataModule`-like data module and
    carry ``reference`` answers (GSM8K's ``"... #### 72"``). Either whole examples (right-padded
    ``input_ids`` with ``labels`` -100 on the prompt, as ``validate`` gives them): a row's prompt is
    its attended tokens before its first label; or prompt-only batches (no ``labels``). Prompts are
    left-padded again and decoded greedily (``generate(do_sample=False)``, KV cache, stopping at eos,
    at ``max_new_tokens`` or after a ``stop`` string). A generation is correct when its extracted final
    answer equals the reference's (:func:`~lit_attrib.metrics.extract_answer`); a generation without
    any number is wrong.

    **multiple_choice** batches come from :class:`~lit_attrib.data.MultipleChoiceDataModule`: one
    forward over all item × choice rows, each choice scored by the summed log-likelihood of its
    continuation tokens (per token with the data's ``normalize: tokens``); the argmax (ties: the
    lowest choice) is the prediction.

    Outputs, in ``output_dir`` (rank zero writes, atomically): ``predictions.jsonl``, one row per
    example in dataset-index order across processes (generation: ``index``, ``prompt``,
    ``generated``, ``answer``, ``reference``, ``reference_answer``, ``correct``; multiple choice:
    ``index``, ``subject``, ``scores``, ``predicted``, ``answer``, ``correct``), and ``metrics.json``
    (``task``, ``tag``, ``metric``, ``value``, ``correct``, ``count``, ``model``, ``data``,
    ``arguments``). The value is logged as ``eval/pass@1`` or ``eval/accuracy``. Every example must
    come once: use data modules whose evaluation loaders shard without repeats under DDP (both above do).

    Args:
        task: ``generation`` (Pass@1) or ``multiple_choice`` (accuracy).
        pretrained: hub id or local path of the model (e.g. a ``save_pretrained`` folder of an edited model).
        config: instead of ``pretrained``, a config dict of a fresh model (vocabulary from the tokenizer).
        checkpoint: a Lightning checkpoint of a ``CausalLMModule`` to take the weights from; without
            ``pretrained`` and ``config``, the model is built as the checkpoint's hyperparameters say.
        trust_checkpoint: unpickle a ``checkpoint`` that holds more than tensors and plain containers
            (``torch.load(weights_only=False)``, which runs code stored in the file); only for files you trust.
        tokenizer: tokenizer hub id or path; defaults to the datamodule's, then ``pretrained``.
        init_seed: seed of the initial weights of a ``config`` model.
        dtype: dtype of the weights.
        attn_implementation: ``eager``, ``sdpa`` or ``flash_attention_2`` (default: transformers').
        max_new_tokens: most tokens generated per prompt (``generation``; GSM8K solutions fit in 256).
        stop: strings that end a generation (it is cut before the first one), e.g. ``["Question:"]`` for
            few-shot prompts, where a base model goes on with a next question of its own.
        output_dir: where the results go; default ``<trainer.log_dir>/eval``.
        tag: a label written into ``metrics.json`` (e.g. ``llama/inf/zero-shot``).
        overwrite: replace existing results; otherwise an existing ``predictions.jsonl`` or
            ``metrics.json`` stops the run before any work.
    """

    def __init__(
        self,
        task: Literal["generation", "multiple_choice"] = "generation",
        pretrained: str | None = None,
        config: dict[str, Any] | None = None,
        checkpoint: str | None = None,
        trust_checkpoint: bool = False,
        tokenizer: str | None = None,
        init_seed: int = 0,
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        attn_implementation: str | None = None,
        max_new_tokens: int = 256,
        stop: list[str] | None = None,
        output_dir: str | None = None,
        tag: str | None = None,
        overwrite: bool = False,
    ) -> None:
        super().__init__()
        problems = []
        if task not in TASK_METRICS:
            problems.append(f"task must be one of {list(TASK_METRICS)}; got '{task}'")
        if pretrained is not None and config is not None:
            problems.append("give one of `pretrained` (hub id or path) and `config` (dict with model_type), not both")
        if pretrained is None and config is None and checkpoint is None:
            problems.append("give the model: `pretrained` (hub id or path), `config` (dict with model_type), or a "
                            "`checkpoint` of a CausalLMModule (which names its own)")
        if max_new_tokens < 1:
            problems.append(f"max_new_tokens must be at least 1; got {max_new_tokens}")
        if stop is not None and (isinstance(stop, str) or not all(isinstance(s, str) and s for s in stop)):
            problems.append(f"stop must be a list of non-empty strings; got {stop!r}")
        if problems:
            raise ConfigError("invalid EvalModule arguments:\n  - " + "\n  - ".join(problems))
        self.save_hyperparameters()
        self.model: PreTrainedModel | None = None
        self.metric = PassAtOne() if task == "generation" else MultipleChoiceAccuracy()
        self.results: dict | None = None
        self._rows: list[dict] = []
        self._folder: Path | None = None

    # ------------------------------------------------------------------------------- building
    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer: ``tokenizer``, else the datamodule's, else ``pretrained``'s."""
        return module_tokenizer(self)

    @property
    def metric_name(self) -> str:
        return TASK_METRICS[self.hparams.task]

    def configure_model(self) -> None:
        if self.model is None:
            configure_base_model(self)

    def setup(self, stage: str) -> None:
        record_datamodule_tokenizer(self)
        if stage not in ("validate", "test"):
            raise ModelError(f"EvalModule evaluates a model: run `lit-attrib validate` or `test`, not `{stage}`")
        if self._folder is None:  # every process asks: trainer.log_dir is a collective
            self._folder = self.output_folder()
            self.check_outputs()

    def output_folder(self) -> Path:
        """``output_dir``, else ``<trainer.log_dir>/eval`` (call on every process: ``log_dir`` broadcasts)."""
        if self.hparams.output_dir is not None:
            return Path(self.hparams.output_dir)
        return Path(self.trainer.log_dir or self.trainer.default_root_dir) / "eval"

    def check_outputs(self) -> None:
        """Refuse to replace earlier results unless ``overwrite``. Checked once per module, so that a second
        pass of the same module replaces its own results."""
        if self.hparams.overwrite:
            return
        existing = [self._folder / name for name in (PREDICTIONS_FILE, METRICS_FILE) if (self._folder / name).exists()]
        if existing:
            raise ArtifactError(f"{existing[0]} already exists; choose another model.output_dir (or trainer log "
                                f"folder), or set model.overwrite=true to replace it")

    # ---------------------------------------------------------------------------- evaluation
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits ``(B, T, V)``."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def on_validation_start(self) -> None:
        self.metric.reset()
        self._rows = []

    def on_test_start(self) -> None:
        self.on_validation_start()

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        if dataloader_idx != 0:
            raise ModelError("EvalModule evaluates one data loader (dataset indices must be unique); give one set")
        multiple_choice = "choice" in batch
        if multiple_choice != (self.hparams.task == "multiple_choice"):
            wanted = "MultipleChoiceDataModule" if not multiple_choice else "TextDataModule (format: qa)"
            raise ModelError(f"task '{self.hparams.task}' got {'multiple-choice' if multiple_choice else 'text'} "
                             f"batches; use a {wanted} or set model.task")
        rows = self._multiple_choice(batch) if multiple_choice else self._generation(batch)
        self._rows.extend(rows)

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self.validation_step(batch, batch_idx, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        self._finish()

    def on_test_epoch_end(self) -> None:
        self._finish()

    # ----------------------------------------------------------------------------- generation
    def _generation(self, batch: dict[str, Any]) -> list[dict]:
        if "reference" not in batch:
            raise DataError("generation needs reference answers in the batch ('reference'): use a TextDataModule "
                            "with format: qa whose output_column holds the answers")
        indices = batch["index"].tolist()
        prompts = self._prompts(batch, indices)
        input_ids, attention_mask = _left_pad(prompts, self.tokenizer.pad_token_id)
        generated = self._generate(input_ids, attention_mask)
        references = [str(reference) for reference in batch["reference"]]
        self.metric.update(generated, references)
        texts = batch.get("prompt") or self.tokenizer.batch_decode(prompts, skip_special_tokens=True)
        return [{"index": index, "prompt": prompt, "generated": text, **graded, "reference": reference}
                for index, prompt, text, graded, reference
                in zip(indices, texts, generated, grade_answers(generated, references), references)]

    @staticmethod
    def _prompts(batch: dict[str, Any], indices: list[int]) -> list[torch.Tensor]:
        """Each row's prompt tokens: its attended tokens before its first label (all of them without labels)."""
        input_ids = batch["input_ids"]
        attention_mask = batch.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        labels = batch.get("labels")
        prompts = []
        for row in range(input_ids.shape[0]):
            end = input_ids.shape[1]
            if labels is not None:
                labelled = (labels[row] != IGNORE_INDEX).nonzero()
                end = int(labelled[0]) if len(labelled) else end
            prompt = input_ids[row, :end][attention_mask[row, :end].bool()]
            if prompt.numel() == 0:
                raise DataError(f"example {indices[row]} has no prompt tokens before its first label; generation "
                                f"needs question-answer rows (TextDataModule format: qa), not format: text")
            prompts.append(prompt)
        return prompts

    @torch.no_grad()
    def _generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[str]:
        hp = self.hparams
        tokenizer = self.tokenizer
        eos = self.model.generation_config.eos_token_id
        stopping = {"stop_strings": list(hp.stop), "tokenizer": tokenizer} if hp.stop else {}
        output = self.model.generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=hp.max_new_tokens, do_sample=False,
            num_beams=1, use_cache=True, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=eos if eos is not None else tokenizer.eos_token_id, **stopping,
        )
        new_tokens = output[:, input_ids.shape[1]:]  # (B, new) after the left-padded prompts
        texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        for stop in hp.stop or []:
            texts = [text.split(stop, 1)[0] for text in texts]
        return [text.strip() for text in texts]

    # ------------------------------------------------------------------------ multiple choice
    def _multiple_choice(self, batch: dict[str, Any]) -> list[dict]:
        loglik, tokens = self.continuation_loglik(batch)
        scores = loglik / tokens if batch.get("normalize", "none") == "tokens" else loglik
        answers = batch["answer"]
        table = scores.new_full((answers.shape[0], int(batch["num_choices"].max())), float("-inf"))
        table[batch["item"], batch["choice"]] = scores  # (items, choices), -inf where an item has fewer
        self.metric.update(table, answers)
        predicted = table.argmax(1)  # the first maximum: ties go to the lowest choice
        subjects = batch.get("subject") or [""] * answers.shape[0]
        return [{"index": index, "subject": subject, "scores": row[:count], "predicted": choice, "answer": answer,
                 "correct": choice == answer}
                for index, subject, row, count, choice, answer
                in zip(batch["index"].tolist(), subjects, table.tolist(), batch["num_choices"].tolist(),
                       predicted.tolist(), answers.tolist())]

    def continuation_loglik(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rows,)`` summed log-likelihood (float64) of each row's label tokens, and ``(rows,)`` their count.

        Only the positions that predict a label are projected onto the vocabulary (``logits_to_keep``
        where the model takes it): a long MMLU prompt costs no ``(rows, T, V)`` logits.
        """
        input_ids, labels = batch["input_ids"], batch["labels"]
        targets = labels[:, 1:]  # (rows, T-1): position t predicts token t + 1
        needed = (targets != IGNORE_INDEX).any(0).nonzero()[:, 0]  # (K,) positions whose logits are used
        keep = {"logits_to_keep": needed} if self._takes_logits_to_keep() else {}
        logits = self.model(input_ids=input_ids, attention_mask=batch.get("attention_mask"), use_cache=False,
                            **keep).logits
        if not keep:
            logits = logits[:, needed]  # (rows, K, V)
        chosen = targets[:, needed]  # (rows, K)
        mask = chosen != IGNORE_INDEX
        logprobs = torch.log_softmax(logits.float(), -1).gather(-1, chosen.clamp(min=0)[..., None])[..., 0]
        return torch.where(mask, logprobs.double(), 0.0).sum(1), mask.sum(1)

    def _takes_logits_to_keep(self) -> bool:
        return "logits_to_keep" in inspect.signature(self.model.forward).parameters

    # -------------------------------------------------------------------------------- results
    def _finish(self) -> None:
        """Compute, gather and write the results. Every process runs all of it up to the write: the metric's
        compute and the gather are collectives."""
        with warnings.catch_warnings():  # a process that saw no batch (fewer batches than processes)
            warnings.filterwarnings("ignore", message=".*compute.*before.*update.*")
            value = float(self.metric.compute())
        rows = self._gather(self._rows)
        repeated = sorted(index for index, times in Counter(row["index"] for row in rows).items() if times > 1)
        if repeated:
            raise DataError(f"dataset indices {repeated[:8]} were evaluated more than once, which would count them "
                            f"twice; give one data loader whose evaluation sampler gives every example once under "
                            f"DDP (TextDataModule and MultipleChoiceDataModule do)")
        rows.sort(key=lambda row: row["index"])
        correct = sum(bool(row["correct"]) for row in rows)
        if not rows:
            rank_zero_warn("EvalModule: no example was evaluated; check the data module's validation split")
        self.results = self._summary(value if rows else None, correct, len(rows))
        if rows:
            self.log(f"eval/{self.metric_name}", value, sync_dist=True)  # the same value on every process
        if self.trainer.is_global_zero and not self.trainer.sanity_checking:
            write_jsonl(self._folder / PREDICTIONS_FILE, rows)
            write_json(self._folder / METRICS_FILE, self.results)
            tag = f" [{self.hparams.tag}]" if self.hparams.tag else ""
            rank_zero_info(f"EvalModule{tag}: {self.metric_name} = {correct}/{len(rows)}"
                           + (f" = {value:.4f}" if rows else "") + f"; results in {self._folder}")
        self.trainer.strategy.barrier("eval_written")  # no process returns before the results are on disk

    def _gather(self, rows: list[dict]) -> list[dict]:
        """Every process's rows, on every process."""
        if self.trainer.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
            return list(rows)
        gathered: list[list[dict] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, rows)
        return [row for part in gathered for row in part]

    def _summary(self, value: float | None, correct: int, count: int) -> dict:
        hp = self.hparams
        datamodule = getattr(self.trainer, "datamodule", None)
        data = None
        if datamodule is not None:
            data = {"class": type(datamodule).__name__, **dict(getattr(datamodule, "hparams", {}) or {})}
        return {
            "task": hp.task, "tag": hp.tag, "metric": self.metric_name, "value": value, "correct": correct,
            "count": count,
            "model": {"pretrained": hp.pretrained, "config": hp.config, "checkpoint": hp.checkpoint,
                      "ckpt_path": self.trainer.ckpt_path, "model_type": self.model.config.model_type,
                      "parameters": sum(parameter.numel() for parameter in self.model.parameters()),
                      "dtype": hp.dtype},
            "data": data,
            "arguments": dict(hp),
        }
