"""KFACCollectorCallback and the K-FAC/EKFAC ops against plain autograd references (float64)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from reference_models import (
    LOOPS,
    KillAtStep,
    KilledRun,
    RowsDataModule,
    TinyModule,
    make_rows,
    reference_covariances,
    reference_lambda,
)

from lit_attrib.artifacts import load_factors
from lit_attrib.artifacts.factors import FACTOR_KEYS
from lit_attrib.callbacks import KFACCollectorCallback
from lit_attrib.errors import ArtifactError, ModelError, TrainingError
from lit_attrib.ops.kfac import ERROR_SAMPLE_ROWS, LargestError, TokenGradients, ekfac_inverse_hvp, factors_inverse_hvp
from lit_attrib.ops.workspaces import Workspaces

LAYERS = ["net.inp", "net.shared", "net.conv", "net.head"]


def _trainer(tmp_path, callbacks, **kwargs):
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0)
    return Trainer(callbacks=callbacks, **{**defaults, **kwargs})


def collect(tmp_path, module, data, stage="validate", name="factors", trainer_kwargs=None, **kwargs):
    kwargs = {"target_modules": LAYERS, "dtype": "float64", "plots": False, **kwargs}
    callback = KFACCollectorCallback(output_dir=str(tmp_path / name), **kwargs)
    trainer = _trainer(tmp_path, [callback], **(trainer_kwargs or {}))
    getattr(trainer, stage)(module, data)
    return load_factors(tmp_path / name)


@pytest.fixture
def module():
    return TinyModule().double()


@pytest.fixture(scope="module")
def rows():
    return make_rows()


def test_covariances_and_lambda_equal_autograd_references(tmp_path, module, rows):
    factors = collect(tmp_path, module, RowsDataModule(rows, batch_size=8))
    reference = reference_covariances(module.net, rows)
    for short, name in zip(("inp", "shared", "conv", "head"), LAYERS):
        torch.testing.assert_close(factors[name]["activation_covariance"], reference[short]["A"], atol=1e-10, rtol=0)
        torch.testing.assert_close(factors[name]["gradient_covariance"], reference[short]["G"], atol=1e-10, rtol=0)
    eigenvectors = {short: (factors[name]["activation_eigenvectors"], factors[name]["gradient_eigenvectors"])
                    for short, name in zip(("inp", "shared", "conv", "head"), LAYERS)}
    lambdas = reference_lambda(module.net, rows, eigenvectors)
    for short, name in zip(("inp", "shared", "conv", "head"), LAYERS):
        torch.testing.assert_close(factors[name]["lambda"], lambdas[short], atol=1e-10, rtol=1e-8)
    meta = factors.metadata["modules"]
    assert meta["net.shared"]["uses_per_forward"] == LOOPS and meta["net.inp"]["uses_per_forward"] == 1
    real_tokens = sum(len(row["input_ids"]) for row in rows)
    assert meta["net.shared"]["activation_tokens"] == LOOPS * real_tokens  # padding never counts
    assert meta["net.inp"]["lambda_examples"] == len(rows)


def test_a_module_used_three_times_accumulates_every_use(tmp_path, module, rows):
    """By hand: A of the looped layer is the mean over all three uses' inputs, not the last use's."""
    factors = collect(tmp_path, module, RowsDataModule(rows), target_modules=["net.shared"], strategy="kfac")
    uses = [[] for _ in range(LOOPS)]
    for row in rows:
        record = []
        module.net(torch.tensor([row["input_ids"]]), record=record)
        for use, (_, x, _) in enumerate(r for r in record if r[0] == "shared"):
            uses[use].append(x[0].detach())
    inputs = [torch.cat(u) for u in uses]  # per use: (tokens, width)
    by_hand = sum(x.T @ x for x in inputs) / sum(x.shape[0] for x in inputs)
    torch.testing.assert_close(factors["net.shared"]["activation_covariance"], by_hand, atol=1e-12, rtol=0)
    last_only = inputs[-1].T @ inputs[-1] / inputs[-1].shape[0]
    assert not torch.allclose(by_hand, last_only)


@pytest.mark.parametrize("variant", ["batch_size_1", "shuffled", "layers_per_pass_1", "module_groups", "frozen"])
def test_invariances(tmp_path, module, rows, variant):
    base = collect(tmp_path, module, RowsDataModule(rows, batch_size=8), name="base")
    if variant == "batch_size_1":
        other = collect(tmp_path, module, RowsDataModule(rows, batch_size=1), name="other")
    elif variant == "shuffled":
        seed_everything(3)
        other = collect(tmp_path, module, RowsDataModule(rows, batch_size=5, shuffle=True), name="other")
    elif variant == "layers_per_pass_1":
        other = collect(tmp_path, module, RowsDataModule(rows, batch_size=8), name="other", layers_per_pass=1)
    elif variant == "module_groups":
        other = collect(tmp_path, module, RowsDataModule(rows, batch_size=8), name="other",
                        module_groups=[["net.conv", "net.head"], ["net.inp", "net.shared"]])
    else:
        frozen = copy.deepcopy(module).requires_grad_(False)
        other = collect(tmp_path, frozen, RowsDataModule(rows, batch_size=8), name="other")
    for name in LAYERS:
        for key, value in base[name].items():
            if "eigenvectors" in key:  # defined up to sign: compare the matrices they rebuild instead
                continue
            torch.testing.assert_close(other[name][key], value, atol=1e-10, rtol=1e-9, msg=f"{name}.{key}")


def test_fit_with_zero_learning_rate_equals_validate(tmp_path, module, rows):
    """Observing the real (token-mean) training backward, rescaled, gives the validate pass's factors."""
    validated = collect(tmp_path, module, RowsDataModule(rows, batch_size=6), name="validate")
    fitted = collect(tmp_path, copy.deepcopy(module), RowsDataModule(rows, batch_size=6, shuffle=True), stage="fit",
                     name="fit", trainer_kwargs={"max_epochs": 2, "limit_val_batches": 0})
    assert fitted.metadata["stage"] == "fit"
    for name in LAYERS:
        for key in ("activation_covariance", "gradient_covariance", "lambda"):
            torch.testing.assert_close(fitted[name][key], validated[name][key], atol=1e-10, rtol=1e-8)


def test_fit_runs_the_lambda_pass_after_training_when_no_epoch_is_left(tmp_path, module, rows):
    validated = collect(tmp_path, module, RowsDataModule(rows), name="validate")
    fitted = collect(tmp_path, copy.deepcopy(module), RowsDataModule(rows), stage="fit", name="fit",
                     trainer_kwargs={"max_epochs": 1, "limit_val_batches": 0})
    torch.testing.assert_close(fitted["net.head"]["lambda"], validated["net.head"]["lambda"], atol=1e-10, rtol=1e-9)


def test_max_examples_bounds_each_pass(tmp_path, module, rows):
    factors = collect(tmp_path, module, RowsDataModule(rows, batch_size=5), max_examples=7)
    reference = reference_covariances(module.net, rows[:7])
    torch.testing.assert_close(factors["net.conv"]["activation_covariance"], reference["conv"]["A"], atol=1e-10, rtol=0)
    assert factors.metadata["modules"]["net.conv"]["lambda_examples"] == 7


def test_true_fisher_samples_labels(tmp_path, module, rows):
    empirical = collect(tmp_path, module, RowsDataModule(rows), name="empirical", strategy="kfac")
    true = collect(tmp_path, module, RowsDataModule(rows), name="true", strategy="kfac", fisher="true")
    assert torch.isfinite(true["net.head"]["gradient_covariance"]).all()
    torch.testing.assert_close(true["net.inp"]["activation_covariance"], empirical["net.inp"]["activation_covariance"])
    assert not torch.allclose(true["net.head"]["gradient_covariance"], empirical["net.head"]["gradient_covariance"])


# ------------------------------------------------------------------------------------ inverse-HVP
@pytest.mark.parametrize("strategy", ["ekfac", "kfac"])
def test_inverse_hvp_equals_explicit_inverse(tmp_path, module, rows, strategy):
    factors = collect(tmp_path, module, RowsDataModule(rows), strategy=strategy)
    for name in ("net.inp", "net.conv"):
        layer = factors[name]
        q_a, q_g, lam = layer["activation_eigenvectors"], layer["gradient_eigenvectors"], layer["lambda"]
        damping = 0.1 * lam.mean().item()
        if strategy == "ekfac":
            rotation = torch.kron(q_g, q_a)  # vec(Q_G X Q_Aᵀ) = (Q_G ⊗ Q_A) vec(X), row-major vec
            matrix = rotation @ torch.diag(lam.flatten() + damping) @ rotation.T
        else:
            g, a = layer["gradient_covariance"], layer["activation_covariance"]
            matrix = torch.kron(g, a) + damping * torch.eye(lam.numel(), dtype=lam.dtype)
        vector = torch.randn(3, *lam.shape, dtype=torch.float64)
        expected = torch.linalg.solve(matrix, vector.reshape(3, -1).T).T.reshape(vector.shape)
        torch.testing.assert_close(factors_inverse_hvp(factors[name], vector), expected, atol=1e-9, rtol=1e-7)
        torch.testing.assert_close(factors_inverse_hvp(factors[name], vector[0], damping=damping), expected[0], atol=1e-9,
                                   rtol=1e-7)


@pytest.mark.parametrize("out_features", [40, 300], ids=["every-row-checked", "rows-sampled"])
def test_inverse_hvp_rotated_back_in_bfloat16_reports_its_error(out_features):
    """``back_dtype``: the result is within bfloat16's rounding of the float64 inverse-HVP, through reused
    workspaces or not, and the error it reports is the true one (all rows checked) or close to it (64 of
    300 rows). Token gradients go the same way as full ones."""
    generator = torch.Generator().manual_seed(0)
    in_features, batch, tokens = 24, 3, 5
    q_a = torch.linalg.qr(torch.randn(in_features, in_features, dtype=torch.float64, generator=generator))[0]
    q_g = torch.linalg.qr(torch.randn(out_features, out_features, dtype=torch.float64, generator=generator))[0]
    lam = torch.rand(out_features, in_features, dtype=torch.float64, generator=generator) ** 4
    gradients = TokenGradients(torch.randn(batch, tokens, in_features, dtype=torch.float64, generator=generator),
                               torch.randn(batch, tokens, out_features, dtype=torch.float64, generator=generator))
    expected = ekfac_inverse_hvp(gradients.full(), q_a, q_g, lam)
    for workspaces in (None, Workspaces()):
        error = LargestError()
        result = ekfac_inverse_hvp(gradients, q_a, q_g, lam, back_dtype=torch.bfloat16, error=error,
                                   workspaces=workspaces)
        assert result.dtype == torch.bfloat16
        true = float((result.double() - expected).norm() / expected.norm())
        assert 0 < true < 2.0 ** -7  # bfloat16's unit roundoff 2⁻⁸, a few roundings
        if out_features <= ERROR_SAMPLE_ROWS:
            assert error.value == pytest.approx(true, rel=1e-6)
        else:
            assert 0.7 * true < error.value < 1.4 * true
    into = torch.empty(batch, out_features, in_features, dtype=torch.float64)
    assert ekfac_inverse_hvp(gradients, q_a, q_g, lam, back_dtype=torch.bfloat16, out=into) is into
    torch.testing.assert_close(into, result.double(), rtol=0, atol=0)


def test_inverse_hvp_rejects_bad_shapes_and_damping():
    q = torch.eye(3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"expected a vector of shape \(\.\.\., 3, 3\)"):
        ekfac_inverse_hvp(torch.zeros(2, 3), q, q, torch.ones(3, 3))
    with pytest.raises(ValueError, match="non-positive"):
        ekfac_inverse_hvp(torch.zeros(3, 3), q, q, torch.ones(3, 3), damping=-2.0)


# ------------------------------------------------------------------------------ resume, precision
@pytest.mark.parametrize("kill_at", [2, 6], ids=["covariance-pass", "lambda-pass"])
def test_kill_and_resume_equals_uninterrupted(tmp_path, facts_path, tokenizer_path, kill_at):
    """A fine-tuning run (lr > 0, shuffled, 4 batches an epoch) killed mid-pass and resumed from its checkpoint."""
    from conftest import TINY_CONFIGS
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lit_attrib import CausalLMModule, TextDataModule

    def run(name, crash=None, ckpt_path=None):
        seed_everything(0)
        module = CausalLMModule(config=TINY_CONFIGS["llama"], learning_rate=3e-3, scheduler="constant")
        data = TextDataModule(path=facts_path, tokenizer=tokenizer_path, num_samples=32, val_size=0, batch_size=8)
        callbacks = [KFACCollectorCallback(target_modules=["*.mlp.down_proj", "*.self_attn.q_proj"],
                                           output_dir=str(tmp_path / name), plots=False),
                     ModelCheckpoint(dirpath=tmp_path / f"{name}-ck", every_n_train_steps=1, save_top_k=-1)]
        if crash is not None:
            callbacks.append(KillAtStep(crash))
        trainer = _trainer(tmp_path, callbacks, max_epochs=2, limit_val_batches=0, enable_checkpointing=True)
        if crash is None:
            trainer.fit(module, data, ckpt_path=ckpt_path)
        else:
            with pytest.raises(KilledRun):
                trainer.fit(module, data, ckpt_path=ckpt_path)
        return trainer

    run("full")
    crashed = run("resumed", crash=kill_at)
    assert not (tmp_path / "resumed" / "factors.json").exists() and crashed.global_step == kill_at
    checkpoint = tmp_path / "resumed-ck" / f"epoch={kill_at // 4}-step={kill_at}.ckpt"
    assert checkpoint.exists()
    run("resumed", ckpt_path=str(checkpoint))
    full, resumed = load_factors(tmp_path / "full"), load_factors(tmp_path / "resumed")
    for name in full:
        for key in ("activation_covariance", "gradient_covariance", "lambda"):
            torch.testing.assert_close(resumed[name][key], full[name][key], rtol=1e-6, atol=1e-9)


def test_bf16_mixed_factors_correlate_with_float32(tmp_path, facts_path, tokenizer_path):
    from conftest import TINY_CONFIGS

    from lit_attrib import CausalLMModule, TextDataModule

    def factors(name, precision):
        module = CausalLMModule(config=TINY_CONFIGS["llama"])
        data = TextDataModule(path=facts_path, tokenizer=tokenizer_path, num_samples=64, val_size=32, batch_size=8)
        return collect(tmp_path, module, data, name=name, target_modules=["*.mlp.*_proj"], dtype="float32",
                       trainer_kwargs={"precision": precision})

    full, half = factors("fp32", "32-true"), factors("bf16", "bf16-mixed")
    for name in full:
        assert all(t.dtype == torch.float32 for t in half[name].values())  # accumulated in float32
        for key in ("activation_covariance", "gradient_covariance", "lambda"):
            pair = torch.stack([full[name][key].flatten(), half[name][key].flatten()]).double()
            assert torch.corrcoef(pair)[0, 1] >= 0.99, (name, key)


def test_plots_in_tensorboard_and_png(tmp_path, module, rows):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    callback = KFACCollectorCallback(target_modules=LAYERS, output_dir=str(tmp_path / "factors"),
                                     inspect_modules=["net.conv"])
    _trainer(tmp_path, [callback], logger=logger).validate(module, RowsDataModule(rows))
    kinds = ("spectrum", "variance", "lambda_heatmap", "lambda_sorted")
    for kind in kinds:
        assert (tmp_path / "factors" / "plots" / f"net.conv.{kind}.png").stat().st_size > 1000
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    assert {f"factors/net.conv/{kind}" for kind in kinds} <= set(events.Tags()["images"])
    assert "factors/net.conv/lambda" in events.Tags()["histograms"]


def test_streamed_factors_file_loads_like_safetensors_and_by_module(tmp_path, module, rows):
    """The factors file is written one module at a time: safetensors reads it back to the same bytes, and
    loading a subset of modules gives those modules' tensors only."""
    from safetensors.torch import load_file

    factors = collect(tmp_path, module, RowsDataModule(rows))
    flat = load_file(str(tmp_path / "factors" / "factors.safetensors"))
    assert set(flat) == {f"{name}.{key}" for name in factors for key in FACTOR_KEYS}
    for name in factors:
        for key in FACTOR_KEYS:
            assert torch.equal(flat[f"{name}.{key}"], factors[name][key])
    part = load_factors(tmp_path / "factors", names=["net.conv"])
    assert list(part.modules) == ["net.conv"] and part.metadata == factors.metadata
    for key in FACTOR_KEYS:
        assert torch.equal(part["net.conv"][key], factors["net.conv"][key])
    keys = ("activation_eigenvectors", "lambda")
    some = load_factors(tmp_path / "factors", keys=keys)
    assert list(some.modules) == list(factors.modules)
    for name in factors:
        assert sorted(some[name]) == sorted(keys) and all(torch.equal(some[name][k], factors[name][k]) for k in keys)
    assert list(load_factors(tmp_path / "factors", names=["net.conv"], keys=["lambda"]).modules["net.conv"]) == ["lambda"]
    with pytest.raises(ValueError, match="unknown factor keys"):
        load_factors(tmp_path / "factors", keys=["eigenvectors"])


@pytest.mark.parametrize("room", [None, 64])  # the header in its room; a header too large for it (moved)
def test_streaming_writer_keeps_every_dtype_and_leaves_nothing_on_failure(tmp_path, monkeypatch, room):
    from safetensors.torch import load_file

    import lit_attrib.io
    from lit_attrib.io import save_tensors_streaming

    if room is not None:
        monkeypatch.setattr(lit_attrib.io, "_HEADER_ROOM", room)

    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    tensors = {"f64": torch.randn(2, 3, dtype=torch.float64), "bf16": torch.randn(5, dtype=torch.bfloat16),
               "f16": torch.randn(1, 2, 3, dtype=torch.float16), "i64": torch.arange(7), "bool": torch.rand(4) > 0.5,
               "scalar": torch.tensor(3.5), "empty": torch.empty(0, 4), "view": base.T, "same": base}
    save_tensors_streaming(tmp_path / "t.safetensors", tensors.items(), metadata={"format": "x/1"})
    loaded = load_file(str(tmp_path / "t.safetensors"))
    assert set(loaded) == set(tensors)
    for key, value in tensors.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key

    def failing():
        yield "a", torch.ones(3)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save_tensors_streaming(tmp_path / "u.safetensors", failing())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.safetensors"]
    with pytest.raises(ValueError, match="used twice"):
        save_tensors_streaming(tmp_path / "v.safetensors", [("a", base), ("a", base)])


def test_covariance_sums_wait_on_disk_through_the_lambda_pass(tmp_path, module, rows, monkeypatch):
    """EKFAC spills A and G sums before the eigendecompositions: neither they (which read one layer back at a
    time) nor the lambda pass hold any of them, the written factors are the reference ones, and no spill file
    is left; an interrupted lambda pass leaves none either."""
    import lit_attrib.ops.kfac_accumulator as accumulator_module
    from lit_attrib.ops.kfac_accumulator import KFACAccumulator

    seen, decomposing, held_while_decomposing = [], [], []
    add, decompose_all, decompose = KFACAccumulator.add_rotated_gradient, KFACAccumulator.eigendecompose, \
        accumulator_module.eigendecompose

    def decompose_all_watching(self, names):
        decomposing.append(self)
        decompose_all(self, names)

    def decompose_watching(matrix, *args):
        held_while_decomposing.append(sum("activation" in sums or "gradient" in sums for sums in decomposing[-1].sums.values()))
        return decompose(matrix, *args)

    monkeypatch.setattr(KFACAccumulator, "eigendecompose", decompose_all_watching)
    monkeypatch.setattr(accumulator_module, "eigendecompose", decompose_watching)

    def watching(self, layer, activations, gradients, last=False):
        seen.append((any("activation" in sums or "gradient" in sums for sums in self.sums.values()),
                     sorted(p.name for p in (tmp_path / "factors").glob(".covariance-sums-*"))))
        add(self, layer, activations, gradients, last=last)

    monkeypatch.setattr(KFACAccumulator, "add_rotated_gradient", watching)
    factors = collect(tmp_path, module, RowsDataModule(rows, batch_size=8))
    assert seen and all(not held and files == [".covariance-sums-group0-rank0.tmp"] for held, files in seen)
    assert held_while_decomposing and not any(held_while_decomposing)
    reference = reference_covariances(module.net, rows)
    torch.testing.assert_close(factors["net.conv"]["activation_covariance"], reference["conv"]["A"], atol=1e-10, rtol=0)
    assert sorted(p.name for p in (tmp_path / "factors").iterdir()) == ["factors.json", "factors.safetensors"]

    def interrupted(self, layer, activations, gradients, last=False):
        raise RuntimeError("stopped in the lambda pass")

    monkeypatch.setattr(KFACAccumulator, "add_rotated_gradient", interrupted)
    with pytest.raises(RuntimeError, match="stopped in the lambda pass"):
        collect(tmp_path, module, RowsDataModule(rows, batch_size=8), name="stopped")
    assert not list((tmp_path / "stopped").glob(".covariance-sums-*"))


# ----------------------------------------------------------------------------------- bad input
def test_pattern_matching_nothing_lists_candidates(tmp_path, module, rows):
    with pytest.raises(ModelError, match=r"pattern 'net.mlp' matches no module; supported layers are named like: "
                                         r"net.inp, net.shared, net.conv, net.head"):
        collect(tmp_path, module, RowsDataModule(rows), target_modules=["net.mlp"])


def test_unsupported_module_type(tmp_path, module, rows):
    with pytest.raises(ModelError, match=r"net.embed \(Embedding\).*supported: nn.Linear, transformers Conv1D"):
        collect(tmp_path, module, RowsDataModule(rows), target_modules=["net.*"])


def test_factors_against_a_model_with_other_shapes(tmp_path, tokenizer_path, facts_path):
    from conftest import TINY_CONFIGS

    from lit_attrib import CausalLMModule, TextDataModule

    module = CausalLMModule(config=TINY_CONFIGS["llama"])
    data = TextDataModule(path=facts_path, tokenizer=tokenizer_path, num_samples=16, val_size=8)
    collect(tmp_path, module, data, target_modules=["*.mlp.*_proj"], strategy="kfac")
    wider = CausalLMModule(config={**TINY_CONFIGS["llama"], "intermediate_size": 48}, tokenizer=tokenizer_path)
    wider.configure_model()
    with pytest.raises(ArtifactError) as info:
        load_factors(tmp_path / "factors", wider)
    message = str(info.value)
    assert "'model.model.layers.0.mlp.gate_proj': out_features is 48 in the model but 64 in the factors" in message
    assert "'model.model.layers.1.mlp.down_proj': in_features is 48 in the model but 64 in the factors" in message
    with pytest.raises(ArtifactError, match=r"'model.model.layers.0.mlp.gate_proj' is not a module of the model "
                                            r"\(did you mean 'model.layers.0.mlp.gate_proj'"):
        load_factors(tmp_path / "factors", module.model)  # the bare HF model has no "model." prefix
    assert len(load_factors(tmp_path / "factors", module)) == 6


class _PoisonActivations(Callback):
    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 1:
            with torch.no_grad():
                pl_module.net.embed.weight.fill_(float("nan"))


def test_non_finite_values_stop_naming_module_and_step_and_write_nothing(tmp_path, module, rows):
    callback = KFACCollectorCallback(target_modules=LAYERS, output_dir=str(tmp_path / "factors"), plots=False)
    with pytest.raises(TrainingError, match=r"non-finite values in \['net.inp: activation'.*in validate batch 1"):
        _trainer(tmp_path, [callback, _PoisonActivations()]).validate(module, RowsDataModule(rows, batch_size=4))
    assert not (tmp_path / "factors").exists() or not any((tmp_path / "factors").iterdir())


def test_invalid_arguments():
    with pytest.raises(ValueError, match="max_examples must be at least 1"):
        KFACCollectorCallback(max_examples=0)
    with pytest.raises(ValueError, match="layers_per_pass or module_groups, not both"):
        KFACCollectorCallback(layers_per_pass=1, module_groups=[["*"]])


def test_output_dir_with_factors_from_other_arguments(tmp_path, module, rows):
    collect(tmp_path, module, RowsDataModule(rows), strategy="kfac")
    before = (tmp_path / "factors" / "factors.safetensors").read_bytes()
    with pytest.raises(ArtifactError, match=r"already holds factors made with other arguments \(strategy differ"):
        collect(tmp_path, module, RowsDataModule(rows), strategy="ekfac")
    assert (tmp_path / "factors" / "factors.safetensors").read_bytes() == before  # nothing lost
    collect(tmp_path, module, RowsDataModule(rows), strategy="kfac")  # same arguments: a rerun is fine
    replaced = collect(tmp_path, module, RowsDataModule(rows), strategy="ekfac", overwrite=True)
    assert json.loads((tmp_path / "factors" / "factors.json").read_text())["arguments"]["strategy"] == "ekfac"
    assert replaced.metadata["arguments"]["strategy"] == "ekfac"
