"""SketchedGradCallback (step-decomposed influence / TracIn) against an autograd reference with untied steps."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from safetensors.torch import load_file
from torch import nn

from lit_attrib.engine.data import example_checksums
from lit_attrib.engine.task import Task
from lit_attrib.ops.loss import loss_mask
from lit_attrib.callbacks import SketchedGradCallback
from lit_attrib.data.algorithmic import AlgorithmicDataModule
from lit_attrib.errors import ArtifactError, ModelError
from lit_attrib.modules.looped import LoopedTransformerModule
from lit_attrib.ops.loss import token_nll
from lit_attrib.ops.step_features import step_layout

LOOPS = 3


def tiny_module(seed: int = 0, **overrides) -> LoopedTransformerModule:
    arguments = dict(vocab_size=14, d_model=8, n_heads=2, d_ff=12, n_loops=LOOPS, max_length=16, init_seed=seed)
    return LoopedTransformerModule(**{**arguments, **overrides}).double()


def tiny_data(batch_size: int = 4, num_train: int = 10, num_val: int = 3) -> AlgorithmicDataModule:
    return AlgorithmicDataModule(task="addition", digits=1, num_train=num_train, num_val=num_val, seed=1,
                                 batch_size=batch_size)


def save_checkpoint(module: LoopedTransformerModule, path, lr: float, step: int) -> str:
    torch.save({"state_dict": module.state_dict(), "global_step": step, "epoch": 0,
                "optimizer_states": [{"param_groups": [{"lr": lr}]}]}, path)
    return str(path)


@pytest.fixture
def checkpoints(tmp_path) -> list[str]:
    first = tiny_module(seed=0)
    second = tiny_module(seed=0)
    with torch.no_grad():
        for parameter in second.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    return [save_checkpoint(first, tmp_path / "a.ckpt", 0.5, 10), save_checkpoint(second, tmp_path / "b.ckpt", 0.25, 20)]


# --------------------------------------------------------------------------------- the reference
def untied_step_gradients(module: LoopedTransformerModule, example: dict) -> torch.Tensor:
    """Per-step gradients of one example's summed loss, by autograd through a copy of the model whose
    loop iterations each have their own block: ``(S + 2, P)`` rows prelude, loop 1..S, readout."""
    blocks = nn.ModuleList(copy.deepcopy(module.block) for _ in range(module.hparams.n_loops))
    prelude = [module.embed.weight, module.position.weight]
    readout = [module.norm.weight, module.norm.bias, module.head.weight]
    ids, labels = example["input_ids"], example["labels"]
    injected = module.embed(ids) + module.position(torch.arange(ids.shape[1]).expand_as(ids))
    h = torch.zeros_like(injected)
    for block in blocks:
        h = block(h + injected, example["attention_mask"])
    loss = token_nll(module.head(module.norm(h)), labels).sum()
    block_parameters = [list(block.parameters()) for block in blocks]
    everything = prelude + readout + [p for ps in block_parameters for p in ps]
    grads = dict(zip(map(id, everything), torch.autograd.grad(loss, everything)))
    flat = lambda params: torch.cat([grads[id(p)].flatten() for p in params])  # noqa: E731
    sizes = [sum(p.numel() for p in part) for part in (prelude, block_parameters[0], readout)]
    rows = [torch.cat([flat(prelude), torch.zeros(sizes[1] + sizes[2], dtype=torch.float64)])]
    for ps in block_parameters:
        rows.append(torch.cat([torch.zeros(sizes[0], dtype=torch.float64), flat(ps), torch.zeros(sizes[2], dtype=torch.float64)]))
    rows.append(torch.cat([torch.zeros(sizes[0] + sizes[1], dtype=torch.float64), flat(readout)]))
    return torch.stack(rows)


def reference_sdi(paths: list[str], data: AlgorithmicDataModule, etas: list[float]) -> torch.Tensor:
    data.setup("predict")
    train = list(data.predict_dataloader().dataset)
    queries = list(data.query_dataloader().dataset)
    collate = data.predict_dataloader().collate_fn
    total = 0
    for path, eta in zip(paths, etas):
        module = tiny_module()
        module.load_state_dict(torch.load(path)["state_dict"])
        train_steps = torch.stack([untied_step_gradients(module, collate([row])) for row in train])
        query_steps = torch.stack([untied_step_gradients(module, collate([row])) for row in queries])
        total = total + eta * torch.einsum("ip,jsp->ijs", train_steps.sum(1), query_steps)
    return total


def run_predict(tmp_path, data, callback, module=None):
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path, callbacks=[callback])
    trainer.predict(module or tiny_module(), datamodule=data, return_predictions=False)
    folder = tmp_path / callback.name if callback.output_dir is None else Path(callback.output_dir)
    return load_file(str(folder / "sdi.safetensors")), json.loads((folder / "sdi.json").read_text())


# ------------------------------------------------------------------------------------ acceptance
def test_exact_mode_equals_untied_autograd_reference(tmp_path, checkpoints):
    data = tiny_data()
    callback = SketchedGradCallback(exact=True, dtype="float64", checkpoints=checkpoints, output_dir=str(tmp_path / "sdi"))
    tensors, metadata = run_predict(tmp_path, data, callback)
    expected = reference_sdi(checkpoints, tiny_data(), [0.5, 0.25])
    assert metadata["steps"] == ["prelude", "loop 1", "loop 2", "loop 3", "readout"]
    assert [c["eta"] for c in metadata["checkpoints"]] == [0.5, 0.25]  # the checkpoints' learning rates
    assert tensors["sdi"].shape == (10, 3, LOOPS + 2)
    torch.testing.assert_close(tensors["sdi"], expected, rtol=1e-6, atol=1e-10)
    torch.testing.assert_close(tensors["tracin"], expected.sum(-1), rtol=1e-6, atol=1e-10)
    assert torch.equal(tensors["train_indices"], torch.arange(10))
    assert torch.equal(tensors["query_indices"], torch.arange(10, 13))
    assert float(expected[..., 1:-1].abs().sum()) > 0 and float(expected[..., 0].abs().sum()) > 0


def test_tracin_mode_is_sdi_summed_over_steps(tmp_path, checkpoints):
    common = dict(exact=True, dtype="float64", checkpoints=checkpoints, eta=[1.0, 2.0])
    sdi, _ = run_predict(tmp_path, tiny_data(), SketchedGradCallback(**common, output_dir=str(tmp_path / "a")))
    tracin, metadata = run_predict(tmp_path, tiny_data(), SketchedGradCallback(**common, mode="tracin",
                                                                               output_dir=str(tmp_path / "b")))
    assert "sdi" not in tracin and metadata["steps"] == ["all steps"]
    torch.testing.assert_close(tracin["tracin"], sdi["sdi"].sum(-1), rtol=1e-9, atol=1e-12)


def test_sketched_sdi_is_unbiased_over_seeds(tmp_path, checkpoints):
    data = tiny_data()
    exact, _ = run_predict(tmp_path, data, SketchedGradCallback(exact=True, dtype="float64", checkpoints=checkpoints[:1],
                                                                output_dir=str(tmp_path / "exact")))
    estimates = []
    for seed in range(50):
        sketched, _ = run_predict(tmp_path, tiny_data(), SketchedGradCallback(
            sketch_dim=64, seed=seed, dtype="float64", checkpoints=checkpoints[:1], keep_sketches=False,
            output_dir=str(tmp_path / f"s{seed}")))
        estimates.append(sketched["sdi"])
    estimates = torch.stack(estimates)
    mean, error = estimates.mean(0), estimates.std(0) / 50 ** 0.5
    # every entry within 3 standard errors would fail by chance somewhere among 150 entries; the
    # totals per step over all pairs (sums of many entries) are the strict check, entries a loose one
    assert float(((mean - exact["sdi"]).abs() <= 3 * error + 1e-12).double().mean()) > 0.95
    step_totals = estimates.sum((1, 2))
    step_error = step_totals.std(0) / 50 ** 0.5
    assert bool(((step_totals.mean(0) - exact["sdi"].sum((0, 1))).abs() <= 3 * step_error).all())
    assert float(estimates.std(0).mean()) > 0  # a sketch, not the exact gradients


@pytest.mark.parametrize("batch_size", [1, 5])
def test_batch_size_and_shuffling_do_not_change_the_results(tmp_path, checkpoints, batch_size):
    reference, _ = run_predict(tmp_path, tiny_data(batch_size=4), SketchedGradCallback(
        sketch_dim=32, checkpoints=checkpoints, output_dir=str(tmp_path / "ref")))

    class Shuffled(AlgorithmicDataModule):
        def predict_dataloader(self):
            loader = super().predict_dataloader()
            return torch.utils.data.DataLoader(loader.dataset, batch_size=batch_size, shuffle=True,
                                               collate_fn=loader.collate_fn)

        def query_dataloader(self):
            loader = super().query_dataloader()
            return torch.utils.data.DataLoader(loader.dataset, batch_size=batch_size, shuffle=True,
                                               collate_fn=loader.collate_fn)

    data = Shuffled(task="addition", digits=1, num_train=10, num_val=3, seed=1, batch_size=batch_size)
    other, _ = run_predict(tmp_path, data, SketchedGradCallback(sketch_dim=32, checkpoints=checkpoints,
                                                                output_dir=str(tmp_path / "other")))
    torch.testing.assert_close(other["sdi"], reference["sdi"], rtol=1e-5, atol=1e-7)
    assert torch.equal(other["train_indices"], reference["train_indices"])


def test_cached_sketches_serve_a_second_query_set_and_a_resume(tmp_path, checkpoints, monkeypatch):
    folder = tmp_path / "sdi"
    first, _ = run_predict(tmp_path, tiny_data(), SketchedGradCallback(sketch_dim=32, checkpoints=checkpoints,
                                                                       output_dir=str(folder)))
    assert len(list(folder.glob(".chunks-sdi-sketches-*"))) == 2  # one cache per checkpoint
    calls = []
    original = SketchedGradCallback._example_features

    def counting(self, trainer, pl_module, batch, per_step):
        calls.append(per_step)
        return original(self, trainer, pl_module, batch, per_step)

    monkeypatch.setattr(SketchedGradCallback, "_example_features", counting)
    again, metadata = run_predict(tmp_path, tiny_data(num_val=5), SketchedGradCallback(
        sketch_dim=32, checkpoints=checkpoints, output_dir=str(folder), overwrite=True))
    assert not any(calls[i] is False for i in range(len(calls)))  # no training-set forward/backward
    assert [c["reused_examples"] for c in metadata["checkpoints"]] == [10, 10]
    torch.testing.assert_close(again["sdi"][:, :3], first["sdi"], rtol=1e-6, atol=1e-8)


def test_the_model_keeps_its_own_weights(tmp_path, checkpoints):
    module = tiny_module(seed=7)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=tmp_path,
                      callbacks=[SketchedGradCallback(sketch_dim=16, checkpoints=checkpoints, output_dir=str(tmp_path / "o"))])
    trainer.predict(module, datamodule=tiny_data(), return_predictions=False)
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    assert (tmp_path / "o" / "trajectories.png").stat().st_size > 1000
    rows = [json.loads(line) for line in (tmp_path / "o" / "topk.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and len(rows[0]["helpful"][0]["steps"]) == LOOPS + 2


def test_hash_tables_are_the_same_for_the_same_seed():
    from lit_attrib.ops.step_features import GradientFeatures
    from lit_attrib.engine.tracking import find_parameter_modules

    module = tiny_module()
    layers = find_parameter_modules(module, None)
    canonical = {id(p): n for n, p in module.named_parameters()}
    one = GradientFeatures(layers, 64, False, 3, torch.float64, torch.device("cpu"), canonical)
    two = GradientFeatures(layers, 64, False, 3, torch.float64, torch.device("cpu"), canonical)
    for name in layers:
        a, b = one.sketches[name], two.sketches[name]
        for x, y in ((getattr(a, "left", a), getattr(b, "left", b)), (getattr(a, "right", a), getattr(b, "right", b))):
            assert torch.equal(x.buckets, y.buckets) and torch.equal(x.signs, y.signs)
    if torch.cuda.is_available():
        three = GradientFeatures(layers, 64, False, 3, torch.float64, torch.device("cuda"), canonical)
        assert all(torch.equal(three.sketches[n].left.buckets.cpu(), one.sketches[n].left.buckets)
                   for n in layers if hasattr(one.sketches[n], "left"))


# ------------------------------------------------------------------------------------ online mode
def test_online_mode_with_one_step_between_query_sketches_is_tracin_ideal(tmp_path):
    """Online, every step: Σ_t lr_t ⟨g_i(θ_t), g_q^{(s)}(θ_t)⟩ over the batches i was in, checked
    against a loop that replays the training and takes exact per-step gradients at each step."""
    data = tiny_data(batch_size=5)
    module = tiny_module()
    start = copy.deepcopy(module.state_dict())
    callback = SketchedGradCallback(exact=True, dtype="float64", output_dir=str(tmp_path / "online"))
    trainer = Trainer(accelerator="cpu", max_steps=4, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                      callbacks=[callback, Recorder()], num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    tensors = load_file(str(tmp_path / "online" / "sdi.safetensors"))
    # replay: the recorder kept each step's batch indices, weights and learning rate
    data.setup("fit")
    collate = data.predict_dataloader().collate_fn
    rows = data.rows
    expected = torch.zeros(10, 3, LOOPS + 2, dtype=torch.float64)
    for state, indices, lr in Recorder.steps:
        replay = tiny_module()
        replay.load_state_dict(state)
        queries = torch.stack([untied_step_gradients(replay, collate([rows[j]])) for j in range(10, 13)])
        for i in indices:
            g = untied_step_gradients(replay, collate([rows[i]])).sum(0)
            expected[i] += lr * torch.einsum("p,jsp->js", g, queries)
    assert len(Recorder.steps) == 4 and start is not None
    seen = tensors["train_indices"]
    torch.testing.assert_close(tensors["sdi"], expected[seen], rtol=1e-6, atol=1e-10)


class Recorder(Callback):
    steps: list = []

    def on_train_start(self, trainer, pl_module):
        Recorder.steps = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        Recorder.steps.append((copy.deepcopy(pl_module.state_dict()), batch["index"].tolist(),
                               float(trainer.optimizers[0].param_groups[0]["lr"])))


# ------------------------------------------------------------------------------------ bad input
def test_step_layout_places_once_used_modules_and_refuses_the_rest():
    names, steps = step_layout({"embed": 1, "block.q": 3, "head": 1}, ["embed", "block.q", "block.q", "block.q", "head"])
    assert names == ["prelude", "loop 1", "loop 2", "loop 3", "readout"]
    assert steps == {"embed": [0], "block.q": [1, 2, 3], "head": [4]}
    with pytest.raises(ModelError, match="different numbers of times"):
        step_layout({"a": 3, "b": 2}, ["a", "b", "a", "b", "a"])
    with pytest.raises(ModelError, match="inside the loop"):
        step_layout({"a": 2, "b": 1}, ["a", "b", "a"])


def test_inconsistent_use_counts_are_an_error(tmp_path, checkpoints):
    class Twice(LoopedTransformerModule):  # the MLP's up projection runs once more in the last loop
        def forward(self, input_ids, attention_mask=None):
            self.block.up_proj(torch.zeros(1, self.hparams.d_model, dtype=torch.float64))
            return super().forward(input_ids, attention_mask)

    module = Twice(vocab_size=14, d_model=8, n_heads=2, d_ff=12, n_loops=LOOPS, max_length=16).double()
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=tmp_path, callbacks=[SketchedGradCallback(
                          target_modules=["block"], sketch_dim=8, checkpoints=checkpoints, output_dir=str(tmp_path / "x"))])
    with pytest.raises(ModelError, match="different numbers of times"):
        trainer.predict(module, datamodule=tiny_data(), return_predictions=False)


def test_sketch_dim_below_one_is_an_error():
    with pytest.raises(ValueError, match="sketch_dim must be an integer of at least 1"):
        SketchedGradCallback(sketch_dim=0)
    with pytest.raises(ValueError, match="mode must be"):
        SketchedGradCallback(mode="both")


def test_a_checkpoint_from_another_model_is_an_error(tmp_path, checkpoints):
    other = save_checkpoint(tiny_module(d_model=12, n_heads=2), tmp_path / "other.ckpt", 0.1, 1)
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=tmp_path, callbacks=[SketchedGradCallback(
                          sketch_dim=8, checkpoints=[checkpoints[0], other], output_dir=str(tmp_path / "x"))])
    with pytest.raises(ArtifactError, match="from another model.*shapes differ"):
        trainer.predict(tiny_module(), datamodule=tiny_data(), return_predictions=False)
    with pytest.raises(ArtifactError, match="no checkpoint at"):
        Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path,
                callbacks=[SketchedGradCallback(checkpoints=[str(tmp_path / "missing-*.ckpt")])]).predict(
            tiny_module(), datamodule=tiny_data(), return_predictions=False)


def test_unsupported_parameter_type_in_strict_mode_names_it(tmp_path, checkpoints):
    class Scaled(LoopedTransformerModule):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.mix = nn.Bilinear(2, 2, 1)  # a 2-D weight no sketch covers

        def forward(self, input_ids, attention_mask=None):
            x = torch.ones(1, 2, dtype=torch.float64)
            return super().forward(input_ids, attention_mask) + 0 * self.mix(x, x).sum()

    def run(**arguments):
        module = Scaled(vocab_size=14, d_model=8, n_heads=2, d_ff=12, n_loops=LOOPS, max_length=16).double()
        trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                          default_root_dir=tmp_path, callbacks=[SketchedGradCallback(
                              target_modules=["mix", "block"], checkpoints=None, **arguments)])
        trainer.fit(module, datamodule=tiny_data())

    with pytest.raises(ModelError, match=r"mix \(Bilinear\).*exact: true.*leave them out"):
        run(sketch_dim=8)


def test_checksums_ignore_right_padding():
    batch = {"input_ids": torch.tensor([[1, 2, 3, 13]]), "attention_mask": torch.tensor([[1, 1, 1, 0]]),
             "labels": torch.tensor([[-100, 2, 3, -100]])}
    task = Task(token_mask=lambda b: loss_mask(b["labels"]))
    shorter = {key: value[:, :3] for key, value in batch.items()}
    assert torch.equal(example_checksums(task, batch), example_checksums(task, shorter))
    changed = {**shorter, "input_ids": torch.tensor([[1, 2, 4]])}
    assert not torch.equal(example_checksums(task, changed), example_checksums(task, shorter))
    relabelled = {**shorter, "labels": torch.tensor([[-100, 2, 5]])}
    assert not torch.equal(example_checksums(task, relabelled), example_checksums(task, shorter))
    for first, second in (([5, 9, 9, 5, 7], [9, 5, 5, 9, 7]), ([5, 5, 5, 1, 1], [6, 3, 6, 1, 1])):  # equal sums
        assert not torch.equal(example_checksums(Task(), (torch.tensor([first]),)),
                               example_checksums(Task(), (torch.tensor([second]),)))
    tuples = (torch.tensor([[1, 2, 3]]), torch.tensor([[2, 3, 4]]))
    assert not torch.equal(example_checksums(Task(), tuples), example_checksums(Task(), (tuples[0], tuples[1] + 1)))


def test_a_killed_pass_resumes_from_its_cached_sketches(tmp_path, checkpoints, monkeypatch):
    reference, _ = run_predict(tmp_path, tiny_data(), SketchedGradCallback(sketch_dim=32, checkpoints=checkpoints,
                                                                           output_dir=str(tmp_path / "ref")))
    original = SketchedGradCallback._example_features
    done = []

    def dies(self, trainer, pl_module, batch, per_step):
        if not per_step:
            if len(done) == 2:  # the third training batch of the first checkpoint
                raise KeyboardInterrupt
            done.append(1)
        return original(self, trainer, pl_module, batch, per_step)

    monkeypatch.setattr(SketchedGradCallback, "_example_features", dies)
    folder = tmp_path / "killed"
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                          default_root_dir=tmp_path, callbacks=[SketchedGradCallback(
                              sketch_dim=32, checkpoints=checkpoints, output_dir=str(folder), chunk_size=4)])
        trainer.predict(tiny_module(), datamodule=tiny_data(), return_predictions=False)
    assert not (folder / "sdi.safetensors").exists()  # nothing half-written
    monkeypatch.setattr(SketchedGradCallback, "_example_features", original)
    resumed, metadata = run_predict(tmp_path, tiny_data(), SketchedGradCallback(
        sketch_dim=32, checkpoints=checkpoints, output_dir=str(folder), chunk_size=4))
    assert metadata["checkpoints"][0]["reused_examples"] == 8 and metadata["checkpoints"][1]["reused_examples"] == 0
    torch.testing.assert_close(resumed["sdi"], reference["sdi"], rtol=1e-6, atol=1e-8)


def test_changed_training_rows_are_sketched_again(tmp_path, checkpoints):
    folder = str(tmp_path / "sdi")
    run_predict(tmp_path, tiny_data(), SketchedGradCallback(sketch_dim=32, checkpoints=checkpoints, output_dir=folder))

    class Changed(AlgorithmicDataModule):
        def setup(self, stage):
            super().setup(stage)
            self.rows[0] = {**self.rows[0], "input_ids": list(reversed(self.rows[0]["input_ids"]))}

    changed = Changed(task="addition", digits=1, num_train=10, num_val=3, seed=1, batch_size=4)
    _, metadata = run_predict(tmp_path, changed, SketchedGradCallback(sketch_dim=32, checkpoints=checkpoints,
                                                                      output_dir=folder))
    assert [c["reused_examples"] for c in metadata["checkpoints"]] == [6, 6]  # the batch of row 0 is redone


def test_other_arguments_do_not_overwrite_results(tmp_path, checkpoints):
    folder = str(tmp_path / "sdi")
    run_predict(tmp_path, tiny_data(), SketchedGradCallback(sketch_dim=32, checkpoints=checkpoints, output_dir=folder))
    with pytest.raises(ArtifactError, match="other arguments"):
        run_predict(tmp_path, tiny_data(), SketchedGradCallback(sketch_dim=16, checkpoints=checkpoints, output_dir=folder))


@pytest.mark.parametrize(("family", "targets"), [("llama", None), ("gpt2", ["model.transformer.wte", "model.transformer.h",
                                                                             "model.transformer.ln_f", "model.lm_head"])])
def test_exact_tracin_of_hugging_face_models_equals_autograd(tmp_path, tokenizer_path, family, targets):
    """Every parameter of a tiny Llama (RMSNorm through torch.func), or GPT-2's Conv1D layers with the
    embedding table tied to the readout (both modules add into one parameter): one step, TracIn."""
    from conftest import TINY_CONFIGS
    from reference_models import RowsDataModule, make_rows

    from lit_attrib.modules import CausalLMModule

    module = CausalLMModule(config=TINY_CONFIGS[family], tokenizer=tokenizer_path, init_seed=0)
    module.configure_model()
    module = module.double().eval()
    path = tmp_path / "c.ckpt"
    torch.save({"state_dict": module.state_dict()}, path)
    rows = make_rows(count=5, vocab=50, seed=3)
    queries = [{**row, "index": 100 + i} for i, row in enumerate(make_rows(count=2, vocab=50, seed=4))]
    data = RowsDataModule(rows, batch_size=2, queries=queries)
    tensors, metadata = run_predict(tmp_path, data, SketchedGradCallback(
        target_modules=targets, exact=True, dtype="float64", checkpoints=[str(path)], eta=0.5,
        output_dir=str(tmp_path / "sdi")), module=module)
    assert metadata["steps"] == ["step 1"]
    parameters = [p for name, p in module.named_parameters() if "wpe" not in name]  # named_parameters dedups tied
    collate = data.predict_dataloader().collate_fn

    def gradient(row):
        loss = module.per_example_loss(collate([row])).sum()
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, parameters)])

    train = torch.stack([gradient(row) for row in rows])
    query = torch.stack([gradient(row) for row in queries])
    torch.testing.assert_close(tensors["tracin"], 0.5 * train @ query.T, rtol=1e-6, atol=1e-10)


def test_online_results_survive_a_resumed_fit(tmp_path):
    class InOrder(AlgorithmicDataModule):
        def train_dataloader(self):
            return self._loader(self.rows[: self.hparams.num_train], self.batch_size, shuffle=False)

    def fit(max_epochs: int, folder: str, ckpt_path: str | None = None, checkpoint: bool = False):
        from lightning.pytorch.callbacks import ModelCheckpoint

        callbacks = [SketchedGradCallback(exact=True, dtype="float64", output_dir=str(tmp_path / folder))]
        if checkpoint:
            callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True))
        trainer = Trainer(accelerator="cpu", max_epochs=max_epochs, logger=False, enable_progress_bar=False,
                          enable_model_summary=False, default_root_dir=tmp_path, callbacks=callbacks,
                          num_sanity_val_steps=0, limit_val_batches=0, enable_checkpointing=checkpoint)
        trainer.fit(tiny_module(), datamodule=InOrder(task="addition", digits=1, num_train=10, num_val=3, seed=1,
                                                      batch_size=5), ckpt_path=ckpt_path)
        return load_file(str(tmp_path / folder / "sdi.safetensors"))

    whole = fit(2, "whole")
    fit(1, "resumed", checkpoint=True)
    resumed = fit(2, "resumed", ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    torch.testing.assert_close(resumed["sdi"], whole["sdi"], rtol=1e-6, atol=1e-10)


def test_split_sketch_gives_each_module_its_own_coordinates_and_stays_unbiased(tmp_path, checkpoints):
    from lit_attrib.ops.step_features import proportional

    assert proportional([10, 30, 60], 20) == [3, 6, 11] and sum(proportional([7, 1, 1, 50], 33)) == 33
    exact, _ = run_predict(tmp_path, tiny_data(), SketchedGradCallback(exact=True, dtype="float64",
                                                                       checkpoints=checkpoints[:1], output_dir=str(tmp_path / "e")))
    estimates = []
    for seed in range(30):
        sketched, metadata = run_predict(tmp_path, tiny_data(), SketchedGradCallback(
            sketch_dim=128, sketch_sharing="split", seed=seed, dtype="float64", checkpoints=checkpoints[:1],
            keep_sketches=False, output_dir=str(tmp_path / f"s{seed}")))
        estimates.append(sketched["tracin"])
    blocks = metadata["sketch"]["blocks"]
    assert sum(b["coordinates"][1] for b in blocks) == 128 and blocks[1]["coordinates"][0] == blocks[0]["coordinates"][1]
    estimates = torch.stack(estimates)
    totals = estimates.sum((1, 2))
    assert abs(float(totals.mean() - exact["tracin"].sum())) <= 3 * float(totals.std() / 30 ** 0.5)
    with pytest.raises(ValueError, match="sketch_sharing"):
        SketchedGradCallback(sketch_sharing="halves")
