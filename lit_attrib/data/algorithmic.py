"""AlgorithmicDataModule: small synthetic tasks (addition, parity) for looped transformers, offline."""

from __future__ import annotations

import random
from typing import Literal

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from lit_attrib.data.collate import CausalLMCollator
from lit_attrib.errors import DataError
from lit_attrib.ops.loss import IGNORE_INDEX

__all__ = ["AlgorithmicDataModule", "VOCAB"]

VOCAB = [str(d) for d in range(10)] + ["+", "=", "<eos>", "<pad>"]
PLUS, EQUALS, EOS, PAD = 10, 11, 12, 13


def addition_row(a: int, b: int, digits: int) -> tuple[list[int], list[int]]:
    """``a+b=`` (most significant digit first) then the sum's ``digits + 1`` digits **least** significant
    first (the order a left-to-right model can carry in) and eos; loss on the answer and eos."""
    prompt = [int(c) for c in f"{a:0{digits}d}"] + [PLUS] + [int(c) for c in f"{b:0{digits}d}"] + [EQUALS]
    answer = [int(c) for c in reversed(f"{a + b:0{digits + 1}d}")] + [EOS]
    return prompt + answer, [IGNORE_INDEX] * len(prompt) + answer


def parity_row(bits: list[int]) -> tuple[list[int], list[int]]:
    """The bits, ``=``, their parity and eos; loss on the parity and eos."""
    prompt = list(bits) + [EQUALS]
    answer = [sum(bits) % 2, EOS]
    return prompt + answer, [IGNORE_INDEX] * len(prompt) + answer


class AlgorithmicDataModule(LightningDataModule):
    """Seeded synthetic rows, token ids directly (vocabulary :data:`VOCAB`, 14 ids; no tokenizer).

    Every row keeps ``index`` (training rows 0..num_train−1, validation rows after them). ``predict``
    yields whole training examples (for analysis passes); :meth:`query_dataloader` the validation rows.

    Args:
        task: ``addition`` (two ``digits``-digit numbers) or ``parity`` (``digits`` bits).
        digits: operand digits (addition) or bits (parity).
        num_train: training rows.
        num_val: validation rows (distinct from the training rows).
        seed: seed of the rows.
        batch_size: training batch size.
        eval_batch_size: validation, prediction and query batch size (default ``batch_size``).
    """

    vocab_size = len(VOCAB)

    def __init__(self, task: Literal["addition", "parity"] = "addition", digits: int = 3, num_train: int = 512,
                 num_val: int = 64, seed: int = 0, batch_size: int = 32, eval_batch_size: int | None = None) -> None:
        super().__init__()
        if task not in ("addition", "parity"):
            raise DataError(f"task must be 'addition' or 'parity'; got '{task}'")
        space = 10 ** (2 * digits) if task == "addition" else 2**digits
        if digits < 1 or num_train < 1 or num_train + num_val > space:
            raise DataError(f"{task} with digits={digits} has {space} distinct rows; num_train + num_val = "
                            f"{num_train + num_val} (both ≥ 1 for training) do not fit: lower them or raise digits")
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.rows: list[dict] = []

    def setup(self, stage: str) -> None:
        if self.rows:
            return
        hp = self.hparams
        rng = random.Random(hp.seed)
        space = 10 ** (2 * hp.digits) if hp.task == "addition" else 2**hp.digits
        for index, code in enumerate(rng.sample(range(space), hp.num_train + hp.num_val)):
            if hp.task == "addition":
                ids, labels = addition_row(code // 10**hp.digits, code % 10**hp.digits, hp.digits)
            else:
                ids, labels = parity_row([(code >> bit) & 1 for bit in range(hp.digits)])
            self.rows.append({"input_ids": ids, "labels": labels, "index": index})

    def _loader(self, rows: list[dict], batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(rows, batch_size=batch_size, shuffle=shuffle, collate_fn=CausalLMCollator(pad_token_id=PAD))

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.rows[: self.hparams.num_train], self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.rows[self.hparams.num_train:], self.eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.rows[: self.hparams.num_train], self.eval_batch_size, shuffle=False)

    def query_dataloader(self) -> DataLoader:
        return self.val_dataloader()
