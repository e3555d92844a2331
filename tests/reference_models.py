"""A tiny network whose forward hands back every linear layer's input and output, without hooks.

It lets the tests compute K-FAC quantities with plain autograd (``torch.autograd.grad`` with respect
to recorded outputs, and per-example parameter gradients), independently of lit_attrib's hooks. It
has a layer with a bias, one without, a transformers ``Conv1D`` and a layer called three times per
forward (a looped, weight-tied block).
"""

from __future__ import annotations

import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule
from torch import nn
from torch.utils.data import DataLoader
from transformers.pytorch_utils import Conv1D

from lit_attrib.data import CausalLMCollator
from lit_attrib.ops import IGNORE_INDEX, loss_mask, token_nll

LOOPS = 3


class TinyNet(nn.Module):
    def __init__(self, vocab: int = 11, width: int = 5) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.inp = nn.Linear(width, width)  # with bias
        self.shared = nn.Linear(width, width, bias=False)  # used LOOPS times per forward
        self.conv = Conv1D(width, width)  # GPT-2 style, weight stored (in, out)
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, input_ids, attention_mask=None, record: list | None = None):
        def layer(name, module, x):
            y = module(x)
            if record is not None:
                record.append((name, x, y))
            return y

        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        h = torch.tanh(layer("inp", self.inp, self.embed(input_ids)))
        for _ in range(LOOPS):
            h = h + torch.tanh(layer("shared", self.shared, h))
        h = layer("conv", self.conv, h)
        # Causal mixing over real tokens, so that each position's gradient depends on the later ones.
        weights = mask.unsqueeze(-1).to(h.dtype)
        h = torch.cumsum(h * weights, dim=1) / torch.cumsum(weights, dim=1).clamp(min=1)
        return layer("head", self.head, h)


class TinyModule(LightningModule):
    """TinyNet as a LightningModule with lit_attrib's loss contract (token-mean training loss)."""

    loss_reduction = "token_mean"

    def __init__(self, learning_rate: float = 0.0, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = TinyNet()
        self.learning_rate = learning_rate

    def forward(self, input_ids, attention_mask=None):
        return self.net(input_ids, attention_mask)

    def per_token_loss(self, batch):
        return token_nll(self(batch["input_ids"], batch["attention_mask"]), batch["labels"])

    def per_example_loss(self, batch):
        return self.per_token_loss(batch).sum(-1)

    def training_step(self, batch, batch_idx):
        nll = token_nll(self(batch["input_ids"], batch["attention_mask"]), batch["labels"])
        return nll.sum() / loss_mask(batch["labels"]).sum()

    def validation_step(self, batch, batch_idx):
        return None

    def predict_step(self, batch, batch_idx):
        return None

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.learning_rate)


def make_rows(count: int = 24, vocab: int = 11, seed: int = 1) -> list[dict]:
    """Sequences of different lengths; the first two tokens are a 'prompt' without loss."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for index in range(count):
        length = int(torch.randint(4, 9, (1,), generator=generator))
        ids = torch.randint(0, vocab, (length,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * 2 + ids[2:], "index": index})
    return rows


class RowsDataModule(LightningDataModule):
    """The same rows for training, validation and prediction (so the stages can be compared), plus
    optional ``query``/``forget``/``retain`` loaders for the influence callbacks."""

    def __init__(self, rows: list[dict], batch_size: int = 8, shuffle: bool = False, queries: list[dict] | None = None,
                 forget: list[dict] | None = None, retain: list[dict] | None = None) -> None:
        super().__init__()
        self.rows, self.batch_size, self.shuffle = rows, batch_size, shuffle
        self.sets = {"query": queries, "forget": forget, "retain": retain}

    def _loader(self, shuffle: bool, rows: list[dict] | None = None) -> DataLoader:
        return DataLoader(self.rows if rows is None else rows, batch_size=self.batch_size, shuffle=shuffle,
                          collate_fn=CausalLMCollator(pad_token_id=0))

    def query_dataloader(self):
        return self._loader(False, self.sets["query"])

    def forget_dataloader(self):
        return self._loader(False, self.sets["forget"])

    def retain_dataloader(self):
        return self._loader(False, self.sets["retain"])

    def train_dataloader(self):
        return self._loader(self.shuffle)

    def val_dataloader(self):
        return self._loader(self.shuffle)

    def predict_dataloader(self):
        return self._loader(self.shuffle)


def _with_bias(x: torch.Tensor, bias: bool) -> torch.Tensor:
    return torch.cat([x, torch.ones(*x.shape[:-1], 1, dtype=x.dtype)], -1) if bias else x


def reference_covariances(net: TinyNet, rows: list[dict]) -> dict[str, dict]:
    """A and G by plain autograd, one unpadded example at a time: sums over every use and token."""
    bias = {"inp": True, "shared": False, "conv": True, "head": False}
    out: dict[str, dict] = {}
    for row in rows:
        ids = torch.tensor([row["input_ids"]])
        record: list = []
        logits = net(ids, record=record)
        loss = token_nll(logits, torch.tensor([row["labels"]])).sum()
        grads = torch.autograd.grad(loss, [y for _, _, y in record])
        for (name, x, _), g in zip(record, grads):
            a = _with_bias(x[0].detach(), bias[name])
            entry = out.setdefault(name, {"A": 0, "G": 0, "tokens": 0, "uses": 0})
            entry["A"] = entry["A"] + a.T @ a
            entry["G"] = entry["G"] + g[0].T @ g[0]
            entry["tokens"] += a.shape[0]
    for entry in out.values():
        entry["A"] = entry["A"] / entry["tokens"]
        entry["G"] = entry["G"] / entry["tokens"]
    return out


def reference_lambda(net: TinyNet, rows: list[dict], eigenvectors: dict[str, tuple]) -> dict[str, torch.Tensor]:
    """Λ = mean over examples of (Q_Gᵀ DW Q_A)² with DW the per-example parameter gradient from autograd."""
    layers = {"inp": net.inp, "shared": net.shared, "conv": net.conv, "head": net.head}
    sums = {name: 0 for name in layers}
    for row in rows:
        loss = token_nll(net(torch.tensor([row["input_ids"]])), torch.tensor([row["labels"]])).sum()
        for name, module in layers.items():
            params = [module.weight] + ([module.bias] if module.bias is not None else [])
            grads = torch.autograd.grad(loss, params, retain_graph=True)
            weight = grads[0].T if name == "conv" else grads[0]  # Conv1D stores (in, out)
            dw = torch.cat([weight, grads[1].unsqueeze(1)], 1) if len(grads) == 2 else weight
            q_a, q_g = eigenvectors[name]
            sums[name] = sums[name] + (q_g.T @ dw @ q_a) ** 2
    return {name: total / len(rows) for name, total in sums.items()}


class KilledRun(RuntimeError):
    """Raised by :class:`KillAtStep`: the run stops as if its process had been killed."""


class KillAtStep(Callback):
    """Stop a training run abruptly when it reaches ``step`` (checkpoints written before stay)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise KilledRun(f"killed at global step {self.step}")

