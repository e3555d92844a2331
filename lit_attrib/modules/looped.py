"""LoopedTransformerModule: one weight-tied transformer block applied ``n_loops`` times (seed 001).

``h_0 = 0``; ``h_{s+1} = Block(h_s + e)`` for ``s = 0 .. n_loops − 1`` with ``e`` the embedded input
(input injection); logits ``= head(norm(h_S))``. Every linear layer of the block is called once per
loop, so lit_attrib's layer tracking sees ``n_loops`` uses of each: the steps of step-decomposed
influence. The embedding and the readout are used once per forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn

from lit_attrib.errors import ConfigError
from lit_attrib.ops.loss import loss_mask, token_nll

__all__ = ["LoopedTransformerModule"]


class Block(nn.Module):
    """Pre-norm causal self-attention and MLP with explicit ``nn.Linear`` projections."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.attn_norm = nn.LayerNorm(d_model)
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.o_proj = nn.Linear(d_model, d_model)
        self.mlp_norm = nn.LayerNorm(d_model)
        self.up_proj = nn.Linear(d_model, d_ff)
        self.down_proj = nn.Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        batch, length, width = x.shape
        h = self.attn_norm(x)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, length, self.n_heads, width // self.n_heads).transpose(1, 2)

        q, k, v = heads(self.q_proj(h)), heads(self.k_proj(h)), heads(self.v_proj(h))
        mask = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
        if attention_mask is not None:  # padding keys are never attended to
            mask = mask & attention_mask[:, None, None, :].bool()
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.o_proj(attended.transpose(1, 2).reshape(batch, length, width))
        return x + self.down_proj(F.gelu(self.up_proj(self.mlp_norm(x))))


class LoopedTransformerModule(LightningModule):
    """A looped (weight-tied) causal transformer, trained with token-mean NLL on the label tokens.

    The same per-example contract as ``CausalLMModule``: :meth:`per_token_loss` ``(B, T)`` and
    :meth:`per_example_loss` ``(B,)`` (summed); ``loss_reduction = "token_mean"``.

    Args:
        vocab_size: number of token ids.
        d_model: width of the residual stream.
        n_heads: attention heads (must divide ``d_model``).
        d_ff: hidden width of the MLP.
        n_loops: times the block is applied per forward (the steps of SDI).
        max_length: longest input (learned position embeddings).
        learning_rate: AdamW learning rate (constant after a linear warmup).
        weight_decay: AdamW weight decay.
        warmup_steps: linear warmup, in optimizer steps.
        init_seed: seed of the initial weights.
    """

    loss_reduction = "token_mean"

    def __init__(self, vocab_size: int, d_model: int = 64, n_heads: int = 4, d_ff: int = 128, n_loops: int = 4,
                 max_length: int = 64, learning_rate: float = 1e-3, weight_decay: float = 0.0, warmup_steps: int = 0,
                 init_seed: int = 0) -> None:
        super().__init__()
        problems = []
        if d_model % n_heads:
            problems.append(f"n_heads={n_heads} must divide d_model={d_model}")
        if n_loops < 1:
            problems.append(f"n_loops must be at least 1; got {n_loops}")
        if problems:
            raise ConfigError("invalid LoopedTransformerModule arguments:\n  - " + "\n  - ".join(problems))
        self.save_hyperparameters()
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(init_seed)
        self.embed = nn.Embedding(vocab_size, d_model)
        self.position = nn.Embedding(max_length, d_model)
        self.block = Block(d_model, n_heads, d_ff)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        torch.random.set_rng_state(generator_state)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        length = input_ids.shape[1]
        if length > self.hparams.max_length:
            raise ValueError(f"input of {length} tokens is longer than max_length={self.hparams.max_length}")
        positions = torch.arange(length, device=input_ids.device).expand_as(input_ids)  # per example: its hooks
        injected = self.embed(input_ids) + self.position(positions)  # then see per-example gradients
        h = torch.zeros_like(injected)
        for _ in range(self.hparams.n_loops):
            h = self.block(h + injected, attention_mask)
        return self.head(self.norm(h))

    def per_token_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return token_nll(self(batch["input_ids"], batch.get("attention_mask")), batch["labels"])

    def per_example_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.per_token_loss(batch).sum(-1)

    def _mean_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.per_token_loss(batch).sum() / loss_mask(batch["labels"]).sum().clamp(min=1)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._mean_loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self(batch["input_ids"], batch.get("attention_mask"))
        loss = token_nll(logits, batch["labels"]).sum() / loss_mask(batch["labels"]).sum().clamp(min=1)
        # Exact match of the whole answer under teacher forcing: every label token is the argmax.
        predicted = F.pad(logits[:, :-1].argmax(-1), (1, 0))
        mask = loss_mask(batch["labels"])
        exact = ((predicted == batch["labels"]) | ~mask).all(-1).float().mean()
        size = batch["input_ids"].shape[0]
        self.log("val/loss", loss, prog_bar=True, batch_size=size)
        self.log("val/exact_match", exact, prog_bar=True, batch_size=size)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        return None  # analysis passes: the callbacks do the work

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.AdamW(self.parameters(), lr=hp.learning_rate, weight_decay=hp.weight_decay)
        warmup = max(1, hp.warmup_steps)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
