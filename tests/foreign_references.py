"""Independent references for the foreign-module matrix: plain torch, autograd loops, explicit sums.

Nothing here imports lit_attrib; the factors a reference needs (eigenbases, Λ) are read from the
artifact's safetensors file by key. Conventions (``../shared/DESIGN.md``): a linear layer is
``y = W a + b`` with ``W (out, in)``; the bias is an appended input column of ones, so gradients
are ``(out, in + 1)``; ``g`` is the output gradient of each example's **summed** loss.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

LossFn = Callable[[nn.Module, object], torch.Tensor]


def with_bias(x: torch.Tensor, bias: bool) -> torch.Tensor:
    """``x (..., in)`` with a column of ones appended when the layer has a bias."""
    return torch.cat([x, torch.ones(*x.shape[:-1], 1, dtype=x.dtype, device=x.device)], -1) if bias else x


@contextlib.contextmanager
def recording(module: nn.Module, layer_names: Iterable[str]):
    """Forward hooks that append ``(name, input, output)`` for **every** call of each named layer."""
    calls: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    handles = []
    for name in layer_names:
        layer = module.get_submodule(name)
        handles.append(layer.register_forward_hook(
            lambda mod, inputs, output, name=name: calls.append((name, inputs[0].detach(), output))))
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def layer_gradient(layer: nn.Linear, grads: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """``(out, in [+1])`` from the gradients of ``weight`` (and ``bias``), zeros where unused."""
    weight = grads[0] if grads[0] is not None else torch.zeros_like(layer.weight)
    if layer.bias is None:
        return weight
    bias = grads[1] if grads[1] is not None else torch.zeros_like(layer.bias)
    return torch.cat([weight, bias[:, None]], 1)


def _parameters(module: nn.Module, layer_names: Sequence[str]) -> tuple[list[torch.Tensor], list[int]]:
    params, counts = [], []
    for name in layer_names:
        layer = module.get_submodule(name)
        own = [layer.weight] + ([layer.bias] if layer.bias is not None else [])
        params.extend(own)
        counts.append(len(own))
    return params, counts


def _split(module: nn.Module, layer_names: Sequence[str], counts: list[int], grads) -> dict[str, torch.Tensor]:
    out, position = {}, 0
    for name, count in zip(layer_names, counts):
        out[name] = layer_gradient(module.get_submodule(name), grads[position:position + count])
        position += count
    return out


# ----------------------------------------------------------------------------- gradients
def per_example_gradients(module: nn.Module, examples: Sequence, loss_fn: LossFn,
                          layer_names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Each layer's ``DW (N, out, in [+1])`` of each example's summed loss, one example at a time.

    ``examples`` are batches of one. The gradient is the parameter's: for a weight shared by several
    calls it is the sum over all of them (track only untied ``nn.Linear`` layers, or mean exactly that).
    """
    params, counts = _parameters(module, layer_names)
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in layer_names}
    for example in examples:
        loss = loss_fn(module, example).sum()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for name, grad in _split(module, layer_names, counts, grads).items():
            rows[name].append(grad)
    return {name: torch.stack(value) for name, value in rows.items()}


def token_gradients(module: nn.Module, example, token_loss_fn: LossFn,
                    layer_names: Sequence[str]) -> list[dict[str, torch.Tensor]]:
    """For each position ``t`` of a one-example batch, the layers' gradient of that token's loss
    (zeros where the token carries no loss)."""
    params, counts = _parameters(module, layer_names)
    losses = token_loss_fn(module, example)[0]  # (T,)
    out = []
    for t in range(losses.shape[0]):
        grads = torch.autograd.grad(losses[t], params, retain_graph=True, allow_unused=True)
        out.append(_split(module, layer_names, counts, grads))
    return out


def sgd_step(module: nn.Module, loss: torch.Tensor, lr: float) -> None:
    """One plain SGD step ``θ ← θ − lr ∇loss`` (a tied parameter once, with its summed gradient)."""
    parameters = [p for p in module.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, parameters, allow_unused=True)
    with torch.no_grad():
        for p, g in zip(parameters, grads):
            if g is not None:
                p.add_(g, alpha=-lr)


# ------------------------------------------------------------------------------- K-FAC
class KFACSums:
    """Running ``Σ a aᵀ``, ``Σ g gᵀ`` and token counts per layer (each call of a layer adds its tokens)."""

    def __init__(self) -> None:
        self.A: dict[str, torch.Tensor] = {}
        self.G: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}

    def add_batch(self, module: nn.Module, batch, layer_names: Sequence[str], loss_fn: LossFn,
                  token_mask_fn: Callable) -> None:
        with recording(module, layer_names) as calls:
            losses = loss_fn(module, batch)
        grads = torch.autograd.grad(losses.sum(), [y for _, _, y in calls], allow_unused=True)
        mask = token_mask_fn(batch).bool()  # (B, T)
        for (name, x, y), g in zip(calls, grads):
            g = torch.zeros_like(y) if g is None else g
            a = with_bias(x, module.get_submodule(name).bias is not None)[mask]  # (N_tok, in [+1])
            g = g.detach()[mask]  # (N_tok, out)
            self.A[name] = self.A.get(name, 0) + a.T @ a
            self.G[name] = self.G.get(name, 0) + g.T @ g
            self.tokens[name] = self.tokens.get(name, 0) + int(mask.sum())

    def covariances(self) -> dict[str, dict[str, torch.Tensor]]:
        return {name: {"A": self.A[name] / self.tokens[name], "G": self.G[name] / self.tokens[name]}
                for name in self.A}


def reference_kfac(module: nn.Module, batches: Iterable, layer_names: Sequence[str], loss_fn: LossFn,
                   token_mask_fn: Callable) -> dict[str, dict[str, torch.Tensor]]:
    """``A = Σ a aᵀ / N_tokens`` and ``G = Σ g gᵀ / N_tokens`` over the tokens ``token_mask_fn`` keeps,
    with ``a`` bias-appended, from hooks on every call, and ``g = ∂(Σ_b loss_b)/∂y`` per batch."""
    sums = KFACSums()
    for batch in batches:
        sums.add_batch(module, batch, layer_names, loss_fn, token_mask_fn)
    return sums.covariances()


def reference_kfac_training(module: nn.Module, batches: Sequence, layer_names: Sequence[str], loss_fn: LossFn,
                            token_mask_fn: Callable, train_loss: Callable[[nn.Module, object, int], torch.Tensor],
                            lr: float) -> dict[str, dict[str, torch.Tensor]]:
    """K-FAC observed along a training run: each batch's sums at the weights of its step, then one SGD
    step ``θ ← θ − lr ∇ train_loss`` (``module`` is changed in place)."""
    sums = KFACSums()
    for position, batch in enumerate(batches):
        sums.add_batch(module, batch, layer_names, loss_fn, token_mask_fn)
        sgd_step(module, train_loss(module, batch, position), lr)
    return sums.covariances()


def reference_lambda(module: nn.Module, examples: Sequence, layer_names: Sequence[str], loss_fn: LossFn,
                     eigenvectors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """EKFAC's ``Λ = mean over examples of (Q_Gᵀ DW Q_A)²``, ``DW`` by an autograd loop over examples.

    ``eigenvectors[name] = (Q_A, Q_G)``.
    """
    grads = per_example_gradients(module, examples, loss_fn, layer_names)
    out = {}
    for name in layer_names:
        q_a, q_g = eigenvectors[name]
        rotated = q_g.T @ grads[name] @ q_a  # (N, out, in)
        out[name] = (rotated ** 2).mean(0)
    return out


# ----------------------------------------------------------------------------- factors
def read_factors(folder: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """``factors.safetensors`` as ``{module: {key: tensor}}`` (keys ``<module>.<factor>``)."""
    flat = load_file(str(Path(folder) / "factors.safetensors"))
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in flat.items():
        name, _, factor = key.rpartition(".")
        out.setdefault(name, {})[factor] = tensor
    return out


def inverse_hvp(factors: dict[str, torch.Tensor], vector: torch.Tensor, damping: float | None) -> torch.Tensor:
    """``Q_G [(Q_Gᵀ V Q_A) / (Λ + λ)] Q_Aᵀ`` with ``λ = 0.1 · mean(Λ)`` when ``damping`` is None."""
    q_a = factors["activation_eigenvectors"].to(vector.dtype)
    q_g = factors["gradient_eigenvectors"].to(vector.dtype)
    lam = factors["lambda"].to(vector.dtype)
    damping = 0.1 * float(lam.mean()) if damping is None else damping
    return q_g @ ((q_g.T @ vector @ q_a) / (lam + damping)) @ q_a.T


def explicit_inverse_hvp(factors: dict[str, torch.Tensor], vector: torch.Tensor, damping: float | None) -> torch.Tensor:
    """The same as :func:`inverse_hvp` through an explicit ``(out·in)²`` matrix and ``torch.linalg.solve``."""
    q_a = factors["activation_eigenvectors"].to(vector.dtype)
    q_g = factors["gradient_eigenvectors"].to(vector.dtype)
    lam = factors["lambda"].to(vector.dtype)
    damping = 0.1 * float(lam.mean()) if damping is None else damping
    basis = torch.kron(q_g, q_a)  # row-major vec(W): columns are the eigenvectors of G ⊗ A
    matrix = basis @ torch.diag(lam.flatten() + damping) @ basis.T
    return torch.linalg.solve(matrix, vector.flatten()).view_as(vector)


def reference_influence(query_grads: dict[str, torch.Tensor], train_grads: dict[str, torch.Tensor],
                        factors: dict[str, dict[str, torch.Tensor]], damping: float | None = None) -> torch.Tensor:
    """``I[q, m] = Σ_layers ⟨(H + λI)⁻¹ ∇L(z_q), ∇L(z_m)⟩`` (positive = helpful), ``(N_query, N_train)``."""
    total = 0
    for name, queries in query_grads.items():
        preconditioned = torch.stack([inverse_hvp(factors[name], v, damping) for v in queries])  # (Q, out, in)
        total = total + torch.einsum("qoi,moi->qm", preconditioned, train_grads[name])
    return total


def reference_tracin(query_grads: Sequence[dict[str, torch.Tensor]], train_grads: Sequence[dict[str, torch.Tensor]],
                     etas: Sequence[float]) -> torch.Tensor:
    """``TracIn[m, q] = Σ_c η_c ⟨∇L(z_q; θ_c), ∇L(z_m; θ_c)⟩`` over the tracked layers, ``(N_train, N_query)``.

    ``query_grads[c]`` / ``train_grads[c]``: per layer ``(N, out, in)`` at checkpoint ``c``.
    """
    total = 0
    for queries, train, eta in zip(query_grads, train_grads, etas):
        total = total + eta * sum(torch.einsum("moi,qoi->mq", train[name], queries[name]) for name in queries)
    return total


def reference_token_scores(module: nn.Module, queries: Sequence, token_loss_fn: LossFn,
                           direction: dict[str, torch.Tensor], layer_names: Sequence[str]) -> list[torch.Tensor]:
    """``S[i, t] = vᵀ ∇θ L(x_it)`` for each one-example query batch, by an autograd loop over tokens
    (``(T_i,)`` per query; 0 where the token carries no loss)."""
    out = []
    for example in queries:
        per_token = token_gradients(module, example, token_loss_fn, layer_names)
        scores = torch.zeros(len(per_token), dtype=torch.float64)
        for t, grads in enumerate(per_token):
            scores[t] = sum((direction[name] * grads[name]).sum() for name in layer_names)
        out.append(scores)
    return out


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def reference_attention(hf_model: nn.Module, example: dict) -> list[torch.Tensor]:
    """Each layer's softmax attention ``(H, T, T)`` of a one-example, unpadded batch of a Llama model,
    recomputed in the batch's dtype from the inputs of each ``self_attn``: ``q = q_proj(h)``,
    ``k = k_proj(h)`` with RoPE (the model's own ``cos``/``sin``), ``softmax(q kᵀ / √d + causal)``.

    (HF's eager kernel takes its softmax in float32, so it is no float64 reference.)
    """
    inputs: list[tuple[nn.Module, torch.Tensor, tuple]] = []
    layers = [m for m in hf_model.modules() if all(hasattr(m, p) for p in ("q_proj", "k_proj", "head_dim"))]

    def grab(module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        inputs.append((module, hidden.detach(), kwargs["position_embeddings"]))

    handles = [m.register_forward_pre_hook(grab, with_kwargs=True) for m in layers]
    try:
        with torch.no_grad():
            hf_model(input_ids=example["input_ids"], attention_mask=example["attention_mask"], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    maps = []
    with torch.no_grad():
        for module, hidden, (cos, sin) in inputs:
            B, T, _ = hidden.shape
            d = module.head_dim
            q = module.q_proj(hidden).view(B, T, -1, d).transpose(1, 2)  # (B, H, T, d)
            k = module.k_proj(hidden).view(B, T, -1, d).transpose(1, 2)  # (B, H_kv, T, d)
            cos, sin = cos[:, None].to(q.dtype), sin[:, None].to(q.dtype)
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            scores = q @ k.transpose(-1, -2) / d ** 0.5
            causal = torch.ones(T, T, dtype=torch.bool).triu(1)
            maps.append(torch.softmax(scores.masked_fill(causal, float("-inf")), -1)[0])
    return maps
