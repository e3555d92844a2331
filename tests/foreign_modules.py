"""Four LightningModules written the way people write them, none of which knows about lit_attrib.

- ``demo``: Lightning's own demo, :class:`lightning.pytorch.demos.LightningTransformer` (an
  encoder-decoder ``nn.Transformer``), made tiny, fed ``(inputs, target)`` tuples cut from a token
  stream, trained on a token-mean ``F.nll_loss``. Its ``nn.MultiheadAttention.out_proj`` layers are
  never called through their ``forward`` (the attention reads their weights directly).
- ``nanogpt``: a nanoGPT-style GPT (``wte`` tied to ``lm_head``, learned ``wpe``, two blocks of
  LayerNorm / causal self-attention ``c_attn``+``c_proj`` / MLP ``c_fc``+``c_proj``), ``(x, y)``
  tuples with ``y`` already shifted and ``-1`` where there is no target, token-mean cross entropy.
- ``llama_labels``: ``transformers.LlamaForCausalLM`` inside a user's module, dict batches
  ``input_ids`` / ``attention_mask`` / ``labels`` (unshifted, ``-100`` on the prompt and padding),
  ``training_step`` returns ``self.model(**batch).loss``.
- ``llama_nolabels``: the same model fed ``input_ids`` / ``attention_mask`` only; the module takes a
  token-mean cross entropy of ``logits[:, :-1]`` against ``input_ids[:, 1:]`` where attended.

Each comes with its data and with the **glue** a user would write for lit_attrib: each example's
summed loss ``loss_fn(module, batch) -> (B,)``, each token's loss ``token_loss_fn(module, batch) ->
(B, T)`` (0 where none is taken), which tokens carry a loss (``token_mask``), which input tokens are
real (``padding_mask``) and where a batch keeps its example ids (``example_ids``). The references in
``foreign_references.py`` use this glue; lit_attrib must need none of it for the two Llama modules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.demos import LightningTransformer
from lightning.pytorch.demos.transformer import Transformer
from torch import nn
from torch.utils.data import DataLoader, Dataset

VOCAB = 13
IGNORE = -100  # Hugging Face's "no loss" label
NANOGPT_IGNORE = -1  # nanoGPT's ignore_index


# =============================================================================== (a) the demo
class DemoTransformer(LightningTransformer):
    """Lightning's demo transformer, tiny: ``training_step`` and ``forward`` are the demo's own."""

    def __init__(self, vocab_size: int = VOCAB, lr: float = 0.0, seed: int = 0, double: bool = True) -> None:
        super().__init__(vocab_size=vocab_size)
        torch.manual_seed(seed)
        self.model = Transformer(vocab_size=vocab_size, ninp=16, nhead=2, nhid=32, nlayers=1, dropout=0.0)
        self.model.pos_encoder.dropout.p = 0.0
        self.lr = lr
        if double:
            self.double()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.model.parameters(), lr=self.lr)

    def prepare_data(self) -> None:
        """The demo downloads WikiText2 here; the tests bring their own token stream (and run offline)."""


class TokenStream(Dataset):
    """The demo's WikiText2 layout over a random token stream: ``(data[i:i+T], data[i+1:i+T+1])``.

    With ``with_ids`` each item also carries its index: ``(inputs, target, index)``.
    """

    def __init__(self, count: int, block_size: int = 5, vocab: int = VOCAB, seed: int = 0, with_ids: bool = False,
                 offset: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.data = torch.randint(0, vocab, (count * block_size + 1,), generator=generator)
        self.count, self.block_size, self.with_ids, self.offset = count, block_size, with_ids, offset

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int):
        start = index * self.block_size
        inputs = self.data[start:start + self.block_size]
        target = self.data[start + 1:start + self.block_size + 1]
        return (inputs, target, torch.tensor(index + self.offset)) if self.with_ids else (inputs, target)


def demo_token_loss(module: DemoTransformer, batch) -> torch.Tensor:
    """``(B, T)``: the demo's NLL of each target token (every position has one)."""
    inputs, target = batch[0], batch[1]
    log_probs = module(inputs, target).view(*target.shape, -1)  # (B, T, V): the demo returns (B·T, V)
    return -log_probs.gather(-1, target.unsqueeze(-1)).squeeze(-1)


def demo_loss(module: DemoTransformer, batch) -> torch.Tensor:
    return demo_token_loss(module, batch).sum(-1)


def all_tokens(batch) -> torch.Tensor:
    return torch.ones_like(batch[1], dtype=torch.bool)


def tuple_ids(batch) -> torch.Tensor | None:
    return batch[2] if len(batch) > 2 else None


# ============================================================================== (b) nanoGPT
class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.n_head, self.n_embd = n_head, n_embd

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, n_embd: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab_size: int = VOCAB, block_size: int = 16, n_layer: int = 2, n_head: int = 2,
                 n_embd: int = 8) -> None:
        super().__init__()
        self.block_size = block_size
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(vocab_size, n_embd),
            "wpe": nn.Embedding(block_size, n_embd),
            "h": nn.ModuleList([Block(n_embd, n_head) for _ in range(n_layer)]),
            "ln_f": nn.LayerNorm(n_embd),
        })
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.2)
            if module.bias is not None:
                torch.nn.init.normal_(module.bias, mean=0.0, std=0.05)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.2)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        _, t = idx.size()
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)  # (t,)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=NANOGPT_IGNORE)
        return logits, loss


class NanoGPTModule(LightningModule):
    def __init__(self, lr: float = 0.0, seed: int = 0, double: bool = True) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.gpt = GPT()
        self.lr = lr
        if double:
            self.double()

    def forward(self, idx, targets=None):
        return self.gpt(idx, targets)

    def training_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        _, loss = self(x, y)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class ShiftedRows(Dataset):
    """Rows of 4..8 random tokens as nanoGPT trains on them: ``x = row[:-1]``, ``y = row[1:]``, padded
    to ``T`` (``x`` with 0, ``y`` with -1). With ``with_ids``: ``(x, y, index)``."""

    def __init__(self, count: int, length: int = 7, vocab: int = VOCAB, seed: int = 0, with_ids: bool = False,
                 offset: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.items = []
        for _ in range(count):
            size = int(torch.randint(4, length + 2, (1,), generator=generator))
            row = torch.randint(0, vocab, (size,), generator=generator)
            x = torch.zeros(length, dtype=torch.long)
            y = torch.full((length,), NANOGPT_IGNORE, dtype=torch.long)
            x[:size - 1], y[:size - 1] = row[:-1], row[1:]
            self.items.append((x, y))
        self.with_ids, self.offset = with_ids, offset

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        x, y = self.items[index]
        return (x, y, torch.tensor(index + self.offset)) if self.with_ids else (x, y)


def gpt_token_loss(module: NanoGPTModule, batch) -> torch.Tensor:
    x, y = batch[0], batch[1]
    logits, _ = module(x)  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=NANOGPT_IGNORE,
                           reduction="none").view_as(y)


def gpt_loss(module: NanoGPTModule, batch) -> torch.Tensor:
    return gpt_token_loss(module, batch).sum(-1)


def gpt_targets(batch) -> torch.Tensor:
    return batch[1] != NANOGPT_IGNORE


# ============================================================================= (c), (d) Llama
def tiny_llama(vocab_size: int = VOCAB):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=64,
                         initializer_range=0.2)
    return LlamaForCausalLM(config)


class LlamaWithoutForward(LightningModule):
    """A user's module around an HF Llama; batches carry ``labels``; HF shifts and takes the mean.
    No ``forward`` (Lightning's ``predict`` refuses such a module unless something lends it a step)."""

    def __init__(self, lr: float = 0.0, seed: int = 0, double: bool = True) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.model = tiny_llama()
        self.lr = lr
        if double:
            self.double()

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class LlamaLabelsModule(LlamaWithoutForward):
    """The same with the usual ``forward(**batch)`` (which Lightning's default ``predict_step``, calling
    ``self(batch)`` with the dict as one positional argument, cannot use)."""

    def forward(self, **batch):
        return self.model(**batch)


class LlamaNoLabelsModule(LlamaLabelsModule):
    """The same model without ``labels``: the module shifts ``input_ids`` itself, over attended tokens."""

    def training_step(self, batch, batch_idx):
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        keep = batch["attention_mask"][:, 1:].bool()
        return F.cross_entropy(logits[:, :-1][keep], batch["input_ids"][:, 1:][keep])


class TokenRows(Dataset):
    """Rows of 3..8 random tokens (ids 1..V-1), the first 1..2 a prompt without loss."""

    def __init__(self, count: int, vocab: int = VOCAB, seed: int = 0, with_ids: bool = False, offset: int = 0,
                 labels: bool = True) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.rows = []
        for index in range(count):
            size = int(torch.randint(3, 9, (1,), generator=generator))
            prompt = int(torch.randint(1, 3, (1,), generator=generator))
            ids = torch.randint(1, vocab, (size,), generator=generator)
            row = {"input_ids": ids}
            if labels:
                row["labels"] = torch.cat([torch.full((prompt,), IGNORE), ids[prompt:]])
            if with_ids:
                row["index"] = index + offset
            self.rows.append(row)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return self.rows[index]


def pad_collate(rows: list[dict]) -> dict:
    """Right padding to the longest row: ``input_ids`` 0, ``attention_mask`` 0, ``labels`` -100."""
    length = max(len(r["input_ids"]) for r in rows)
    batch = {"input_ids": torch.zeros(len(rows), length, dtype=torch.long),
             "attention_mask": torch.zeros(len(rows), length, dtype=torch.long)}
    if "labels" in rows[0]:
        batch["labels"] = torch.full((len(rows), length), IGNORE, dtype=torch.long)
    for b, row in enumerate(rows):
        n = len(row["input_ids"])
        batch["input_ids"][b, :n] = row["input_ids"]
        batch["attention_mask"][b, :n] = 1
        if "labels" in row:
            batch["labels"][b, :n] = row["labels"]
    if "index" in rows[0]:
        batch["index"] = torch.tensor([r["index"] for r in rows])
    return batch


def hf_labels(batch: dict) -> torch.Tensor:
    """Unshifted labels: the batch's, else ``input_ids`` where attended."""
    if "labels" in batch:
        return batch["labels"]
    return batch["input_ids"].masked_fill(~batch["attention_mask"].bool(), IGNORE)


def llama_token_loss(module: LlamaLabelsModule, batch: dict) -> torch.Tensor:
    """``(B, T)``: position ``t`` holds the NLL of label ``t`` (predicted from tokens before it); 0 at
    position 0 and wherever the label is -100."""
    logits = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = hf_labels(batch)
    B, T, V = logits.shape
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=IGNORE,
                          reduction="none").view(B, T - 1)
    return F.pad(nll, (1, 0))


def llama_loss(module: LlamaLabelsModule, batch: dict) -> torch.Tensor:
    return llama_token_loss(module, batch).sum(-1)


def llama_targets(batch: dict) -> torch.Tensor:
    mask = hf_labels(batch) != IGNORE
    mask[:, 0] = False
    return mask


def attended(batch: dict) -> torch.Tensor:
    return batch["attention_mask"].bool()


def dict_ids(batch: dict) -> torch.Tensor | None:
    return batch.get("index")


# ================================================================================= the catalogue
@dataclass
class Foreign:
    """One foreign module with its data and glue.

    ``layers`` are the nn.Linear layers the tests track (called through ``forward``, untied);
    ``patterns`` select exactly them.
    """

    name: str
    make: Callable[..., LightningModule]
    dataset: Callable[..., Dataset]
    collate: Callable | None
    loss_fn: Callable
    token_loss_fn: Callable
    token_mask: Callable  # the tokens that carry a loss, aligned with token_loss_fn
    padding_mask: Callable  # the real input tokens (curvature expectations run over these)
    example_ids: Callable
    layers: list[str]
    hf: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def patterns(self) -> list[str]:
        return list(self.layers)

    def loader(self, dataset: Dataset, batch_size: int = 7, shuffle: bool = False, seed: int = 0) -> DataLoader:
        generator = torch.Generator().manual_seed(seed) if shuffle else None
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=self.collate,
                          generator=generator)

    def examples(self, dataset: Dataset) -> list:
        """Each example of ``dataset`` as a batch of one (in index order)."""
        return [next(iter(DataLoader(torch.utils.data.Subset(dataset, [i]), batch_size=1, collate_fn=self.collate)))
                for i in range(len(dataset))]


def _demo_layers() -> list[str]:
    return ["model.transformer.encoder.layers.0.linear1", "model.transformer.encoder.layers.0.linear2",
            "model.transformer.decoder.layers.0.linear1", "model.transformer.decoder.layers.0.linear2",
            "model.decoder"]


FOREIGN = {
    "demo": Foreign("demo", DemoTransformer, TokenStream, None, demo_loss, demo_token_loss, all_tokens, all_tokens,
                    tuple_ids, _demo_layers()),
    "nanogpt": Foreign("nanogpt", NanoGPTModule, ShiftedRows, None, gpt_loss, gpt_token_loss, gpt_targets,
                       gpt_targets, tuple_ids,
                       [f"gpt.transformer.h.{i}.{part}" for i in range(2)
                        for part in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]),
    "llama_labels": Foreign("llama_labels", LlamaLabelsModule, TokenRows, pad_collate, llama_loss, llama_token_loss,
                            llama_targets, attended, dict_ids,
                            [f"model.model.layers.0.{p}" for p in ("self_attn.q_proj", "self_attn.k_proj",
                                                                   "self_attn.v_proj", "self_attn.o_proj",
                                                                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
                            + ["model.lm_head"], hf=True),
}
FOREIGN["llama_nolabels"] = Foreign(
    "llama_nolabels", LlamaNoLabelsModule, lambda *a, **k: TokenRows(*a, **{**k, "labels": False}), pad_collate,
    llama_loss, llama_token_loss, llama_targets, attended, dict_ids, FOREIGN["llama_labels"].layers, hf=True)


def foreign_task(spec: Foreign, style: str = "subclass"):
    """The glue as a :class:`lit_attrib.engine.Task` (imported here: the modules above do not need lit_attrib).

    ``style="functions"`` builds it from the functions (``example_ids`` then returns ``None`` for
    batches without ids); ``"subclass"`` overrides the methods, as a user subclassing ``Task`` would.
    """
    from lit_attrib.engine import Task

    functions = {"loss_fn": spec.loss_fn, "token_loss_fn": spec.token_loss_fn, "token_mask": spec.token_mask,
                 "padding_mask": spec.padding_mask}
    if style == "functions":
        return Task(example_ids=spec.example_ids, **functions)

    class ForeignTask(Task):
        def example_ids(self, batch):
            ids = spec.example_ids(batch)
            return None if ids is None else torch.as_tensor(ids).long().reshape(-1)

    ForeignTask.__qualname__ = ForeignTask.__name__ = f"{spec.name}_task"
    return ForeignTask(**functions)


def perturbed(module: nn.Module, scale: float = 0.1, seed: int = 1) -> dict[str, torch.Tensor]:
    """A state dict of ``module`` with every floating tensor moved by seeded noise (a "later checkpoint")."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in module.state_dict().items():
        if value.is_floating_point():
            noise = torch.randn(value.shape, generator=generator, dtype=torch.float64).to(value.dtype)
            value = value + scale * noise * value.abs().mean().clamp(min=1e-3)
        out[key] = value.clone()
    # tied weights (nanoGPT's wte / lm_head) must stay tied
    if "gpt.lm_head.weight" in out:
        out["gpt.transformer.wte.weight"] = out["gpt.lm_head.weight"]
    return out


__all__ = ["FOREIGN", "VOCAB", "Foreign", "foreign_task", "perturbed"]
