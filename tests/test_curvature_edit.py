"""CurvatureEditModule, MemorizationDataModule and MemorizedSetCallback against plain references.

References are independent of the code under test: numpy eigendecompositions and a brute-force mask
for the edit, a cache-less greedy loop and a dynamic-programming Levenshtein distance for
memorization, ``F.cross_entropy`` row by row for perplexity, and one forward per window for discovery.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import REPO, TINY_CONFIGS, TOKENIZER, run_cli
from lightning.pytorch import Trainer

from lit_attrib.artifacts.factors import FACTOR_KEYS, save_factors
from lit_attrib.callbacks import MemorizedSetCallback
from lit_attrib.data import MemorizationDataModule, load_tokenizer
from lit_attrib.errors import ArtifactError, ConfigError, DataError, ModelError
from lit_attrib.io import read_jsonl, write_jsonl
from lit_attrib.metrics import ndcg_at_k
from lit_attrib.modules import CausalLMModule, CurvatureEditModule
from lit_attrib.modules.curvature_edit import greedy_continuation
from lit_attrib.ops.kfac import eigendecompose

CONFIG = TINY_CONFIGS["llama"]
PROJECTIONS = {"gate": (64, 32), "up": (64, 32), "down": (32, 64)}


def _spd(n: int, generator: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, 2 * n, generator=generator, dtype=torch.float64)
    return (x @ x.T / (2 * n)).float()


def write_random_factors(path, layers=(0, 1), shapes=PROJECTIONS, seed=0) -> None:
    """A factors artifact with random SPD covariances for the MLP projections of ``layers``."""
    generator = torch.Generator().manual_seed(seed)
    modules, metadata = {}, {}
    for layer in layers:
        for projection, (out, inp) in shapes.items():
            name = f"model.model.layers.{layer}.mlp.{projection}_proj"
            a, g = _spd(inp, generator), _spd(out, generator)
            mu, u_a = eigendecompose(a)
            lam, u_g = eigendecompose(g)
            modules[name] = {"activation_covariance": a, "gradient_covariance": g, "activation_eigenvalues": mu.float(),
                             "activation_eigenvectors": u_a.float(), "gradient_eigenvalues": lam.float(),
                             "gradient_eigenvectors": u_g.float(), "lambda": torch.outer(lam, mu).float()}
            assert set(modules[name]) == set(FACTOR_KEYS)
            metadata[name] = {"type": "Linear", "in_features": inp, "out_features": out, "bias": False}
    save_factors(path, modules, {"modules": metadata})


def reference_edit(weight: torch.Tensor, a: torch.Tensor, g: torch.Tensor, rho: float) -> torch.Tensor:
    """numpy eigendecompositions, an explicit list of pairs sorted in Python, then the projection."""
    mu, u_a = np.linalg.eigh(a.double().numpy())
    lam, u_g = np.linalg.eigh(g.double().numpy())
    pairs = sorted(((max(lam[i], 0) * max(mu[j], 0), i, j) for i in range(len(lam)) for j in range(len(mu))),
                   reverse=True)
    total = sum(p[0] for p in pairs)
    mask, kept = np.zeros((len(lam), len(mu))), 0.0
    for mass, i, j in pairs:
        if kept >= rho * total or rho == 0:
            break
        mask[i, j], kept = 1.0, kept + mass
    coefficients = u_g.T @ weight.double().numpy() @ u_a
    return torch.from_numpy(u_g @ (coefficients * mask) @ u_a.T)


def make_module(factors, layers, **kwargs) -> CurvatureEditModule:
    module = CurvatureEditModule(factors=str(factors), layers=layers, config=CONFIG, tokenizer=str(TOKENIZER), **kwargs)
    module.configure_model()
    return module


def test_edit_matches_reference_and_touches_nothing_else(tmp_path):
    write_random_factors(tmp_path / "factors")
    module = make_module(tmp_path / "factors", {"1": {"up": 0.5, "gate": 0.5}}, rhos=[1.0, 0.5, 0.0])
    before = {k: v.clone() for k, v in module.state_dict().items()}
    module.apply_edit()
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "factors" / "factors.safetensors"))
    names = [f"model.model.layers.1.mlp.{p}_proj" for p in ("gate", "up")]
    assert [v["rho"] for v in module.variants] == [None, 1.0, 0.5, 0.0]
    for position, rho in ((1, 1.0), (2, 0.5), (3, 0.0)):
        module._load(position)
        after = module.state_dict()
        for key, value in before.items():
            edited = key.removesuffix(".weight") in names
            if not edited:  # the edit of a layer touches no other layer (nor anything else)
                assert torch.equal(after[key], value), key
                continue
            name = key.removesuffix(".weight")
            expected = reference_edit(value, saved[f"{name}.activation_covariance"],
                                      saved[f"{name}.gradient_covariance"], rho)
            torch.testing.assert_close(after[key].double(), expected, rtol=1e-5, atol=1e-6)
            if rho == 1.0:
                torch.testing.assert_close(after[key], value, rtol=1e-5, atol=1e-6)
            if rho == 0.0:
                assert float(after[key].abs().max()) == 0.0
    module._load(0)  # the baseline comes back exactly
    assert all(torch.equal(module.state_dict()[k], v) for k, v in before.items())
    kept = module.variants[2]["modules"][names[0]]["kept_coefficients"]
    assert 0 < kept < 1


def test_edit_bad_input(tmp_path):
    write_random_factors(tmp_path / "factors", layers=(0,))
    with pytest.raises(ArtifactError, match=r"layer 1 up: no factors for 'model.model.layers.1.mlp.up_proj'(.|\n)*"
                                             r"the factors hold: model.model.layers.0.mlp.down_proj"):
        make_module(tmp_path / "factors", {"1": {"up": 0.6}}).apply_edit()
    with pytest.raises(DataError, match=r'spec\["0"\]\["up"\]: rho .* must be a number in \[0, 1\]; got 1.5'):
        make_module(tmp_path / "factors", {"0": {"up": 1.5}})
    with pytest.raises(DataError, match=r'spec\["0"\]\["upp"\]: unknown projection'):
        make_module(tmp_path / "factors", '{"0": {"upp": 0.5}}')
    with pytest.raises(DataError, match="not valid JSON"):
        make_module(tmp_path / "factors", '{"0": {"up": 0.5}')
    with pytest.raises(ConfigError, match=r"rhos must be .* in \[0, 1\]"):
        make_module(tmp_path / "factors", {"0": {"up": 0.5}}, rhos=[0.5, -0.1])
    # factors of another width: (64, 48) instead of (64, 32)
    write_random_factors(tmp_path / "wide", layers=(0,), shapes={"up": (64, 48)})
    with pytest.raises(ArtifactError, match=r"factors of 'model.model.layers.0.mlp.up_proj' are for a weight of "
                                             r"\(out, in\) = \(64, 48\), but the model's is \(64, 32\)"):
        make_module(tmp_path / "wide", {"0": {"up": 0.5}}).apply_edit()


def test_windows_longer_than_a_sequence_are_refused(tmp_path):
    write_jsonl(tmp_path / "short.jsonl", [{"text": "a b c d e f g h i j k l"}, {"text": "a b"}])
    data = MemorizationDataModule(tokenizer=str(TOKENIZER), memorized=str(tmp_path / "short.jsonl"),
                                  prefix_len=3, suffix_len=4)
    with pytest.raises(DataError, match=r"prefix_len \+ suffix_len = 3 \+ 4 = 7 tokens is longer than 1 sequence"
                                        r"\(s\) of .* \(first: row 1, 3 tokens\)"):
        data.setup("validate")
    data = MemorizationDataModule(tokenizer=str(TOKENIZER), scan=str(tmp_path / "short.jsonl"), prefix_len=40,
                                  suffix_len=40)
    with pytest.raises(DataError, match="no text of .* has prefix_len \\+ suffix_len = 80 tokens"):
        data.setup("predict")


# ------------------------------------------------------------------------------ evaluation
def _levenshtein(a: list[int], b: list[int]) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        previous, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (x != y))
    return row[-1]


def _naive_greedy(model, prefix: torch.Tensor, steps: int) -> torch.Tensor:
    ids = prefix
    for _ in range(steps):
        ids = torch.cat([ids, model(input_ids=ids, use_cache=False).logits[:, -1:].argmax(-1)], 1)
    return ids[:, prefix.shape[1]:]


def _eval_data(tmp_path, module, prefix_len=6, suffix_len=5) -> MemorizationDataModule:
    """Memorized rows: half are the model's own greedy continuations (memorized by construction)."""
    tokenizer = load_tokenizer(str(TOKENIZER))
    texts = [line["answer"] for line in read_jsonl(REPO / "data" / "facts" / "facts.jsonl")[:40]]
    ids = [[tokenizer.bos_token_id] + tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    ids = [row[:prefix_len] for row in ids if len(row) >= prefix_len][:10]
    prefixes = torch.tensor(ids)
    with torch.no_grad():
        own = torch.cat([prefixes, _naive_greedy(module.model, prefixes, suffix_len)], 1)
    rows = [{"input_ids": own[i].tolist()} for i in range(5)]
    rows += [{"input_ids": ids[i] + [7 + i] * suffix_len} for i in range(5, 10)]
    write_jsonl(tmp_path / "memorized.jsonl", rows)
    write_jsonl(tmp_path / "heldout.jsonl", [{"text": t} for t in texts[20:33]])
    return MemorizationDataModule(tokenizer=str(TOKENIZER), memorized=str(tmp_path / "memorized.jsonl"),
                                  heldout=str(tmp_path / "heldout.jsonl"), prefix_len=prefix_len,
                                  suffix_len=suffix_len, batch_size=4)


def _reference_results(module, data) -> list[dict]:
    """Every variant's metrics computed independently, example by example."""
    windows = torch.tensor([row["input_ids"] for row in data.datasets["memorized"]])
    prefix, suffix = windows[:, :6], windows[:, 6:]
    heldout = [torch.tensor(row["input_ids"])[None] for row in data.datasets["heldout"]]
    rows, baseline_logits = [], None
    for position, variant in enumerate(module.variants):
        module._load(position)
        with torch.no_grad():
            predicted = _naive_greedy(module.model, prefix, suffix.shape[1])
            distances = [_levenshtein(p, s) / suffix.shape[1] for p, s in zip(predicted.tolist(), suffix.tolist())]
            logits = [module.model(input_ids=ids).logits[0, :-1] for ids in heldout]
        nll = sum(float(F.cross_entropy(lg, ids[0, 1:], reduction="sum")) for lg, ids in zip(logits, heldout))
        tokens = sum(ids.shape[1] - 1 for ids in heldout)
        row = {"strict_accuracy": float((predicted == suffix).all(1).double().mean()),
               "loose_accuracy": float(np.mean([1 - d >= 0.75 for d in distances])),
               "distance": float(np.mean(distances)), "perplexity": math.exp(nll / tokens), "tokens": tokens}
        flat = torch.cat(logits)
        if variant["model"] == "baseline":
            baseline_logits = flat
        row["ndcg"] = None if baseline_logits is None or position == 0 else float(
            ndcg_at_k(flat, baseline_logits, 10).mean())
        rows.append(row)
    return rows


def test_validate_results_equal_independent_reference(tmp_path):
    write_random_factors(tmp_path / "factors")
    spec = {"0": {"gate": 0.7, "up": 0.7}, "1": {"down": 0.7}}
    module = CurvatureEditModule(factors=str(tmp_path / "factors"), layers=json.dumps(spec), config=CONFIG,
                                 tokenizer=str(TOKENIZER), rhos=[1.0, 0.3], output_dir=str(tmp_path / "edit"),
                                 save_edited=None)
    module.configure_model()
    data = _eval_data(tmp_path, module)
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(module, datamodule=data)
    results = read_jsonl(tmp_path / "edit" / "results.jsonl")
    assert [(r["model"], r["rho"]) for r in results] == [("baseline", None), ("edited", 1.0), ("edited", 0.3)]
    assert results[2]["spec"] == {"0": {"gate": 0.3, "up": 0.3}, "1": {"down": 0.3}}
    assert (tmp_path / "edit" / "results.png").is_file()
    reference = _reference_results(module, data)
    assert reference[0]["strict_accuracy"] == 0.5  # the five own continuations, and only them
    for got, want in zip(results, reference):
        for key in ("strict_accuracy", "loose_accuracy", "distance", "perplexity"):
            assert got[key] == pytest.approx(want[key], rel=1e-5), key
        assert got["perplexity_tokens"] == want["tokens"] and got["memorization_examples"] == 10
        assert got["ndcg@10"] == (None if want["ndcg"] is None else pytest.approx(want["ndcg"], rel=1e-5))
    assert results[1]["ndcg@10"] == pytest.approx(1.0)  # ρ = 1 is the baseline
    assert results[2]["perplexity"] != pytest.approx(results[0]["perplexity"])
    # a second run does not overwrite the results
    again = CurvatureEditModule(factors=str(tmp_path / "factors"), layers=spec, config=CONFIG,
                                tokenizer=str(TOKENIZER), output_dir=str(tmp_path / "edit"))
    with pytest.raises(ArtifactError, match="results.jsonl already exists"):
        Trainer(accelerator="cpu", devices=1, logger=False).validate(again, datamodule=data)


def test_greedy_continuation_equals_a_cacheless_loop():
    module = make_module("unused", {"0": {"up": 0.5}})
    prefix = torch.randint(5, 100, (3, 7))
    torch.testing.assert_close(greedy_continuation(module.model, prefix, 9), _naive_greedy(module.model, prefix, 9))


def test_save_edited_round_trips(tmp_path):
    from transformers import AutoModelForCausalLM

    write_random_factors(tmp_path / "factors")
    module = CurvatureEditModule(factors=str(tmp_path / "factors"), layers={"1": {"up": 0.4}}, config=CONFIG,
                                 tokenizer=str(TOKENIZER), skip_baseline=True, output_dir=str(tmp_path / "edit"),
                                 save_edited=str(tmp_path / "edited"))
    module.configure_model()
    data = _eval_data(tmp_path, module)
    Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False).validate(module, datamodule=data)
    rows = read_jsonl(tmp_path / "edit" / "results.jsonl")
    assert [r["model"] for r in rows] == ["edited"] and rows[0]["ndcg@10"] is None
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "edited")
    for name, value in module.model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value)
    unedited = make_module(tmp_path / "factors", {"1": {"up": 0.4}}).model.state_dict()
    changed = [name for name, value in loaded.state_dict().items() if not torch.equal(value, unedited[name])]
    assert changed == ["model.layers.1.mlp.up_proj.weight"]
    assert (tmp_path / "edited" / "tokenizer.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".edited")]  # no temporary folder left


def test_bf16_edit_runs_and_keeps_dtype(tmp_path):
    write_random_factors(tmp_path / "factors")
    module = CurvatureEditModule(factors=str(tmp_path / "factors"), layers={"1": {"up": 1.0}}, config=CONFIG,
                                 tokenizer=str(TOKENIZER), output_dir=str(tmp_path / "edit"))
    module.configure_model()
    data = _eval_data(tmp_path, module)
    Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
            precision="bf16-mixed").validate(module, datamodule=data)
    baseline, edited = read_jsonl(tmp_path / "edit" / "results.jsonl")
    assert edited["perplexity"] == pytest.approx(baseline["perplexity"], rel=1e-2)  # ρ = 1 changes nothing
    assert math.isfinite(edited["perplexity"]) and edited["ndcg@10"] > 0.9
    module = CurvatureEditModule(factors=str(tmp_path / "factors"), layers={"1": {"up": 0.5}}, config=CONFIG,
                                 tokenizer=str(TOKENIZER), dtype="bfloat16", output_dir=str(tmp_path / "bf16"))
    Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False).validate(module, datamodule=data)
    assert module.model.model.layers[1].mlp.up_proj.weight.dtype == torch.bfloat16
    baseline16, edited16 = read_jsonl(tmp_path / "bf16" / "results.jsonl")
    assert baseline16["perplexity"] == pytest.approx(baseline["perplexity"], rel=2e-2)  # bf16 weights, same model
    assert math.isfinite(edited16["perplexity"]) and 0 < edited16["ndcg@10"] < 1


# ------------------------------------------------------------------------------- discovery
def test_discovery_keeps_exactly_the_memorized_windows(tmp_path):
    module = CausalLMModule(config=CONFIG, tokenizer=str(TOKENIZER))
    module.configure_model()
    tokenizer = load_tokenizer(str(TOKENIZER))
    texts = [row["question"] for row in read_jsonl(REPO / "data" / "facts" / "facts.jsonl")[:12]]
    # documents whose first window is the model's own continuation (memorized), others as they are, one twice
    docs = []
    for i, text in enumerate(texts):
        ids = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"][:5]
        if i % 2 == 0:
            with torch.no_grad():
                ids = ids + _naive_greedy(module.model, torch.tensor([ids]), 4)[0].tolist()
        docs.append({"input_ids": ids + [11, 12, 13, 14, 15, 16, 17, 18, 19, 20]})
    docs.append(dict(docs[0]))
    write_jsonl(tmp_path / "scan.jsonl", docs)
    data = MemorizationDataModule(tokenizer=str(TOKENIZER), scan=str(tmp_path / "scan.jsonl"), prefix_len=6,
                                  suffix_len=4, stride=3, batch_size=5)
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      callbacks=[MemorizedSetCallback(output_dir=str(tmp_path / "memorized"))])
    trainer.predict(module, datamodule=data, return_predictions=False)
    # reference: one forward per window, teacher-forced argmax of every suffix token
    expected, seen = [], set()
    for source_index, doc in enumerate(docs):
        ids = doc["input_ids"]
        for offset in range(0, len(ids) - 10 + 1, 3):
            window = ids[offset:offset + 10]
            with torch.no_grad():
                predicted = module.model(input_ids=torch.tensor([window])).logits[0, 5:9].argmax(-1).tolist()
            if predicted == window[6:] and tuple(window) not in seen:
                seen.add(tuple(window))
                expected.append((source_index, offset, window))
    rows = read_jsonl(tmp_path / "memorized" / "memorized.jsonl")
    assert [(r["source_index"], r["offset"], r["input_ids"]) for r in rows] == expected
    assert len(expected) >= 6  # the six own continuations at least; the repeated document is dropped
    summary = json.loads((tmp_path / "memorized" / "memorized.json").read_text())
    assert summary["duplicates_dropped"] >= 1 and summary["windows"] == len(data.datasets["scan"])
    # the output is a valid `memorized` source: every row is memorized by the same model
    check = MemorizationDataModule(tokenizer=str(TOKENIZER), memorized=str(tmp_path / "memorized" / "memorized.jsonl"),
                                   prefix_len=6, suffix_len=4)
    check.setup("validate")
    windows = torch.tensor([row["input_ids"] for row in check.datasets["memorized"]])
    assert torch.equal(greedy_continuation(module.model, windows[:, :6], 4), windows[:, 6:])


# ------------------------------------------------------------------------------------- DDP
@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_process_ddp_metrics_equal_one_process(tmp_path):
    """validate (metrics) and predict (discovery) with 1 and 2 CPU processes, outputs in their default
    folders under the run's log_dir (which every process must ask for)."""
    write_random_factors(tmp_path / "factors")
    module = make_module(tmp_path / "factors", {"0": {"up": 0.5}})
    with torch.no_grad():  # peaked logits: no near-ties whose argmax could flip with the batch's composition
        module.model.lm_head.weight.mul_(30)
    torch.save({"state_dict": module.state_dict()}, tmp_path / "model.ckpt")
    _eval_data(tmp_path, module)
    write_jsonl(tmp_path / "scan.jsonl", read_jsonl(tmp_path / "memorized.jsonl") * 2)  # 5 memorized, twice
    results, memorized = {}, {}
    for processes in (1, 2):
        root = tmp_path / f"run_{processes}"
        config = {
            "seed_everything": 0,
            "trainer": {"accelerator": "cpu", "devices": processes, "strategy": "ddp" if processes > 1 else "auto",
                        "logger": False, "enable_progress_bar": False, "default_root_dir": str(root),
                        "callbacks": [{"class_path": "lit_attrib.callbacks.MemorizedSetCallback"}]},
            "model": {"class_path": "lit_attrib.modules.CurvatureEditModule", "init_args": {
                "factors": str(tmp_path / "factors"), "layers": '{"0": {"up": 0.5, "gate": 0.5}}', "config": CONFIG,
                "checkpoint": str(tmp_path / "model.ckpt"), "rhos": [1.0, 0.4]}},
            "data": {"class_path": "lit_attrib.data.MemorizationDataModule", "init_args": {
                "tokenizer": str(TOKENIZER), "memorized": str(tmp_path / "memorized.jsonl"),
                "heldout": str(tmp_path / "heldout.jsonl"), "scan": str(tmp_path / "scan.jsonl"), "prefix_len": 6,
                "suffix_len": 5, "stride": 3, "batch_size": 3}},
        }
        path = tmp_path / f"edit_{processes}.yaml"
        path.write_text(yaml.safe_dump(config))
        for command in ("validate", "predict"):
            result = run_cli(command, "-c", str(path), in_process=processes == 1)
            assert result.returncode == 0, result.stderr[-3000:]
        results[processes] = read_jsonl(root / "edit" / "results.jsonl")
        memorized[processes] = read_jsonl(root / "memorized" / "memorized.jsonl")
    for one, two in zip(results[1], results[2]):
        assert one.keys() == two.keys()
        for key, value in one.items():  # float32 models: batches padded differently differ in round-off only
            assert two[key] == (pytest.approx(value, rel=1e-5) if isinstance(value, float) else value), key
        assert one["strict_accuracy"] == two["strict_accuracy"]  # counts are exact
    assert results[1][0]["memorization_examples"] == 10 and results[1][0]["strict_accuracy"] == 0.5
    own = {tuple(row["input_ids"]) for row in read_jsonl(tmp_path / "memorized.jsonl")[:5]}  # some prefixes repeat
    assert memorized[1] == memorized[2]
    assert {tuple(row["input_ids"]) for row in memorized[1]} == own and len(memorized[1]) == len(own)
    assert all(row["source_index"] < 5 for row in memorized[1])  # the first place of each, not its copy

def test_passes_of_one_module_validate_test_predict(tmp_path):
    """validate twice (the second replaces its own results), test (keeps the edited model), then predict
    (runs the unedited model); without a baseline kept, predict says why it cannot."""
    write_random_factors(tmp_path / "factors")
    module = CurvatureEditModule(factors=str(tmp_path / "factors"), layers={"0": {"up": 0.0}}, config=CONFIG,
                                 tokenizer=str(TOKENIZER), rhos=[0.0, 1.0], output_dir=str(tmp_path / "edit"))
    module.configure_model()
    original = module.model.model.layers[0].mlp.up_proj.weight.detach().clone()
    data = _eval_data(tmp_path, module)
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    trainer.validate(module, datamodule=data)
    first = read_jsonl(tmp_path / "edit" / "results.jsonl")
    trainer.validate(module, datamodule=data)
    assert read_jsonl(tmp_path / "edit" / "results.jsonl") == first
    trainer.test(module, datamodule=data)
    assert read_jsonl(tmp_path / "edit" / "results.jsonl") == first
    assert float(module.model.model.layers[0].mlp.up_proj.weight.abs().max()) == 0  # the first edited: rho 0
    scan = MemorizationDataModule(tokenizer=str(TOKENIZER), scan=str(tmp_path / "heldout.jsonl"), prefix_len=3,
                                  suffix_len=2)
    trainer.predict(module, datamodule=scan, return_predictions=False)
    assert torch.equal(module.model.model.layers[0].mlp.up_proj.weight, original)
    edited_only = CurvatureEditModule(factors=str(tmp_path / "factors"), layers={"0": {"up": 0.5}}, config=CONFIG,
                                      tokenizer=str(TOKENIZER), skip_baseline=True, output_dir=str(tmp_path / "e2"))
    trainer.validate(edited_only, datamodule=data)
    with pytest.raises(ModelError, match="kept no unedited weights"):
        trainer.predict(edited_only, datamodule=scan, return_predictions=False)


def test_edit_of_a_layer_with_a_bias_uses_the_bias_column(tmp_path):
    config = {**CONFIG, "mlp_bias": True}
    shapes = {"up": (64, 33)}  # the factors' layout appends the bias input
    write_random_factors(tmp_path / "factors", layers=(0,), shapes=shapes)
    module = CurvatureEditModule(factors=str(tmp_path / "factors"), layers={"0": {"up": 0.5}}, config=config,
                                 tokenizer=str(TOKENIZER), rhos=[1.0, 0.5, 0.0])
    module.configure_model()
    layer = module.model.model.layers[0].mlp.up_proj
    weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    module.apply_edit()
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "factors" / "factors.safetensors"))
    name = "model.model.layers.0.mlp.up_proj"
    for position, rho in ((1, 1.0), (2, 0.5), (3, 0.0)):
        module._load(position)
        expected = reference_edit(torch.cat([weight, bias[:, None]], 1), saved[f"{name}.activation_covariance"],
                                  saved[f"{name}.gradient_covariance"], rho)
        torch.testing.assert_close(layer.weight.double(), expected[:, :32], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.bias.double(), expected[:, 32], rtol=1e-5, atol=1e-6)
    module._load(0)
    assert torch.equal(layer.weight, weight) and torch.equal(layer.bias, bias)
    write_random_factors(tmp_path / "nobias", layers=(0,), shapes={"up": (64, 32)})
    bad = CurvatureEditModule(factors=str(tmp_path / "nobias"), layers={"0": {"up": 0.5}}, config=config,
                              tokenizer=str(TOKENIZER))
    bad.configure_model()
    with pytest.raises(ArtifactError, match=r"\(64, 32\), but the model's is \(64, 33\) \(bias column appended\)"):
        bad.apply_edit()
