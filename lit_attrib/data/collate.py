"""Dynamic padding: each batch is padded to its own longest row, never to ``max_length``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from lit_attrib.ops.loss import IGNORE_INDEX

__all__ = ["CausalLMCollator"]


@dataclass
class CausalLMCollator:
    """Pad ``input_ids``/``labels`` rows into a batch; keep every row's dataset ``index``.

    Tensor fields: ``input_ids (B, T)``, ``attention_mask (B, T)``, ``labels (B, T)`` (``-100`` on
    padding) when rows have labels, ``index (B,)``, and ``token_class (B, T)`` (``-1`` on padding) when
    rows carry per-token classes (math / noise / other, for attention allocation). String fields
    (``prompt``, ``reference``) are passed through as lists.

    Args:
        pad_token_id: id written into padded positions (they are masked and carry no loss).
        padding_side: ``"right"`` for training and scoring, ``"left"`` for generation.
        pad_to_multiple_of: round the padded length up (e.g. 8 for tensor cores); ``None`` for exact.
    """

    pad_token_id: int
    padding_side: Literal["left", "right"] = "right"
    pad_to_multiple_of: int | None = None

    def __call__(self, rows: list[dict]) -> dict:
        length = max(len(row["input_ids"]) for row in rows)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        has_labels = "labels" in rows[0]
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long) if has_labels else None
        token_class = torch.full((len(rows), length), -1, dtype=torch.long) if "token_class" in rows[0] else None
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            span = slice(length - n, length) if self.padding_side == "left" else slice(0, n)
            input_ids[i, span] = torch.as_tensor(row["input_ids"])
            attention_mask[i, span] = 1
            if labels is not None:
                labels[i, span] = torch.as_tensor(row["labels"])
            if token_class is not None:
                token_class[i, span] = torch.as_tensor(row["token_class"][:n])
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "index": torch.as_tensor([row["index"] for row in rows], dtype=torch.long),
        }
        if labels is not None:
            batch["labels"] = labels
        if token_class is not None:
            batch["token_class"] = token_class
        for key in ("prompt", "reference"):
            if key in rows[0]:
                batch[key] = [row[key] for row in rows]
        return batch
