"""Per-example gradients of linear layers from their activations and output gradients.

For ``y = W a (+ b)`` the gradient of one example's summed loss is ``DW = Σ_t g_t a_tᵀ`` (bias
column appended to ``a``), summed over every use of the layer in the forward pass. It is never formed
from ``out × in`` per-token products: one batched matrix product per use.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lit_attrib.layers import LayerInfo
from lit_attrib.ops.kfac import TokenGradients, append_bias_column

__all__ = ["ExampleGradients", "layer_inputs"]


def layer_inputs(layer: LayerInfo, activations: torch.Tensor, gradients: torch.Tensor,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``a`` (bias-appended when the layer has a bias) and ``g`` of one use, ``(B, T, ·)``, in ``dtype``."""
    if activations.ndim == 2:  # (T, in): one example
        activations, gradients = activations.unsqueeze(0), gradients.unsqueeze(0)
    activations = activations.to(dtype)
    if layer.has_bias:
        activations = append_bias_column(activations)
    return activations, gradients.to(dtype)


class ExampleGradients:
    """Each tracked layer's per-example gradients over one batch, as :class:`TokenGradients` (``DW_b =
    Σ_t g_{b,t} a_{b,t}ᵀ`` kept as its tokens), or the running sum ``Σ_examples DW (out, in)``.

    Interface of every accumulator: :meth:`begin_batch`; :meth:`add` one use of one layer; :meth:`end_batch`;
    :meth:`reduce` across processes; :meth:`state_dict`. With ``per_example``, :meth:`take` hands over a
    layer's gradients as soon as its last use is in, so that a caller that processes them layer by layer
    (and drops them) never holds more than the layers whose uses are still arriving.

    Args:
        layers: the tracked layers, by name.
        dtype: the dtype of the gradients (inputs are cast to it).
        per_example: keep each example's gradient for the batch instead of adding them to the running
            sums, as :class:`TokenGradients` (every use's ``a`` and ``g`` joined along the tokens): nothing
            of size ``out × in`` per example is formed, and a caller that rotates them does so through the
            tokens (``.full()`` multiplies them out).
        device: where the sums live.
    """

    def __init__(self, layers: dict[str, LayerInfo], dtype: torch.dtype = torch.float32, per_example: bool = False,
                 device: torch.device | str = "cpu") -> None:
        self.layers = layers
        self.device = torch.device(device)
        self.dtype = dtype
        self.per_example = per_example
        self._uses: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self._taken: set[str] = set()
        self._size = 0

    def begin_batch(self, size: int) -> None:
        """Start a batch of ``size`` examples."""
        self._uses = {}
        self._taken = set()
        self._size = size

    def add(self, layer: LayerInfo, activations: torch.Tensor, gradients: torch.Tensor) -> None:
        """Add one use of ``layer``: ``a (B, T, in)`` as it entered the layer, ``g (B, T, out)`` of the summed loss."""
        a, g = layer_inputs(layer, activations, gradients, self.dtype)
        if self.per_example:
            self._uses.setdefault(layer.name, []).append((a, g))
        else:
            update = g.flatten(0, 1).T @ a.flatten(0, 1)  # (out, in): the batch's sum
            held = self.sums.get(layer.name)
            self.sums[layer.name] = update if held is None else held.add_(update)

    def take(self, name: str) -> TokenGradients:
        """With ``per_example``: layer ``name``'s gradients of this batch, handed over and no longer held (call
        it once every use of the layer is in); :meth:`end_batch` leaves it out."""
        self._taken.add(name)
        uses = self._uses.pop(name, [])
        out_features, in_features = self.layers[name].gradient_shape
        if not uses:  # no use reached: no tokens, a zero gradient
            return TokenGradients(torch.zeros(self._size, 0, in_features, dtype=self.dtype, device=self.device),
                                  torch.zeros(self._size, 0, out_features, dtype=self.dtype, device=self.device))
        if len(uses) == 1:
            return TokenGradients(*uses[0])
        return TokenGradients(torch.cat([a for a, _ in uses], 1), torch.cat([g for _, g in uses], 1))

    def end_batch(self) -> dict[str, TokenGradients]:
        """Finish the batch; with ``per_example``, the gradients of each layer (no tokens for a layer the loss
        did not reach in this batch) that were not handed over by :meth:`take`, else an empty dict."""
        self.count += self._size
        if not self.per_example:
            return {}
        batch = {name: self.take(name) for name in self.layers if name not in self._taken}
        self._uses = {}
        self._taken = set()
        return batch

    def reduce(self, reduce_fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Sum the running sums and the count over processes (every process calls this; a layer a process
        never saw contributes zeros)."""
        for name, layer in self.layers.items():
            value = self.sums.get(name)
            if value is None:
                value = torch.zeros(layer.gradient_shape, dtype=self.dtype, device=self.device)
            self.sums[name] = reduce_fn(value)
        self.count = int(reduce_fn(torch.tensor(float(self.count), dtype=torch.float64, device=self.device)))

    def state_dict(self) -> dict:
        return {"sums": {k: v.detach().to("cpu", copy=True) for k, v in self.sums.items()}, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.sums = {k: v.to(self.device) for k, v in state.get("sums", {}).items()}
        self.count = state.get("count", 0)
