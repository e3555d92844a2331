"""K-FAC token sampling (``token_fraction``): exact on the sampled tokens, unbiased over seeds (float64)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback
from reference_models import LOOPS, RowsDataModule, TinyModule, _with_bias, make_rows
from test_kfac import LAYERS, collect
from torch import nn

from lit_attrib.callbacks import KFACCollectorCallback
from lit_attrib.errors import ConfigError
from lit_attrib.layers import layer_info
from lit_attrib.ops.kfac import factors_inverse_hvp
from lit_attrib.ops.kfac_accumulator import KFACAccumulator, inclusion_probabilities
from lit_attrib.ops.loss import token_nll

SHORT = {"net.inp": "inp", "net.shared": "shared", "net.conv": "conv", "net.head": "head"}
BIAS = {"inp": True, "shared": False, "conv": True, "head": False}


def _projections():
    """q and k read one input (q with a bias, k without); o reads another of a different width."""
    torch.manual_seed(0)
    return {"q": layer_info("q", nn.Linear(6, 4)), "k": layer_info("k", nn.Linear(6, 4, bias=False)),
            "o": layer_info("o", nn.Linear(4, 3))}


def _batch(seed: int, padding: list[int]):
    """Inputs of q/k (B, T, 6) and o (B, T, 4), output gradients, and a right-padding mask (B, T)."""
    g = torch.Generator().manual_seed(seed)
    B, T = len(padding), 9
    mask = torch.ones(B, T, dtype=torch.bool)
    for row, pad in enumerate(padding):
        mask[row, T - pad:] = False
    x = torch.randn(B, T, 6, generator=g, dtype=torch.float64)
    h = torch.randn(B, T, 4, generator=g, dtype=torch.float64)
    gq, gk = torch.randn(B, T, 4, generator=g, dtype=torch.float64), torch.randn(B, T, 4, generator=g, dtype=torch.float64)
    go = torch.randn(B, T, 3, generator=g, dtype=torch.float64)
    return mask, {"q": (x, gq), "k": (x, gk), "o": (h, go)}


BATCHES = [_batch(1, [0, 3, 5, 1]), _batch(2, [2, 0, 7, 4, 0])]


def _accumulate(fraction: float, seed: int, scale: float = 0.5, sampling: str = "uniform", batches=BATCHES):
    layers = _projections()
    accumulator = KFACAccumulator(layers, torch.float64)
    samples = []
    for batch_index, (mask, uses) in enumerate(batches):
        generator = torch.Generator().manual_seed(1000 * seed + batch_index)
        accumulator.begin_batch(mask, scale, fraction, generator, sampling)
        for name, (a, g) in uses.items():
            accumulator.add_activations(layers[name], a)
            accumulator.add_gradients(layers[name], g)
        assert accumulator.end_batch() == []
        samples.append(accumulator.sampled_rows(mask.numel()))
    normalised = {name: {"A": accumulator.sums[name]["activation"] / accumulator.counts[name]["activation_tokens"],
                         "G": accumulator.sums[name]["gradient"] / accumulator.counts[name]["gradient_tokens"]}
                  for name in layers}
    return accumulator, samples, normalised


def test_sampled_sums_equal_an_explicit_reference_on_the_sampled_tokens():
    fraction, scale = 0.3, 0.5
    accumulator, samples, _ = _accumulate(fraction, seed=7, scale=scale)
    reference = {name: {"A": 0, "G": 0, "tokens": 0} for name in ("q", "k", "o")}
    for (mask, uses), (indices, weight, real) in zip(BATCHES, samples):
        real_positions = mask.reshape(-1).nonzero().squeeze(1)
        k = round(fraction * real_positions.numel())
        assert real == real_positions.numel() and indices.numel() == k and weight == real / k
        assert set(indices.tolist()) <= set(real_positions.tolist())  # padding is never sampled
        assert len(set(indices.tolist())) == k
        for name, (a, g) in uses.items():
            bias = name != "k"
            for flat in indices.tolist():  # by hand, token by token
                row, position = divmod(flat, mask.shape[1])
                a_j = _with_bias(a[row, position].unsqueeze(0), bias)[0]
                reference[name]["A"] = reference[name]["A"] + weight * torch.outer(a_j, a_j)
                reference[name]["G"] = reference[name]["G"] + weight * scale ** 2 * torch.outer(g[row, position],
                                                                                                  g[row, position])
            reference[name]["tokens"] += real
    for name, expected in reference.items():
        torch.testing.assert_close(accumulator.sums[name]["activation"], expected["A"], atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(accumulator.sums[name]["gradient"], expected["G"], atol=1e-12, rtol=1e-12)
        assert accumulator.counts[name] == {"activation_tokens": expected["tokens"], "gradient_tokens": expected["tokens"]}
    # q and k read one input: the same tokens, so the same A (q's has the bias row and column on top)
    torch.testing.assert_close(accumulator.sums["q"]["activation"][:6, :6], accumulator.sums["k"]["activation"],
                               atol=0, rtol=0)


def test_the_sample_is_a_function_of_the_generator_seed():
    first = [indices for indices, _, _ in _accumulate(0.4, seed=3)[1]]
    again = [indices for indices, _, _ in _accumulate(0.4, seed=3)[1]]
    other = [indices for indices, _, _ in _accumulate(0.4, seed=4)[1]]
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    assert not all(torch.equal(x, y) for x, y in zip(first, other))


def test_fraction_one_takes_every_real_token():
    _, _, full = _accumulate(1.0, seed=0)
    layers = _projections()
    for name in layers:
        a = torch.cat([_with_bias(uses[name][0][mask], name != "k") for mask, uses in BATCHES])  # (tokens, in)
        g = torch.cat([uses[name][1][mask] for mask, uses in BATCHES])
        torch.testing.assert_close(full[name]["A"], a.T @ a / a.shape[0], atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(full[name]["G"], 0.25 * g.T @ g / g.shape[0], atol=1e-12, rtol=1e-12)


def test_the_estimate_is_unbiased_over_seeds():
    """Averaged over 64 seeds, sampled A and G approach the full-rate ones within a few standard errors."""
    _, _, full = _accumulate(1.0, seed=0)
    draws = [_accumulate(0.25, seed=seed)[2] for seed in range(64)]
    for name in full:
        for key in ("A", "G"):
            values = torch.stack([draw[name][key] for draw in draws])  # (64, d, d)
            error = values.std(0) / 64 ** 0.5
            z = (values.mean(0) - full[name][key]).abs() / error.clamp(min=1e-12)
            assert float(z.max()) < 4.5, f"{name}.{key}: the mean over seeds is {float(z.max()):.1f} SE off"
            # the sampling is real: one draw is far from the full-rate value, well beyond the mean's error
            assert float((values[0] - full[name][key]).norm()) > 3 * float((values.mean(0) - full[name][key]).norm())


class _RecordSamples(Callback):
    """After the collector: the batch and the token sample it drew (flattened ``B·T`` positions)."""

    def __init__(self, collector: KFACCollectorCallback) -> None:
        self.collector, self.seen = collector, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        mask = batch["attention_mask"].bool()
        self.seen.append((batch_idx, mask, *self.collector._accumulator.sampled_rows(mask.numel())))


def _fit(tmp_path, module, rows, name, **kwargs):
    collector = KFACCollectorCallback(target_modules=LAYERS, strategy="kfac", dtype="float64", plots=False,
                                      output_dir=str(tmp_path / name), **kwargs)
    recorder = _RecordSamples(collector)
    from lightning.pytorch import Trainer

    from lit_attrib.artifacts import load_factors

    Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, default_root_dir=tmp_path, max_epochs=1, limit_val_batches=0,
            callbacks=[collector, recorder]).fit(module, RowsDataModule(rows, batch_size=6))
    return load_factors(tmp_path / name), recorder.seen


def test_fit_factors_equal_an_autograd_reference_on_the_sampled_tokens(tmp_path):
    rows, module = make_rows(), TinyModule().double()
    factors, seen = _fit(tmp_path, copy.deepcopy(module), rows, "sampled", token_fraction=0.5, seed=11,
                         token_sampling="uniform")
    assert factors.metadata["arguments"]["token_fraction"] == 0.5
    # Reference: each example alone, unpadded, by autograd; the sampled (example, position) pairs picked out.
    sums = {short: {"A": 0, "G": 0, "tokens": 0} for short in BIAS}
    for batch_idx, mask, indices, weight, real in seen:
        assert real == int(mask.sum()) and indices.numel() == round(0.5 * real)
        for flat in indices.tolist():
            row, position = divmod(flat, mask.shape[1])
            assert mask[row, position]
            example = rows[6 * batch_idx + row]
            record: list = []
            logits = module.net(torch.tensor([example["input_ids"]]), record=record)
            loss = token_nll(logits, torch.tensor([example["labels"]])).sum()
            grads = torch.autograd.grad(loss, [y for _, _, y in record])
            t = int(mask[row, :position].sum())  # the position among the example's own tokens
            for (short, x, _), g in zip(record, grads):
                a = _with_bias(x[0, t:t + 1].detach(), BIAS[short])[0]
                sums[short]["A"] = sums[short]["A"] + weight * torch.outer(a, a)
                sums[short]["G"] = sums[short]["G"] + weight * torch.outer(g[0, t], g[0, t])
        for short in BIAS:
            sums[short]["tokens"] += real * (LOOPS if short == "shared" else 1)
    for name, short in SHORT.items():
        tokens = sums[short]["tokens"]
        assert factors.metadata["modules"][name]["activation_tokens"] == tokens
        torch.testing.assert_close(factors[name]["activation_covariance"], sums[short]["A"] / tokens, atol=1e-10, rtol=1e-9)
        torch.testing.assert_close(factors[name]["gradient_covariance"], sums[short]["G"] / tokens, atol=1e-10, rtol=1e-9)
    # the same seed draws the same tokens; a full-rate fit differs
    again, _ = _fit(tmp_path, copy.deepcopy(module), rows, "again", token_fraction=0.5, seed=11, token_sampling="uniform")
    full = collect(tmp_path, copy.deepcopy(module), RowsDataModule(rows, batch_size=6), stage="fit", name="full",
                   strategy="kfac", trainer_kwargs={"max_epochs": 1, "limit_val_batches": 0})
    torch.testing.assert_close(again["net.head"]["gradient_covariance"], factors["net.head"]["gradient_covariance"],
                               atol=0, rtol=0)
    assert not torch.allclose(full["net.head"]["gradient_covariance"], factors["net.head"]["gradient_covariance"])
    assert "token_fraction" not in full.metadata["arguments"]


def test_inclusion_probabilities_are_proportional_capped_at_one_and_sum_to_the_expected_count():
    weights = torch.cat([torch.tensor([50.0, 20.0]), torch.rand(30, generator=torch.Generator().manual_seed(0)) + 0.1]).double()
    weights = weights.numpy()
    # expected 0.5: nothing capped; 2: the 50 capped, the rest share 1 in proportion; 3: raising c caps the 20 too
    for expected, exact in ((0.5, True), (2.0, True), (10.0, False), (3.0, False)):
        chances = torch.from_numpy(inclusion_probabilities(weights, expected))
        assert float(chances.max()) <= 1.0 and float(chances.sum()) <= expected + 1e-9
        if exact:
            assert abs(float(chances.sum()) - expected) < 1e-9
        else:  # the tokens capped in the second round lose their excess only
            assert float(chances.sum()) > 0.8 * expected
        free = chances < 1
        ratio = chances[free] / torch.from_numpy(weights)[free]  # one c for every token below the cap ...
        torch.testing.assert_close(ratio, ratio[:1].expand_as(ratio), atol=0, rtol=1e-9)
        if (~free).any():  # ... and the capped ones are the largest weights
            assert float(weights[~free].min()) >= float(weights[free].max())
    assert float(inclusion_probabilities(weights, 2.0)[0]) == 1.0
    torch.testing.assert_close(torch.from_numpy(inclusion_probabilities(np.ones(8), 2.0)), torch.full((8,), 0.25, dtype=torch.float64))


def _heavy_batches():
    """Batches whose gradients have a few tokens with 30× the norm of the rest (as G's tokens do in training);
    the padding holds huge values that must never be sampled."""
    batches = []
    for seed in (5, 6):
        mask, uses = _batch(seed, [1, 4, 0])
        generator = torch.Generator().manual_seed(seed)
        for a, g in uses.values():
            heavy = torch.rand(g.shape[:2], generator=generator) < 0.08
            g[heavy] *= 30
            a[~mask], g[~mask] = 1e6, 1e6
        batches.append((mask, uses))
    return batches


def test_norm_sampling_is_unbiased_and_beats_uniform_on_heavy_tailed_gradients():
    """``"norm"``: the mean over seeds is the full-rate A and G (no bias, padding never drawn), and on
    gradients with a heavy tail its error is a fraction of uniform sampling's at the same fraction."""
    batches = _heavy_batches()
    _, _, full = _accumulate(1.0, seed=0, batches=batches)
    draws = {sampling: [_accumulate(0.3, seed=seed, sampling=sampling, batches=batches)[2] for seed in range(96)]
             for sampling in ("norm", "uniform")}
    for name in full:
        for key in ("A", "G"):
            values = torch.stack([draw[name][key] for draw in draws["norm"]])  # (96, d, d)
            error = values.std(0) / 96 ** 0.5
            z = (values.mean(0) - full[name][key]).abs() / error.clamp(min=1e-12)
            assert float(z.max()) < 4.5, f"{name}.{key}: the mean over seeds is {float(z.max()):.1f} SE off"
            assert float((values[0] - full[name][key]).norm()) > 3 * float((values.mean(0) - full[name][key]).norm())
        mse = {sampling: sum(float((draw[name]["G"] - full[name]["G"]).square().sum()) for draw in draws[sampling])
               for sampling in draws}
        assert mse["norm"] < 0.25 * mse["uniform"], f"{name}: G's squared error {mse}"


def test_norm_sampling_shares_an_input_sample_and_counts_every_real_token():
    accumulator, _, _ = _accumulate(0.3, seed=2, sampling="norm")
    # q and k read one input: one sample, so the same A (q's has the bias row and column on top)
    torch.testing.assert_close(accumulator.sums["q"]["activation"][:6, :6], accumulator.sums["k"]["activation"],
                               atol=0, rtol=0)
    real = sum(int(mask.sum()) for mask, _ in BATCHES)
    for name in ("q", "k", "o"):
        assert accumulator.counts[name] == {"activation_tokens": real, "gradient_tokens": real}
    assert accumulator.sums["q"]["activation"][6, 6] == real  # the bias corner counts tokens, not samples


def test_fit_with_norm_sampling_is_reproducible_and_recorded(tmp_path):
    rows, module = make_rows(), TinyModule().double()
    first, _ = _fit(tmp_path, copy.deepcopy(module), rows, "norm", token_fraction=0.5, seed=3)
    again, _ = _fit(tmp_path, copy.deepcopy(module), rows, "norm_again", token_fraction=0.5, seed=3)
    uniform, _ = _fit(tmp_path, copy.deepcopy(module), rows, "uniform", token_fraction=0.5, seed=3,
                      token_sampling="uniform")
    assert first.metadata["arguments"]["token_sampling"] == "norm"
    for name in SHORT:
        torch.testing.assert_close(again[name]["gradient_covariance"], first[name]["gradient_covariance"], atol=0, rtol=0)
    assert not torch.allclose(uniform["net.head"]["gradient_covariance"], first["net.head"]["gradient_covariance"])


def test_invalid_token_sampling():
    with pytest.raises(ConfigError, match="token_sampling must be 'norm' or 'uniform'"):
        KFACCollectorCallback(token_fraction=0.5, token_sampling="importance")


@pytest.mark.parametrize("fraction", [0, -0.5, 1.5, float("nan"), "half", True])
def test_invalid_token_fraction(fraction):
    with pytest.raises(ConfigError, match=r"token_fraction must be a number in \(0, 1\]"):
        KFACCollectorCallback(token_fraction=fraction)


# ------------------------------------------------------------------------- bfloat16 products
def test_bfloat16_products_stay_within_their_rounding_of_the_exact_sums():
    """``product_dtype=bfloat16``: the sums of every layer (shared input, bias corner, padding, the gradient
    scale) are within bfloat16's rounding of float64 explicit sums, and the products really ran in bfloat16."""
    layers = _projections()
    exact, narrow = KFACAccumulator(layers, torch.float64), KFACAccumulator(layers, torch.float64,
                                                                           product_dtype=torch.bfloat16)
    for accumulator in (exact, narrow):
        for mask, uses in BATCHES:
            accumulator.begin_batch(mask, 0.5)
            for name, (a, g) in uses.items():
                accumulator.add_activations(layers[name], a)
                accumulator.add_gradients(layers[name], g)
            accumulator.end_batch()
    for name in layers:
        for key in ("activation", "gradient"):
            reference, result = exact.sums[name][key], narrow.sums[name][key]
            assert result.dtype == torch.float64 and narrow.counts[name] == exact.counts[name]
            error = float((result - reference).norm() / reference.norm())
            assert 0 < error < 2.0 ** -7, (name, key, error)  # rounded (bfloat16's unit 2⁻⁸), but only that


def test_fit_with_bfloat16_covariance_products_is_recorded_and_close(tmp_path):
    rows, module = make_rows(), TinyModule().double()
    exact = collect(tmp_path, copy.deepcopy(module), RowsDataModule(rows, batch_size=8), name="exact")
    narrow = collect(tmp_path, copy.deepcopy(module), RowsDataModule(rows, batch_size=8), name="narrow",
                     covariance_dtype="bfloat16")
    assert narrow.metadata["arguments"]["covariance_dtype"] == "bfloat16"
    assert "covariance_dtype" not in exact.metadata["arguments"]
    for name in LAYERS:
        for key in ("activation_covariance", "gradient_covariance"):
            error = float((narrow[name][key] - exact[name][key]).norm() / exact[name][key].norm())
            assert 0 < error < 2.0 ** -7, (name, key, error)
    with pytest.raises(ConfigError, match="covariance_dtype must be 'bfloat16' or null"):
        KFACCollectorCallback(covariance_dtype="float16")


def test_float32_eigendecompositions_are_checked_and_recorded(tmp_path, monkeypatch):
    """``eigendecomposition_dtype: float32``: every eigenbasis still diagonalises its factor (the residual is
    recorded per layer and equals an explicit one), the preconditioned result is close to float64's, and a
    residual above the limit stops the run."""
    from lit_attrib.errors import TrainingError

    rows, module = make_rows(), TinyModule().double()
    exact = collect(tmp_path, copy.deepcopy(module), RowsDataModule(rows, batch_size=8), name="f64")
    narrow = collect(tmp_path, copy.deepcopy(module), RowsDataModule(rows, batch_size=8), name="f32",
                     eigendecomposition_dtype="float32")
    record = narrow.metadata["eigendecomposition"]
    assert narrow.metadata["arguments"]["eigendecomposition_dtype"] == "float32" and record["dtype"] == "float32"
    assert set(record["relative_residuals"]) == set(LAYERS)
    for name in LAYERS:
        residuals = []
        for side in ("activation", "gradient"):
            matrix = narrow[name][f"{side}_covariance"]
            vectors, values = narrow[name][f"{side}_eigenvectors"], narrow[name][f"{side}_eigenvalues"]
            residuals.append(float((matrix @ vectors - vectors * values).norm() / matrix.norm()))
            # the factors themselves are float64 and the same; only their eigenbases differ
            torch.testing.assert_close(matrix, exact[name][f"{side}_covariance"], rtol=0, atol=0)
        assert 0 < max(residuals) < 1e-5
        assert record["relative_residuals"][name] == pytest.approx(max(residuals), rel=0.05, abs=1e-7)
        vector = torch.randn(3, *exact[name]["lambda"].shape, dtype=torch.float64)
        torch.testing.assert_close(factors_inverse_hvp(narrow[name], vector), factors_inverse_hvp(exact[name], vector),
                                   rtol=1e-3, atol=1e-6 * float(factors_inverse_hvp(exact[name], vector).abs().max()))
    monkeypatch.setattr("lit_attrib.callbacks.kfac_collector.MAX_EIGEN_RESIDUAL", 1e-12)
    with pytest.raises(TrainingError, match=r"float32 eigendecomposition of layer 'net\.\w+' .* eigendecomposition_dtype float64"):
        collect(tmp_path, copy.deepcopy(module), RowsDataModule(rows, batch_size=8), name="refused",
                eigendecomposition_dtype="float32")
    with pytest.raises(ConfigError, match="eigendecomposition_dtype must be 'float64' or 'float32'"):
        KFACCollectorCallback(eigendecomposition_dtype="float16")


# ------------------------------------------------------------------------- deferred products
def _sums(deferred_rows, fraction=1.0, sampling="uniform", product_dtype=None, batches=BATCHES * 3):
    """The sums and counts of every layer over ``batches`` (each batch's sample from its own seeded generator)."""
    layers = _projections()
    accumulator = KFACAccumulator(layers, torch.float64, product_dtype=product_dtype, deferred_rows=deferred_rows)
    for index, (mask, uses) in enumerate(batches):
        accumulator.begin_batch(mask, 0.5 + index, fraction, torch.Generator().manual_seed(index), sampling)
        for name, (a, g) in uses.items():
            accumulator.add_activations(layers[name], a)
            accumulator.add_gradients(layers[name], g)
            if name == "q":  # q is used twice (a module called twice in one forward)
                accumulator.add_activations(layers[name], 2 * a)
                accumulator.add_gradients(layers[name], -g)
        assert accumulator.end_batch() == []
    pending = dict(accumulator._pending)
    state = accumulator.state_dict()  # multiplies what still waits
    return state["sums"], state["counts"], pending


@pytest.mark.parametrize(("fraction", "sampling"), [(1.0, "uniform"), (0.5, "uniform"), (0.5, "norm")])
def test_deferred_products_equal_each_batchs_own(fraction, sampling):
    """``deferred_rows``: products of several batches' rows at once give the same sums and counts as one product
    per batch (padding, token samples and their weights, gradient scales, bias rows, a shared input, a layer used
    twice), whatever the threshold; rows still waiting are multiplied before the sums are read."""
    exact, counts, _ = _sums(None, fraction, sampling)
    for rows in (1, 40, 10_000):
        sums, deferred_counts, pending = _sums(rows, fraction, sampling)
        assert deferred_counts == counts
        assert bool(pending) == (rows == 10_000)  # the largest threshold never reached: all of it waited
        for name in exact:
            for key in ("activation", "gradient"):
                torch.testing.assert_close(sums[name][key], exact[name][key], rtol=1e-12, atol=1e-12)


def test_deferred_products_share_one_input_and_stay_within_bfloat16_rounding():
    layers = _projections()
    exact, _, _ = _sums(None)
    narrow, _, _ = _sums(64, product_dtype=torch.bfloat16)
    for name in layers:
        for key in ("activation", "gradient"):
            error = float((narrow[name][key] - exact[name][key]).norm() / exact[name][key].norm())
            assert 0 < error < 2.0 ** -7, (name, key, error)
    # q and k read one input: its waiting rows are held once and multiplied once
    accumulator = KFACAccumulator(layers, torch.float64, deferred_rows=10_000)
    mask, uses = BATCHES[0]
    accumulator.begin_batch(mask)
    for name, (a, _) in uses.items():
        accumulator.add_activations(layers[name], a)
    accumulator.end_batch()
    assert accumulator._pending[("q", "activation")][0] is accumulator._pending[("k", "activation")][0]
    real = int(mask.sum())
    assert accumulator._pending[("q", "activation")][0].shape == (real, 6)  # real tokens only
    calls = []
    gram = accumulator._gram
    accumulator._gram = lambda *args: calls.append(1) or gram(*args)
    accumulator.flush()
    assert len(calls) == 2  # one product for q and k, one for o
    torch.testing.assert_close(accumulator.sums["q"]["activation"][:6, :6], accumulator.sums["k"]["activation"])


def test_deferred_rows_with_a_non_finite_input_stop_at_its_batch():
    layers = _projections()
    accumulator = KFACAccumulator(layers, torch.float64, deferred_rows=10_000)
    mask, uses = BATCHES[0]
    accumulator.begin_batch(mask)
    a, g = uses["o"]
    accumulator.add_activations(layers["o"], a)
    accumulator.add_gradients(layers["o"], g.clone().index_fill_(0, torch.tensor([1]), float("nan")))
    assert accumulator.end_batch() == ["o: gradient"]


def test_fit_with_deferred_products_gives_the_factors_of_every_batch_at_once(tmp_path):
    rows, module = make_rows(), TinyModule().double()
    exact = collect(tmp_path, copy.deepcopy(module), RowsDataModule(rows, batch_size=4), name="exact",
                    strategy="ekfac")
    for deferred in (1, 25, 10_000):  # every batch, every few batches, only at the end of the pass
        later = collect(tmp_path, copy.deepcopy(module), RowsDataModule(rows, batch_size=4), name=f"later{deferred}",
                        strategy="ekfac", deferred_rows=deferred)
        assert later.metadata["arguments"]["deferred_rows"] == deferred
        for name in LAYERS:
            for key in ("activation_covariance", "gradient_covariance", "lambda"):
                torch.testing.assert_close(later[name][key], exact[name][key], rtol=1e-10, atol=1e-12)
    for bad in (0, -5, 2.5, True, "many"):
        with pytest.raises(ConfigError, match="deferred_rows must be a whole number"):
            KFACCollectorCallback(deferred_rows=bad)
