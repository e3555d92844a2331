"""AttentionAllocation: where attention mass goes, summed over a pass (seed 004's allocation ratios).

For every captured layer and head, the accumulator sums the mass that the selected query positions
put on each class of key tokens (e.g. other / math / noise), in three parts: the signed mass, the
positive part's and the negative part's (:func:`lit_attrib.ops.attention.class_mass`). Plain
float64 tensors and no Lightning, so that a callback can sum them across processes and save them
in a checkpoint; the shares (each class's part of the total) are taken only when read.

Per batch: :meth:`AttentionAllocation.begin_batch`, one :meth:`AttentionAllocation.add` per layer
and example, :meth:`AttentionAllocation.end_batch`; at the end of the pass
:meth:`AttentionAllocation.reduce` with a sum over processes, then :meth:`AttentionAllocation.shares`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lit_attrib.ops.attention import class_mass

__all__ = ["PARTS", "AttentionAllocation", "shares"]

PARTS = ("signed", "positive", "negative")
"""The parts of the mass, in the order of the first dimension of :attr:`AttentionAllocation.mass`."""


def shares(mass: torch.Tensor) -> torch.Tensor:
    """Each class's share of the total over the last dimension; NaN where the total is 0.

    A signed total is ``(1 − λ)`` per query of a differential map and may be negative (λ > 1): the
    shares still sum to 1.
    """
    total = mass.sum(-1, keepdim=True)
    safe = torch.where(total == 0, torch.ones_like(total), total)
    return torch.where(total != 0, mass / safe, torch.nan)


class AttentionAllocation:
    """Sums of attention mass on classes of key tokens, per layer, head and part, and query counts.

    ``mass`` is ``(3, layers, heads, classes)`` float64 (parts as in :data:`PARTS`), ``queries`` is
    ``(layers,)``: how many query rows each layer's sums hold. Layers are numbered ``0..layers-1`` in
    the order the caller chose (positions, not the model's layer indices).

    Args:
        num_layers: how many layers are captured.
        num_heads: how many heads per layer (differential heads for a differential model).
        num_classes: how many classes of key tokens.

    Example::

        allocation = AttentionAllocation(num_layers=2, num_heads=4, num_classes=3)
        allocation.begin_batch()
        allocation.add(0, maps, key_class)  # maps (4, queries, S), key_class (S,)
        allocation.end_batch()
        allocation.reduce(lambda t: t)  # a sum over processes in a distributed run
        ratios = allocation.shares()  # (3, 2, 4, 3): each part's shares sum to 1 per layer and head
    """

    def __init__(self, num_layers: int, num_heads: int, num_classes: int) -> None:
        if min(num_layers, num_heads, num_classes) < 1:
            raise ValueError(f"AttentionAllocation needs at least one layer, head and class; got {num_layers} "
                             f"layers, {num_heads} heads, {num_classes} classes")
        self.mass = torch.zeros(len(PARTS), num_layers, num_heads, num_classes, dtype=torch.float64)
        self.queries = torch.zeros(num_layers, dtype=torch.float64)
        self._in_batch = False

    @property
    def num_classes(self) -> int:
        return self.mass.shape[-1]

    def begin_batch(self) -> None:
        """Open a batch: :meth:`add` is accepted until :meth:`end_batch`."""
        self._in_batch = True

    def add(self, layer: int, maps: torch.Tensor, key_class: torch.Tensor) -> None:
        """Add the mass of one example's maps of one layer.

        Args:
            layer: position of the layer, in ``[0, num_layers)``.
            maps: ``(heads, queries, S)`` attention maps of the selected query rows (signed for a
                differential map).
            key_class: ``(S,)`` class of every key, in ``[0, num_classes)`` or ``-1`` (counts for nothing).
        """
        if not self._in_batch:
            raise RuntimeError("AttentionAllocation.add outside a batch: call begin_batch() first")
        expected = self.mass.shape[2]
        if maps.dim() != 3 or maps.shape[0] != expected or key_class.shape != maps.shape[-1:]:
            raise ValueError(f"expected maps (heads={expected}, queries, S) and key_class (S,); got maps "
                             f"{tuple(maps.shape)} and key_class {tuple(key_class.shape)}")
        mass = class_mass(maps, key_class, self.num_classes)  # (3, heads, queries, classes)
        self.mass[:, layer] += mass.sum(-2).cpu()
        self.queries[layer] += maps.shape[-2]

    def end_batch(self) -> None:
        """Close the batch opened by :meth:`begin_batch`."""
        self._in_batch = False

    def reduce(self, reduce_fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace the sums by ``reduce_fn`` of them (a sum over processes)."""
        self.mass = reduce_fn(self.mass)
        self.queries = reduce_fn(self.queries)

    def shares(self) -> torch.Tensor:
        """``(3, layers, heads, classes)``: each class's share of a part's mass (NaN where a part has none)."""
        return shares(self.mass)

    def pooled_shares(self) -> torch.Tensor:
        """``(3, layers, classes)``: the shares of the mass of all heads of a layer together."""
        return shares(self.mass.sum(2))

    def state_dict(self) -> dict:
        return {"mass": self.mass.clone(), "queries": self.queries.clone()}

    def load_state_dict(self, state: dict) -> None:
        mass = state.get("mass", self.mass)
        queries = state.get("queries", self.queries)
        if mass.shape != self.mass.shape or queries.shape != self.queries.shape:
            raise ValueError(f"the saved allocation has mass {tuple(mass.shape)} and queries {tuple(queries.shape)}; "
                             f"this one expects {tuple(self.mass.shape)} and {tuple(self.queries.shape)} (same "
                             f"layers, heads and classes)")
        self.mass = mass.to(torch.float64).clone()
        self.queries = queries.to(torch.float64).clone()
