"""GenerationWriter: ``predict`` answers to ``generated.jsonl``, with a base-vs-fine-tuned table."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from typing_extensions import override

from lit_attrib.io import atomic_open, read_jsonl, write_jsonl

__all__ = ["GenerationWriter"]


def _cell(text: Any, limit: int = 160) -> str:
    # Control characters (an untrained model emits them) would break the table's rows.
    text = "".join(ch if ch.isprintable() else " " for ch in str(text)).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


class GenerationWriter(BasePredictionWriter):
    """Write the rows that ``CausalLMModule.predict_step`` returns to ``generated.jsonl``.

    Rows (``index``, ``prompt``, ``reference``, ``generated`` and, with ``compare_with``,
    ``generated_base``) are sorted by dataset index whatever the number of processes. When a second
    model was compared, ``comparison.md`` holds a side-by-side table, also logged to TensorBoard text.
    Each process streams its rows to a part file as batches finish; rank zero merges them at the end
    and writes the final files atomically.

    Args:
        output_dir: folder for the files; default: the run's ``trainer.log_dir``.
        max_table_rows: rows shown in ``comparison.md`` and TensorBoard.
    """

    def __init__(self, output_dir: str | None = None, max_table_rows: int = 50) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = output_dir
        self.max_table_rows = max_table_rows

    def _dir(self, trainer: Trainer) -> Path:
        return Path(self.output_dir or trainer.log_dir or trainer.default_root_dir)

    def _part(self, trainer: Trainer) -> Path:
        return self._dir(trainer) / f".generated.rank{trainer.global_rank}.jsonl.part"

    @override
    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        part = self._part(trainer)
        part.parent.mkdir(parents=True, exist_ok=True)
        part.write_text("")

    @override
    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        if not prediction:  # an analysis pass: nothing was generated
            return
        with open(self._part(trainer), "a", encoding="utf-8") as handle:
            for row in prediction:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")

    @override
    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            parts = [self._dir(trainer) / f".generated.rank{rank}.jsonl.part" for rank in range(trainer.world_size)]
            rows = {row["index"]: row for part in parts for row in read_jsonl(part)}  # DDP may repeat padded rows
            ordered = [rows[index] for index in sorted(rows)]
            if ordered:
                write_jsonl(self._dir(trainer) / "generated.jsonl", ordered)
            if ordered and "generated_base" in ordered[0]:
                self._write_comparison(trainer, ordered)
            for part in parts:
                os.unlink(part)
        trainer.strategy.barrier()

    def _write_comparison(self, trainer: Trainer, rows: list[dict]) -> None:
        lines = ["| index | prompt | reference | base | fine-tuned |", "|---|---|---|---|---|"]
        for row in rows[: self.max_table_rows]:
            cells = [row["index"], row["prompt"], row["reference"], row["generated_base"], row["generated"]]
            lines.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
        table = "\n".join(lines) + "\n"
        with atomic_open(self._dir(trainer) / "comparison.md") as handle:
            handle.write(table)
        experiment = getattr(trainer.logger, "experiment", None)
        if experiment is not None and hasattr(experiment, "add_text"):
            experiment.add_text("predict/comparison", table, global_step=trainer.global_step)
