"""MemorizedSetCallback: find the text windows a model has memorized, in a ``predict`` pass.

A window (``prefix_len + suffix_len`` tokens, see :class:`~lit_attrib.data.MemorizationDataModule`)
counts as memorized when the teacher-forced argmax of every suffix position is the suffix token,
which is the same as greedy decoding reproducing the suffix exactly.
"""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lit_attrib.callbacks._common import ArtifactCallback, check_context, context_length, tensors_checksum
from lit_attrib.engine.task import Task
from lit_attrib.errors import DataError, ModelError
from lit_attrib.io import write_json, write_jsonl

__all__ = ["MemorizedSetCallback", "model_logits"]


def model_logits(pl_module: LightningModule, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token logits ``(B, T, V)`` from ``pl_module(input_ids, attention_mask)`` (a tensor or an
    output with ``.logits``, as Hugging Face models return)."""
    output = pl_module(input_ids, attention_mask)
    logits = getattr(output, "logits", output)
    if not isinstance(logits, torch.Tensor) or logits.shape[:2] != input_ids.shape:
        raise ModelError(f"{type(pl_module).__name__}(input_ids, attention_mask) must return next-token logits "
                         f"(B, T, V) (or an output with .logits); got {type(output).__name__}")
    return logits


class MemorizedSetCallback(ArtifactCallback):
    """Keep the windows of ``predict_dataloader()`` whose suffix the model reproduces token for token.

    Writes ``memorized.jsonl`` (one row per distinct window, in source order: ``source_index``,
    ``offset``, ``input_ids``, ``prefix_len``, ``suffix_len`` and the decoded ``prefix``/``suffix``)
    and then ``memorized.json`` (arguments and counts), both on rank zero, into ``output_dir``
    (default ``<trainer.log_dir>/<name>``). The ``.jsonl`` is ready to be the ``memorized`` source of
    :class:`~lit_attrib.data.MemorizationDataModule`. Windows that repeat (the same tokens at several
    places) are kept once, at their first place.

    Args:
        output_dir: artifact folder.
        name: the artifact's name.
        overwrite: replace results made with other arguments.
    """

    metadata_file = "memorized.json"

    def __init__(self, output_dir: str | None = None, name: str = "memorized", overwrite: bool = False) -> None:
        self.output_dir = output_dir
        self.name = name
        self.overwrite = overwrite
        self._found: list[dict] = []
        self._scanned: set[int] = set()
        self._window: tuple[int, int] | None = None
        self._arguments: dict = {}

    def arguments(self) -> dict:
        return self._arguments

    @override
    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._task = Task()  # window batches: input_ids, attention_mask, index and the window columns
        self._found, self._scanned, self._window = [], set(), None
        self._context = context_length(pl_module)
        data = getattr(trainer.datamodule, "hparams", {})
        self._arguments = {
            "model": type(pl_module).__name__, "weights": tensors_checksum(pl_module.parameters()),
            **{key: json.loads(json.dumps(data.get(key), default=str))
               for key in ("scan", "prefix_len", "suffix_len", "stride", "num_samples")},
        }
        # every process asks for the folder (trainer.log_dir is a collective); refuse before the scan, not after
        self._folder = self.folder(trainer)
        self.check_overwrite(trainer)

    @override
    def on_predict_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        task = self._task
        if task.column(batch, "prefix_len") is None:
            raise DataError("MemorizedSetCallback needs window batches (with `prefix_len`); use "
                            "lit_attrib.data.MemorizationDataModule with `scan` as the datamodule")
        check_context(task, batch, self._context, "the window")
        prefix_len = int(task.column(batch, "prefix_len"))
        ids = task.input_ids(batch)
        window = (prefix_len, ids.shape[1] - prefix_len)
        if self._window is not None and window != self._window:
            raise DataError(f"windows changed from prefix/suffix {self._window} to {window} within one pass")
        self._window = window
        padding = task.padding_mask(batch)
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            logits = model_logits(pl_module, ids, None if padding is None else padding.long())
        predicted = logits[:, prefix_len - 1:-1].argmax(-1)
        memorized = (predicted == ids[:, prefix_len:]).all(-1).cpu()
        rows, sources, offsets = task.example_ids(batch), task.column(batch, "source_index"), task.column(batch, "offset")
        for row in range(ids.shape[0]):
            self._scanned.add(int(rows[row]))
            if memorized[row]:
                self._found.append({"source_index": int(sources[row]), "offset": int(offsets[row]),
                                    "input_ids": ids[row].tolist()})

    @override
    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        found, scanned = self._found, self._scanned
        if dist.is_available() and dist.is_initialized() and trainer.world_size > 1:
            parts: list = [None] * trainer.world_size
            dist.all_gather_object(parts, (found, sorted(scanned)))
            found = [row for part_found, _ in parts for row in part_found]
            scanned = {index for _, part_scanned in parts for index in part_scanned}
        if not trainer.is_global_zero:
            return
        prefix_len, suffix_len = self._window or (0, 0)
        tokenizer = getattr(trainer.datamodule, "tokenizer", None)
        rows, seen = [], set()
        for row in sorted(found, key=lambda r: (r["source_index"], r["offset"])):
            key = tuple(row["input_ids"])
            if key in seen:
                continue
            seen.add(key)
            row = {**row, "prefix_len": prefix_len, "suffix_len": suffix_len}
            if tokenizer is not None:
                row["prefix"] = tokenizer.decode(row["input_ids"][:prefix_len], skip_special_tokens=True)
                row["suffix"] = tokenizer.decode(row["input_ids"][prefix_len:], skip_special_tokens=True)
            rows.append(row)
        folder = self._folder
        write_jsonl(folder / "memorized.jsonl", rows)
        counts = {"windows": len(scanned), "memorized": len(found), "distinct": len(rows),
                  "duplicates_dropped": len(found) - len(rows)}
        write_json(folder / self.metadata_file, {"format": "lit_attrib.memorized/1", "arguments": self.arguments(),
                                                 "prefix_len": prefix_len, "suffix_len": suffix_len, **counts})
        share = counts["memorized"] / max(counts["windows"], 1)
        rank_zero_info(f"MemorizedSetCallback: {counts['memorized']} of {counts['windows']} windows memorized "
                       f"({share:.1%}), {len(rows)} distinct, written to {folder / 'memorized.jsonl'}")
