"""K-FAC token sampling (``token_fraction``): exact on the sampled tokens, unbiased over seeds (float64)."""

from __future__ import annotations

import copy

import pytest
import torch
from lightning.pytorch import Callback
from reference_models import LOOPS, RowsDataModule, TinyModule, _with_bias, make_rows
from test_kfac import LAYERS, collect
from torch import nn

from lit_attrib.callbacks import KFACCollectorCallback
from lit_attrib.errors import ConfigError
from lit_attrib.layers import layer_info
from lit_attrib.ops.kfac_accumulator import KFACAccumulator
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


def _accumulate(fraction: float, seed: int, scale: float = 0.5):
    layers = _projections()
    accumulator = KFACAccumulator(layers, torch.float64)
    samples = []
    for batch_index, (mask, uses) in enumerate(BATCHES):
        generator = torch.Generator().manual_seed(1000 * seed + batch_index)
        accumulator.begin_batch(mask, scale, fraction, generator)
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
    factors, seen = _fit(tmp_path, copy.deepcopy(module), rows, "sampled", token_fraction=0.5, seed=11)
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
    again, _ = _fit(tmp_path, copy.deepcopy(module), rows, "again", token_fraction=0.5, seed=11)
    full = collect(tmp_path, copy.deepcopy(module), RowsDataModule(rows, batch_size=6), stage="fit", name="full",
                   strategy="kfac", trainer_kwargs={"max_epochs": 1, "limit_val_batches": 0})
    torch.testing.assert_close(again["net.head"]["gradient_covariance"], factors["net.head"]["gradient_covariance"],
                               atol=0, rtol=0)
    assert not torch.allclose(full["net.head"]["gradient_covariance"], factors["net.head"]["gradient_covariance"])
    assert "token_fraction" not in full.metadata["arguments"]


@pytest.mark.parametrize("fraction", [0, -0.5, 1.5, float("nan"), "half", True])
def test_invalid_token_fraction(fraction):
    with pytest.raises(ConfigError, match=r"token_fraction must be a number in \(0, 1\]"):
        KFACCollectorCallback(token_fraction=fraction)
