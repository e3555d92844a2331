"""CountSketch / TensorSketch against explicit matrices, circular convolutions and unbiasedness."""

from __future__ import annotations

import pytest
import torch

from lit_attrib.ops.sketch import CountSketch, TensorSketch, block_seed


def circular_convolution(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``z[k] = Σ_p x[p] y[(k − p) mod m]`` by a plain loop."""
    m = x.shape[-1]
    return torch.stack([sum(x[p] * y[(k - p) % m] for p in range(m)) for k in range(m)])


def test_count_sketch_is_its_explicit_matrix():
    sketch = CountSketch(dim=13, sketch_dim=5, seed=3)
    x = torch.randn(4, 13, dtype=torch.float64)
    matrix = sketch.matrix()
    assert matrix.shape == (5, 13) and torch.equal(matrix.abs().sum(0), torch.ones(13, dtype=torch.float64))
    torch.testing.assert_close(sketch(x), x @ matrix.T, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("out_features", "in_features", "tokens", "m"), [(3, 4, 5, 16), (40, 33, 3, 8)],
                         ids=["explicit-path", "fft-path"])
def test_tensor_sketch_of_token_outer_products_is_the_convolution_of_count_sketches(out_features, in_features,
                                                                                      tokens, m):
    sketch = TensorSketch(out_features, in_features, m, seed=11)
    g = torch.randn(2, tokens, out_features, dtype=torch.float64)
    a = torch.randn(2, tokens, in_features, dtype=torch.float64)
    expected = torch.stack([
        sum(circular_convolution(sketch.left(g[b, t]), sketch.right(a[b, t])) for t in range(tokens)) for b in range(2)
    ])
    torch.testing.assert_close(sketch.outer(g, a), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(sketch.dense(torch.einsum("bto,bti->boi", g, a)), expected, rtol=1e-10, atol=1e-10)


def test_sketched_inner_products_are_unbiased():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(6, 7, dtype=torch.float64, generator=generator)
    y = x + 0.5 * torch.randn(6, 7, dtype=torch.float64, generator=generator)
    exact = float((x * y).sum())
    estimates = torch.tensor([float(TensorSketch(6, 7, 16, seed).dense(x) @ TensorSketch(6, 7, 16, seed).dense(y))
                              for seed in range(50)])
    error = float(estimates.std() / 50 ** 0.5)
    assert abs(float(estimates.mean()) - exact) < 3 * error, (float(estimates.mean()), exact, error)
    assert float(estimates.std()) > 0  # a sketch, not the identity


def test_tables_depend_only_on_the_seed():
    one, two = CountSketch(100, 32, seed=5), CountSketch(100, 32, seed=5)
    assert torch.equal(one.buckets, two.buckets) and torch.equal(one.signs, two.signs)
    other = CountSketch(100, 32, seed=6)
    assert not torch.equal(one.buckets, other.buckets)
    torch.manual_seed(123)  # the global generator plays no part
    assert torch.equal(CountSketch(100, 32, seed=5).buckets, one.buckets)
    assert block_seed(0, "model.layers.0.mlp.up_proj") != block_seed(0, "model.layers.0.mlp.down_proj")
    if torch.cuda.is_available():
        assert torch.equal(CountSketch(100, 32, seed=5, device="cuda").buckets.cpu(), one.buckets)


def test_bad_dimensions_are_refused():
    with pytest.raises(ValueError, match="sketch_dim ≥ 1"):
        CountSketch(10, 0, seed=0)
    with pytest.raises(ValueError, match="last axis of 10"):
        CountSketch(10, 4, seed=0)(torch.zeros(3, 9))


def test_embedding_sketch_is_the_tensor_sketch_of_the_explicit_gradient():
    from lit_attrib.ops.sketch import embedding_example_gradients, embedding_sketch

    table = torch.nn.Embedding(11, 6, padding_idx=0).double()
    ids = torch.tensor([[3, 5, 3, 0], [0, 10, 2, 2]])
    g = torch.randn(2, 4, 6, dtype=torch.float64)
    # autograd per example, one at a time: the reference gradient of Σ_t ⟨g_t, E[id_t]⟩
    expected = torch.stack([torch.autograd.grad((table(ids[b]) * g[b]).sum(), table.weight)[0] for b in range(2)])
    torch.testing.assert_close(embedding_example_gradients(ids, g, 11, padding_idx=0), expected, rtol=1e-12, atol=0)
    sketch = TensorSketch(11, 6, 16, seed=4)
    torch.testing.assert_close(embedding_sketch(sketch, ids, g, padding_idx=0), sketch.dense(expected),
                               rtol=1e-10, atol=1e-12)


def test_functional_example_gradients_match_an_autograd_loop():
    from lit_attrib.ops.sketch import functional_example_gradients

    norm = torch.nn.LayerNorm(5).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    g = torch.randn(3, 4, 5, dtype=torch.float64)
    expected = torch.stack([torch.cat([t.flatten() for t in torch.autograd.grad((norm(x[b]) * g[b]).sum(),
                                                                                 [norm.weight, norm.bias])])
                            for b in range(3)])
    torch.testing.assert_close(functional_example_gradients(norm, x, g), expected, rtol=1e-12, atol=1e-12)


def test_layer_norm_example_gradients_match_torch_func():
    from lit_attrib.ops.sketch import functional_example_gradients, layer_norm_example_gradients

    norm = torch.nn.LayerNorm(6).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
    x = torch.randn(3, 5, 6, dtype=torch.float64) * 3 + 1
    g = torch.randn(3, 5, 6, dtype=torch.float64)
    torch.testing.assert_close(layer_norm_example_gradients(norm, x, g), functional_example_gradients(norm, x, g),
                               rtol=1e-10, atol=1e-12)
