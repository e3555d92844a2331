"""Influence math on one linear layer: preconditioned query gradients and their contraction with a
training batch's activations and output gradients.

Conventions (``../shared/DESIGN.md``): ``I(z_q, z_m) = ∇L(z_q)ᵀ (H + λI)⁻¹ ∇L(z_m)``, positive = the
training example lowers the query's loss. For a linear layer the training gradient is
``DW_m = Σ_t g_t a_tᵀ`` (bias-appended ``a``), so with ``P_q = (H + λI)⁻¹ ∇_W L(z_q)`` the layer's share is
``Σ_t g_tᵀ P_q a_t``: scores come from ``a`` and ``g`` directly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from lit_attrib.io import ScratchTensors
from lit_attrib.layers import LayerInfo
from lit_attrib.ops.gradients import layer_inputs
from lit_attrib.ops.kfac import LargestError
from lit_attrib.ops.workspaces import Workspaces

__all__ = ["LayerMemory", "LowRank", "PairwiseScores", "check_rank", "layer_memory", "low_rank", "pairwise_scores",
           "partition_layers", "partition_need", "skinny_product", "token_pairwise_scores"]

LowRank = tuple[torch.Tensor, torch.Tensor]
"""A rank-r factorisation ``P ≈ left @ right`` with ``left (Q, out, r)`` and ``right (Q, r, in)``."""


def check_rank(shape: tuple[int, int], rank: int) -> None:
    """Raise a ``ValueError`` unless ``1 ≤ rank ≤ min(out, in)`` for a gradient of shape ``(out, in)``."""
    out_features, in_features = shape
    if not 1 <= rank <= min(out_features, in_features):
        raise ValueError(
            f"query_gradient_rank={rank} is not between 1 and the rank of a ({out_features}, {in_features}) "
            f"gradient ({min(out_features, in_features)}); lower it or set it to null for full rank"
        )


def low_rank(preconditioned: torch.Tensor, rank: int) -> LowRank:
    """The best rank-``rank`` approximation of each ``P_q (out, in)`` (truncated SVD), as ``(left, right)``.

    Raises:
        ValueError: ``rank`` is below 1 or above ``min(out, in)``, the largest rank the gradient has.
    """
    out_features, in_features = preconditioned.shape[-2:]
    check_rank((out_features, in_features), rank)
    # The top singular pairs from the eigendecomposition of the smaller Gram matrix, in float64
    # (faster than a full SVD of the tall matrix; float64 keeps the squared condition harmless).
    matrix = preconditioned.double()
    if out_features >= in_features:
        _, right = torch.linalg.eigh(matrix.mT @ matrix)  # ascending eigenvalues
        right = right[..., :, -rank:].flip(-1)  # (Q, in, r)
        left = matrix @ right  # = U_r Σ_r
        return left.to(preconditioned.dtype).contiguous(), right.mT.to(preconditioned.dtype).contiguous()
    _, left = torch.linalg.eigh(matrix @ matrix.mT)
    left = left[..., :, -rank:].flip(-1)  # (Q, out, r): U_r
    right = left.mT @ matrix  # = Σ_r V_rᵀ
    return left.to(preconditioned.dtype).contiguous(), right.to(preconditioned.dtype).contiguous()


def token_pairwise_scores(preconditioned: torch.Tensor | LowRank, activations: torch.Tensor,
                          output_gradients: torch.Tensor) -> torch.Tensor:
    """``S[q, b, t] = g_{b,t}ᵀ P_q a_{b,t}``: each training token's share of the score, ``(Q, B, T)``.

    Args:
        preconditioned: ``P (Q, out, in)`` or its :func:`low_rank` factors.
        activations: ``a (B, T, in)``, bias column appended when the layer has a bias.
        output_gradients: ``g (B, T, out)`` of each example's summed loss.
    """
    if isinstance(preconditioned, tuple):
        left, right = preconditioned
        projected_g = torch.einsum("bto,qor->qbtr", output_gradients, left)
        projected_a = torch.einsum("bti,qri->qbtr", activations, right)
        return (projected_g * projected_a).sum(-1)
    return (torch.einsum("qoi,bti->qbto", preconditioned, activations) * output_gradients.unsqueeze(0)).sum(-1)


def pairwise_scores(preconditioned: torch.Tensor | LowRank, activations: torch.Tensor,
                    output_gradients: torch.Tensor, workspace: torch.Tensor | None = None) -> torch.Tensor:
    """``S[q, b] = Σ_t g_{b,t}ᵀ P_q a_{b,t} = ⟨P_q, DW_b⟩``, ``(Q, B)``, by the cheaper contraction.

    A low-rank ``P`` goes through the tokens (``B·T·Q·r·(out + in)`` operations, nothing of size
    ``out × in`` per example). A full-rank ``P`` with several queries goes through the batch's
    gradients of this one layer (``B·T·out·in + Q·B·out·in``, against ``Q·B·T·out·in`` through the
    tokens); they live only for this call, in ``workspace`` when given (a ``(B, out, in)`` buffer the caller
    reuses across layers, so that the heap is not fragmented by one such allocation per layer).
    """
    if isinstance(preconditioned, tuple) or preconditioned.shape[0] == 1:
        return token_pairwise_scores(preconditioned, activations, output_gradients).sum(-1)
    # Plain matrix products: einsum would copy both operands into its own layout first.
    example_gradients = torch.bmm(output_gradients.mT, activations, out=workspace)  # (B, out, in)
    return skinny_product(preconditioned.flatten(1), example_gradients.flatten(1))


_SKINNY_FORMS = (lambda p, d: (d @ p.T).T, lambda p, d: p @ d.T)
_skinny_choice: dict[tuple, int] = {}


def skinny_product(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``left @ rightᵀ`` for ``left (Q, K)`` and ``right (B, K)`` with a long ``K``, ``(Q, B)``.

    BLAS libraries stream such a product at very different speeds depending on which operand they see
    as transposed, and which way is faster depends on the library and the CPU (``(B, K) @ (K, Q)`` was
    2.2× faster on one machine for SmolLM2's MLP, ``(Q, K) @ (K, B)`` 3.3× faster on another). Both ways
    are timed on the first product of each shape, dtype and device, and the faster one serves every later
    product of that kind in this process (same result to round-off; one way per kind, so repeated runs
    in one process agree bit for bit).
    """
    key = (tuple(left.shape), tuple(right.shape), left.dtype, right.dtype, left.device)
    choice = _skinny_choice.get(key)
    if choice is None:
        timings = []
        for form in _SKINNY_FORMS:
            form(left, right)  # warm-up
            _synchronize(left.device)
            start = time.perf_counter()
            form(left, right)
            _synchronize(left.device)
            timings.append(time.perf_counter() - start)
        choice = _skinny_choice[key] = timings.index(min(timings))
    return _SKINNY_FORMS[choice](left, right)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PairwiseScores:
    """Scores of each training example of a batch against every query, accumulated over the tracked
    layers' uses: ``S[b, q] = Σ_layers Σ_uses Σ_t g_{b,t}ᵀ P_q a_{b,t}``.

    A rank-r ``P`` is multiplied back out to ``(Q, out, in)`` for a layer whenever that contracts
    faster (``(T + Q)·out·in`` against ``T·Q·r·(out + in)``) and the expanded layers stay within
    ``expand_bytes`` together (the decision is made once per layer, at its first use).

    ``P`` may be stored in a narrower dtype than ``dtype`` (float16, bfloat16): each use casts its
    layer's ``P`` up to ``dtype`` for the contraction (one layer at a time), so the arithmetic is in
    ``dtype`` and only the storage rounding remains.

    Args:
        preconditioned: each layer's ``P (Q, out, in)`` or its :func:`low_rank` factors.
        dtype: the dtype of ``a``, ``g``, the contraction and the scores.
        token_scores: also keep each training token's share ``(B, Q, T)``.
        expand_bytes: memory for expanded rank-r layers (0: never expand).
        scoring_dtype: a narrower dtype (``torch.bfloat16``) for the training side of full-rank scores: each
            example's ``DW_b = Σ_t g_t a_tᵀ`` is multiplied from ``a`` and ``g`` cast to it (float32 sums inside
            the product) and rounded to it, and contracted with ``P`` in it when ``P`` is stored in it (else
            cast up to ``dtype`` first; a product in ``scoring_dtype`` rounds each layer's scores to it too). The
            relative Frobenius error of the first example's ``DW`` of every batch and layer, against ``dtype``,
            is kept in ``scoring_error`` (the largest). ``None``: everything in ``dtype``.
    """

    def __init__(self, preconditioned: dict[str, torch.Tensor | LowRank] | ScratchTensors, dtype: torch.dtype = torch.float32,
                 token_scores: bool = False, expand_bytes: float = 0.0,
                 scoring_dtype: torch.dtype | None = None) -> None:
        # A copy (rank-r layers expanded below replace their entry), except of query gradients on disk: those
        # are read one layer at a time and are full rank.
        self.preconditioned = preconditioned if isinstance(preconditioned, ScratchTensors) else dict(preconditioned)
        self.dtype = dtype
        self.token_scores = token_scores
        self.expand_bytes = expand_bytes
        self.expanded: list[str] = []
        self._expanded_bytes = 0
        self._decided: set[str] = set()
        self._batch: dict[str, torch.Tensor] = {}
        self._workspaces = Workspaces()
        self.scoring_dtype = scoring_dtype
        self.scoring_error = LargestError()

    def begin_batch(self) -> None:
        self._batch = {}

    def add(self, layer: LayerInfo, activations: torch.Tensor, gradients: torch.Tensor) -> None:
        """Add one use of ``layer``: ``a (B, T, in)`` as it entered the layer, ``g (B, T, out)``."""
        a, g = layer_inputs(layer, activations, gradients, self.dtype)
        if layer.name not in self._decided:
            self._maybe_expand(layer.name, tokens=a.shape[1])
        stored = self.preconditioned[layer.name]
        if self.scoring_dtype is not None and not self.token_scores and isinstance(stored, torch.Tensor) \
                and stored.shape[0] > 1:
            self._add("scores", self._narrow_scores(stored, a, g))
            return
        if isinstance(stored, torch.Tensor) and stored.dtype != self.dtype:  # cast into a buffer kept per shape:
            # a fresh (Q, out, in) allocation per use is mapped and page-faulted anew each time (glibc maps
            # blocks above 32 MB), which cost more than the contraction on SmolLM2.
            preconditioned = self._workspaces.get(stored.shape[0], stored.shape[1:], a, slot=1).copy_(stored)
        else:
            preconditioned = _as_dtype(stored, self.dtype)
        if self.token_scores:
            tokens = token_pairwise_scores(preconditioned, a, g)  # (Q, B, T)
            self._add("token_scores", tokens)
            self._add("scores", tokens.sum(-1))
        else:
            through_gradients = not isinstance(preconditioned, tuple) and preconditioned.shape[0] > 1
            workspace = self._workspaces.get(a.shape[0], (g.shape[-1], a.shape[-1]), a) if through_gradients else None
            self._add("scores", pairwise_scores(preconditioned, a, g, workspace))

    def _narrow_scores(self, stored: torch.Tensor, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """``(Q, B)`` scores of one full-rank layer with the batch's ``DW`` in ``scoring_dtype`` (see the class)."""
        low, size, shape = self.scoring_dtype, a.shape[0], (g.shape[-1], a.shape[-1])
        narrow = self._workspaces.get(size, shape, a.new_empty(0, dtype=low), slot=2)
        torch.bmm(g.mT.to(low), a.to(low), out=narrow)  # (B, out, in)
        exact = g[0].mT @ a[0]  # the first example's DW in dtype: the error's reference
        norm = float(exact.norm())
        if norm > 0:
            self.scoring_error.update(float((narrow[0].to(self.dtype) - exact).norm()) / norm)
        if stored.dtype == low:  # both sides narrow: no copy of P
            return skinny_product(stored.flatten(1), narrow.flatten(1)).to(self.dtype)
        example_gradients = self._workspaces.get(size, shape, a).copy_(narrow)
        preconditioned = stored if stored.dtype == self.dtype else \
            self._workspaces.get(stored.shape[0], stored.shape[1:], a, slot=1).copy_(stored)
        return skinny_product(preconditioned.flatten(1), example_gradients.flatten(1))

    def end_batch(self) -> dict[str, torch.Tensor]:
        """The batch's ``scores (B, Q)`` (and ``token_scores (B, Q, T)``), the example first."""
        result = {"scores": self._batch["scores"].T}
        if self.token_scores:
            result["token_scores"] = self._batch["token_scores"].transpose(0, 1)
        self._batch = {}
        return result

    def _add(self, key: str, value: torch.Tensor) -> None:
        self._batch[key] = self._batch[key] + value if key in self._batch else value

    def _maybe_expand(self, name: str, tokens: int) -> None:
        self._decided.add(name)
        preconditioned = self.preconditioned[name]
        if not isinstance(preconditioned, tuple) or self.token_scores:
            return
        left, right = preconditioned
        queries, out_features, rank = left.shape
        in_features = right.shape[-1]
        through_tokens = tokens * queries * rank * (out_features + in_features)
        expanded = (tokens + queries) * out_features * in_features
        size = queries * out_features * in_features * left.element_size()
        if expanded < through_tokens and self._expanded_bytes + size <= self.expand_bytes:
            # Still rank r, now cheaper to contract; multiplied in ``dtype``, kept in the storage dtype.
            self.preconditioned[name] = (left.to(self.dtype) @ right.to(self.dtype)).to(left.dtype)
            self._expanded_bytes += size
            self.expanded.append(name)


def _as_dtype(preconditioned: torch.Tensor | LowRank, dtype: torch.dtype) -> torch.Tensor | LowRank:
    if isinstance(preconditioned, tuple):
        return tuple(part.to(dtype) for part in preconditioned)
    return preconditioned.to(dtype)


# ------------------------------------------------------------------------------- memory
@dataclass(frozen=True)
class LayerMemory:
    """What one layer costs a pairwise pass, in bytes: its stored query gradients (held for the whole
    training pass) and the most it needs on top while one batch goes through it (transient)."""

    query: int
    working: int


def layer_memory(shape: tuple[int, int], queries: int, query_batch: int, train_batch: int, tokens: int,
                 rank: int | None, compute_size: int, query_size: int, token_scores: bool = False,
                 scoring_size: int | None = None) -> LayerMemory:
    """The bytes one layer of gradient shape ``(out, in)`` costs a pairwise pass (see :class:`LayerMemory`).

    Query side: a query batch's per-example gradients ``DW (B_q, out, in)`` plus the inverse-HVP's
    intermediates (about three more of that size), for a rank-r cut also the float64 copy and Gram
    matrix of :func:`low_rank`, and the concatenation of the layer's batches (one more copy of the layer's
    stored gradients). Training side, mirroring :func:`pairwise_scores`: the batch's ``DW (B, out, in)``
    for a full-rank ``P`` with several queries, else the ``(Q, B, T, ·)`` products through the tokens;
    plus ``P`` cast up to the compute dtype when it is stored narrower. With a ``scoring_size`` (bytes per
    value of a narrower ``scoring_dtype``, see :class:`PairwiseScores`) the batch's ``DW`` is held in it too, and
    ``P`` stored in it is not cast. The model, its activations and autograd's saved tensors are not counted: the
    forward and backward need them anyway.
    """
    out_features, in_features = shape
    full = out_features * in_features
    stored = queries * (full if rank is None else rank * (out_features + in_features)) * query_size
    query_side = 4 * query_batch * full * compute_size + stored
    if rank is not None:
        smaller = min(out_features, in_features)
        query_side += query_batch * (full + smaller * smaller) * 8
    if token_scores and rank is None:
        train_side = 2 * queries * train_batch * tokens * out_features * compute_size
    elif token_scores or rank is not None or queries == 1:
        width = out_features if rank is None else rank
        train_side = 3 * queries * train_batch * tokens * width * compute_size
    else:
        train_side = train_batch * full * compute_size + queries * train_batch * compute_size
    narrow = scoring_size is not None and rank is None and not token_scores and queries > 1
    narrow_both = narrow and query_size == scoring_size
    if narrow:  # DW in scoring_dtype, and in the compute dtype too unless P is stored narrow
        train_side += train_batch * full * scoring_size - (train_batch * full * compute_size if narrow_both else 0)
    if query_size != compute_size and not narrow_both:
        train_side += stored // query_size * compute_size
    return LayerMemory(query=stored, working=max(query_side, train_side))


def partition_need(memory: dict[str, LayerMemory], names: list[str]) -> int:
    """The bytes a pass over the layers ``names`` needs: their stored query gradients together, plus the
    largest transient of one of them (layers go through a batch one at a time)."""
    return sum(memory[name].query for name in names) + max((memory[name].working for name in names), default=0)


def partition_layers(memory: dict[str, LayerMemory], budget: float) -> list[list[str]]:
    """Consecutive groups of layers (in the order given: the model's), each within ``budget`` bytes by
    :func:`partition_need`; as few groups as consecutive groups allow (each filled greedily).

    Scores are a sum over layers, so a pass per group, each with its group's query gradients only,
    adds up to the scores of one pass over every layer.

    Raises:
        ValueError: a layer needs more than ``budget`` on its own (the message names it and its need).
    """
    groups: list[list[str]] = []
    for name in memory:
        if partition_need(memory, [name]) > budget:
            raise ValueError(name)
        if groups and partition_need(memory, groups[-1] + [name]) <= budget:
            groups[-1].append(name)
        else:
            groups.append([name])
    return groups
