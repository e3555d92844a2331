"""The engine's user contract on a module written outside lit_attrib: tuple batches, a token-mean loss of
its own, no ``predict_step``, no example ids. Numbers against explicit hooks; misuse against clear errors."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lit_attrib.callbacks import InfluenceCallback, KFACCollectorCallback
from lit_attrib.engine import Task
from lit_attrib.errors import ConfigError, DataError, LitAttribError

VOCAB, LENGTH, WIDTH = 13, 6, 8
REPO = Path(__file__).resolve().parents[1]


class Chunks(Dataset):
    """nanoGPT-style ``(x, y)`` chunks of a token stream, ``y`` already shifted."""

    def __init__(self, count: int = 14, seed: int = 3) -> None:
        stream = torch.randint(0, VOCAB, (count * LENGTH + 1,), generator=torch.Generator().manual_seed(seed))
        self.rows = [(stream[i * LENGTH:(i + 1) * LENGTH], stream[i * LENGTH + 1:(i + 1) * LENGTH + 1])
                     for i in range(count)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        return self.rows[i]


class TupleLM(LightningModule):
    """A user's module: ``(x, y)`` batches, token-mean cross entropy, SGD; no predict_step, no lit_attrib."""

    def __init__(self, lr: float = 0.0, mha: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.hidden = nn.Linear(WIDTH, WIDTH)
        self.attention = nn.MultiheadAttention(WIDTH, 2, batch_first=True) if mha else None
        self.head = nn.Linear(WIDTH, VOCAB)
        self.lr = lr
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.hidden(self.embed(x)))
        if self.attention is not None:
            h = h + self.attention(h, h, h, need_weights=False)[0]
        return self.head(h)  # (B, T, V)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        return F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def summed_loss(module, batch):
    x, y = batch
    return F.cross_entropy(module(x).transpose(1, 2), y, reduction="none").sum(-1)  # (B,)


def _trainer(tmp_path, callbacks, **kwargs) -> Trainer:
    return Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, default_root_dir=tmp_path, callbacks=callbacks, **kwargs)


def _reference_factors(module: TupleLM, rows: list) -> dict[str, torch.Tensor]:
    """A and G of ``head`` from hooks of our own, with g of each example's summed loss."""
    seen = {}
    handle = module.head.register_forward_hook(lambda m, inputs, output: seen.update(a=inputs[0], out=output))
    a_sum = torch.zeros(WIDTH + 1, WIDTH + 1, dtype=torch.float64)
    g_sum = torch.zeros(VOCAB, VOCAB, dtype=torch.float64)
    tokens = 0
    for x, y in rows:
        loss = summed_loss(module, (x[None], y[None])).sum()
        (g,) = torch.autograd.grad(loss, seen["out"])
        a = torch.cat([seen["a"], torch.ones_like(seen["a"][..., :1])], -1).reshape(-1, WIDTH + 1)
        g = g.reshape(-1, VOCAB)
        a_sum += a.T @ a
        g_sum += g.T @ g
        tokens += a.shape[0]
    handle.remove()
    return {"activation_covariance": a_sum / tokens, "gradient_covariance": g_sum / tokens}


@pytest.mark.parametrize("reduction", ["auto", "token_mean"])
def test_fit_collection_on_tuple_batches_finds_the_token_mean(tmp_path, reduction):
    module, data = TupleLM(), Chunks()
    callback = KFACCollectorCallback(target_modules=["head"], strategy="kfac", dtype="float64", plots=False,
                                     output_dir=str(tmp_path / "f"), loss_fn=summed_loss,
                                     train_loss_reduction=reduction)
    _trainer(tmp_path, [callback], max_epochs=1).fit(module, DataLoader(data, batch_size=4, shuffle=True))
    saved = load_file(str(tmp_path / "f" / "factors.safetensors"))
    expected = _reference_factors(module, data.rows)
    for key, value in expected.items():
        torch.testing.assert_close(saved[f"head.{key}"], value, rtol=1e-10, atol=1e-12)


def test_a_wrong_reduction_is_refused_on_the_first_batch(tmp_path):
    callback = KFACCollectorCallback(target_modules=["head"], strategy="kfac", plots=False, loss_fn=summed_loss,
                                     output_dir=str(tmp_path / "f"), train_loss_reduction="example_mean")
    with pytest.raises(ConfigError, match=r"train_loss_reduction is 'example_mean'.*token_mean 24"):
        _trainer(tmp_path, [callback], max_epochs=1).fit(TupleLM(), DataLoader(Chunks(), batch_size=4))
    assert not (tmp_path / "f").exists()


def test_a_loss_that_is_not_the_training_loss_is_refused(tmp_path):
    def shifted_twice(module, batch):  # the training loss shifts once: this one is another loss
        x, y = batch
        return F.cross_entropy(module(x)[:, :-1].transpose(1, 2), y[:, 1:], reduction="none").sum(-1)

    callback = KFACCollectorCallback(target_modules=["head"], strategy="kfac", plots=False, loss_fn=shifted_twice,
                                     output_dir=str(tmp_path / "f"))
    with pytest.raises(ConfigError, match="fits none of"):
        _trainer(tmp_path, [callback], max_epochs=1).fit(TupleLM(), DataLoader(Chunks(), batch_size=4))


def test_without_a_loss_the_callback_says_what_to_give(tmp_path):
    for reduction in ("auto", "example_mean"):  # a stated reduction cannot be checked without a loss either
        callback = KFACCollectorCallback(target_modules=["head"], plots=False, output_dir=str(tmp_path / "f"),
                                         strategy="kfac", train_loss_reduction=reduction)
        with pytest.raises(ConfigError, match=r"TupleLM.*loss_fn=f\(module, batch\).*check_train_loss: false"):
            _trainer(tmp_path, [callback], max_epochs=1).fit(TupleLM(), DataLoader(Chunks(), batch_size=4))


def test_a_layer_never_called_through_forward_is_named(tmp_path):
    callback = KFACCollectorCallback(target_modules=["attention.out_proj", "head"], strategy="kfac", plots=False,
                                     loss_fn=summed_loss, output_dir=str(tmp_path / "f"))
    with pytest.raises(ConfigError, match=r"\['attention.out_proj'\] were never called through their forward"):
        _trainer(tmp_path, [callback]).predict(TupleLM(mha=True), DataLoader(Chunks(), batch_size=4))


def _factors(tmp_path, module) -> str:
    callback = KFACCollectorCallback(target_modules=["hidden", "head"], dtype="float64", plots=False,
                                     output_dir=str(tmp_path / "factors"), loss_fn=summed_loss)
    _trainer(tmp_path, [callback]).predict(module, DataLoader(Chunks(), batch_size=5), return_predictions=False)
    return str(tmp_path / "factors")


def test_predict_without_predict_step_and_data_handed_over_directly(tmp_path):
    module, data = TupleLM(), Chunks()
    factors = _factors(tmp_path, module)
    queries = torch.utils.data.Subset(data, [0, 3])

    def scores(loader, name, task=None, queries=queries):
        callback = InfluenceCallback(factors=factors, queries=queries, dtype="float64", output_dir=str(tmp_path / name),
                                     **({"task": task} if task else {"loss_fn": summed_loss}))
        _trainer(tmp_path, [callback]).predict(module, loader, return_predictions=False)
        return load_file(str(tmp_path / name / "scores.safetensors"))["scores"]

    ordered = scores(DataLoader(data, batch_size=4), "ordered")
    assert ordered.shape == (2, len(data))
    assert "predict_step" not in module.__dict__  # the lent predict_step is returned
    # Batch size 1 and 7 agree; the query's own row is its most helpful example.
    torch.testing.assert_close(scores(DataLoader(data, batch_size=7), "seven"), ordered, rtol=1e-9, atol=1e-12)
    assert ordered.argmax(-1).tolist() == [0, 3]

    with pytest.raises(ConfigError, match="shuffled and its batches carry no example ids"):
        scores(DataLoader(data, batch_size=4, shuffle=True), "shuffled")

    class Indexed(Dataset):  # rows that say which example they are: shuffling is then harmless
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            return (*data[i], i)

    task = Task(loss_fn=lambda m, b: summed_loss(m, b[:2]), example_ids=lambda b: b[2])
    shuffled = scores(DataLoader(Indexed(), batch_size=3, shuffle=True), "with-ids", task=task,
                      queries=torch.utils.data.Subset(Indexed(), [0, 3]))
    torch.testing.assert_close(shuffled, ordered, rtol=1e-9, atol=1e-12)


def test_a_loader_name_without_a_datamodule_says_how_to_hand_data_over(tmp_path):
    module = TupleLM()
    callback = InfluenceCallback(factors=_factors(tmp_path, module), loss_fn=summed_loss, output_dir=str(tmp_path / "i"))
    with pytest.raises(DataError, match="the run has no datamodule.*a DataLoader, a dataset"):
        _trainer(tmp_path, [callback]).predict(module, DataLoader(Chunks(), batch_size=4))


def test_errors_for_bad_arguments_are_config_errors():
    with pytest.raises(ConfigError):
        KFACCollectorCallback(max_examples=0)
    with pytest.raises(ConfigError):
        InfluenceCallback(factors="x", top_k=0)
    assert issubclass(ConfigError, LitAttribError) and issubclass(ConfigError, ValueError)


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_layers_import_only_downwards():
    package = REPO / "lit_attrib"
    for path in (package / "ops").glob("*.py"):
        bad = {n for n in _imports(path) if n.split(".")[0] in ("lightning", "transformers")
               or n.startswith(("lit_attrib.engine", "lit_attrib.callbacks", "lit_attrib.modules", "lit_attrib.data"))}
        assert not bad, f"{path.name} imports {bad}"
    for path in (package / "artifacts").glob("*.py"):
        bad = {n for n in _imports(path) if n.startswith(("lit_attrib.ops", "lit_attrib.engine", "lit_attrib.callbacks"))}
        assert not bad, f"artifacts/{path.name} imports {bad}"
    for path in (package / "callbacks").glob("*.py"):
        source = path.read_text()
        assert "batch[\"labels\"]" not in source and "batch['index']" not in source, path.name


def test_ekfac_in_fit_without_a_loss_is_refused_before_training(tmp_path):
    module = TupleLM()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    callback = KFACCollectorCallback(target_modules=["head"], strategy="ekfac", plots=False,
                                     train_loss_reduction="token_mean", output_dir=str(tmp_path / "f"))
    with pytest.raises(ConfigError, match="loss_fn=f"):
        _trainer(tmp_path, [callback], max_epochs=1).fit(module, DataLoader(Chunks(), batch_size=4))
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_true_fisher_uses_the_task_logits_not_forward(tmp_path):
    """A module whose forward does not return logits: the true Fisher samples from the task's logits."""

    class Wrapped(TupleLM):
        def forward(self, x):  # a user's forward that returns something else entirely
            return {"hidden": x}

        def logits(self, x):
            return TupleLM.forward(self, x)

    def logits_fn(module, batch):
        return module.logits(batch[0])

    task = Task(loss_fn=lambda m, b: F.cross_entropy(m.logits(b[0]).transpose(1, 2), b[1], reduction="none").sum(-1),
                logits_fn=logits_fn)
    callback = KFACCollectorCallback(target_modules=["head"], strategy="kfac", fisher="true", plots=False,
                                     dtype="float64", task=task, output_dir=str(tmp_path / "f"), seed=3)
    _trainer(tmp_path, [callback]).predict(Wrapped(), DataLoader(Chunks(), batch_size=4), return_predictions=False)
    saved = load_file(str(tmp_path / "f" / "factors.safetensors"))
    # Sampled targets change G, not A; A equals the explicit one.
    expected = _reference_factors(TupleLM(), Chunks().rows)
    torch.testing.assert_close(saved["head.activation_covariance"], expected["activation_covariance"])
    assert not torch.allclose(saved["head.gradient_covariance"], expected["gradient_covariance"])
    with pytest.raises(ConfigError, match="logits_fn"):
        callback = KFACCollectorCallback(target_modules=["head"], fisher="true", plots=False, loss_fn=summed_loss,
                                         output_dir=str(tmp_path / "g"))
        _trainer(tmp_path, [callback]).predict(Wrapped(), DataLoader(Chunks(), batch_size=4))


def test_a_loss_function_named_in_yaml_needs_no_annotation(tmp_path, monkeypatch):
    from jsonargparse import ArgumentParser

    (tmp_path / "user_losses.py").write_text("def summed(module, batch):\n    return module(batch).sum(-1)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    parser = ArgumentParser()
    parser.add_class_arguments(InfluenceCallback, "callback")
    config = parser.parse_args(["--callback.factors=f", "--callback.loss_fn=user_losses.summed"])
    callback = parser.instantiate_classes(config).callback
    assert callback.loss_fn.__name__ == "summed" and callback.loss_fn.__module__ == "user_losses"


def test_kfac_and_online_sdi_in_one_fit_do_not_see_each_others_passes(tmp_path):
    from lit_attrib.callbacks import SketchedGradCallback

    data = Chunks()

    def run(callbacks, name):
        _trainer(tmp_path / name, callbacks, max_epochs=1).fit(TupleLM(), DataLoader(data, batch_size=4))

    kfac = lambda name: KFACCollectorCallback(target_modules=["head"], strategy="kfac", dtype="float64",  # noqa: E731
                                              plots=False, loss_fn=summed_loss, output_dir=str(tmp_path / name))
    sdi = lambda name: SketchedGradCallback(target_modules=["hidden", "head"], checkpoints=None, exact=True,  # noqa: E731
                                            queries=torch.utils.data.Subset(data, [1, 2]), loss_fn=summed_loss,
                                            dtype="float64", plots=False, output_dir=str(tmp_path / name))
    run([kfac("kfac-alone")], "a")
    run([sdi("sdi-alone")], "b")
    run([sdi("sdi-both"), kfac("kfac-both")], "c")  # SDI first: its query pass runs inside K-FAC's batch
    alone, both = (load_file(str(tmp_path / n / "factors.safetensors")) for n in ("kfac-alone", "kfac-both"))
    for key in alone:
        torch.testing.assert_close(both[key], alone[key], rtol=1e-12, atol=1e-14)
    alone, both = (load_file(str(tmp_path / n / "sdi.safetensors")) for n in ("sdi-alone", "sdi-both"))
    torch.testing.assert_close(both["tracin"], alone["tracin"], rtol=1e-12, atol=1e-14)


def test_loaders_whose_order_is_not_known_are_refused(tmp_path):
    module = TupleLM()
    factors = _factors(tmp_path, module)
    data = Chunks()

    class Bucketing(torch.utils.data.BatchSampler):  # a user's batch sampler: it may reorder
        pass

    bucketed = DataLoader(data, batch_sampler=Bucketing(torch.utils.data.SequentialSampler(data), 4, False))
    for loaders, message in ((bucketed, "shuffled and its batches carry no example ids"),
                             ([DataLoader(data, batch_size=4), DataLoader(data, batch_size=4)], "one loader per pass")):
        callback = InfluenceCallback(factors=factors, queries=torch.utils.data.Subset(data, [0]), loss_fn=summed_loss,
                                     output_dir=str(tmp_path / "i"))
        with pytest.raises(ConfigError, match=message):
            _trainer(tmp_path, [callback]).predict(module, loaders)
        assert "predict_step" not in module.__dict__  # given back after the error too


def test_single_example_batches_re_run_training_step_once(tmp_path):
    calls = []

    class ExampleMean(TupleLM):
        def training_step(self, batch, batch_idx):
            calls.append(batch_idx)
            return summed_loss(self, batch).mean()

    module, data = ExampleMean(), Chunks(count=5)
    callback = KFACCollectorCallback(target_modules=["head"], strategy="kfac", dtype="float64", plots=False,
                                     loss_fn=summed_loss, output_dir=str(tmp_path / "f"))
    _trainer(tmp_path, [callback], max_epochs=1).fit(module, DataLoader(data, batch_size=1))
    assert len(calls) == len(data) + 1  # one check: sum and example mean agree on every batch of one example
    saved = load_file(str(tmp_path / "f" / "factors.safetensors"))
    torch.testing.assert_close(saved["head.gradient_covariance"],
                               _reference_factors(module, data.rows)["gradient_covariance"], rtol=1e-10, atol=1e-12)


def test_hf_batches_without_labels_take_no_loss_on_padding_or_the_first_real_token():
    from lit_attrib.engine.task import HFCausalLMTask

    task = HFCausalLMTask(model=None)
    batch = {"input_ids": torch.tensor([[0, 0, 5, 6, 7], [5, 6, 7, 8, 0]]),
             "attention_mask": torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])}
    assert task.token_mask(batch).tolist() == [[False, False, False, True, True], [False, True, True, True, False]]


def test_without_the_check_a_stated_reduction_is_trusted(tmp_path):
    module, data = TupleLM(), Chunks()
    callback = KFACCollectorCallback(target_modules=["head"], strategy="kfac", dtype="float64", plots=False,
                                     output_dir=str(tmp_path / "f"), train_loss_reduction="token_mean",
                                     check_train_loss=False)  # no loss_fn needed: nothing is re-run
    _trainer(tmp_path, [callback], max_epochs=1).fit(module, DataLoader(data, batch_size=4))
    saved = load_file(str(tmp_path / "f" / "factors.safetensors"))
    torch.testing.assert_close(saved["head.gradient_covariance"],
                               _reference_factors(module, data.rows)["gradient_covariance"], rtol=1e-10, atol=1e-12)
    callback = KFACCollectorCallback(target_modules=["head"], strategy="kfac", plots=False, loss_fn=summed_loss,
                                     output_dir=str(tmp_path / "g"), check_train_loss=False)
    with pytest.raises(ConfigError, match="check_train_loss is off, so train_loss_reduction must say"):
        _trainer(tmp_path, [callback], max_epochs=1).fit(module, DataLoader(data, batch_size=4))


class ShiftedLabelsLM(LightningModule):
    """A user's module around a Hugging Face Llama whose collate already shifted the labels."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        self.model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                                                  num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                                  max_position_embeddings=32)).double()

    def forward(self, input_ids):
        return self.model(input_ids=input_ids).logits

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch["input_ids"]).reshape(-1, VOCAB), batch["labels"].reshape(-1))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _shifted_rows() -> list[dict]:
    return [{"input_ids": x, "labels": y} for x, y in Chunks(count=8).rows]


def test_already_shifted_labels_are_caught_and_a_task_fixes_them(tmp_path):
    loader = DataLoader(_shifted_rows(), batch_size=4)
    callback = KFACCollectorCallback(target_modules=["*.mlp.down_proj"], strategy="kfac", plots=False,
                                     output_dir=str(tmp_path / "f"))
    with pytest.raises(ConfigError, match="fits none of"):  # the default reads labels as unshifted
        _trainer(tmp_path, [callback], max_epochs=1).fit(ShiftedLabelsLM(), loader)

    def shifted_loss(module, batch):
        return F.cross_entropy(module(batch["input_ids"]).transpose(1, 2), batch["labels"], reduction="none").sum(-1)

    task = Task(loss_fn=shifted_loss, token_mask=lambda batch: batch["labels"] != -100)
    callback = KFACCollectorCallback(target_modules=["*.mlp.down_proj"], strategy="kfac", plots=False, task=task,
                                     dtype="float64", output_dir=str(tmp_path / "g"))
    _trainer(tmp_path, [callback], max_epochs=1).fit(ShiftedLabelsLM(), loader)
    factors = load_file(str(tmp_path / "g" / "factors.safetensors"))
    module, seen = ShiftedLabelsLM(), {}
    down = module.model.model.layers[0].mlp.down_proj
    down.register_forward_hook(lambda m, i, o: seen.update(out=o))
    total, tokens = 0, 0
    for batch in loader:
        (g,) = torch.autograd.grad(shifted_loss(module, batch).sum(), seen["out"])
        total = total + g.reshape(-1, g.shape[-1]).T @ g.reshape(-1, g.shape[-1])
        tokens += batch["labels"].numel()
    # (Hugging Face's RMSNorm computes in float32 even in a float64 model: float32 round-off)
    torch.testing.assert_close(factors["model.model.layers.0.mlp.down_proj.gradient_covariance"], total / tokens,
                               rtol=2e-5, atol=1e-7)


def test_a_module_returning_a_tuple_is_named(tmp_path):
    from lit_attrib.callbacks import SketchedGradCallback

    data = Chunks()
    callback = SketchedGradCallback(target_modules=None, checkpoints=None, exact=True, plots=False,
                                    queries=torch.utils.data.Subset(data, [0]), loss_fn=summed_loss,
                                    output_dir=str(tmp_path / "sdi"))
    with pytest.raises(ConfigError, match=r"'attention' \(MultiheadAttention\) returns a tuple"):
        _trainer(tmp_path, [callback], max_epochs=1).fit(TupleLM(mha=True), DataLoader(data, batch_size=4))


def test_collecting_every_nth_batch_takes_exactly_those_batches(tmp_path):
    module, data = TupleLM(), Chunks()
    callback = KFACCollectorCallback(target_modules=["head"], strategy="kfac", dtype="float64", plots=False,
                                     loss_fn=summed_loss, output_dir=str(tmp_path / "f"), every_n_batches=2)
    _trainer(tmp_path, [callback], max_epochs=1).fit(module, DataLoader(data, batch_size=4))
    saved = load_file(str(tmp_path / "f" / "factors.safetensors"))
    expected = _reference_factors(module, data.rows[0:4] + data.rows[8:12])  # batches 0 and 2 of 4
    for key, value in expected.items():
        torch.testing.assert_close(saved[f"head.{key}"], value, rtol=1e-10, atol=1e-12)
    with pytest.raises(ConfigError, match="every_n_batches must be at least 1"):
        KFACCollectorCallback(every_n_batches=0)


def test_token_scores_of_a_tied_weight_count_only_the_tracked_use(tmp_path):
    """nanoGPT/GPT-2 style: ``head`` shares its weight with ``embed``; token scores along v move the head's
    use only, as the factors and the direction see it."""
    from lit_attrib.callbacks import TokenInfluenceCallback
    from lit_attrib.ops.kfac import factors_inverse_hvp

    class Tied(TupleLM):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(WIDTH, VOCAB, bias=False).double()
            self.head.weight = self.embed.weight  # (VOCAB, WIDTH): tied

    def token_losses(module, batch):
        x, y = batch
        return F.cross_entropy(module(x).transpose(1, 2), y, reduction="none")  # (B, T)

    module, data = Tied(), Chunks(count=8)
    factors = KFACCollectorCallback(target_modules=["head"], dtype="float64", plots=False, loss_fn=summed_loss,
                                    output_dir=str(tmp_path / "factors"))
    _trainer(tmp_path, [factors]).predict(module, DataLoader(data, batch_size=4), return_predictions=False)
    forget, retain = torch.utils.data.Subset(data, [0, 1]), torch.utils.data.Subset(data, [2, 3, 4])
    callback = TokenInfluenceCallback(factors=str(tmp_path / "factors"), positive=forget, negative=retain,
                                      loss_fn=summed_loss, token_loss_fn=token_losses, dtype="float64",
                                      output_dir=str(tmp_path / "tokens"))
    _trainer(tmp_path, [callback]).predict(module, DataLoader(forget, batch_size=2), return_predictions=False)
    scores = load_file(str(tmp_path / "tokens" / "token_scores.safetensors"))["scores"]

    seen = {}
    module.head.register_forward_hook(lambda m, i, o: seen.update(a=i[0], out=o))

    def head_gradient(rows, token=None):  # the head's own use: Σ_t g_t a_tᵀ (never the embedding's use)
        total = 0
        for x, y in rows:
            losses = token_losses(module, (x[None], y[None]))[0]
            (g,) = torch.autograd.grad(losses.sum() if token is None else losses[token], seen["out"])
            total = total + g[0].T @ seen["a"][0]
        return total

    direction = head_gradient([data[0], data[1]]) / 2 - head_gradient([data[i] for i in (2, 3, 4)]) / 3
    from lit_attrib.artifacts import load_factors

    v = factors_inverse_hvp(load_factors(tmp_path / "factors")["head"], direction)
    expected = torch.tensor([[float((v * head_gradient([data[q]], t)).sum()) for t in range(LENGTH)] for q in (0, 1)],
                            dtype=torch.float64)
    torch.testing.assert_close(scores, expected, rtol=1e-8, atol=1e-10 * float(expected.abs().max()))


def test_a_training_step_that_skips_a_batch_adds_nothing_for_it(tmp_path):
    class Skipping(TupleLM):
        def training_step(self, batch, batch_idx):
            return None if batch_idx == 1 else super().training_step(batch, batch_idx)

    module, data = Skipping(), Chunks(count=12)
    callback = KFACCollectorCallback(target_modules=["head"], strategy="kfac", dtype="float64", plots=False,
                                     loss_fn=summed_loss, output_dir=str(tmp_path / "f"))
    _trainer(tmp_path, [callback], max_epochs=1).fit(module, DataLoader(data, batch_size=4))
    saved = load_file(str(tmp_path / "f" / "factors.safetensors"))
    expected = _reference_factors(module, data.rows[0:4] + data.rows[8:12])  # batch 1 ran no backward
    for key, value in expected.items():
        torch.testing.assert_close(saved[f"head.{key}"], value, rtol=1e-10, atol=1e-12)


def test_release_freed_memory_returns_freed_heap_pages():
    """After freeing many medium tensors that later small allocations pin, trimming lowers the resident set
    (glibc only; elsewhere it reports that it did nothing). In a fresh interpreter: the heap of a process that
    ran other tests is in no known state."""
    import subprocess
    import sys

    script = """
import sys
from pathlib import Path
import torch
from lit_attrib.engine.memory import release_freed_memory
if not sys.platform.startswith("linux"):
    print("skip", release_freed_memory()); sys.exit(0)
resident_mb = lambda: int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20
big = torch.ones(2**23)  # freeing a 32 MiB mapping raises glibc's mmap threshold: what follows is heap
del big
temporaries, kept = [], []
for _ in range(600):  # 1 MiB temporaries, each followed by a small tensor that stays (pins the heap)
    temporaries.append(torch.ones(2**18))
    kept.append(torch.ones(1024))
del temporaries
before = resident_mb()
trimmed = release_freed_memory()
print(trimmed, before - resident_mb(), all(bool((t == 1).all()) for t in kept))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    if out[0] == "skip":
        return
    trimmed, released, intact = out
    assert trimmed == "True" and intact == "True"
    assert float(released) > 400  # most of the 600 MiB freed went back
