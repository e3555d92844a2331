"""CausalLMModule under a real Trainer: optimizer, schedule, resume, precision, NaN guard, model errors."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TINY_CONFIGS
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_attrib.data import TextDataModule
from lit_attrib.errors import ConfigError, ModelError, TrainingError
from lit_attrib.modules import CausalLMModule, build_causal_lm


def _data(facts_path, tokenizer_path, **kwargs):
    kwargs = {"num_samples": 64, "val_size": 16, "batch_size": 8, "max_length": 48, **kwargs}
    return TextDataModule(path=facts_path, tokenizer=tokenizer_path, **kwargs)


def _trainer(tmp_path, **kwargs):
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0)
    return Trainer(**{**defaults, **kwargs})


class _RecordLR(Callback):
    def __init__(self):
        self.lrs: dict[int, float] = {}
        self.batches: dict[int, list[int]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs[trainer.global_step] = trainer.optimizers[0].param_groups[0]["lr"]
        self.batches[trainer.global_step] = batch["index"].tolist()


def test_warmup_and_cosine_with_restarts_follow_the_formula(tmp_path, facts_path, tokenizer_path):
    steps, warmup, cycles, peak = 24, 4, 2, 1e-3
    module = CausalLMModule(config=TINY_CONFIGS["llama"], learning_rate=peak, scheduler="cosine_with_restarts",
                            warmup_steps=warmup, num_cycles=cycles)
    record = _RecordLR()
    _trainer(tmp_path, max_steps=steps, callbacks=[record], limit_val_batches=0).fit(
        module, _data(facts_path, tokenizer_path))
    for step, lr in record.lrs.items():
        if step < warmup:
            expected = peak * step / warmup
        else:
            progress = (step - warmup) / (steps - warmup)
            expected = peak * 0.5 * (1 + math.cos(math.pi * ((cycles * progress) % 1.0)))
        assert lr == pytest.approx(expected, abs=1e-12), step
    assert sorted(record.lrs) == list(range(steps))


def test_optimizer_is_fused_adamw_without_decay_on_norms_and_biases(tmp_path, facts_path, tokenizer_path):
    module = CausalLMModule(config=TINY_CONFIGS["gpt2"], weight_decay=0.05, betas=(0.8, 0.95))
    trainer = _trainer(tmp_path, max_steps=1, limit_val_batches=0)
    trainer.fit(module, _data(facts_path, tokenizer_path))
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"] is True
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0 and decay["betas"] == (0.8, 0.95)
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(module.parameters()))


def test_resume_continues_global_step_schedule_and_data_order(tmp_path, facts_path, tokenizer_path):
    """Killed at step 6 of 16 (mid-epoch, 8 batches an epoch) and resumed: the same run as uninterrupted."""
    def run(ckpt_path=None, every=None):
        seed_everything(0)  # same shuffling for both runs; the resumed one must get it from the checkpoint
        module = CausalLMModule(config=TINY_CONFIGS["llama"], learning_rate=1e-3, scheduler="cosine_with_restarts",
                                warmup_steps=3, num_cycles=2)
        record = _RecordLR()
        callbacks = [record]
        if every:
            callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=every, save_top_k=-1))
        trainer = _trainer(tmp_path, max_steps=16, callbacks=callbacks, limit_val_batches=0,
                           enable_checkpointing=bool(every))
        trainer.fit(module, _data(facts_path, tokenizer_path), ckpt_path=ckpt_path)
        return trainer, record, module

    _, full, full_module = run()
    run(every=6)
    checkpoint = tmp_path / "ck" / "epoch=0-step=6.ckpt"
    assert checkpoint.exists()
    resumed_trainer, resumed, resumed_module = run(ckpt_path=str(checkpoint))
    assert min(resumed.lrs) == 6 and resumed_trainer.global_step == 16
    for step, lr in resumed.lrs.items():
        assert lr == pytest.approx(full.lrs[step], abs=1e-12), step
    assert resumed.batches == {step: full.batches[step] for step in range(6, 16)}  # next batch, not the first
    for (name, a), b in zip(full_module.named_parameters(), resumed_module.parameters()):
        torch.testing.assert_close(a, b, msg=name)


def test_bf16_mixed_fit_on_cpu(tmp_path, facts_path, tokenizer_path):
    module = CausalLMModule(config=TINY_CONFIGS["llama"], learning_rate=3e-3)
    trainer = _trainer(tmp_path, max_steps=6, precision="bf16-mixed", limit_val_batches=2, val_check_interval=6)
    trainer.fit(module, _data(facts_path, tokenizer_path))
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and torch.isfinite(metrics["val/perplexity"])
    assert all(p.dtype == torch.float32 for p in module.parameters())  # master weights stay float32


def test_validation_perplexity_is_exp_of_token_mean_loss(tmp_path, facts_path, tokenizer_path):
    module = CausalLMModule(config=TINY_CONFIGS["llama"])
    data = _data(facts_path, tokenizer_path, batch_size=5)
    metrics = _trainer(tmp_path).validate(module, data, verbose=False)[0]
    # Independent reference: summed NLL over every label token of the validation set / their count.
    module.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in data.val_dataloader():
            total += module.per_example_loss(batch).sum().item()
            count += int((batch["labels"][:, 1:] != -100).sum())
    assert metrics["val/loss"] == pytest.approx(total / count, rel=1e-5)
    assert metrics["val/perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)


class _PoisonWeights(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 3:
            with torch.no_grad():
                next(pl_module.model.parameters()).fill_(float("nan"))


def test_nan_loss_stops_with_the_step(tmp_path, facts_path, tokenizer_path):
    module = CausalLMModule(config=TINY_CONFIGS["llama"])
    with pytest.raises(TrainingError, match=r"training loss is nan at global step 3 \(epoch 0, batch 3"):
        _trainer(tmp_path, max_steps=8, callbacks=[_PoisonWeights()], limit_val_batches=0).fit(
            module, _data(facts_path, tokenizer_path))


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_every_model_family_fits(tmp_path, facts_path, tokenizer_path, model_type):
    module = CausalLMModule(config=TINY_CONFIGS[model_type], learning_rate=3e-3)
    trainer = _trainer(tmp_path, max_steps=4, limit_val_batches=0)
    trainer.fit(module, _data(facts_path, tokenizer_path))
    assert trainer.global_step == 4 and type(module.model).__name__.lower().startswith(model_type.replace("2", ""))


def test_config_models_are_reproducible_by_init_seed(tokenizer_path):
    from lit_attrib.data import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_path)
    a = build_causal_lm(config=TINY_CONFIGS["llama"], tokenizer=tokenizer, init_seed=1)
    torch.manual_seed(123)  # the global seed must not matter
    b = build_causal_lm(config=TINY_CONFIGS["llama"], tokenizer=tokenizer, init_seed=1)
    c = build_causal_lm(config=TINY_CONFIGS["llama"], tokenizer=tokenizer, init_seed=2)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
    assert not all(torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))
    assert a.config.vocab_size == len(tokenizer) and a.config.pad_token_id == tokenizer.pad_token_id


# ------------------------------------------------------------------------------- bad input
def test_unknown_model_type_suggests_close_names(tokenizer_path):
    with pytest.raises(ModelError, match=r"unknown model_type 'lama'; did you mean \[.*'llama'"):
        build_causal_lm(config={"model_type": "lama", "vocab_size": 10})


def test_unknown_scheduler():
    with pytest.raises(ConfigError, match=r"unknown scheduler 'cosine_restarts'; choose one of \[.*'cosine_with_restarts'"):
        CausalLMModule(config=TINY_CONFIGS["llama"], scheduler="cosine_restarts")


def test_pretrained_path_missing_and_hub_offline():
    with pytest.raises(ModelError, match=r"model path './checkpoints/nope' does not exist"):
        build_causal_lm(pretrained="./checkpoints/nope")
    with pytest.raises(ModelError, match=r"could not load model 'TinyLlama/TinyLlama_v1.1' .* offline mode is on"):
        build_causal_lm(pretrained="TinyLlama/TinyLlama_v1.1")


def test_exactly_one_model_source():
    with pytest.raises(ConfigError, match="exactly one of `pretrained`"):
        CausalLMModule()
    with pytest.raises(ConfigError, match="exactly one of `pretrained`"):
        CausalLMModule(pretrained="x", config={"model_type": "llama"})


def test_predict_step_generates_nothing_for_labelled_examples(facts_path, tokenizer_path):
    data = _data(facts_path, tokenizer_path, predict_split="train", predict_content="examples")
    data.setup("predict")
    module = CausalLMModule(config=TINY_CONFIGS["llama"], tokenizer=tokenizer_path)
    module.configure_model()
    assert module.predict_step(next(iter(data.predict_dataloader())), 0) is None
