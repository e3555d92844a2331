"""Running K-FAC / EKFAC sums for a set of layers: fed from hooks, normalised once at the end.

Plain tensors and counts (no Lightning), so that a callback can save them in a checkpoint, sum them
across processes, and resume. Every quantity is a sum; ``A``, ``G`` and ``Λ`` are divided by their
counts only when read.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lit_attrib.ops.kfac import (
    append_bias_column,
    covariance_sum,
    eigendecompose,
    kfac_lambda,
    rotated_per_example_gradient,
)
from lit_attrib.tracking import LayerInfo

__all__ = ["KFACAccumulator"]

_COUNT_KEYS = {"activation": "activation_tokens", "gradient": "gradient_tokens", "lambda": "lambda_examples"}


def _tokens(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``(B, T, d)`` (or ``(N, d)``) -> ``(tokens, d)`` keeping the positions where ``mask`` is set."""
    if x.ndim == 2:
        return x
    if mask is None:
        return x.reshape(-1, x.shape[-1])
    return x[mask]


class KFACAccumulator:
    """Sums of ``a aᵀ``, ``g gᵀ`` and squared rotated per-example gradients, per layer.

    Args:
        layers: the tracked layers, by name.
        dtype: accumulation dtype (float32 or float64); inputs are cast to it, so bf16 activations
            are accumulated in float32.
    """

    def __init__(self, layers: dict[str, LayerInfo], dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        self.layers = layers
        self.dtype = dtype
        self._device = torch.device(device)
        self.sums: dict[str, dict[str, torch.Tensor]] = {name: {} for name in layers}
        self.counts: dict[str, dict[str, int]] = {name: {} for name in layers}
        self.eigen: dict[str, dict[str, torch.Tensor]] = {}
        self._batch_rotated: dict[str, torch.Tensor] = {}

    # --------------------------------------------------------------------------------- updates
    def _prepare(self, layer: LayerInfo, activations: torch.Tensor) -> torch.Tensor:
        activations = activations.to(self.dtype)
        return append_bias_column(activations) if layer.has_bias else activations

    def _add(self, name: str, key: str, value: torch.Tensor, count: int, count_key: str) -> None:
        sums = self.sums[name]
        sums[key] = value if key not in sums else sums[key] + value
        self.counts[name][count_key] = self.counts[name].get(count_key, 0) + count

    def add_activations(self, layer: LayerInfo, activations: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Add ``Σ a aᵀ`` over the unmasked tokens of one use of ``layer``."""
        rows = _tokens(self._prepare(layer, activations), mask)
        self._add(layer.name, "activation", covariance_sum(rows), rows.shape[0], _COUNT_KEYS["activation"])

    def add_gradients(self, layer: LayerInfo, gradients: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Add ``Σ g gᵀ`` over the unmasked tokens (``g`` of the sum-reduced loss)."""
        rows = _tokens(gradients.to(self.dtype), mask)
        self._add(layer.name, "gradient", covariance_sum(rows), rows.shape[0], _COUNT_KEYS["gradient"])

    def add_rotated_gradient(self, layer: LayerInfo, activations: torch.Tensor, gradients: torch.Tensor,
                             mask: torch.Tensor | None) -> None:
        """Add one use's ``Q_Gᵀ DW_b Q_A`` to this batch's per-example buffer (uses add up before squaring)."""
        activations = self._prepare(layer, activations)
        gradients = gradients.to(self.dtype)
        if activations.ndim == 2:  # (N, d): one example of N tokens
            activations, gradients = activations.unsqueeze(0), gradients.unsqueeze(0)
        if mask is not None and mask.shape == activations.shape[:2]:
            activations = activations * mask.unsqueeze(-1).to(self.dtype)
        eigen = self.eigen[layer.name]
        rotated = rotated_per_example_gradient(
            activations, gradients, eigen["activation_eigenvectors"], eigen["gradient_eigenvectors"]
        )  # (B, out, in)
        buffer = self._batch_rotated.get(layer.name)
        self._batch_rotated[layer.name] = rotated if buffer is None else buffer + rotated

    def end_batch(self) -> None:
        """Square this batch's per-example rotated gradients into ``Σ (Q_Gᵀ DW Q_A)²``."""
        for name, rotated in self._batch_rotated.items():
            self._add(name, "lambda", rotated.square().sum(0), rotated.shape[0], _COUNT_KEYS["lambda"])
        self._batch_rotated.clear()

    def discard_batch(self) -> None:
        self._batch_rotated.clear()

    # ------------------------------------------------------------------------------ reading
    def reduce(self, names: list[str], keys: tuple[str, ...], reduce_fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace the sums ``keys`` of ``names`` and their counts by ``reduce_fn`` of them (a sum over processes).

        Every process must call this with the same names and keys; a layer that saw nothing here
        contributes zeros.
        """
        for name in names:
            layer = self.layers[name]
            for key in keys:
                shape = {"activation": (layer.gradient_shape[1],) * 2, "gradient": (layer.out_features,) * 2,
                         "lambda": layer.gradient_shape}[key]
                value = self.sums[name].get(key, torch.zeros(shape, dtype=self.dtype, device=self._device))
                self.sums[name][key] = reduce_fn(value)
                count = torch.tensor(float(self.counts[name].get(_COUNT_KEYS[key], 0)), dtype=torch.float64, device=self._device)
                self.counts[name][_COUNT_KEYS[key]] = int(round(float(reduce_fn(count))))

    def clear(self, names: list[str], keys: tuple[str, ...]) -> None:
        """Forget the sums ``keys`` of ``names`` and their counts."""
        for name in names:
            for key in keys:
                self.sums[name].pop(key, None)
                self.counts[name].pop(_COUNT_KEYS[key], None)

    def non_finite(self, names: list[str] | None = None) -> list[str]:
        """``layer: quantity`` of every sum holding a NaN or Inf."""
        entries = [(f"{name}: {key}", tensor) for name in (names or list(self.sums))
                   for key, tensor in sorted(self.sums[name].items())]
        if not entries:
            return []
        flags = torch.stack([tensor.isfinite().all() for _, tensor in entries]).tolist()
        return [label for (label, _), ok in zip(entries, flags) if not ok]

    def eigendecompose(self, names: list[str]) -> None:
        """Fix ``A`` and ``G`` of ``names`` (after summing across processes) and their float64 eigenbases."""
        for name in names:
            sums, counts = self.sums[name], self.counts[name]
            if "activation" not in sums or "gradient" not in sums:
                raise RuntimeError(f"layer '{name}' saw no activations or no gradients in the covariance pass")
            activation = sums["activation"].double() / max(counts["activation_tokens"], 1)
            gradient = sums["gradient"].double() / max(counts["gradient_tokens"], 1)
            activation_values, activation_vectors = eigendecompose(activation)
            gradient_values, gradient_vectors = eigendecompose(gradient)
            self.eigen[name] = {
                "activation_covariance": activation,
                "gradient_covariance": gradient,
                "activation_eigenvalues": activation_values,
                "activation_eigenvectors": activation_vectors.to(self.dtype),
                "gradient_eigenvalues": gradient_values,
                "gradient_eigenvectors": gradient_vectors.to(self.dtype),
            }

    def factors(self, name: str, strategy: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The saved tensors of one layer (see ``lit_attrib.artifacts.factors``)."""
        eigen = self.eigen[name]
        if strategy == "ekfac":
            lambda_matrix = self.sums[name]["lambda"].double() / max(self.counts[name]["lambda_examples"], 1)
        else:
            lambda_matrix = kfac_lambda(eigen["activation_eigenvalues"], eigen["gradient_eigenvalues"])
        return {**{key: value.to(dtype) for key, value in eigen.items()}, "lambda": lambda_matrix.to(dtype)}

    # ------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        # Copies, never views: a checkpoint must not change when the running sums do (or vice versa).
        cpu = lambda d: {k: v.detach().to("cpu", copy=True) for k, v in d.items()}  # noqa: E731
        return {
            "sums": {name: cpu(sums) for name, sums in self.sums.items()},
            "counts": {name: dict(counts) for name, counts in self.counts.items()},
            "eigen": {name: cpu(eigen) for name, eigen in self.eigen.items()},
        }

    def load_state_dict(self, state: dict, device: torch.device | str = "cpu") -> None:
        self.sums = {name: {k: v.to(device) for k, v in state.get("sums", {}).get(name, {}).items()}
                     for name in self.layers}
        self.counts = {name: dict(state.get("counts", {}).get(name, {})) for name in self.layers}
        self.eigen = {name: {k: v.to(device) for k, v in eigen.items()} for name, eigen in state.get("eigen", {}).items()}
