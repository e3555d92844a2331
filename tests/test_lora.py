"""LoRA (PEFT) in CausalLMModule: only the adapters train and are saved; adapters reload and merge to
the same model; analyses of the adapter layers equal autograd references; fine-tuning runs in train
mode and analyses in eval mode."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_CONFIGS, TOKENIZER
from foreign_references import (
    inverse_hvp,
    per_example_gradients,
    read_factors,
    reference_influence,
    reference_kfac,
    reference_token_scores,
)
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from reference_models import RowsDataModule, make_rows
from safetensors.torch import load_file

from lit_attrib.callbacks import InfluenceCallback, KFACCollectorCallback, TokenInfluenceCallback
from lit_attrib.errors import ConfigError, ModelError
from lit_attrib.modules import CausalLMModule
from lit_attrib.modules.lora import adapter_patterns

pytest.importorskip("peft")

LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def _module(**kwargs) -> CausalLMModule:
    module = CausalLMModule(config=TINY_CONFIGS["llama"], tokenizer=str(TOKENIZER), **kwargs)
    module.configure_model()
    return module


def _adapted(seed: int = 0) -> CausalLMModule:
    """A float64 LoRA model whose ``lora_B`` are not zero (fresh ones are), so every adapter has a gradient."""
    module = _module(lora=LORA).double()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    return module


def _trainer(tmp_path, callbacks=(), **kwargs) -> Trainer:
    return Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                   default_root_dir=tmp_path, callbacks=list(callbacks), **{"enable_checkpointing": False, **kwargs})


def _logits(module: CausalLMModule, rows) -> torch.Tensor:
    ids = torch.tensor([rows[0]["input_ids"]])
    with torch.no_grad():
        return module.eval()(ids)


def test_only_the_adapters_train_and_checkpoints_hold_only_them(tmp_path):
    rows = make_rows(count=16)
    module = _module(lora=LORA, learning_rate=1e-2)
    base = {k: v.clone() for k, v in module.state_dict().items() if "lora_" not in k}
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _trainer(tmp_path, [checkpoint], max_epochs=1, enable_checkpointing=True).fit(module, RowsDataModule(rows))
    state = module.state_dict()
    assert all(torch.equal(state[k], v) for k, v in base.items())  # the base model is frozen
    assert any(float(v.abs().sum()) > 0 for k, v in state.items() if "lora_B" in k)  # the adapters learned
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["state_dict"]
    assert set(saved) == {k for k, p in module.named_parameters() if p.requires_grad}
    assert all("lora_" in k for k in saved)
    reloaded = CausalLMModule.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    torch.testing.assert_close(_logits(reloaded, rows), _logits(module, rows))
    # Adapters on another base model (another init_seed) or with other settings are refused, not mixed.
    for other in ({"init_seed": 1}, {"lora": {**LORA, "alpha": 16}}):
        with pytest.raises(ModelError, match="another base model or with other LoRA settings"):
            CausalLMModule.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt", weights_only=True, **other)


def test_saved_adapters_reload_and_merge_into_the_same_model(tmp_path):
    rows = make_rows(count=4)
    module = _adapted().float()
    module.save_adapter(str(tmp_path / "adapter"))
    reloaded = _module(adapter=str(tmp_path / "adapter"))
    torch.testing.assert_close(_logits(reloaded, rows), _logits(module, rows))
    before = _logits(module, rows)
    module.merge_adapter()
    assert not module.uses_lora and not any("lora_" in k for k in module.state_dict())
    torch.testing.assert_close(_logits(module, rows), before, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="lora has unknown keys \\['rank'\\]"):
        CausalLMModule(config=TINY_CONFIGS["llama"], lora={"rank": 4})


def test_adapter_layer_factors_and_scores_equal_autograd(tmp_path):
    """Factors (EKFAC), pairwise influence and token scores of the lora_A / lora_B layers, float64."""
    rows = make_rows(count=12)
    module = _adapted()
    layers = [name for name, m in module.named_modules() if name.endswith((".lora_A.default", ".lora_B.default"))]
    assert len(layers) == 8  # q_proj and v_proj of 2 blocks, A and B each
    factors_cb = KFACCollectorCallback(target_modules=adapter_patterns(LORA), dtype="float64", plots=False,
                                       output_dir=str(tmp_path / "factors"))
    _trainer(tmp_path, [factors_cb]).predict(module, RowsDataModule(rows, batch_size=5), return_predictions=False)
    factors = read_factors(tmp_path / "factors")
    assert sorted(factors) == sorted(layers)
    loader = RowsDataModule(rows, batch_size=5).predict_dataloader()
    loss = lambda m, b: m.per_example_loss(b)  # noqa: E731
    expected = reference_kfac(module, list(loader), layers, loss, lambda b: b["attention_mask"].bool())
    tolerance = dict(rtol=2e-5, atol=1e-9)  # Hugging Face's RMSNorm runs in float32 even in a float64 model
    for name in layers:
        for key, short in (("activation_covariance", "A"), ("gradient_covariance", "G")):
            torch.testing.assert_close(factors[name][key], expected[name][short], **tolerance)

    singles = [batch for batch in RowsDataModule(rows, batch_size=1).predict_dataloader()]
    train = per_example_gradients(module, singles, loss, layers)
    queries = rows[:3]
    influence = InfluenceCallback(factors=str(tmp_path / "factors"), dtype="float64", output_dir=str(tmp_path / "i"))
    _trainer(tmp_path, [influence]).predict(module, RowsDataModule(rows, batch_size=5, queries=queries),
                                            return_predictions=False)
    scores = load_file(str(tmp_path / "i" / "scores.safetensors"))["scores"]
    reference = reference_influence({n: g[:3] for n, g in train.items()}, train, factors)
    torch.testing.assert_close(scores, reference, rtol=2e-5, atol=2e-5 * float(reference.abs().max()))
    assert scores.argmax(-1).tolist() == [0, 1, 2]  # each query's own row helps it most

    forget, retain = rows[:4], rows[4:]
    tokens = TokenInfluenceCallback(factors=str(tmp_path / "factors"), dtype="float64", output_dir=str(tmp_path / "t"))
    _trainer(tmp_path, [tokens]).predict(module, RowsDataModule(forget, batch_size=3, forget=forget, retain=retain),
                                         return_predictions=False)
    saved = load_file(str(tmp_path / "t" / "token_scores.safetensors"))
    direction = {n: inverse_hvp(factors[n], g[:4].mean(0) - g[4:].mean(0), None) for n, g in train.items()}
    expected = reference_token_scores(module, singles[:4], lambda m, b: m.per_token_loss(b), direction, layers)
    for row, scores in enumerate(expected):
        length = len(scores)
        torch.testing.assert_close(saved["scores"][row, :length], scores, rtol=2e-5,
                                   atol=2e-5 * float(scores.abs().max()))


class _Modes(Callback):
    """Records whether the Hugging Face model is in train mode in each kind of step."""

    def __init__(self) -> None:
        self.modes: dict[str, set[bool]] = {}

    def _record(self, kind, pl_module):
        self.modes.setdefault(kind, set()).add(pl_module.model.training)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._record("fit", pl_module)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._record("validate", pl_module)

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._record("predict", pl_module)


def test_a_pretrained_model_fine_tunes_in_train_mode_and_is_analysed_in_eval_mode(tmp_path):
    """from_pretrained returns a model in eval mode (dropout off): fit must switch it to train mode."""
    config = {**TINY_CONFIGS["llama"], "attention_dropout": 0.5}
    fresh = CausalLMModule(config=config, tokenizer=str(TOKENIZER))
    fresh.configure_model()
    fresh.model.save_pretrained(tmp_path / "pretrained")
    module = CausalLMModule(pretrained=str(tmp_path / "pretrained"), tokenizer=str(TOKENIZER))
    modes = _Modes()
    rows = make_rows(count=8)
    trainer = _trainer(tmp_path, [modes], max_epochs=1, num_sanity_val_steps=1)
    trainer.fit(module, RowsDataModule(rows, batch_size=4))
    collect = KFACCollectorCallback(target_modules=["*.mlp.down_proj"], plots=False, output_dir=str(tmp_path / "f"))
    _trainer(tmp_path, [modes, collect]).predict(module, RowsDataModule(rows, batch_size=4), return_predictions=False)
    assert modes.modes == {"fit": {True}, "validate": {False}, "predict": {False}}


def test_tracincp_over_adapter_checkpoints_equals_autograd(tmp_path):
    """Checkpoints of a LoRA run hold only the adapters; TracInCP replays them on the adapter layers."""
    from foreign_references import reference_tracin

    from lit_attrib.callbacks import SketchedGradCallback

    rows = make_rows(count=8)
    module = _adapted()
    layers = [name for name, _ in module.named_modules() if name.endswith((".lora_A.default", ".lora_B.default"))]
    trained = {k for k, p in module.named_parameters() if p.requires_grad}
    singles = list(RowsDataModule(rows, batch_size=1).predict_dataloader())
    loss = lambda m, b: m.per_example_loss(b)  # noqa: E731
    paths, grads = [], []
    for seed in (1, 2):
        checkpoint = _adapted(seed)
        torch.save({"state_dict": {k: v for k, v in checkpoint.state_dict().items() if k in trained},
                    "lit_attrib_base": checkpoint.base_fingerprint()}, tmp_path / f"c{seed}.ckpt")
        paths.append(str(tmp_path / f"c{seed}.ckpt"))
        grads.append(per_example_gradients(checkpoint, singles, loss, layers))
    callback = SketchedGradCallback(target_modules=adapter_patterns(LORA), exact=True, mode="tracin", dtype="float64",
                                    checkpoints=paths, eta=[0.5, 0.25], plots=False, output_dir=str(tmp_path / "sdi"))
    _trainer(tmp_path, [callback]).predict(module, RowsDataModule(rows, batch_size=3, queries=rows[:2]),
                                           return_predictions=False)
    tracin = load_file(str(tmp_path / "sdi" / "sdi.safetensors"))["tracin"]
    expected = reference_tracin([{n: g[:2] for n, g in c.items()} for c in grads], grads, [0.5, 0.25])
    torch.testing.assert_close(tracin, expected, rtol=2e-5, atol=2e-5 * float(expected.abs().max()))
