"""CountSketch and TensorSketch of per-example gradients (seed 001's projected TracIn / SDI).

A CountSketch of ``x ∈ R^d`` into ``R^m`` adds ``s(i) x_i`` to bucket ``h(i)``, with a random bucket
``h(i)`` and sign ``s(i) = ±1`` per coordinate; ``⟨CS(x), CS(y)⟩`` is an unbiased estimate of ``⟨x, y⟩``.
A TensorSketch of ``u ⊗ v`` is the circular convolution ``CS_1(u) ⊛ CS_2(v)``: the CountSketch of
``u ⊗ v`` with bucket ``h_1(i) + h_2(j) mod m`` and sign ``s_1(i) s_2(j)``. For a linear layer's
per-example gradient ``DW = Σ_t g_t a_tᵀ`` (bias column appended to ``a``) that gives

    TS(DW) = IFFT( Σ_t FFT(CS_G(g_t)) ⊙ FFT(CS_A(a_t)) ),

computed from the activations and output gradients without forming ``DW``.

Hash and sign tables are drawn on the CPU from ``torch.Generator().manual_seed(seed)`` and then moved
to the device, so the same seed gives bit-identical tables on every device. Each parameter block
gets its own seed (:func:`block_seed`), so blocks sketched into one shared ``m``-dimensional vector
are independent and their cross terms vanish in expectation.

Reference: Pham & Pagh 2013 (TensorSketch), https://doi.org/10.1145/2487575.2487591.
"""

from __future__ import annotations

import zlib

import torch

__all__ = ["CountSketch", "TensorSketch", "block_seed"]


def block_seed(seed: int, name: str) -> int:
    """The seed of one parameter block: the global seed mixed with a stable hash of its name."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**62)


class CountSketch:
    """A seeded CountSketch ``R^dim -> R^sketch_dim`` applied along the last axis.

    Args:
        dim: input dimension ``d``.
        sketch_dim: output dimension ``m``.
        seed: seed of the bucket and sign tables (drawn on the CPU: identical on every device).
        device: where the tables live.

    Raises:
        ValueError: ``dim`` or ``sketch_dim`` below 1.
    """

    def __init__(self, dim: int, sketch_dim: int, seed: int, device: str | torch.device = "cpu") -> None:
        if dim < 1 or sketch_dim < 1:
            raise ValueError(f"CountSketch needs dim ≥ 1 and sketch_dim ≥ 1; got dim={dim}, sketch_dim={sketch_dim}")
        generator = torch.Generator().manual_seed(seed)
        self.dim, self.sketch_dim, self.seed = dim, sketch_dim, seed
        self.buckets = torch.randint(0, sketch_dim, (dim,), generator=generator).to(device)
        self.signs = (torch.randint(0, 2, (dim,), generator=generator) * 2 - 1).to(device)

    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The explicit ``(m, d)`` sketch matrix (for references and tests)."""
        out = torch.zeros(self.sketch_dim, self.dim, dtype=dtype, device=self.buckets.device)
        out[self.buckets, torch.arange(self.dim, device=self.buckets.device)] = self.signs.to(dtype)
        return out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., d) -> (..., m)``."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"expected a last axis of {self.dim}; got {tuple(x.shape)}")
        out = x.new_zeros(*x.shape[:-1], self.sketch_dim)
        return out.index_add_(-1, self.buckets, x * self.signs.to(x.dtype))


class TensorSketch:
    """A seeded TensorSketch of ``(out, in)`` matrices, in particular of ``Σ_t g_t a_tᵀ``.

    Args:
        out_features: rows (the output-gradient side, ``g``).
        in_features: columns (the activation side, ``a``, bias column included).
        sketch_dim: output dimension ``m``.
        seed: seed of both CountSketches.
        device: where the tables live.
    """

    def __init__(self, out_features: int, in_features: int, sketch_dim: int, seed: int,
                 device: str | torch.device = "cpu") -> None:
        self.left = CountSketch(out_features, sketch_dim, seed, device)
        self.right = CountSketch(in_features, sketch_dim, seed + 1, device)
        self.sketch_dim = sketch_dim

    @property
    def buckets(self) -> torch.Tensor:
        """``(out, in)`` bucket of each matrix entry: ``h_G(i) + h_A(j) mod m``."""
        return (self.left.buckets[:, None] + self.right.buckets[None, :]) % self.sketch_dim

    @property
    def signs(self) -> torch.Tensor:
        """``(out, in)`` sign of each matrix entry: ``s_G(i) s_A(j)``."""
        return self.left.signs[:, None] * self.right.signs[None, :]

    def dense(self, matrix: torch.Tensor) -> torch.Tensor:
        """The sketch of explicit matrices ``(..., out, in) -> (..., m)`` (the same map as :meth:`outer`)."""
        flat = matrix.flatten(-2) * self.signs.flatten().to(matrix.dtype)
        return flat.new_zeros(*flat.shape[:-1], self.sketch_dim).index_add_(-1, self._flat_buckets(), flat)

    def outer_explicit(self, output_gradients: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
        """:meth:`outer` through the explicit per-example matrices, the signs folded into ``g`` and ``a``
        (``s_G(i) s_A(j) g_i a_j``) so that only the bucket sums remain."""
        dtype = output_gradients.dtype
        signed = torch.bmm((output_gradients * self.left.signs.to(dtype)).mT, activations * self.right.signs.to(dtype))
        flat = signed.flatten(-2)
        return flat.new_zeros(flat.shape[0], self.sketch_dim).index_add_(-1, self._flat_buckets(), flat)

    def _flat_buckets(self) -> torch.Tensor:
        """The bucket of every matrix entry, flattened; kept for the small matrices the explicit route takes."""
        cached = getattr(self, "_buckets_cache", None)
        if cached is not None:
            return cached
        buckets = self.buckets.flatten()
        if buckets.numel() <= 1 << 22:
            self._buckets_cache = buckets
        return buckets

    def explicit_is_cheaper(self, tokens: int, out_features: int, in_features: int) -> bool:
        """Whether forming ``Σ_t g_t a_tᵀ`` beats the FFT route, by a CPU-measured cost model in units of
        one multiply-add of a batched matmul: explicit ``T·out·in + 30·out·in`` (the product, then a
        scatter of every entry, ~30× a multiply-add), FFT ``24·T·m·log₂m + 4·T·(out + in)`` (two FFTs per
        token, ~24× a multiply-add per ``m·log₂m``). Both routes are the same map."""
        m = self.sketch_dim
        entries = out_features * in_features
        return tokens * entries + 30 * entries <= 24 * tokens * m * max(1, m.bit_length() - 1) + 4 * tokens * (
            out_features + in_features)

    def outer(self, output_gradients: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
        """Sketch of ``Σ_t g_t a_tᵀ`` per example: ``g (B, T, out)``, ``a (B, T, in)`` -> ``(B, m)``.

        Goes through the FFT (``B·T·(out + in + m log m)`` operations) or, where that is cheaper,
        through the explicit per-example matrices (``B·T·out·in``); both are the same map.
        """
        batch, tokens, out_features = output_gradients.shape
        m = self.sketch_dim
        if self.explicit_is_cheaper(tokens, out_features, activations.shape[-1]):
            return self.outer_explicit(output_gradients, activations)
        dtype = torch.promote_types(output_gradients.dtype, torch.float32)
        left = torch.fft.rfft(self.left(output_gradients.to(dtype)), n=m)  # (B, T, m // 2 + 1)
        right = torch.fft.rfft(self.right(activations.to(dtype)), n=m)
        return torch.fft.irfft((left * right).sum(1), n=m)  # (B, m)


def embedding_sketch(sketch: TensorSketch, ids: torch.Tensor, output_gradients: torch.Tensor,
                     padding_idx: int | None = None) -> torch.Tensor:
    """Sketch of an embedding's per-example gradient ``Σ_t e_{id_t} g_tᵀ`` (``(vocab, dim)``) without forming it.

    The one-hot side's CountSketch is a single signed bucket, so the convolution is a circular shift:
    ``TS = Σ_t s_L(id_t) · roll(CS_R(g_t), h_L(id_t))`` (``B·T·m`` operations, no FFT). ``ids (B, T)``,
    ``g (B, T, dim)`` -> ``(B, m)``; tokens equal to ``padding_idx`` get no gradient, as in ``nn.Embedding``.
    """
    m = sketch.sketch_dim
    ids = ids.reshape(ids.shape[0], -1)
    right = sketch.right(output_gradients.reshape(ids.shape[0], ids.shape[1], -1))  # (B, T, m)
    signs = sketch.left.signs[ids].to(right.dtype)
    if padding_idx is not None:
        signs = signs.masked_fill(ids == padding_idx, 0)
    positions = (torch.arange(m, device=ids.device) + sketch.left.buckets[ids][..., None]) % m  # (B, T, m)
    out = right.new_zeros(ids.shape[0], m)
    return out.scatter_add_(1, positions.flatten(1), (right * signs[..., None]).flatten(1))


def embedding_example_gradients(ids: torch.Tensor, output_gradients: torch.Tensor, num_embeddings: int,
                                padding_idx: int | None = None) -> torch.Tensor:
    """Per-example gradient of an embedding table: ``ids (B, T)``, ``g (B, T, dim)`` -> ``(B, vocab, dim)``."""
    batch = ids.shape[0]
    ids = ids.reshape(batch, -1)
    g = output_gradients.reshape(batch, ids.shape[1], -1)
    if padding_idx is not None:
        g = g.masked_fill((ids == padding_idx)[..., None], 0)
    out = g.new_zeros(batch, num_embeddings, g.shape[-1])
    return out.scatter_add_(1, ids[..., None].expand(-1, -1, g.shape[-1]), g)


def layer_norm_example_gradients(norm: torch.nn.LayerNorm, inputs: torch.Tensor,
                                 output_gradients: torch.Tensor) -> torch.Tensor:
    """Per-example gradient of a LayerNorm's weight and bias, ``(B, 2·dim)`` (``(B, dim)`` without bias):
    ``Σ_t g_t ⊙ x̂_t`` and ``Σ_t g_t`` with ``x̂`` the normalised input (in float32 or better)."""
    dtype = torch.promote_types(inputs.dtype, torch.float32)
    g = output_gradients.to(dtype)
    normalised = torch.nn.functional.layer_norm(inputs.to(dtype), norm.normalized_shape, eps=norm.eps)
    batch = inputs.shape[0]
    parts = [(g * normalised).reshape(batch, -1, *norm.normalized_shape).sum(1).flatten(1)]
    if norm.bias is not None:
        parts.append(g.reshape(batch, -1, *norm.normalized_shape).sum(1).flatten(1))
    return torch.cat(parts, 1)


def functional_example_gradients(module: torch.nn.Module, inputs: torch.Tensor,
                                 output_gradients: torch.Tensor) -> torch.Tensor:
    """Per-example gradient of ``module``'s own parameters, flattened in ``named_parameters`` order: ``(B, P)``.

    For modules that treat every example on its own (norms, elementwise scales): the vector-Jacobian
    product of ``module(x_b)`` with ``g_b``, vectorised over the batch with ``torch.func``.
    """
    params = {name: p.detach() for name, p in module.named_parameters(recurse=False)}

    def one(x: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
        _, pullback = torch.func.vjp(lambda p: torch.func.functional_call(module, p, (x[None],)), params)
        return pullback(g[None])[0]

    grads = torch.func.vmap(one)(inputs, output_gradients.to(inputs.dtype))
    return torch.cat([grads[name].flatten(1) for name in params], 1)
