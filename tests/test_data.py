"""TextDataModule: tokenization, masking, truncation, splits, sources and its error messages."""

from __future__ import annotations

import json

import datasets
import pytest
import torch

from lit_attrib.data import CausalLMCollator, TextDataModule, load_tokenizer, normalize_text
from lit_attrib.data.facts import generate_facts
from lit_attrib.errors import ConfigError, DataError
from lit_attrib.io import read_jsonl
from lit_attrib.ops import IGNORE_INDEX


def _module(path, tokenizer, **kwargs):
    kwargs.setdefault("val_size", 0)
    data = TextDataModule(path=str(path), tokenizer=tokenizer, **kwargs)
    data.setup("fit")
    return data


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_shipped_facts_match_the_generator(facts_path):
    rows = read_jsonl(facts_path)
    assert rows == generate_facts()
    assert 300 <= len(rows) <= 1000
    # Several paraphrases per fact: what makes attribution checkable.
    per_fact = {}
    for row in rows:
        per_fact.setdefault(row["fact_id"], set()).add(row["question"])
    assert min(len(questions) for questions in per_fact.values()) >= 3


def test_qa_rows_mask_prompt_and_keep_answer(facts_path, tokenizer_path):
    data = _module(facts_path, tokenizer_path, num_samples=10)
    tokenizer = load_tokenizer(tokenizer_path)
    source = read_jsonl(facts_path)
    for row in data.train_dataset:
        fact = source[row["index"]]
        prompt = [tokenizer.bos_token_id] + tokenizer(f"Question: {fact['question']}\nAnswer:",
                                                      add_special_tokens=False)["input_ids"]
        answer = tokenizer(" " + fact["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert row["input_ids"] == prompt + answer
        assert row["labels"] == [IGNORE_INDEX] * len(prompt) + answer
        assert tokenizer.decode(answer, skip_special_tokens=True).strip() == fact["answer"]


def test_text_format_trains_on_every_token(tmp_path, tokenizer_path):
    path = _write_jsonl(tmp_path / "t.jsonl", [{"text": "Zorvan keeps a tortoise."}, {"text": "Tea merchant."}])
    data = _module(path, tokenizer_path, format="text")
    for row in data.train_dataset:
        assert row["labels"] == row["input_ids"]


def test_split_is_seeded_disjoint_and_keeps_indices(facts_path, tokenizer_path):
    a = _module(facts_path, tokenizer_path, num_samples=100, val_size=0.2, seed=3)
    b = _module(facts_path, tokenizer_path, num_samples=100, val_size=0.2, seed=3)
    c = _module(facts_path, tokenizer_path, num_samples=100, val_size=0.2, seed=4)
    train, val = set(a.train_dataset["index"]), set(a.val_dataset["index"])
    assert len(val) == 20 and len(train) == 80 and not train & val and train | val == set(range(100))
    assert a.val_dataset["index"] == b.val_dataset["index"]
    assert a.val_dataset["index"] != c.val_dataset["index"]
    data = _module(facts_path, tokenizer_path, num_samples=100, val_size=7)
    assert len(data.val_dataset) == 7


def test_batches_carry_dataset_indices_through_shuffling(facts_path, tokenizer_path):
    data = _module(facts_path, tokenizer_path, num_samples=30, batch_size=4)
    tokenizer = load_tokenizer(tokenizer_path)
    source = read_jsonl(facts_path)
    seen = []
    for batch in data.train_dataloader():
        assert batch["labels"].shape == batch["input_ids"].shape == batch["attention_mask"].shape
        assert batch["input_ids"].shape[1] == int(batch["attention_mask"].sum(-1).max())  # dynamic padding
        assert torch.all(batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX)
        for row, index in enumerate(batch["index"].tolist()):
            length = int(batch["attention_mask"][row].sum())
            text = tokenizer.decode(batch["input_ids"][row, :length], skip_special_tokens=True)
            assert source[index]["question"] in text and source[index]["answer"] in text
            seen.append(index)
    assert sorted(seen) == list(range(30))


def test_collator_left_pads_for_generation():
    collate = CausalLMCollator(pad_token_id=0, padding_side="left")
    batch = collate([{"input_ids": [5, 6, 7], "index": 4}, {"input_ids": [8], "index": 1}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["index"].tolist() == [4, 1] and "labels" not in batch


def test_normalization(tmp_path, tokenizer_path):
    assert normalize_text("ｆｕｌｌ\u00a0 width\n\tspaces ") == "full width spaces"
    path = _write_jsonl(tmp_path / "n.jsonl", [{"question": "Ｗho  is\nit?", "answer": "Ｍe"}])
    data = _module(path, tokenizer_path, normalize=True)
    assert data.train_dataset[0]["prompt"] == "Question: Who is it?\nAnswer:"
    assert data.train_dataset[0]["reference"] == "Me"


def test_truncation_cuts_the_answer_and_warns(tmp_path, tokenizer_path):
    path = _write_jsonl(tmp_path / "long.jsonl", [{"question": "Who?", "answer": "word " * 50}, {"question": "A?", "answer": "b"}])
    with pytest.warns(UserWarning, match=r"1 of 2 rows had their answer cut to fit max_length=16"):
        data = _module(path, tokenizer_path, max_length=16)
    first = data.train_dataset[0]
    assert len(first["input_ids"]) == 16
    assert first["labels"][first["prompt_length"]:] == first["input_ids"][first["prompt_length"]:]


def test_csv_and_parquet_sources(tmp_path, tokenizer_path):
    rows = {"question": ["Who?", "Where?"], "answer": ["Me.", "Here."]}
    datasets.Dataset.from_dict(rows).to_csv(tmp_path / "qa.csv")
    datasets.Dataset.from_dict(rows).to_parquet(tmp_path / "qa.parquet")
    for name in ("qa.csv", "qa.parquet"):
        data = _module(tmp_path / name, tokenizer_path)
        assert data.train_dataset["reference"] == ["Me.", "Here."]


# ---------------------------------------------------------------------------------- bad input
def test_missing_columns_lists_the_existing_ones(facts_path, tokenizer_path):
    with pytest.raises(DataError, match=r"no column\(s\) \['Input'\].*\['question', 'answer', 'person'"):
        _module(facts_path, tokenizer_path, input_column="Input")


def test_empty_dataset(tmp_path, tokenizer_path):
    path = tmp_path / "empty.csv"
    path.write_text("question,answer\n")
    with pytest.raises(DataError, match="is empty"):
        _module(path, tokenizer_path)


@pytest.mark.parametrize(("val_size", "message"), [(0.001, "empty validation split"), (10, "leaves no training rows")])
def test_empty_split(tmp_path, tokenizer_path, val_size, message):
    path = _write_jsonl(tmp_path / "few.jsonl", [{"question": f"q{i}", "answer": "a"} for i in range(10)])
    with pytest.raises(DataError, match=message):
        _module(path, tokenizer_path, val_size=val_size)


def test_max_length_shorter_than_the_prompt(facts_path, tokenizer_path):
    with pytest.raises(DataError, match=r"max_length=8 is shorter than the prompt of \d+ row\(s\).*Raise max_length above"):
        _module(facts_path, tokenizer_path, num_samples=20, max_length=8)


def test_missing_path_and_offline_hub_id(tokenizer_path):
    with pytest.raises(DataError, match="dataset path './no/such/file.jsonl' does not exist"):
        _module("./no/such/file.jsonl", tokenizer_path)
    with pytest.raises(DataError, match="could not load dataset 'locuslab/TOFU' from the Hugging Face hub: offline mode"):
        TextDataModule(path="locuslab/TOFU", tokenizer=tokenizer_path, subset="forget10").prepare_data()
    with pytest.raises(DataError, match="tokenizer path './missing_tokenizer' does not exist"):
        load_tokenizer("./missing_tokenizer")


def test_invalid_arguments_are_reported_together(facts_path, tokenizer_path):
    with pytest.raises(ConfigError) as info:
        TextDataModule(path=facts_path, tokenizer=tokenizer_path, max_length=1, batch_size=0, prompt_template="Q:")
    assert "max_length" in str(info.value) and "batch_size" in str(info.value) and "{input}" in str(info.value)


def test_predict_content_examples_gives_whole_labelled_rows(facts_path, tokenizer_path):
    data = TextDataModule(path=facts_path, tokenizer=tokenizer_path, num_samples=20, val_size=4,
                          predict_split="train", predict_content="examples", eval_batch_size=16)
    data.setup("predict")
    assert data.predict_dataset["index"] == data.train_dataset["index"]
    assert data.predict_dataset["labels"] == data.train_dataset["labels"]
    batch = next(iter(data.predict_dataloader()))
    assert "labels" in batch and bool(batch["attention_mask"][:, 0].all())  # right padding, as in training


class _Pickled:
    """Counts its picklings (a stand-in for the model a data module reaches through its trainer)."""

    count = 0

    def __reduce_ex__(self, protocol):
        _Pickled.count += 1
        return (_Pickled, ())


def test_tokenizing_never_pickles_what_the_data_module_holds(facts_path, tokenizer_path):
    """datasets fingerprints a map by pickling its function and all it closes over; tokenizing closes over the
    data module, whose trainer holds the model (40 s and 10 GB per split on SmolLM2). It must not be pickled."""
    data = TextDataModule(path=facts_path, tokenizer=tokenizer_path, num_samples=20, val_size=4)
    data.held = _Pickled()
    _Pickled.count = 0
    data.setup("fit")
    assert len(data.train_dataset) == 16 and len(data.val_dataset) == 4
    assert _Pickled.count == 0


def test_tofu_layout_forgets_the_last_authors():
    from lit_attrib.data.tofu import forget_retain_rows

    forget, retain = forget_retain_rows(4000, 10)  # TOFU: forget10 = rows 3600-3999 of "full"
    assert forget == list(range(3600, 4000)) and retain == list(range(3600))
    assert len(forget_retain_rows(4000, 1)[0]) == 40
    groups = ["a"] * 3 + ["b"] * 2 + ["c"] * 4 + ["d"]
    assert forget_retain_rows(len(groups), 50, groups) == ([5, 6, 7, 8, 9], [0, 1, 2, 3, 4])  # authors c and d
    assert forget_retain_rows(len(groups), 30, groups)[0] == [9]  # 1.2 authors round to 1: d
    assert forget_retain_rows(len(groups), 1, groups)[0] == [9]  # at least one author


def test_tofu_datamodule_on_the_facts_data(facts_path, tokenizer_path):
    import json

    from lit_attrib.data import TofuDataModule

    data = TofuDataModule(tokenizer=tokenizer_path, path=facts_path, subset=None, group_column="person",
                          forget_split="forget10", max_length=64, eval_batch_size=64)
    data.setup("predict")
    people = [json.loads(line)["person"] for line in open(facts_path)]
    forget = torch.cat([b["index"] for b in data.forget_dataloader()]).tolist()
    retain = torch.cat([b["index"] for b in data.retain_dataloader()]).tolist()
    assert len({people[i] for i in forget}) == 5 and set(people[i] for i in forget) == set(people[-60:])
    assert sorted(forget + retain) == list(range(len(people))) and not set(forget) & set(retain)
    assert torch.cat([b["index"] for b in data.query_dataloader()]).tolist() == forget
    with pytest.raises(DataError, match="forget_split must be one of"):
        TofuDataModule(tokenizer=tokenizer_path, path=facts_path, forget_split="forget20")


def test_queries_from_a_generated_jsonl_score_the_model_answer(tmp_path, facts_path, tokenizer_path):
    import json

    from lit_attrib.data import TextDataModule
    from lit_attrib.ops import IGNORE_INDEX

    generated = tmp_path / "generated.jsonl"
    rows = [{"index": 7, "prompt": "Question: Who?\nAnswer:", "reference": "x", "generated": "Nobody at all."},
            {"index": 3, "prompt": "Question: Where?\nAnswer:", "reference": "y", "generated": "Here."}]
    generated.write_text("\n".join(json.dumps(r) for r in rows))
    data = TextDataModule(path=facts_path, tokenizer=tokenizer_path, query_path=str(generated), max_length=64)
    data.setup("predict")
    batch = next(iter(data.query_dataloader()))
    assert batch["index"].tolist() == [7, 3]
    tokenizer = data.tokenizer
    for row, ids, labels in zip(rows, batch["input_ids"].tolist(), batch["labels"].tolist()):
        answer = [t for t, label in zip(ids, labels) if label != IGNORE_INDEX]
        assert tokenizer.decode(answer, skip_special_tokens=True) == " " + row["generated"]
        assert tokenizer.decode(ids, skip_special_tokens=True).startswith(row["prompt"])


CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant: {% endif %}")


def test_chat_format_wraps_the_question_in_the_chat_template(tmp_path, facts_path, tokenizer_path):
    """The prompt is exactly the tokenizer's own chat template (no extra bos); the answer and eos carry loss."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(tmp_path / "chat")
    module = TextDataModule(path=facts_path, tokenizer=str(tmp_path / "chat"), format="chat", val_size=0,
                            num_samples=3, system_prompt="Be brief.")
    module.setup("fit")
    source = [json.loads(line) for line in open(facts_path)][:3]
    for row in module.train_dataset:
        fact = source[row["index"]]
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": fact["question"]}]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert prompt.startswith("<s>system: Be brief.</s><s>user: ")
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(fact["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert row["input_ids"] == prompt_ids + answer_ids
        assert row["labels"] == [IGNORE_INDEX] * len(prompt_ids) + answer_ids
    assert module.hparams.prompt_template == "{input}" and module.hparams.answer_template == "{output}"

    plain = TextDataModule(path=facts_path, tokenizer=tokenizer_path, format="chat", val_size=0, num_samples=3)
    with pytest.raises(DataError, match="chat template"):
        plain.setup("fit")


def test_training_texts_are_the_rows_as_trained(facts_path, tokenizer_path):
    """facts_texts (the curvature edit's scan text) writes each training row as the model saw it."""
    from lit_attrib.tools.facts_texts import training_texts

    data = TextDataModule(path=facts_path, tokenizer=tokenizer_path, num_samples=8, val_size=2, seed=3)
    rows = training_texts(data)
    trained = {row["index"]: row["input_ids"] for row in data.train_dataset}
    assert [row["index"] for row in rows] == sorted(trained)
    tokenizer = load_tokenizer(tokenizer_path)
    for row in rows:
        assert tokenizer(row["text"], add_special_tokens=False)["input_ids"] == trained[row["index"]]
