"""Noisy GSM8K: the generator, noise injection, math spans, token classes and NoisyGSM8KDataModule."""

from __future__ import annotations

import operator
import re
from pathlib import Path

import pytest

from lit_attrib.data import NoisyGSM8KDataModule, load_tokenizer
from lit_attrib.data.gsm8k import (
    NOISE_TYPES,
    TOKEN_CLASSES,
    classify_tokens,
    generate_problems,
    inject_noise,
    math_spans,
    noise_sentence,
    sentence_boundaries,
)
from lit_attrib.errors import DataError
from lit_attrib.io import read_jsonl, write_jsonl
from lit_attrib.ops import IGNORE_INDEX

TINY = Path(__file__).resolve().parents[1] / "data" / "gsm8k_tiny"
TOKENIZER = str(TINY / "tokenizer")
NOISY = NOISE_TYPES[1:]
OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}


def _module(**kwargs) -> NoisyGSM8KDataModule:
    kwargs.setdefault("path", str(TINY))
    kwargs.setdefault("subset", None)
    kwargs.setdefault("split", "train")
    kwargs.setdefault("num_samples", 40)
    kwargs.setdefault("batch_size", 4)
    return NoisyGSM8KDataModule(tokenizer=TOKENIZER, **kwargs)


def _solve(question: str) -> int:
    """An independent solver of the generator's problems: reads the sentences, not the generator's record."""
    value = None
    for sentence in re.split(r"(?<=[.?])\s+", question)[:-1]:
        if m := re.search(r"(has|buys) (\d+) \w+ with (\d+) \w+ in each", sentence):
            value = (value if m[1] == "buys" else 0) + int(m[2]) * int(m[3])
        elif m := re.search(r"has (\d+) \w+\.$", sentence):
            value = int(m[1])
        elif m := re.search(r"(\d+) more", sentence):
            value += int(m[1])
        elif m := re.search(r"(gives|loses|sells) (\d+)", sentence):
            value -= int(m[2])
        elif "doubles" in sentence or "triples" in sentence:
            value *= 2 if "doubles" in sentence else 3
        elif m := re.search(r"into (\d+) equal piles", sentence):
            assert value % int(m[1]) == 0
            value //= int(m[1])
        else:
            raise AssertionError(f"unparsed sentence {sentence!r}")
    return value


def _is_subsequence(short: str, long: str) -> bool:
    chars = iter(long)
    return all(c in chars for c in short)


# ------------------------------------------------------------------------------------- generator
def test_shipped_tiny_data_matches_the_generator():
    train, test = read_jsonl(TINY / "train.jsonl"), read_jsonl(TINY / "test.jsonl")
    problems = [{"question": p["question"], "answer": p["answer"]} for p in generate_problems(2200, seed=0)]
    assert train == problems[:2000] and test == problems[2000:]
    assert not {row["question"] for row in train} & {row["question"] for row in test}
    assert sum(f.stat().st_size for f in TINY.rglob("*") if f.is_file()) < 1_000_000
    tokenizer = load_tokenizer(TOKENIZER)
    assert tokenizer.is_fast and 512 <= len(tokenizer) <= 1024
    longest = max(len(tokenizer(row["question"])["input_ids"]) for row in train + test)
    assert longest <= 60


def test_generator_is_deterministic_and_its_answers_are_right():
    problems = generate_problems(300, seed=5)
    assert problems == generate_problems(300, seed=5)
    assert [p["question"] for p in problems] != [p["question"] for p in generate_problems(300, seed=6)]
    assert len({p["question"] for p in problems}) == 300
    ops_seen = set()
    for p in problems:
        question, lines = p["question"], p["answer"].split("\n")
        assert 2 <= len(re.findall(r"[.?]( |$)", question)) <= 4 and question.endswith("?")
        assert question.split(". ")[-1].startswith("How many")
        assert _solve(question) == p["result"]
        assert lines[-1] == f"#### {p['result']}"
        for (a, op, b, result), line in zip(p["calculations"], lines[:-1], strict=True):
            assert OPS[op](a, b) == result and f"{a} {op} {b} = {result}" in line
            ops_seen.add(op)
        assert p["calculations"][-1][3] == p["result"]
        operands = {n for a, _, b, _ in p["calculations"] for n in (a, b)}
        assert {int(n) for n in re.findall(r"\d+", question)} <= operands
    assert ops_seen == set(OPS)


# ----------------------------------------------------------------------------------------- noise
@pytest.mark.parametrize("noise", NOISY)
def test_noise_is_deterministic_and_seeded(noise):
    questions = [p["question"] for p in generate_problems(60, seed=1)]
    first = [inject_noise(q, noise, seed=0, key=i) for i, q in enumerate(questions)]
    assert first == [inject_noise(q, noise, seed=0, key=i) for i, q in enumerate(questions)]
    # Row order does not matter: the key (the row's index) and the seed decide.
    assert first[::-1] == [inject_noise(questions[i], noise, seed=0, key=i) for i in reversed(range(60))]
    other_seed = [inject_noise(q, noise, seed=1, key=i) for i, q in enumerate(questions)]
    other_key = [inject_noise(q, noise, seed=0, key=i + 1) for i, q in enumerate(questions)]
    assert sum(a != b for a, b in zip(first, other_seed)) > 20
    assert sum(a != b for a, b in zip(first, other_key)) > 20
    assert len({noise_sentence(q, noise, 0, i) for i, q in enumerate(questions)}) > 10


def test_noise_is_pinned_whatever_the_hash_seed():
    # Each pytest run has a fresh random PYTHONHASHSEED: pinned values would break if the choice used hash().
    question = "Mia has 12 apples. She gives 5 apples to Leo. How many apples does Mia have now?"
    assert [inject_noise(question, noise, seed=0, key=1) for noise in NOISY] == [
        ("Mia has 12 apples. The town library has 14 shelves on 34 floors. She gives 5 apples to Leo. "
         "How many apples does Mia have now?", (18, 64)),
        ("Mia has 12 apples. One could also work out 12 - 5 = 7, which is not used here. She gives 5 apples to "
         "Leo. How many apples does Mia have now?", (18, 78)),
        ("Mia has 12 apples. Leo was not interested in apples at all. She gives 5 apples to Leo. How many apples "
         "does Mia have now?", (18, 59)),
    ]


@pytest.mark.parametrize("noise", NOISY)
def test_noise_span_is_the_inserted_sentence_at_a_boundary(noise):
    positions = set()
    for i, p in enumerate(generate_problems(150, seed=3)):
        question = p["question"]
        noisy, (start, end) = inject_noise(question, noise, seed=7, key=i)
        sentence = noise_sentence(question, noise, seed=7, key=i)
        assert noisy[start:end] == " " + sentence  # the separating space leads the span at a boundary
        assert noisy[:start] + noisy[end:] == question and _is_subsequence(question, noisy)
        assert start in sentence_boundaries(question) and question[start - 1] in ".!?"
        assert noisy[end].isspace()
        final = question[max(sentence_boundaries(question)):].lstrip()  # the question asked
        assert noisy.endswith(final) and end <= len(noisy) - len(final)
        positions.add(sentence_boundaries(question).index(start))
        if noise == "rcs" and (m := re.search(r"(\d+) ([-+*]) (\d+) = (\d+)", sentence)):
            a, op, b, c = m.groups()  # a redundant calculation on the problem's numbers, and a right one
            assert OPS[op](int(a), int(b)) == int(c)
            numbers = re.findall(r"\d+", question)  # padded with small random numbers when fewer than two
            assert {a, b} <= set(numbers) if len(numbers) >= 2 else {a, b} & set(numbers)
    assert len(positions) >= 2  # not always the same boundary


def test_sentence_boundaries():
    question = "Mr. Lee has 3.5 kg of rice. He buys 2 more kg!  Then? How much rice does he have?"
    assert sentence_boundaries(question) == [27, 46, 53]
    assert [question[p - 1] for p in sentence_boundaries(question)] == [".", "!", "?"]
    assert sentence_boundaries("How many apples does Mia have?") == []
    assert sentence_boundaries("Mia has 3 apples. ") == []  # trailing space: nothing follows


@pytest.mark.parametrize("question", ["Mia has 12 apples and buys 3 more, so how many does she have?",
                                      "Dr. Lee has 3.5 kg of rice"])
def test_question_without_a_boundary_gets_the_noise_at_its_start(question):
    for noise in NOISY:
        noisy, (start, end) = inject_noise(question, noise, seed=0, key=4)
        sentence = noise_sentence(question, noise, seed=0, key=4)
        assert (start, end) == (0, len(sentence) + 1)
        assert noisy == sentence + " " + question and noisy[:start] + noisy[end:] == question


def test_clean_unknown_and_empty():
    assert inject_noise("Mia has 3 apples. How many?", "clean", seed=0, key=1) == ("Mia has 3 apples. How many?", None)
    assert noise_sentence("Mia has 3 apples.", "clean", 0) is None
    with pytest.raises(DataError, match=r"unknown noise type 'loud'; choose one of \['clean', 'inf', 'rcs', 'sd'\]"):
        inject_noise("Mia has 3 apples.", "loud", seed=0)
    with pytest.raises(DataError, match="empty question"):
        inject_noise("  ", "sd", seed=0)


def test_noise_reuses_the_problem_people_and_objects():
    question = "Mia has 12 apples. She gives 5 apples to Leo. How many apples does Mia have now?"
    sentences = {noise: [noise_sentence(question, noise, 0, k) for k in range(40)] for noise in NOISY}
    assert all(re.search(r"\d", s) for s in sentences["inf"] + sentences["rcs"])
    assert sum("Mia" in s or "Leo" in s for s in sentences["sd"]) > 10
    assert sum("apples" in s for s in sentences["sd"]) > 10
    assert all(re.findall(r"\d+", s)[0] in {"12", "5"} for s in sentences["rcs"])  # calculations on its numbers


# ------------------------------------------------------------------------------------ math spans
def test_math_spans_on_crafted_text():
    text = "Each of 1,200 kids paid $4.20, 25% more than 3.5 times half a dozen; 12 - 5 = 7 and 3/4 per day."
    assert [text[a:b] for a, b in math_spans(text)] == [
        "Each", "1,200", "$4.20", "25%", "more", "3.5", "times", "half", "dozen", "12", "-", "5", "=", "7",
        "3", "/", "4", "per",
    ]
    text = "An 18-year-old drove 60 km/h for twenty minutes; someone bought two dozen eggs in total."
    assert [text[a:b] for a, b in math_spans(text)] == ["18", "60", "twenty", "two", "dozen", "total"]
    assert math_spans("Therefore Moreover Eachother") == []


def test_classify_tokens_precedence_and_special_tokens():
    text = "A. B 3 x. C"
    noise_span = (2, 9)  # " B 3 x." with its leading space
    offsets = [(0, 0), (0, 1), (1, 2), (2, 4), (4, 6), (6, 8), (8, 9), (9, 11), (0, 0)]
    math = [(5, 6), (10, 11)]
    assert classify_tokens(offsets, text=text, noise_span=noise_span, math=math) == [0, 0, 0, 2, 2, 2, 2, 1, 0]
    # a token that only touches the separating space is not noise
    assert classify_tokens([(1, 3), (2, 4)], text="A. B", noise_span=(2, 4), math=[]) == [0, 2]
    assert classify_tokens([(0, 2)], text="N. A", noise_span=(0, 3), math=[]) == [2]
    assert classify_tokens([(2, 4)], text="N. A", noise_span=(0, 3), math=[]) == [0]


# ------------------------------------------------------------------------------------ datamodule
def test_datamodule_fit_batches_carry_token_classes_and_answer_only_loss():
    data = _module(noise="inf", val_size=0.25, noise_seed=3)
    data.setup("fit")
    assert data.token_classes == TOKEN_CLASSES == ("other", "math", "noise")
    assert len(data.train_dataset) == 30 and len(data.val_dataset) == 10
    tokenizer = load_tokenizer(TOKENIZER)
    batch = next(iter(data.train_dataloader()))
    mask = batch["attention_mask"].bool()
    assert batch["token_class"].shape == batch["input_ids"].shape == (4, batch["input_ids"].shape[1])
    assert (batch["token_class"][~mask] == -1).all() and (~mask).any()
    assert ((batch["token_class"][mask] >= 0) & (batch["token_class"][mask] <= 2)).all()
    for row, labels, reference in zip(batch["input_ids"], batch["labels"], batch["reference"]):
        assert "#### " in reference
        answer = labels[labels != IGNORE_INDEX]
        assert tokenizer.decode(answer, skip_special_tokens=True).strip() == reference
    source = {row["index"]: row for row in data.rows}
    for row in data.train_dataset:
        record, classes, ids = source[row["index"]], row["token_class"], row["input_ids"]
        assert len(classes) == len(ids) and classes[0] == 0 and classes[-1] == 0  # bos, eos
        noise = [i for i, c in enumerate(classes) if c == 2]
        start, end = record["noise_span"]
        assert noise == list(range(noise[0], noise[-1] + 1))  # one contiguous run
        assert tokenizer.decode([ids[i] for i in noise]).strip() == record["noisy_question"][start:end].strip()
        assert re.search(r"\d", record["noisy_question"][start:end])  # inf noise has numbers, and they are noise
        for i, token in enumerate(ids):
            if re.search(r"\d", tokenizer.decode([token])) and classes[i] != 2:
                assert classes[i] == 1, (tokenizer.decode([token]), row["index"])
        assert 1 in classes[:row["prompt_length"]] and 1 in classes[row["prompt_length"]:]  # question and answer math
        assert tokenizer.decode([ids[1]]) == "Question" and classes[1] == 0


def test_rows_and_write_noisy(tmp_path):
    data = _module(noise="sd", val_size=0)
    with pytest.raises(DataError, match="setup"):
        data.rows
    data.setup("fit")
    source = read_jsonl(TINY / "train.jsonl")[:40]
    assert [r["index"] for r in data.rows] == list(range(40))
    assert sorted(data.train_dataset["index"]) == list(range(40))
    for record, row in zip(data.rows, source):
        start, end = record["noise_span"]
        assert record["question"] == row["question"]
        assert record["noisy_question"][:start] + record["noisy_question"][end:] == row["question"]
        assert record["noisy_question"][start:end].strip() == noise_sentence(row["question"], "sd", 0, record["index"])
        assert record["math_spans"] == math_spans(record["noisy_question"])
    for row in data.train_dataset:
        assert row["prompt"] == f"Question: {data.rows[row['index']]['noisy_question']}\nAnswer:"
    written = read_jsonl(data.write_noisy(tmp_path / "noisy" / "sd.jsonl"))
    assert written == [{**r, "noise_span": list(r["noise_span"]), "math_spans": [list(s) for s in r["math_spans"]]}
                       for r in data.rows]
    # keyed by the source index: fewer rows, or another split seed, give the same noise per row
    fewer = _module(noise="sd", val_size=0.5, seed=9, num_samples=15)
    fewer.setup("fit")
    assert fewer.rows == data.rows[:15]


def test_clean_rows_have_no_noise_tokens():
    data = _module(noise="clean", val_size=0, num_samples=12)
    data.setup("fit")
    assert all(r["noise_span"] is None and r["noisy_question"] == r["question"] for r in data.rows)
    assert all(2 not in row["token_class"] and 1 in row["token_class"] for row in data.train_dataset)


def test_validate_only_with_val_size_one_and_prompt_only_predict_batches():
    data = _module(path=str(TINY), split="test", noise="rcs", num_samples=None, eval_batch_size=8,
                   val_size=1.0, predict_content="prompts")
    data.setup("validate")
    assert len(data.val_dataset) == 200 and sorted(data.val_dataset["index"]) == list(range(200))
    with pytest.raises(DataError, match=r"val_size: 1\.0 makes every row a validation row.*val_size below 1\.0"):
        data.train_dataloader()
    batch = next(iter(data.val_dataloader()))
    assert batch["token_class"].shape == batch["labels"].shape == (8, batch["input_ids"].shape[1])
    data.setup("predict")
    tokenizer = load_tokenizer(TOKENIZER)
    batch = next(iter(data.predict_dataloader()))
    mask = batch["attention_mask"].bool()
    assert "labels" not in batch and batch["token_class"].shape == batch["input_ids"].shape
    assert (batch["token_class"][~mask] == -1).all() and (~mask[:, 0]).any() and mask[:, -1].all()  # left padded
    for ids, classes, index in zip(batch["input_ids"], batch["token_class"], batch["index"]):
        record = data.rows[int(index)]
        start, end = record["noise_span"]
        noise_ids = ids[classes == 2]
        assert tokenizer.decode(noise_ids).strip() == record["noisy_question"][start:end].strip()
        assert tokenizer.decode(ids[classes >= 0], skip_special_tokens=True).endswith("Answer:")
    # an integer val_size of 1 is one row, not every row
    one = _module(val_size=1, num_samples=10)
    one.setup("fit")
    assert len(one.val_dataset) == 1 and len(one.train_dataset) == 9


def test_invalid_arguments():
    with pytest.raises(DataError, match="unknown noise type 'loud'"):
        _module(noise="loud")
    with pytest.raises(DataError, match="format: qa"):
        _module(format="text")


def test_normalized_single_sentence_rows_and_templated_queries(tmp_path):
    rows = [{"question": "Mia  has 12 apples and buys 3 more,\nso how many apples does she have?",
             "answer": "12 + 3 = 15\n#### 15"},
            {"question": "Leo has 4 pens.   He buys 2 more pens. How many pens does Leo have?",
             "answer": "4 + 2 = 6\n#### 6"}]
    write_jsonl(tmp_path / "messy.jsonl", rows)
    queries = [{"prompt": "Question: Ava has 7 cards. How many cards?\nAnswer:", "generated": " 7 - 0 = 7\n#### 7"}]
    write_jsonl(tmp_path / "generated.jsonl", queries)
    data = _module(path=str(tmp_path / "messy.jsonl"), noise="sd", normalize=True, val_size=0,
                   query_path=str(tmp_path / "generated.jsonl"))
    data.setup("fit")
    first, second = data.rows
    assert first["question"] == "Mia has 12 apples and buys 3 more, so how many apples does she have?"
    assert first["noise_span"][0] == 0 and first["noisy_question"].endswith(" " + first["question"])  # no boundary
    assert second["noise_span"][0] == len("Leo has 4 pens.")
    tokenizer = load_tokenizer(TOKENIZER)
    for row in data.train_dataset:
        record = data.rows[row["index"]]
        start, end = record["noise_span"]
        noise = [token for token, c in zip(row["input_ids"], row["token_class"]) if c == 2]
        assert tokenizer.decode(noise).strip() == record["noisy_question"][start:end].strip()
    # already templated prompts (a GenerationWriter file): no recorded noise, math from the text
    query = next(iter(data.query_dataloader()))
    classes, ids = query["token_class"][0].tolist(), query["input_ids"][0].tolist()
    assert 2 not in classes
    math = [tokenizer.decode([t]).strip() for t, c in zip(ids, classes) if c == 1]
    assert math == ["7", "7", "-", "0", "=", "7", "7"]


def test_hub_path_is_offline_with_a_clear_error():
    with pytest.raises(DataError, match="openai/gsm8k"):
        NoisyGSM8KDataModule(tokenizer=TOKENIZER).prepare_data()
