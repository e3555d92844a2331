"""Kronecker-structured random projections of per-example gradients of linear layers (LoGra-style).

For a layer ``y = W a (+ b)`` with seeded ``P_in (k_in × in)`` and ``P_out (k_out × out)``, an example's
projected gradient is ``Σ_t (P_out g_t)(P_in a_t)ᵀ = P_out DW P_inᵀ`` (``k_out × k_in``), computed from
the projected activations and output gradients: the ``out × in`` gradient is never formed. The rows of
each ``P`` are orthonormal, scaled by ``sqrt(d / k)``, so ``E[Pᵀ P] = I`` (inner products of projected
gradients are unbiased) and at full size (``k = d``) ``P`` is orthogonal (inner products, and K-FAC in
the projected space, are exact).

Dividing a gradient elementwise by Adam's ``sqrt(v̂) + ε`` (LESS, TrackStar) does not commute with the
Kronecker-factored contraction: ``P_out (DW ⊘ S) P_inᵀ`` cannot be formed from ``P a`` and ``P g``
unless ``S`` has rank one. :meth:`ProjectedGradients.add` with a ``denominator`` therefore forms each
example's ``DW`` of that layer (a few examples at a time), divides it exactly, then projects it.
"""

from __future__ import annotations

import zlib

import torch

from lit_attrib.layers import LayerInfo
from lit_attrib.ops.gradients import layer_inputs

__all__ = ["ProjectedGradients", "projection_matrix"]


def projection_matrix(seed: int, name: str, side: str, rows: int, columns: int,
                      dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """``P (rows × columns)``, orthonormal rows scaled by ``sqrt(columns / rows)``, from ``seed``, the layer's
    ``name`` and the ``side`` (``in``/``out``) alone: the same on every process and every run."""
    if not 1 <= rows <= columns:
        raise ValueError(f"a projection of {name} ({side}) must keep between 1 and {columns} dimensions; got {rows}")
    generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}:{side}".encode()))
    gaussian = torch.randn(columns, rows, generator=generator, dtype=torch.float64)
    orthonormal, upper = torch.linalg.qr(gaussian)  # (columns, rows), orthonormal columns
    orthonormal = orthonormal * torch.sign(torch.diagonal(upper))  # a unique QR: the distribution is Haar
    return (orthonormal.T * (columns / rows) ** 0.5).to(dtype=dtype, device=device).contiguous()


class ProjectedGradients:
    """Each example's projected gradient ``P_out DW P_inᵀ`` of every tracked layer, flattened into one row,
    and (optionally) the K-FAC sums of the projected activations and gradients.

    Interface of every accumulator: :meth:`begin_batch`; :meth:`add` one use of one layer; :meth:`end_batch`
    (the batch's rows); :meth:`take_sums` the curvature sums since the last call (kept or dropped with the rows;
    the callback sums them across batches, parts and processes).

    Args:
        layers: the tracked layers, by name (the row's blocks follow this order).
        sizes: each layer's ``(k_out, k_in)``; ``k_in`` counts the bias column of a layer with a bias.
        seed: the projections' seed.
        dtype: dtype of the projections and rows.
        device: where they live.
        curvature: also accumulate ``Σ (P a)(P a)ᵀ`` and ``Σ (P g)(P g)ᵀ`` over the real tokens.
    """

    def __init__(self, layers: dict[str, LayerInfo], sizes: dict[str, tuple[int, int]], seed: int = 0,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", curvature: bool = True) -> None:
        self.layers, self.sizes, self.seed, self.dtype = layers, sizes, seed, dtype
        self.device = torch.device(device)
        self.curvature = curvature
        self.projections = {
            name: (projection_matrix(seed, name, "out", sizes[name][0], layer.gradient_shape[0], dtype, device),
                   projection_matrix(seed, name, "in", sizes[name][1], layer.gradient_shape[1], dtype, device))
            for name, layer in layers.items()
        }
        self.sums: dict[str, dict[str, torch.Tensor]] = {name: {} for name in layers}
        self._batch: dict[str, torch.Tensor] = {}
        self._size = 0
        self._mask: torch.Tensor | None = None
        self._scale = 1.0

    @property
    def width(self) -> int:
        """The length of a row: ``Σ k_out · k_in`` over the layers."""
        return sum(k_out * k_in for k_out, k_in in self.sizes.values())

    def begin_batch(self, size: int, mask: torch.Tensor | None = None, gradient_scale: float = 1.0) -> None:
        """Start a batch of ``size`` examples; ``mask (B, T)`` marks the real tokens (curvature sums only);
        ``gradient_scale`` turns the observed output gradients into those of each example's summed loss."""
        self._batch, self._size, self._scale = {}, size, gradient_scale
        self._mask = None if mask is None else mask.reshape(-1).to(self.device, torch.bool)

    def add(self, layer: LayerInfo, activations: torch.Tensor, gradients: torch.Tensor,
            denominator: torch.Tensor | None = None) -> None:
        """Add one use of ``layer``: ``a (B, T, in)`` as it entered the layer, ``g (B, T, out)``.

        With ``denominator (out, in + bias)`` (Adam's ``sqrt(v̂) + ε``) the row holds
        ``P_out (DW ⊘ denominator) P_inᵀ``: exact, at the cost of forming ``DW`` per example.
        """
        a, g = layer_inputs(layer, activations, gradients, self.dtype)
        if a.shape[0] != self._size:
            raise ValueError(f"{layer.name}: a use with {a.shape[0]} rows in a batch of {self._size} examples; "
                             f"per-example gradients need the batch on the first axis")
        p_out, p_in = self.projections[layer.name]
        if denominator is not None:
            if self.curvature:
                raise ValueError("the projected curvature is of unnormalised gradients: a denominator needs "
                                 "curvature=False")
            block = _normalised_block(g, a, denominator.to(self.device, self.dtype), p_out, p_in)
            if self._scale != 1.0:
                block = block.mul_(self._scale)  # after the projection, as below: k_out × k_in, not T × out
            held = self._batch.get(layer.name)
            self._batch[layer.name] = block if held is None else held.add_(block)
            return
        projected_a = a @ p_in.T  # (B, T, k_in)
        projected_g = g @ p_out.T  # (B, T, k_out)
        if self._scale != 1.0:
            projected_g = projected_g.mul_(self._scale)  # after the projection: k_out columns, not out
        block = projected_g.mT @ projected_a  # (B, k_out, k_in)
        held = self._batch.get(layer.name)
        self._batch[layer.name] = block if held is None else held.add_(block)
        if self.curvature:
            rows_a, rows_g = projected_a.flatten(0, 1), projected_g.flatten(0, 1)
            if self._mask is not None and self._mask.shape[0] == rows_a.shape[0]:
                rows_a, rows_g = rows_a[self._mask], rows_g[self._mask]
            sums = self.sums[layer.name]
            sums["activation"] = sums.get("activation", 0) + rows_a.T @ rows_a
            sums["gradient"] = sums.get("gradient", 0) + rows_g.T @ rows_g
            sums["tokens"] = sums.get("tokens", 0) + rows_a.shape[0]

    def end_batch(self, layer_scales: dict[str, float] | None = None) -> torch.Tensor:
        """The batch's rows ``(B, width)``: each layer's block flattened, in layer order (zeros for a layer
        the loss did not reach), multiplied by its ``layer_scales`` entry (a learning rate) where given."""
        blocks = []
        for name in self.layers:
            block = self._batch.get(name)
            if block is None:
                block = torch.zeros(self._size, *self.sizes[name], dtype=self.dtype, device=self.device)
            elif layer_scales is not None:
                block = block.mul_(layer_scales[name])  # the batch's own block, dropped right after
            blocks.append(block.flatten(1))
        self._batch = {}
        return torch.cat(blocks, dim=1)

    def take_sums(self) -> dict[str, torch.Tensor]:
        """The curvature sums since the last call, flat (``<layer>.activation``, ``<layer>.gradient``,
        ``<layer>.tokens``), and start them afresh: a batch's sums, kept or dropped with its rows."""
        flat = {}
        for name, sums in self.sums.items():
            if "activation" in sums:
                flat[f"{name}.activation"] = sums["activation"]
                flat[f"{name}.gradient"] = sums["gradient"]
                flat[f"{name}.tokens"] = torch.tensor(int(sums["tokens"]), dtype=torch.int64)
        self.sums = {name: {} for name in self.layers}
        return flat



def _normalised_block(g: torch.Tensor, a: torch.Tensor, denominator: torch.Tensor, p_out: torch.Tensor,
                      p_in: torch.Tensor, max_elements: int = 1 << 24) -> torch.Tensor:
    """``P_out (DW_b ⊘ denominator) P_inᵀ`` of every example ``b``, ``(B, k_out, k_in)``, with
    ``DW_b = Σ_t g_bt a_btᵀ`` formed for a few examples at a time (at most ``max_elements`` entries)."""
    if tuple(denominator.shape) != (g.shape[-1], a.shape[-1]):
        raise ValueError(f"a denominator of shape {tuple(denominator.shape)} for gradients of shape "
                         f"{(g.shape[-1], a.shape[-1])}")
    chunk = max(1, max_elements // denominator.numel())
    blocks = []
    for start in range(0, g.shape[0], chunk):
        gradient = g[start:start + chunk].mT @ a[start:start + chunk]  # (b, out, in)
        blocks.append(p_out @ gradient.div_(denominator) @ p_in.T)  # (b, k_out, k_in)
    return torch.cat(blocks)
