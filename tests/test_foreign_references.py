"""The references of the foreign-module matrix checked on their own (explicit matrices, autograd identities),
and the foreign modules' glue checked against their own training steps."""

from __future__ import annotations

from copy import deepcopy

import pytest
import torch
from foreign_modules import FOREIGN
from foreign_references import (
    explicit_inverse_hvp,
    inverse_hvp,
    per_example_gradients,
    reference_attention,
    reference_influence,
    reference_kfac,
    reference_kfac_training,
    reference_lambda,
    reference_token_scores,
    reference_tracin,
    token_gradients,
)
from torch import nn

NAMES = list(FOREIGN)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny float64 matrices: one thread is faster than two, and spins less on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=NAMES)
def spec(request):
    return FOREIGN[request.param]


# --------------------------------------------------------------------------------- the glue
def test_glue_is_the_training_loss_summed(spec):
    """The token-mean of ``token_loss_fn`` over ``token_mask`` is the module's own training loss, tokens
    without a loss are exactly 0, and ``loss_fn`` is ``token_loss_fn`` summed."""
    module = spec.make()
    batch = next(iter(spec.loader(spec.dataset(9, seed=3), batch_size=9)))
    tokens = spec.token_loss_fn(module, batch)
    mask = spec.token_mask(batch)
    assert tokens.shape == mask.shape
    assert bool((tokens[~mask] == 0).all()) and bool((tokens[mask] > 0).all())
    assert not bool(mask.all()) or spec.name == "demo"  # padding (and prompts) exist except in the demo's stream
    rtol = 1e-6 if spec.name == "llama_labels" else 1e-12  # HF computes its loss in float32
    torch.testing.assert_close(module.training_step(batch, 0).double(), tokens.sum() / mask.sum(), rtol=rtol, atol=0)
    torch.testing.assert_close(spec.loss_fn(module, batch), tokens.sum(-1), rtol=1e-12, atol=0)
    assert spec.padding_mask(batch).shape == mask.shape


def test_examples_do_not_depend_on_padding(spec):
    """A batch's per-example losses equal those of each example alone (padding changes nothing)."""
    module = spec.make()
    dataset = spec.dataset(9, seed=3)
    batched = spec.loss_fn(module, next(iter(spec.loader(dataset, batch_size=9))))
    alone = torch.cat([spec.loss_fn(module, e) for e in spec.examples(dataset)])
    torch.testing.assert_close(batched, alone, rtol=1e-12, atol=0)


# ------------------------------------------------------------------------------ gradients
def test_per_example_gradients_sum_to_the_batch_gradient(spec):
    module = spec.make()
    dataset = spec.dataset(6, seed=4)
    grads = per_example_gradients(module, spec.examples(dataset), spec.loss_fn, spec.layers)
    loss = spec.loss_fn(module, next(iter(spec.loader(dataset, batch_size=6)))).sum()
    for name in spec.layers:
        layer = module.get_submodule(name)
        expected = torch.autograd.grad(loss, [layer.weight] + ([layer.bias] if layer.bias is not None else []),
                                       retain_graph=True)
        expected = torch.cat([expected[0], expected[1][:, None]], 1) if layer.bias is not None else expected[0]
        assert grads[name].shape == (6, *expected.shape)
        torch.testing.assert_close(grads[name].sum(0), expected, rtol=1e-10, atol=1e-14)
        assert float(grads[name].abs().sum()) > 0, name


def test_token_gradients_sum_to_the_example_gradient(spec):
    module = spec.make()
    example = spec.examples(spec.dataset(3, seed=5))[1]
    per_token = token_gradients(module, example, spec.token_loss_fn, spec.layers)
    whole = per_example_gradients(module, [example], spec.loss_fn, spec.layers)
    mask = spec.token_mask(example)[0]
    for name in spec.layers:
        torch.testing.assert_close(sum(g[name] for g in per_token), whole[name][0], rtol=1e-10, atol=1e-14)
        for t in torch.nonzero(~mask).flatten().tolist():  # tokens without a loss have no gradient
            assert float(per_token[t][name].abs().max()) == 0.0


def test_token_scores_sum_to_the_sequence_score(spec):
    module = spec.make()
    examples = spec.examples(spec.dataset(3, seed=6))
    generator = torch.Generator().manual_seed(0)
    direction = {name: torch.randn(module.get_submodule(name).weight.shape[0],
                                   module.get_submodule(name).weight.shape[1]
                                   + int(module.get_submodule(name).bias is not None),
                                   generator=generator, dtype=torch.float64) for name in spec.layers}
    scores = reference_token_scores(module, examples, spec.token_loss_fn, direction, spec.layers)
    grads = per_example_gradients(module, examples, spec.loss_fn, spec.layers)
    for i, row in enumerate(scores):
        expected = sum((direction[n] * grads[n][i]).sum() for n in spec.layers)
        torch.testing.assert_close(row.sum(), expected, rtol=1e-10, atol=1e-12)
        assert bool((row[~spec.token_mask(examples[i])[0]] == 0).all())


# ----------------------------------------------------------------------------------- K-FAC
class Twice(nn.Module):
    """``y = W2 tanh(W1 x + b1)`` with ``W1`` applied twice (a looped layer), for explicit matrices."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(3, 3).double()
        self.head = nn.Linear(3, 2, bias=False).double()

    def forward(self, x):
        h = torch.tanh(self.first(x))
        return self.head(torch.tanh(self.first(h)))


def test_kfac_equals_explicit_matrices_on_a_two_token_toy():
    model = Twice()
    x = torch.tensor([[[0.5, -1.0, 2.0], [1.5, 0.25, -0.5]]], dtype=torch.float64)  # (1, 2, 3)
    c = torch.tensor([[[1.0, -2.0], [0.5, 3.0]]], dtype=torch.float64)  # loss = Σ_t c_t · y_t

    def loss_fn(module, batch):
        return (module(batch) * c).sum((1, 2))

    factors = reference_kfac(model, [x], ["first", "head"], loss_fn, lambda batch: torch.ones(1, 2, dtype=torch.bool))
    # head: a = its input, g = c (the loss is linear in y)
    h = torch.tanh(model.first(torch.tanh(model.first(x))))[0].detach()  # (2, 3)
    torch.testing.assert_close(factors["head"]["A"], (h.T @ h) / 2, rtol=1e-12, atol=0)
    torch.testing.assert_close(factors["head"]["G"], (c[0].T @ c[0]) / 2, rtol=1e-12, atol=0)
    # first: both uses count, each with its own input, over 2 tokens × 2 uses
    h1 = torch.tanh(model.first(x))[0].detach()
    a = torch.cat([torch.cat([x[0], h1]), torch.ones(4, 1, dtype=torch.float64)], 1)  # (4, 3 + 1)
    torch.testing.assert_close(factors["first"]["A"], (a.T @ a) / 4, rtol=1e-12, atol=0)
    # g of each use by explicit chain rule
    pre1 = model.first(x)[0].detach()
    pre2 = model.first(h1).detach()
    g2 = (c[0] @ model.head.weight.detach()) * (1 - torch.tanh(pre2) ** 2)  # (2, 3): gradient at use 2's output
    g1 = (g2 @ model.first.weight.detach()) * (1 - torch.tanh(pre1) ** 2)  # use 1's output
    g = torch.cat([g1, g2])
    torch.testing.assert_close(factors["first"]["G"], (g.T @ g) / 4, rtol=1e-12, atol=0)


def test_kfac_skips_masked_tokens():
    model = Twice()
    x = torch.randn(2, 3, 3, dtype=torch.float64)
    mask = torch.tensor([[True, True, False], [True, False, False]])

    def loss_fn(module, batch):
        return (module(batch) ** 2 * mask[..., None]).sum((1, 2))

    masked = reference_kfac(model, [x], ["head"], loss_fn, lambda batch: mask)
    kept = torch.tanh(model.first(torch.tanh(model.first(x))))[mask].detach()  # (3, 3)
    torch.testing.assert_close(masked["head"]["A"], kept.T @ kept / 3, rtol=1e-12, atol=0)


def test_ekfac_lambda_of_one_token_is_the_kfac_eigenvalue_product():
    """With one example of one token, ``DW = g aᵀ`` and ``Λ = (Q_Gᵀg)² (Q_Aᵀa)²ᵀ = λ_G μ_Aᵀ``."""
    model = Twice()
    x = torch.randn(1, 1, 3, dtype=torch.float64)

    def loss_fn(module, batch):
        return (module(batch) ** 2).sum((1, 2))

    factors = reference_kfac(model, [x], ["head"], loss_fn, lambda batch: torch.ones(1, 1, dtype=torch.bool))
    mu, q_a = torch.linalg.eigh(factors["head"]["A"])
    lam, q_g = torch.linalg.eigh(factors["head"]["G"])
    corrected = reference_lambda(model, [x], ["head"], loss_fn, {"head": (q_a, q_g)})
    torch.testing.assert_close(corrected["head"], torch.outer(lam, mu), rtol=1e-9, atol=1e-12)


def test_training_replay_without_learning_rate_is_plain_kfac(spec):
    module = spec.make()
    batches = list(spec.loader(spec.dataset(6, seed=7), batch_size=4))
    plain = reference_kfac(module, batches, spec.layers[:2], spec.loss_fn, spec.padding_mask)
    replay = reference_kfac_training(module, batches, spec.layers[:2], spec.loss_fn, spec.padding_mask,
                                     lambda m, b, i: m.training_step(b, i), lr=0.0)
    for name in plain:
        torch.testing.assert_close(replay[name]["A"], plain[name]["A"], rtol=1e-12, atol=0)
        torch.testing.assert_close(replay[name]["G"], plain[name]["G"], rtol=1e-12, atol=0)


# ----------------------------------------------------------------------- scores from factors
def _random_factors(out: int, inp: int, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    q_a = torch.linalg.qr(torch.randn(inp, inp, generator=generator, dtype=torch.float64))[0]
    q_g = torch.linalg.qr(torch.randn(out, out, generator=generator, dtype=torch.float64))[0]
    lam = torch.rand(out, inp, generator=generator, dtype=torch.float64)
    return {"activation_eigenvectors": q_a, "gradient_eigenvectors": q_g, "lambda": lam}


@pytest.mark.parametrize("damping", [None, 0.3])
def test_inverse_hvp_equals_explicit_solve(damping):
    factors = _random_factors(3, 4)
    vector = torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(inverse_hvp(factors, vector, damping), explicit_inverse_hvp(factors, vector, damping),
                               rtol=1e-10, atol=1e-12)


def test_influence_is_a_bilinear_form_of_flattened_gradients():
    factors = {"x": _random_factors(3, 4, seed=1), "y": _random_factors(2, 2, seed=2)}
    queries = {"x": torch.randn(2, 3, 4, dtype=torch.float64), "y": torch.randn(2, 2, 2, dtype=torch.float64)}
    train = {"x": torch.randn(5, 3, 4, dtype=torch.float64), "y": torch.randn(5, 2, 2, dtype=torch.float64)}
    scores = reference_influence(queries, train, factors, damping=0.2)
    for q in range(2):
        for m in range(5):
            expected = sum(explicit_inverse_hvp(factors[n], queries[n][q], 0.2).flatten() @ train[n][m].flatten()
                           for n in factors)
            torch.testing.assert_close(scores[q, m], expected, rtol=1e-10, atol=1e-12)


def test_tracin_is_the_weighted_sum_of_dot_products():
    first = {"x": torch.randn(4, 3, 2, dtype=torch.float64)}
    second = {"x": torch.randn(4, 3, 2, dtype=torch.float64)}
    # queries = training examples: each checkpoint adds η times a Gram matrix
    tracin = reference_tracin([first, second], [first, second], [0.5, 2.0])
    flat = [g["x"].flatten(1) for g in (first, second)]
    expected = 0.5 * flat[0] @ flat[0].T + 2.0 * flat[1] @ flat[1].T
    torch.testing.assert_close(tracin, expected, rtol=1e-12, atol=0)


# ------------------------------------------------------------------------------- attention
@pytest.mark.parametrize("name", ["llama_labels", "llama_nolabels"])
def test_reference_attention_is_a_causal_softmax(name):
    spec = FOREIGN[name]
    module = spec.make()
    example = spec.examples(spec.dataset(2, seed=8))[0]
    maps = reference_attention(module.model, example)
    length = example["input_ids"].shape[1]
    assert len(maps) == 1 and maps[0].shape == (2, length, length)
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(2, length, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert float(maps[0].triu(1).abs().max()) == 0.0
    # HF's eager kernel (softmax in float32) agrees to float32 precision
    copy = deepcopy(module.model)
    copy.set_attn_implementation("eager")
    with torch.no_grad():
        eager = copy(input_ids=example["input_ids"], attention_mask=example["attention_mask"],
                     output_attentions=True, use_cache=False)
    torch.testing.assert_close(maps[0], eager.attentions[0][0], rtol=0, atol=1e-6)
