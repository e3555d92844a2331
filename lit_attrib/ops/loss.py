"""Token-level negative log-likelihood of a causal LM, the loss every analysis is defined on."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["IGNORE_INDEX", "loss_mask", "token_nll"]

IGNORE_INDEX = -100
"""Label value of tokens that carry no loss (prompt and padding), as in Hugging Face and PyTorch."""


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token NLL of next-token prediction, aligned with the label positions.

    Entry ``[b, t]`` is ``-log p(labels[b, t] | tokens[b, :t])``, computed from ``logits[b, t - 1]``.
    Position 0 has no prediction and every position whose label is ``IGNORE_INDEX`` is exactly 0, so
    ``token_nll(...).sum(-1)`` is the per-example summed loss.

    Args:
        logits: ``(B, T, V)`` next-token logits; half precision is upcast to float32, float64 is kept.
        labels: ``(B, T)`` token ids, ``IGNORE_INDEX`` where no loss is taken.

    Returns:
        ``(B, T)`` tensor, float32 (or float64 for float64 logits).

    Raises:
        ValueError: if the shapes do not line up.
    """
    if logits.ndim != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"expected logits (B, T, V) and labels (B, T) with the same B, T; "
            f"got logits {tuple(logits.shape)} and labels {tuple(labels.shape)}"
        )
    batch, length, vocab = logits.shape
    shifted_logits = logits[:, :-1]  # (B, T-1, V) predicts tokens 1..T-1
    if shifted_logits.dtype in (torch.float16, torch.bfloat16):
        shifted_logits = shifted_logits.float()
    shifted_labels = labels[:, 1:]  # (B, T-1)
    nll = F.cross_entropy(
        shifted_logits.reshape(-1, vocab), shifted_labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(batch, length - 1)
    return F.pad(nll, (1, 0))  # (B, T): position 0 carries no loss


def loss_mask(labels: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` bool mask of the positions :func:`token_nll` takes a loss at (label set, not position 0)."""
    mask = labels != IGNORE_INDEX
    mask[:, 0] = False
    return mask
