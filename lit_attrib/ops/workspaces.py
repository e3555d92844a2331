"""Buffers reused across layers and batches (see :class:`Workspaces`)."""

from __future__ import annotations

import torch

__all__ = ["Workspaces"]


class Workspaces:
    """``(B, out, in)`` buffers kept across layers and batches, one per layer shape.

    A pass that makes one such temporary per layer, freed between long-lived tensors allocated in the
    meantime (sums, query gradients), leaves glibc's heap fragmented: the resident set grew by one buffer
    per MLP layer and batch on SmolLM2. Reusing one buffer per shape avoids it.
    """

    def __init__(self) -> None:
        self._held: dict[tuple, torch.Tensor] = {}

    def get(self, size: int, shape: tuple[int, int], like: torch.Tensor, slot: int = 0) -> torch.Tensor:
        """A ``(size, *shape)`` buffer with ``like``'s dtype and device (contents undefined); ``slot`` tells
        apart buffers of one shape that are in use at the same time."""
        key = (*shape, slot)
        held = self._held.get(key)
        if held is None or held.shape[0] < size or held.dtype != like.dtype or held.device != like.device:
            held = self._held[key] = like.new_empty(size, *shape)
        return held[:size]
