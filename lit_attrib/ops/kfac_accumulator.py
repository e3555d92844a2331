"""Running K-FAC / EKFAC sums for a set of layers: fed from hooks, normalised once at the end.

Plain tensors and counts (no Lightning), so that a callback can save them in a checkpoint, sum them
across processes, and resume. Every quantity is a sum; ``A``, ``G`` and ``Λ`` are divided by their
counts only when read.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from lit_attrib.io import save_tensors_streaming
from lit_attrib.layers import LayerInfo
from lit_attrib.ops.kfac import (
    append_bias_column,
    eigen_residual,
    eigendecompose,
    kfac_lambda,
)
from lit_attrib.ops.workspaces import Workspaces

__all__ = ["KFACAccumulator", "inclusion_probabilities"]

_SHARED_INPUTS = 4
"""Inputs whose products :class:`KFACAccumulator` keeps for the layers sharing them (see ``_share``)."""

_PRODUCT_ROWS = 64
"""Row counts of narrow-dtype products are rounded up to a multiple of this (see ``KFACAccumulator._gram``)."""

_COUNT_KEYS = {"activation": "activation_tokens", "gradient": "gradient_tokens", "lambda": "lambda_examples"}


def inclusion_probabilities(weights: np.ndarray, expected: float) -> np.ndarray:
    """``π_t = min(1, c·w_t)`` for positive ``weights``, with ``Σ π_t ≈ expected`` (``≤ len(weights)``).

    ``c = expected / Σ w`` first; the tokens that reach 1 are kept for sure and ``c`` is raised once so
    that the others share the rest of the expected count in proportion (exact unless that raise caps
    more tokens, which then stay at 1: ``Σ π_t`` falls a little short). NumPy: these are a few hundred
    numbers per layer and batch, where a dozen small torch ops would cost more than the products saved.
    """
    chances = weights * (expected / weights.sum())
    capped = chances >= 1
    if not capped.any():
        return chances
    rest = np.where(capped, 0.0, weights)
    return np.where(capped, 1.0, np.minimum(rest * ((expected - capped.sum()) / rest.sum()), 1.0))


class KFACAccumulator:
    """Sums of ``a aᵀ``, ``g gᵀ`` and squared rotated per-example gradients, per layer.

    Per batch: :meth:`begin_batch` (token mask and gradient scale), then the hooks' ``add_*`` calls
    for every use of every layer, then :meth:`end_batch`. Updates are in place (``addmm_``), the bias
    column of ``a`` is never materialised (its row of ``A`` is a running sum of ``a``), padding is
    removed by multiplying with the mask, and finiteness is checked once per batch.

    With ``token_fraction`` ``p < 1`` in :meth:`begin_batch`, ``A`` and ``G`` of the batch come from
    about ``p·n`` of its ``n`` real tokens, gathered (``index_select``) before the products so that they
    cost ``p`` of the full ones; each sampled token's product is weighted by ``1 / π_t``, its chance of
    being sampled, and ``n`` tokens are counted, so each batch's contribution is an unbiased estimate
    of its full one (Horvitz–Thompson) and the normalised ``A`` and ``G`` are unbiased for the
    full-rate ones. Two samplings:

    - ``"norm"``: token ``t`` of an input (for ``A``) or of a layer's output gradient (for ``G``) is
      kept when the batch's uniform draw ``u_t < π_t = min(1, c·w_t)``, ``Σ π_t ≈ p·n`` (see
      :func:`inclusion_probabilities`), with ``w_t`` ``‖x_t‖²`` mixed with 10 % of the uniform weight.
      ``π_t ∝ ‖x_t‖² = ‖x_t x_tᵀ‖_F`` minimises the estimate's expected squared Frobenius error (its
      variance is ``Σ_t (1/π_t − 1)‖x_t‖⁴``), and the few tokens that carry most of ``‖g‖²`` are
      always kept; the uniform part bounds every weight (by ``10 / p``). Layers reading one input share
      its sample (equal ``A``); ``A`` and ``G`` of a use have their own ``π_t``.
    - ``"uniform"``: one random subset of ``k = round(p·n)`` real tokens per batch (per row count, see
      :meth:`sampled_rows`), weighted by ``n / k``, serves every layer and use, so ``A`` and ``G`` of
      a use cover the same tokens.

    The lambda pass (:meth:`add_rotated_gradient`) is per example and never sampled.

    Args:
        layers: the tracked layers, by name.
        dtype: accumulation dtype (float32 or float64); inputs are cast to it, so bf16 activations
            are accumulated in float32.
        device: where the sums live.
        product_dtype: the dtype of each batch's ``A`` and ``G`` products (e.g. ``torch.bfloat16``: the
            product about 4× faster on a CPU with AMX); the rows are cast to it, the matrix product
            accumulates in float32 and its result, rounded to ``product_dtype`` (relative 2⁻⁹ per entry), is
            added to the sums in ``dtype``. Rounding errors of different batches and tokens are independent,
            so they shrink in the average; ``None``: ``dtype``. The lambda pass is not affected.
        eigen_dtype: the dtype of the eigendecompositions (float64; float32 is about 3× faster for
            ``1536 × 1536``): with float32 the relative residual ``‖C V − V diag(w)‖_F / ‖C‖_F`` of each
            layer's worse factor is kept in ``eigen_residuals``.
        deferred_rows: ``A`` and ``G`` products wait until a layer holds this many token rows (from several
            batches; its real tokens only, each row times the square root of its weight) and are then
            multiplied at once: the same sums up to round-off, with one ``d × d`` product and one pass over
            the sums per several batches instead of one per batch. The waiting rows cost about
            ``deferred_rows × (in + out)`` values per layer; everything that reads the sums (and
            :meth:`state_dict`) multiplies them first. ``None``: every batch at once.
    """

    def __init__(self, layers: dict[str, LayerInfo], dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", product_dtype: torch.dtype | None = None,
                 eigen_dtype: torch.dtype = torch.float64, deferred_rows: int | None = None) -> None:
        self.layers = layers
        self.dtype = dtype
        self.deferred_rows = deferred_rows
        # (layer, "activation" | "gradient") -> waiting weighted rows (see deferred_rows); layers reading one
        # input hold the same tensors, and their product is made once (see flush)
        self._pending: dict[tuple[str, str], list[torch.Tensor]] = {}
        self._pending_rows = 0  # the most rows any layer holds
        self.eigen_dtype = eigen_dtype
        self.eigen_residuals: dict[str, float] = {}  # with eigen_dtype narrower than float64 (see eigendecompose)
        self.product_dtype = dtype if product_dtype is None else product_dtype
        self._device = torch.device(device)
        self.sums: dict[str, dict[str, torch.Tensor]] = {name: {} for name in layers}
        self.counts: dict[str, dict[str, int]] = {name: {} for name in layers}
        self.eigen: dict[str, dict[str, torch.Tensor]] = {}
        self._batch_rotated: dict[str, torch.Tensor] = {}
        self._workspaces = Workspaces()  # the single-use layers' rotated gradients (see add_rotated_gradient)
        self._spilled: dict[str, Path] = {}  # layer -> the file holding its A and G sums (see spill)
        self._mask: torch.Tensor | None = None  # (B * T, 1) in self.dtype, or None when every token counts
        self._tokens = 0  # real tokens in the batch (with a mask)
        self._scale = 1.0
        self._checks: list[tuple[str, torch.Tensor]] = []
        # Layers that read the same input in one forward (q/k/v, gate/up) share its products: keyed by
        # the input's memory, which the cache keeps alive (and so unique) while cached (see _share).
        self._shared: dict[tuple, tuple[torch.Tensor, ...]] = {}
        self._fraction = 1.0
        self._sampling = "uniform"
        self._generator: torch.Generator | None = None
        self._padding: torch.Tensor | None = None  # (B, T) bool of the batch, kept to sample real tokens from
        self._real: np.ndarray | None = None  # its real positions (see _real_positions)
        self._draws: dict[int, np.ndarray] = {}  # real row count -> uniform draws (see _uniforms)
        # Row count -> (sorted row indices, weight n/k, n): this batch's token sample (see sampled_rows).
        self._samples: dict[int, tuple[torch.Tensor, float, int]] = {}

    # --------------------------------------------------------------------------------- updates
    def begin_batch(self, mask: torch.Tensor | None, gradient_scale: float = 1.0, token_fraction: float = 1.0,
                    generator: torch.Generator | None = None, sampling: str = "uniform") -> None:
        """Start a batch: ``mask (B, T)`` marks the tokens that count (``None``: all of them).

        ``gradient_scale`` turns the observed output gradients into those of the summed loss.
        ``token_fraction < 1`` samples that fraction of the real tokens for ``A`` and ``G`` with
        ``generator`` (a CPU generator; draws happen as the layers report), by ``sampling``
        (``"norm"`` or ``"uniform"``, see the class).
        """
        if sampling not in ("norm", "uniform"):
            raise ValueError(f"sampling must be 'norm' or 'uniform'; got {sampling!r}")
        self._sampling = sampling
        padded = mask is not None and not bool(mask.all())
        self._mask = mask.reshape(-1, 1).to(self.dtype) if padded else None
        self._tokens = int(mask.sum()) if padded else 0
        self._scale = gradient_scale
        self._shared.clear()
        self._fraction = token_fraction
        self._generator = generator
        self._padding = mask.reshape(-1) if padded else None
        self._real = None
        self._draws.clear()
        self._samples.clear()

    def sampled_rows(self, count: int) -> tuple[torch.Tensor, float, int]:
        """The token sample of this batch for inputs of ``count`` rows: ``(indices, weight, real tokens)``.

        ``indices`` are sorted positions in the flattened ``(B·T)`` rows, a uniform random subset of
        ``k = max(1, round(p·n))`` of the ``n`` real ones (all rows when ``count`` is not the mask's
        ``B·T``), and ``weight = n / k``. Drawn once per batch and row count, then reused.
        """
        if count not in self._samples:
            if self._padding is not None and self._padding.numel() == count:
                real = self._padding.nonzero().squeeze(1)  # (n,)
            else:
                real = None
            n = count if real is None else real.numel()
            k = min(n, max(1, round(self._fraction * n))) if n else 0
            chosen = torch.randperm(n, generator=self._generator)[:k].sort().values  # CPU
            indices = chosen if real is None else real[chosen.to(real.device)]
            self._samples[count] = (indices.to(self._device), n / k if k else 0.0, n)
        return self._samples[count]

    def _rows(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, float]:
        """``(B, T, d) -> (N, d)`` rows, the same rows with padding zeroed, the number of real rows, and
        the weight of the rows' products (``n / k`` for a token sample of ``k`` rows, else 1)."""
        rows = x.reshape(-1, x.shape[-1])  # (N, d)
        if self._fraction < 1.0 and self._sampling == "norm":
            return self._norm_sample(rows)
        if self._fraction < 1.0:
            # Gather before casting and multiplying: the products then cost k/N of the full ones.
            indices, weight, count = self.sampled_rows(rows.shape[0])
            rows = rows.index_select(0, indices.to(rows.device)).to(self.dtype)  # (k, d), real tokens only
            return rows, rows, count, weight
        rows = rows.to(self.dtype)
        if self._mask is not None and self._mask.shape[0] == rows.shape[0]:
            return rows, rows * self._mask, self._tokens, 1.0
        return rows, rows, rows.shape[0], 1.0

    def _norm_sample(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, float]:
        """``_rows`` for ``"norm"`` sampling: the kept real rows, the same rows times ``1 / π_t``, and ``n``."""
        rows, weights, n = self._norm_kept(rows)
        return rows, rows * weights.unsqueeze(1), n, 1.0

    def _norm_kept(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``"norm"`` sampling of ``(N, d)`` rows: the kept real rows (in ``dtype``), their weights ``1 / π_t``,
        and the number ``n`` of real rows."""
        norms = rows.float().square().sum(1).cpu().double().numpy()  # (N,)
        real = self._real_positions(rows.shape[0])
        if real is not None:
            norms = norms[real]  # (n,): real tokens only
        n, total = norms.size, norms.sum()
        if n == 0 or total == 0:  # nothing to add (a zero row adds nothing to x xᵀ)
            rows = rows[:0].to(self.dtype)
            return rows, rows.new_zeros(0), n
        chances = inclusion_probabilities(norms * (0.9 / total) + 0.1 / n, self._fraction * n)
        kept = np.flatnonzero(self._uniforms(n) < chances)  # among the real tokens
        positions = torch.from_numpy(kept if real is None else real[kept]).to(rows.device)
        rows = rows.index_select(0, positions).to(self.dtype)  # (k, d)
        return rows, torch.from_numpy(1.0 / chances[kept]).to(rows.device, self.dtype), n

    def _weighted_rows(self, x: torch.Tensor, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, int]:
        """For deferred products: the real (or sampled) rows of ``x (..., d)``, each times ``scale·√w`` for its
        product weight ``w`` (so that ``rowsᵀ rows`` is the weighted sum), in ``dtype`` and in memory of their
        own; the weighted column sum ``Σ_t w_t x_t`` (unscaled); and the number of real tokens counted."""
        flat = x.reshape(-1, x.shape[-1])  # (N, d)
        weights = None
        if self._fraction < 1.0 and self._sampling == "norm":
            rows, weights, count = self._norm_kept(flat)
            weight = 1.0
        elif self._fraction < 1.0:
            indices, weight, count = self.sampled_rows(flat.shape[0])
            rows = flat.index_select(0, indices.to(flat.device)).to(self.dtype)
        else:
            real = self._real_positions(flat.shape[0])
            rows = flat if real is None else flat.index_select(0, torch.from_numpy(real).to(flat.device))
            rows, count, weight = rows.to(self.dtype), rows.shape[0], 1.0
        column = (rows.T @ weights if weights is not None else rows.sum(0)) * weight
        factor = scale * weight ** 0.5
        if weights is not None:
            rows = rows * (weights.sqrt() * factor).unsqueeze(1)
        elif factor != 1.0:
            rows = rows * factor
        elif rows.data_ptr() == x.data_ptr():
            rows = rows.clone()  # the model's own tensor: the product waits past this batch
        return rows, column, count

    def _defer(self, name: str, side: str, rows: torch.Tensor) -> None:
        waiting = self._pending.setdefault((name, side), [])
        waiting.append(rows)
        self._pending_rows = max(self._pending_rows, sum(r.shape[0] for r in waiting))

    def _uniforms(self, count: int) -> np.ndarray:
        """One uniform draw per token, shared by every layer of the batch with ``count`` real rows: each
        layer's sample is then still independent across tokens with its own ``π_t``, for one draw per batch
        (on the CPU generator, so the sample is the same on any device)."""
        if count not in self._draws:
            self._draws[count] = torch.rand(count, generator=self._generator, dtype=torch.float64).numpy()
        return self._draws[count]

    def _real_positions(self, count: int) -> np.ndarray | None:
        """The positions of the batch's real tokens among its ``count`` flattened ``(B·T)`` rows (computed once
        per batch), or ``None`` when every row counts."""
        if self._padding is None or self._padding.numel() != count:
            return None
        if self._real is None:
            self._real = self._padding.cpu().numpy().nonzero()[0]
        return self._real

    def _share(self, key: tuple, value: tuple[torch.Tensor, ...]) -> None:
        """Cache one input's products for the layers that read it. Those layers' gradients arrive one after
        another in the backward (q/k/v, gate/up), so the last few inputs are kept, not the whole batch's
        (every layer's ``A`` product at once was 400 MB on SmolLM2); an evicted input is recomputed, never
        confused with another (the entry holds the input, so its memory is not reused while cached)."""
        self._shared[key] = value
        while len(self._shared) > _SHARED_INPUTS:
            del self._shared[next(iter(self._shared))]

    def _no_autocast(self) -> torch.autocast:
        """The products run in the accumulation dtype even when the hooks fire inside an autocast region
        (bf16-mixed): autocast would compute them in bfloat16."""
        return torch.autocast(self._device.type, enabled=False)

    def _buffer(self, name: str, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        buffer = self.sums[name].get(key)
        if buffer is None:
            buffer = self.sums[name][key] = torch.zeros(shape, dtype=self.dtype, device=self._device)
        return buffer

    def _gram(self, masked: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``maskedᵀ rows``, multiplied in ``product_dtype``, returned in ``dtype``.

        In a narrower dtype the rows are zero-padded to a multiple of :data:`_PRODUCT_ROWS` (zero rows add
        nothing): oneDNN compiles a bfloat16 kernel for each new shape, and the row count changes with every
        batch's padded length (a new shape cost about as much as the product it served)."""
        if self.product_dtype == self.dtype:
            return masked.T @ rows
        count = rows.shape[0]
        size = -(-count // _PRODUCT_ROWS) * _PRODUCT_ROWS

        def padded(x: torch.Tensor) -> torch.Tensor:
            out = x.new_zeros(size, x.shape[1], dtype=self.product_dtype)
            out[:count] = x
            return out

        right = padded(rows)
        # Cast back before adding: an in-place add of a bfloat16 operand into float32 runs 3× slower.
        return ((right if masked is rows else padded(masked)).T @ right).to(self.dtype)

    def _count(self, name: str, key: str, count: int) -> None:
        self.counts[name][_COUNT_KEYS[key]] = self.counts[name].get(_COUNT_KEYS[key], 0) + count

    @staticmethod
    def _key(tensor: torch.Tensor, *extra) -> tuple:
        return (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype, *extra)

    def add_activations(self, layer: LayerInfo, activations: torch.Tensor) -> None:
        """Add ``Σ a aᵀ`` (bias-appended ``a``) over the real tokens of one use of ``layer``."""
        if self.deferred_rows is not None:
            return self._add_activations_later(layer, activations)
        with self._no_autocast():
            key = self._key(activations, "covariance")
            if key not in self._shared:
                rows, masked, count, weight = self._rows(activations)
                self._share(key, (activations, self._gram(masked, rows), masked.sum(0), count, weight))
            _, product, column, count, weight = self._shared[key]
            width = product.shape[0]
            total = self._buffer(layer.name, "activation", (width + layer.has_bias,) * 2)
            total[:width, :width].add_(product, alpha=weight)  # alpha 1 (no sampling) adds exactly as `+=`
            if layer.has_bias:  # the appended 1: its row and column are Σ a, its corner the token count
                total[:width, width].add_(column, alpha=weight)
                total[width, :width].add_(column, alpha=weight)
                total[width, width] += count
            self._count(layer.name, "activation", count)
            self._checks.append((f"{layer.name}: activation", total[:width, :width].diagonal().sum()))

    def _add_activations_later(self, layer: LayerInfo, activations: torch.Tensor) -> None:
        """:meth:`add_activations` with the product deferred (see ``deferred_rows``); the bias row and column
        and the token count are added now."""
        with self._no_autocast():
            key = self._key(activations, "deferred")
            if key not in self._shared:
                self._share(key, (activations, *self._weighted_rows(activations)))
            _, rows, column, count = self._shared[key]
            width = rows.shape[1]
            total = self._buffer(layer.name, "activation", (width + layer.has_bias,) * 2)
            self._defer(layer.name, "activation", rows)
            if layer.has_bias:
                total[:width, width] += column
                total[width, :width] += column
                total[width, width] += count
            self._count(layer.name, "activation", count)
            self._checks.append((f"{layer.name}: activation", column.sum()))

    def add_gradients(self, layer: LayerInfo, gradients: torch.Tensor) -> None:
        """Add ``Σ g gᵀ`` over the real tokens (``g`` of the sum-reduced loss, after the batch's scale)."""
        if self.deferred_rows is not None:
            with self._no_autocast():
                rows, column, count = self._weighted_rows(gradients, abs(self._scale))
                self._buffer(layer.name, "gradient", (rows.shape[1],) * 2)
                self._defer(layer.name, "gradient", rows)
                self._count(layer.name, "gradient", count)
                self._checks.append((f"{layer.name}: gradient", column.sum()))
            return
        with self._no_autocast():
            rows, masked, count, weight = self._rows(gradients)
            total = self._buffer(layer.name, "gradient", (rows.shape[1],) * 2)
            if self.product_dtype == self.dtype:
                total.addmm_(masked.T, rows, alpha=self._scale ** 2 * weight)
            else:
                total.add_(self._gram(masked, rows), alpha=self._scale ** 2 * weight)
            self._count(layer.name, "gradient", count)
            self._checks.append((f"{layer.name}: gradient", total.diagonal().sum()))

    def add_rotated_gradient(self, layer: LayerInfo, activations: torch.Tensor, gradients: torch.Tensor,
                             last: bool = False) -> None:
        """Add one use's ``Q_Gᵀ DW_b Q_A`` to this batch's per-example buffer (uses add up before squaring).

        ``last``: this is the layer's last use in the batch, so its buffer is squared into the sum and
        freed now, not at :meth:`end_batch` (only one layer's per-example buffer is then held at a time).
        """
        with self._no_autocast():
            eigen = self.eigen[layer.name]
            key = self._key(activations, id(eigen["activation_eigenvectors"]), layer.has_bias)
            if key not in self._shared:  # Q_Aᵀ a, shared by the layers with this input and this eigenbasis
                source = activations
                activations = activations.to(self.dtype)
                if activations.ndim == 2:  # (N, d): one example of N tokens
                    activations = activations.unsqueeze(0)
                if self._mask is not None and self._mask.shape[0] == activations.shape[0] * activations.shape[1]:
                    activations = activations * self._mask.view(*activations.shape[:2], 1)
                if layer.has_bias:
                    activations = append_bias_column(activations)
                self._share(key, (source, activations @ eigen["activation_eigenvectors"]))
            rotated_activations = self._shared[key][1]  # (B, T, in)
            gradients = gradients.to(self.dtype)
            if gradients.ndim == 2:
                gradients = gradients.unsqueeze(0)
            rotated_gradients = (gradients @ eigen["gradient_eigenvectors"]).mT  # (B, out, T)
            buffer = self._batch_rotated.get(layer.name)
            if buffer is not None:  # a later use of a layer used several times
                buffer.baddbmm_(rotated_gradients, rotated_activations)
            elif last:  # the only use: into a workspace reused by every layer of this shape
                workspace = self._workspaces.get(rotated_gradients.shape[0], layer.gradient_shape, rotated_gradients)
                buffer = torch.bmm(rotated_gradients, rotated_activations, out=workspace)
            else:
                buffer = self._batch_rotated[layer.name] = torch.bmm(rotated_gradients, rotated_activations)
            if last:
                self._batch_rotated.pop(layer.name, None)
                self._square(layer.name, buffer)

    def allocate_lambda(self, names: list[str]) -> None:
        """Allocate the ``Λ`` sums of ``names`` now, one after another, before the lambda pass: allocated by
        its first batch, between that batch's temporaries, they left the heap fragmented (0.8 GB on SmolLM2)."""
        with torch.inference_mode(False):  # the pass adds to them outside inference mode
            for name in names:
                self._buffer(name, "lambda", tuple(self.layers[name].gradient_shape))

    def _square(self, name: str, rotated: torch.Tensor) -> None:
        """Add one batch's ``Σ_b (Q_Gᵀ DW_b Q_A)²`` of layer ``name`` (example by example: no temporary)."""
        total = self._buffer(name, "lambda", tuple(rotated.shape[1:]))
        for example in rotated:
            total.addcmul_(example, example, value=self._scale ** 2)
        self._count(name, "lambda", rotated.shape[0])
        self._checks.append((f"{name}: lambda", total.sum()))

    def end_batch(self) -> list[str]:
        """Square the batch's per-example rotated gradients into ``Σ (Q_Gᵀ DW Q_A)²``; return what went non-finite.

        Returns:
            ``layer: quantity`` of every sum that holds a NaN or Inf after this batch (one sync), in model order.
        """
        for name, rotated in self._batch_rotated.items():  # layers whose last use was not marked
            self._square(name, rotated)
        self._batch_rotated.clear()
        self._shared.clear()
        if self._pending_rows >= (self.deferred_rows or 0):
            self.flush()
        checks, self._checks = self._checks, []
        if not checks:
            return []
        finite = torch.stack([value for _, value in checks]).isfinite().tolist()
        bad = dict.fromkeys(label for (label, _), ok in zip(checks, finite) if not ok)
        order = {name: i for i, name in enumerate(self.layers)}  # model order, whatever order the hooks ran in
        return sorted(bad, key=lambda label: (order.get(label.split(": ")[0], len(order)), label))

    def flush(self) -> None:
        """Multiply every waiting row block into its sums (see ``deferred_rows``): one product per input, added
        to every layer that reads it."""
        if not self._pending:
            return
        last: tuple[tuple[int, ...], torch.Tensor] | None = None  # layers sharing an input come one after another
        with self._no_autocast():
            for (name, side), blocks in self._pending.items():
                rows = blocks[0] if len(blocks) == 1 else torch.cat(blocks)
                total = self.sums[name][side]
                width = rows.shape[1]
                if side == "gradient" and self.product_dtype == self.dtype:
                    total.addmm_(rows.T, rows)
                else:
                    identity = tuple(id(block) for block in blocks)
                    if last is None or last[0] != identity:
                        last = (identity, self._gram(rows, rows))
                    total[:width, :width] += last[1]
                self._checks.append((f"{name}: {side}", total[:width, :width].diagonal().sum()))
        self._pending.clear()
        self._pending_rows = 0

    # ------------------------------------------------------------------------------ reading
    def reduce(self, names: list[str], keys: tuple[str, ...], reduce_fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace the sums ``keys`` of ``names`` and their counts by ``reduce_fn`` of them (a sum over processes).

        Every process must call this with the same names and keys; a layer that saw nothing here
        contributes zeros.
        """
        self.flush()
        for name in names:
            layer = self.layers[name]
            for key in keys:
                shape = {"activation": (layer.gradient_shape[1],) * 2, "gradient": (layer.out_features,) * 2,
                         "lambda": layer.gradient_shape}[key]
                value = self.sums[name].get(key, torch.zeros(shape, dtype=self.dtype, device=self._device))
                self.sums[name][key] = reduce_fn(value)
                count = torch.tensor(float(self.counts[name].get(_COUNT_KEYS[key], 0)), dtype=torch.float64,
                                     device=self._device)
                self.counts[name][_COUNT_KEYS[key]] = int(round(float(reduce_fn(count))))

    def clear(self, names: list[str], keys: tuple[str, ...]) -> None:
        """Forget the sums ``keys`` of ``names`` and their counts."""
        for name in names:
            for key in keys:
                self._pending.pop((name, key), None)
                self.sums[name].pop(key, None)
                self.counts[name].pop(_COUNT_KEYS[key], None)
            if "activation" in keys:
                self._spilled.pop(name, None)

    def covariances(self, name: str, sums: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``A`` and ``G`` of layer ``name`` in float64: the sums (``sums``, or its own, read back if spilled)
        divided by their token counts."""
        sums, counts = self._covariance_sums(name) if sums is None else sums, self.counts[name]
        if "activation" not in sums or "gradient" not in sums:
            raise RuntimeError(f"layer '{name}' saw no activations or no gradients in the covariance pass")
        return (sums["activation"].double() / max(counts["activation_tokens"], 1),
                sums["gradient"].double() / max(counts["gradient_tokens"], 1))

    # ----------------------------------------------------------------------------- spilling
    def spill(self, names: list[str], path: str | os.PathLike) -> None:
        """Move the summed ``a aᵀ`` and ``g gᵀ`` of ``names`` to a file: the eigendecompositions read them back
        one layer at a time, and after them they are needed only when the factors are written, so neither the
        eigendecompositions nor the lambda pass hold every layer's sums next to the eigenbases.
        :meth:`covariances`, :meth:`eigendecompose` and :meth:`state_dict` read them back; :meth:`drop_spilled`
        deletes the files.
        """
        self.flush()
        path = Path(path)
        pairs = ((f"{name}.{key}", self.sums[name][key]) for name in names for key in ("activation", "gradient")
                 if key in self.sums[name])
        save_tensors_streaming(path, pairs)
        for name in names:
            for key in ("activation", "gradient"):
                self.sums[name].pop(key, None)
            self._spilled[name] = path

    def _covariance_sums(self, name: str) -> dict[str, torch.Tensor]:
        """The sums of layer ``name``, the spilled ones read back (waiting rows multiplied in first)."""
        self.flush()
        if name not in self._spilled:
            return self.sums[name]
        with safe_open(str(self._spilled[name]), framework="pt", device=str(self._device)) as handle:
            stored = set(handle.keys())
            read = {key: handle.get_tensor(f"{name}.{key}") for key in ("activation", "gradient")
                    if f"{name}.{key}" in stored}
        return {**self.sums[name], **read}

    def drop_spilled(self) -> None:
        """Delete the spill files (the sums in them are gone)."""
        for path in set(self._spilled.values()):
            path.unlink(missing_ok=True)
        self._spilled.clear()

    def eigendecompose(self, names: list[str]) -> None:
        """Fix ``A`` and ``G`` of ``names`` (after summing across processes) and their eigenbases (``eigen_dtype``).

        Only the eigenvalues and eigenvectors are kept (the eigenvectors in the accumulation dtype); ``A``
        and ``G`` are formed again from the sums when the factors are read (:meth:`factors`), so no float64
        copy of them is held through the lambda pass.
        """
        # Layers reading one input have equal A: decompose it once. They come one after another (q/k/v,
        # gate/up), so each layer's sums are compared with the last two distinct ones only (sums and token
        # counts: no float64 matrix kept for the comparison, and no sums of every layer held at once).
        recent: list[tuple[torch.Tensor, int, tuple]] = []
        for name in names:
            sums = self._covariance_sums(name)
            activation, gradient = self.covariances(name, sums)
            total, tokens = sums["activation"], self.counts[name]["activation_tokens"]
            for seen, count, result in recent:
                if count == tokens and seen.shape == total.shape and torch.equal(seen, total):
                    activation_values, activation_vectors, residual = result
                    break
            else:
                activation_values, activation_vectors, residual = self._eigendecompose(activation)
                recent = [*recent[-1:], (total, tokens, (activation_values, activation_vectors, residual))]
            del activation, sums
            gradient_values, gradient_vectors, gradient_residual = self._eigendecompose(gradient)
            del gradient
            if self.eigen_dtype != torch.float64:
                self.eigen_residuals[name] = max(residual, gradient_residual)
            self.eigen[name] = {
                "activation_eigenvalues": activation_values,
                "activation_eigenvectors": activation_vectors,
                "gradient_eigenvalues": gradient_values,
                "gradient_eigenvectors": gradient_vectors,
            }

    def _eigendecompose(self, covariance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Eigenvalues (float64), eigenvectors (``dtype``) in ``eigen_dtype``, and the residual (0 in float64)."""
        values, vectors = eigendecompose(covariance, self.eigen_dtype)
        residual = eigen_residual(covariance, values, vectors) if self.eigen_dtype != torch.float64 else 0.0
        return values.double(), vectors.to(self.dtype), residual

    def factors(self, name: str, strategy: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The saved tensors of one layer (see ``lit_attrib.artifacts.factors``)."""
        eigen = self.eigen[name]
        activation, gradient = self.covariances(name)
        if strategy == "ekfac":
            lambda_matrix = self.sums[name]["lambda"].double() / max(self.counts[name]["lambda_examples"], 1)
        else:
            lambda_matrix = kfac_lambda(eigen["activation_eigenvalues"], eigen["gradient_eigenvalues"])
        return {"activation_covariance": activation.to(dtype), "gradient_covariance": gradient.to(dtype),
                **{key: value.to(dtype) for key, value in eigen.items()}, "lambda": lambda_matrix.to(dtype)}

    # ------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        # Copies, never views: a checkpoint must not change when the running sums do (or vice versa).
        cpu = lambda d: {k: v.detach().to("cpu", copy=True) for k, v in d.items()}  # noqa: E731
        return {
            "sums": {name: cpu(self._covariance_sums(name)) for name in self.sums},
            "counts": {name: dict(counts) for name, counts in self.counts.items()},
            "eigen": {name: cpu(eigen) for name, eigen in self.eigen.items()},
            "eigen_residuals": dict(self.eigen_residuals),
        }

    def load_state_dict(self, state: dict, device: torch.device | str = "cpu") -> None:
        self.sums = {name: {k: v.to(device) for k, v in state.get("sums", {}).get(name, {}).items()}
                     for name in self.layers}
        self._spilled.clear()
        self.counts = {name: dict(state.get("counts", {}).get(name, {})) for name in self.layers}
        self.eigen = {name: {k: v.to(device) for k, v in eigen.items()} for name, eigen in state.get("eigen", {}).items()}
        self.eigen_residuals = dict(state.get("eigen_residuals", {}))
