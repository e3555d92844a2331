"""AttentionCaptureCallback and ops/attention against independent references: the attention module's own
output, eager ``output_attentions`` maps, and explicit class sums."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from transformers import AutoConfig, AutoModelForCausalLM

from lit_attrib.callbacks.attention_capture import AttentionCaptureCallback, load_attention
from lit_attrib.errors import DataError, ModelError
from lit_attrib.ops.attention import class_mass
from lit_attrib.plotting import attention_comparison_figure, plt

VOCAB = 100


def tiny(model_type: str, implementation: str, kv_heads: int = 4, layers: int = 2, seed: int = 0):
    extra = {"lambda_std_dev": 0.5} if model_type == "diffllama" else {}
    config = AutoConfig.for_model(model_type, vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=kv_heads,
                                  max_position_embeddings=64, **extra)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation=implementation).eval()


class Wrapper(L.LightningModule):
    """The smallest LightningModule around a Hugging Face model: one forward per batch, logits kept."""

    def __init__(self, model, generate: int = 0):
        super().__init__()
        self.model = model
        self.generate = generate
        self.outputs = []

    def forward(self, ids, mask=None):
        return self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits

    def validation_step(self, batch, batch_idx):
        if self.generate:
            self.outputs.append(self.model.generate(input_ids=batch["input_ids"], max_new_tokens=self.generate,
                                                    do_sample=False, pad_token_id=0))
        else:
            self.outputs.append(self(batch["input_ids"], batch["attention_mask"]))

    test_step = validation_step

    def predict_step(self, batch, batch_idx):
        return self(batch["input_ids"], batch["attention_mask"])


def examples(count: int = 5, length: int = 12, seed: int = 0) -> list[dict]:
    """Rows of different lengths (so batches are right-padded), answers on the last 4 tokens, and classes."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for index in range(count):
        n = length - index % 3
        ids = torch.randint(3, VOCAB, (n,), generator=generator)
        labels = torch.full((n,), -100)
        labels[-4:] = ids[-4:]
        rows.append({"input_ids": ids, "labels": labels, "index": index,
                     "token_class": torch.randint(0, 3, (n,), generator=generator)})
    return rows


def collate(rows: list[dict]) -> dict:
    length = max(len(row["input_ids"]) for row in rows)
    batch = {"input_ids": torch.zeros(len(rows), length, dtype=torch.long),
             "attention_mask": torch.zeros(len(rows), length, dtype=torch.long),
             "labels": torch.full((len(rows), length), -100), "token_class": torch.full((len(rows), length), -1),
             "index": torch.tensor([row["index"] for row in rows])}
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        batch["input_ids"][i, :n] = row["input_ids"]
        batch["attention_mask"][i, :n] = 1
        batch["labels"][i, :n] = row["labels"]
        batch["token_class"][i, :n] = row["token_class"]
    return batch


def run(model, callback=None, stage: str = "validate", rows=None, batch_size: int = 3, generate: int = 0):
    module = Wrapper(model, generate=generate)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[callback] if callback else [])
    loader = DataLoader(rows or examples(), batch_size=batch_size, collate_fn=collate)
    if stage == "predict":
        return trainer.predict(module, loader)
    getattr(trainer, stage)(module, loader, verbose=False)
    return module.outputs


# ----------------------------------------------------------------------------------- DiffLlama
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("kv_heads", [4, 2], ids=["multi-head", "grouped-query"])
def test_differential_maps_times_values_reproduce_the_attention_output(tmp_path, implementation, kv_heads):
    model = tiny("diffllama", implementation, kv_heads)
    attention = model.model.layers[1].self_attn
    seen = {"values": [], "outputs": []}
    attention.v_proj.register_forward_hook(lambda m, a, out: seen["values"].append(out.detach()))
    attention.register_forward_hook(lambda m, a, out: seen["outputs"].append(out[0].detach()))
    run(model, AttentionCaptureCallback(queries="all", max_examples=10, output_dir=str(tmp_path)))
    meta, tensors = load_attention(tmp_path)
    lam, heads, d = meta["lambda"]["1"], 4, attention.head_dim
    groups = heads // kv_heads
    assert meta["differential"] and meta["heads"] == [0, 1]
    assert lam == pytest.approx(float(torch.exp((attention.lambda_q1 * attention.lambda_k1).sum())
                                      - torch.exp((attention.lambda_q2 * attention.lambda_k2).sum())
                                      + attention.lambda_init), rel=1e-6)
    for batch, (values, outputs) in enumerate(zip(seen["values"], seen["outputs"])):
        values = values.view(*values.shape[:2], kv_heads, d).transpose(1, 2)  # (B, kv, T, d)
        for row in range(values.shape[0]):
            index = 3 * batch + row
            maps = tensors[f"{index}/layer1"].double()  # (H/2, n, n) over the real tokens
            n = maps.shape[-1]
            assert torch.allclose(maps.sum(-1), torch.full_like(maps.sum(-1), 1 - lam), atol=1e-5)  # rows: 1 − λ
            pairs = []
            for head in range(heads // 2):  # head i pairs with i + H/2; both read kv heads j and j + kv/2
                j = head // groups
                both = torch.cat([values[row, j, :n], values[row, j + kv_heads // 2, :n]], -1).double()
                pairs.append(maps[head] @ both)
            mixed = (1 - attention.lambda_init) * F.rms_norm(torch.stack(pairs, 1), (2 * d,),
                                                             eps=model.config.rms_norm_eps)
            expected = attention.o_proj(mixed.reshape(n, -1).float())
            torch.testing.assert_close(expected, outputs[row, :n], atol=1e-5, rtol=0)


def test_differential_maps_equal_the_plain_maps_combined_without_clamping(tmp_path):
    """Captured under SDPA: A₁ − λ·A₂ of eager ``output_attentions`` (the first softmax of all heads)."""
    model = tiny("diffllama", "sdpa", kv_heads=2, seed=3)
    with torch.no_grad():  # a large λ: the differential maps then have negative entries
        for layer in model.model.layers:
            layer.self_attn.lambda_q2.fill_(0.0)
            layer.self_attn.lambda_q1.fill_(0.3)
            layer.self_attn.lambda_k1.fill_(0.3)
    run(model, AttentionCaptureCallback(queries="all", max_examples=10, output_dir=str(tmp_path)))
    meta, tensors = load_attention(tmp_path)
    rows = examples()
    eager = tiny("diffllama", "eager", kv_heads=2, seed=3)
    eager.load_state_dict(model.state_dict())
    negative = 0
    for row in rows:
        with torch.no_grad():
            plain = eager(input_ids=row["input_ids"][None], output_attentions=True).attentions
        for layer in (0, 1):
            lam = meta["lambda"][str(layer)]
            expected = plain[layer][0, :2] - lam * plain[layer][0, 2:]
            captured = tensors[f"{row['index']}/layer{layer}"]
            torch.testing.assert_close(captured, expected, atol=1e-6, rtol=0)
            negative += int((captured < 0).sum())
    assert negative > 0
    assert all(meta["lambda"][str(layer)] > 1 for layer in (0, 1))  # rows sum to 1 − λ < 0
    for layer in ("0", "1"):  # the signed shares still sum to 1, and each part's (where it has mass)
        assert sum(meta["ratios"]["signed_mean_over_heads"][layer].values()) == pytest.approx(1.0)
        for part in ("positive", "negative"):
            shares = list(meta["ratios"][part + "_mean_over_heads"][layer].values())
            assert shares == [None] * 3 or sum(shares) == pytest.approx(1.0)


# --------------------------------------------------------------------------------------- Llama
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_llama_maps_equal_eager_maps_and_logits_are_unchanged(tmp_path, implementation):
    model = tiny("llama", implementation, kv_heads=2)
    baseline = run(model)
    captured = run(model, AttentionCaptureCallback(queries="all", max_examples=10, output_dir=str(tmp_path)))
    for before, after in zip(baseline, captured):
        assert torch.equal(before, after)
    meta, tensors = load_attention(tmp_path)
    assert not meta["differential"] and meta["heads"] == [0, 1, 2, 3]
    eager = tiny("llama", "eager", kv_heads=2)
    eager.load_state_dict(model.state_dict())
    for row in examples():
        with torch.no_grad():
            plain = eager(input_ids=row["input_ids"][None], output_attentions=True).attentions
        for layer in (0, 1):
            torch.testing.assert_close(tensors[f"{row['index']}/layer{layer}"], plain[layer][0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("model_type", ["llama", "diffllama"])
def test_generation_with_the_kv_cache_is_unchanged(tmp_path, model_type):
    model = tiny(model_type, "sdpa")
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # decisive argmaxes
    rows = [{k: v for k, v in row.items()} for row in examples(count=3)]
    for row in rows:  # equal lengths: no padding inside a generated batch
        row["input_ids"], row["labels"], row["token_class"] = (t[:9] for t in (row["input_ids"], row["labels"],
                                                                                row["token_class"]))
    plain = run(model, rows=rows, generate=6)
    captured = run(model, AttentionCaptureCallback(queries="last", output_dir=str(tmp_path)), rows=rows, generate=6)
    assert torch.equal(plain[0], captured[0]) and plain[0].shape[1] == 15
    meta, tensors = load_attention(tmp_path)
    assert tensors["0/layer0"].shape[-2:] == (1, 9)  # the prompt's prefill, one query: the last token


# ---------------------------------------------------------------------------------- allocation
@pytest.mark.parametrize("model_type", ["llama", "diffllama"])
def test_allocation_ratios_equal_explicit_class_sums(tmp_path, model_type):
    model = tiny(model_type, "sdpa")
    rows = examples()
    run(model, AttentionCaptureCallback(queries="answer", max_examples=10, output_dir=str(tmp_path)), rows=rows)
    meta, tensors = load_attention(tmp_path)
    heads = len(meta["heads"])
    mass = torch.zeros(3, 2, heads, 3, dtype=torch.float64)
    for row in rows:
        answer = (row["labels"] != -100).nonzero().squeeze(-1)
        assert torch.equal(tensors[f"{row['index']}/queries"], answer)
        for layer in (0, 1):
            maps = tensors[f"{row['index']}/layer{layer}"].double()  # (heads, answer queries, keys)
            for c in range(3):
                on_class = maps[..., row["token_class"] == c].sum((-1, -2))
                mass[0, layer, :, c] += on_class
                mass[1, layer, :, c] += maps.clamp(min=0)[..., row["token_class"] == c].sum((-1, -2))
                mass[2, layer, :, c] += (-maps).clamp(min=0)[..., row["token_class"] == c].sum((-1, -2))
    torch.testing.assert_close(tensors["mass"].double(), mass.float().double(), atol=1e-5, rtol=1e-5)
    parts = ["signed", "positive", "negative"] if model_type == "diffllama" else ["signed"]
    assert [p for p in parts if p in meta["ratios"]] == parts
    for layer in (0, 1):
        for head in range(heads):
            ratios = meta["ratios"]["signed"][str(layer)][str(head)]
            expected = mass[0, layer, head] / mass[0, layer, head].sum()
            assert [ratios[c] for c in ("other", "math", "noise")] == pytest.approx(expected.tolist(), rel=1e-5)
            assert sum(ratios.values()) == pytest.approx(1.0)
    assert meta["queries_per_layer"]["0"] == 4 * len(rows)
    table = (tmp_path / "allocation.md").read_text()
    assert table.count("\n| ") == 3 and ("λ" in table) == (model_type == "diffllama")
    assert (tmp_path / "plots" / "example0.png").is_file() and (tmp_path / "plots" / "example1.png").is_file()


def test_class_mass_splits_signed_positive_and_negative():
    weights = torch.tensor([[0.5, -0.25, 0.75, 0.0]])
    mass = class_mass(weights, torch.tensor([0, 1, 1, -1]), 2)
    assert mass[:, 0].tolist() == [[0.5, 0.5], [0.5, 0.75], [0.0, 0.25]]


def test_max_examples_keeps_the_smallest_indices_and_test_and_predict_stages(tmp_path):
    rows = examples(count=7)[::-1]  # indices arrive in descending order
    model = tiny("llama", "sdpa")
    for stage in ("test", "predict"):
        run(model, AttentionCaptureCallback(queries="last", max_examples=2, output_dir=str(tmp_path / stage)), stage,
            rows)
    for stage in ("test", "predict"):
        meta, tensors = load_attention(tmp_path / stage)
        assert meta["examples"] == [0, 1] and meta["queries_per_layer"]["1"] == 7
        assert sorted({key.split("/")[0] for key in tensors if "/" in key}) == ["0", "1"]


def test_side_by_side_figure(tmp_path):
    captures = {}
    for model_type in ("llama", "diffllama"):
        run(tiny(model_type, "sdpa"), AttentionCaptureCallback(queries="answer", output_dir=str(tmp_path / model_type)))
        captures[model_type] = load_attention(tmp_path / model_type)
    figure = attention_comparison_figure(captures, index=0, layer=1)
    assert len(figure.axes) >= 3
    plt.close(figure)
    with pytest.raises(KeyError, match="example 99"):
        attention_comparison_figure(captures, index=99, layer=1)


# ------------------------------------------------------------------------------------ bad input
def test_bad_input_is_refused_with_the_valid_range(tmp_path):
    with pytest.raises(ModelError, match=r"valid are 0\.\.1"):
        run(tiny("llama", "sdpa"), AttentionCaptureCallback(layers=[2], output_dir=str(tmp_path)))
    with pytest.raises(ModelError, match=r"2 differential heads .* valid are 0\.\.1"):
        run(tiny("diffllama", "sdpa"), AttentionCaptureCallback(heads=[2], output_dir=str(tmp_path)))
    with pytest.raises(ModelError, match="no attention module it recognises.*GPT2Attention"):
        config = AutoConfig.for_model("gpt2", vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4, n_positions=64)
        run(AutoModelForCausalLM.from_config(config), AttentionCaptureCallback(output_dir=str(tmp_path)))
    with pytest.raises(DataError, match=r"dataset index 0 \(12 real tokens; valid are -12\.\.11\)"):
        run(tiny("llama", "sdpa"), AttentionCaptureCallback(queries=[20], output_dir=str(tmp_path)))
    assert not (tmp_path / "allocation.json").exists()  # nothing half-written
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import AttentionInterface
    assert AttentionInterface._global_mapping["sdpa"] is sdpa_attention_forward  # the registry is restored


def test_two_captures_in_one_run_and_loaders_without_indices(tmp_path):
    """Both callbacks see the same maps, the kernel registry is restored, rows without ``index`` are numbered."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import AttentionInterface

    rows = [{k: v for k, v in row.items() if k != "index"} for row in examples()]
    first = AttentionCaptureCallback(queries="all", max_examples=10, output_dir=str(tmp_path / "a"))
    second = AttentionCaptureCallback(queries="all", layers=[1], max_examples=10, output_dir=str(tmp_path / "b"))
    module = Wrapper(tiny("llama", "sdpa"))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[first, second])
    loader = DataLoader(rows, batch_size=3, collate_fn=lambda b: {k: v for k, v in collate(
        [{**r, "index": 0} for r in b]).items() if k != "index"})
    trainer.validate(module, loader, verbose=False)
    assert AttentionInterface._global_mapping["sdpa"] is sdpa_attention_forward
    (meta_a, a), (meta_b, b) = load_attention(tmp_path / "a"), load_attention(tmp_path / "b")
    assert meta_a["examples"] == meta_b["examples"] == [0, 1, 2, 3, 4]
    for index, row in enumerate(rows):  # rows numbered in the order seen: maps and tokens of the same row
        assert torch.equal(a[f"{index}/input_ids"], row["input_ids"])
        assert torch.equal(a[f"{index}/layer1"], b[f"{index}/layer1"])


def test_results_of_other_arguments_are_not_replaced(tmp_path):
    run(tiny("llama", "sdpa"), AttentionCaptureCallback(queries="last", output_dir=str(tmp_path)))
    with pytest.raises(Exception, match="overwrite"):
        run(tiny("llama", "sdpa"), AttentionCaptureCallback(queries="all", output_dir=str(tmp_path)))
    assert json.loads((tmp_path / "allocation.json").read_text())["arguments"]["queries"] == "last"


# ------------------------------------------------------------------------- allocation accumulator
def _explicit_allocation(batches, layers: int, heads: int, classes: int):
    """Mass, query counts and shares by plain loops over heads, queries and keys."""
    mass = torch.zeros(3, layers, heads, classes, dtype=torch.float64)
    queries = torch.zeros(layers, dtype=torch.float64)
    for batch in batches:
        for layer, maps, key_class in batch:
            queries[layer] += maps.shape[1]
            for h in range(heads):
                for q in range(maps.shape[1]):
                    for s in range(maps.shape[2]):
                        c = int(key_class[s])
                        if c < 0:
                            continue
                        w = float(maps[h, q, s])
                        mass[0, layer, h, c] += w
                        mass[1, layer, h, c] += max(w, 0.0)
                        mass[2, layer, h, c] += max(-w, 0.0)
    total = mass.sum(-1, keepdim=True)
    pooled = mass.sum(2)
    return mass, queries, mass / total, pooled / pooled.sum(-1, keepdim=True)


def _allocation_batches(seed: int, count: int = 3, layers: int = 2, heads: int = 3, classes: int = 3):
    """Batches of ``(layer, maps (heads, queries, S), key_class (S,))`` with signed maps and padded keys."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        batch = []
        for layer in range(layers):
            for _ in range(2):  # two examples per layer and batch
                keys, queries = int(torch.randint(4, 9, (1,), generator=generator)), int(
                    torch.randint(1, 4, (1,), generator=generator))
                maps = torch.randn(heads, queries, keys, generator=generator, dtype=torch.float64)
                key_class = torch.randint(-1, classes, (keys,), generator=generator)
                key_class[:classes] = torch.arange(classes)  # every class present
                batch.append((layer, maps, key_class))
        batches.append(batch)
    return batches


def _accumulate(batches, layers: int = 2, heads: int = 3, classes: int = 3):
    from lit_attrib.ops.attention_allocation import AttentionAllocation

    allocation = AttentionAllocation(layers, heads, classes)
    for batch in batches:
        allocation.begin_batch()
        for layer, maps, key_class in batch:
            allocation.add(layer, maps, key_class)
        allocation.end_batch()
    return allocation


def test_attention_allocation_equals_explicit_sums_and_shares():
    batches = _allocation_batches(seed=0)
    allocation = _accumulate(batches)
    mass, queries, shares, pooled = _explicit_allocation(batches, 2, 3, 3)
    torch.testing.assert_close(allocation.mass, mass, atol=1e-12, rtol=0)
    torch.testing.assert_close(allocation.queries, queries, atol=0, rtol=0)
    torch.testing.assert_close(allocation.shares(), shares, atol=1e-12, rtol=0)
    torch.testing.assert_close(allocation.pooled_shares(), pooled, atol=1e-12, rtol=0)
    torch.testing.assert_close(allocation.shares().sum(-1), torch.ones(3, 2, 3, dtype=torch.float64))
    torch.testing.assert_close(allocation.mass[0], allocation.mass[1] - allocation.mass[2])  # signed = pos − neg


def test_attention_allocation_shares_of_empty_parts_are_nan():
    from lit_attrib.ops.attention_allocation import AttentionAllocation

    allocation = AttentionAllocation(1, 1, 2)
    allocation.begin_batch()
    allocation.add(0, torch.tensor([[[0.25, 0.75, 0.5]]]), torch.tensor([0, 1, -1]))
    allocation.end_batch()
    assert allocation.shares()[0, 0, 0].tolist() == [0.25, 0.75]
    assert allocation.shares()[2, 0, 0].isnan().all()  # no negative mass: no shares
    with pytest.raises(RuntimeError, match="begin_batch"):
        allocation.add(0, torch.ones(1, 1, 3), torch.tensor([0, 1, -1]))
    with pytest.raises(ValueError, match=r"heads=1.*\(2, 1, 3\)"):
        allocation.begin_batch()
        allocation.add(0, torch.ones(2, 1, 3), torch.tensor([0, 1, -1]))


def test_attention_allocation_split_over_processes_and_resumed_equals_one_pass():
    from lit_attrib.ops.attention_allocation import AttentionAllocation

    batches = _allocation_batches(seed=1, count=4)
    whole = _accumulate(batches)
    first, second = _accumulate(batches[:2]), _accumulate(batches[2:])
    other = {id(first.mass): second.mass, id(first.queries): second.queries}
    first.reduce(lambda tensor: tensor + other[id(tensor)])  # a sum over two "processes"
    torch.testing.assert_close(first.mass, whole.mass, atol=1e-12, rtol=0)
    torch.testing.assert_close(first.queries, whole.queries, atol=0, rtol=0)
    resumed = AttentionAllocation(2, 3, 3)
    resumed.load_state_dict(_accumulate(batches[:3]).state_dict())
    for layer, maps, key_class in batches[3]:
        resumed.begin_batch()
        resumed.add(layer, maps, key_class)
        resumed.end_batch()
    torch.testing.assert_close(resumed.mass, whole.mass, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="same layers, heads and classes"):
        AttentionAllocation(1, 3, 3).load_state_dict(whole.state_dict())


def test_an_analysis_pass_over_whole_examples_is_captured(tmp_path, facts_path, tokenizer_path):
    """CausalLMModule's predict_step generates nothing for whole examples (labels): the callback runs the
    forward it watches itself, and the maps equal eager ``output_attentions`` of the same weights."""
    from conftest import TINY_CONFIGS

    from lit_attrib.data import TextDataModule
    from lit_attrib.modules import CausalLMModule

    module = CausalLMModule(config=TINY_CONFIGS["llama"], tokenizer=tokenizer_path)
    data = TextDataModule(path=facts_path, tokenizer=tokenizer_path, num_samples=12, val_size=4, batch_size=4,
                          predict_split="val", predict_content="examples")
    capture = AttentionCaptureCallback(queries="answer", max_examples=2, output_dir=str(tmp_path))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[capture])
    trainer.predict(module, data, return_predictions=False)
    meta, tensors = load_attention(tmp_path)
    assert len(meta["examples"]) == 2 and meta["queries_per_layer"]["0"] > 0
    eager = CausalLMModule(config=TINY_CONFIGS["llama"], tokenizer=tokenizer_path, attn_implementation="eager")
    eager.configure_model()
    eager.model.load_state_dict(module.model.state_dict())
    for index in meta["examples"]:
        ids = tensors[f"{index}/input_ids"]
        with torch.no_grad():
            plain = eager.model.eval()(input_ids=ids[None], output_attentions=True).attentions
        queries = tensors[f"{index}/queries"]
        for layer in (0, 1):
            torch.testing.assert_close(tensors[f"{index}/layer{layer}"], plain[layer][0][:, queries], atol=1e-6, rtol=0)
