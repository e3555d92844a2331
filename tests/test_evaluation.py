"""The evaluation harness: answer extraction, Pass@1 and multiple-choice accuracy against plain references.

References are independent of the code under test: a table of crafted generations for extraction,
hand counts for the metrics, a cache-less greedy loop on one unpadded prompt at a time for generation,
and ``F.cross_entropy`` on one unpadded item x choice row at a time for multiple choice. DDP with 2 CPU
processes must give the same results files as one process.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import REPO, TINY_CONFIGS, TOKENIZER, run_cli
from lightning.pytorch import Trainer

from lit_attrib.data import MultipleChoiceDataModule, TextDataModule, load_tokenizer
from lit_attrib.errors import ArtifactError, ConfigError, DataError, ModelError
from lit_attrib.io import read_jsonl, write_jsonl
from lit_attrib.metrics import (
    MultipleChoiceAccuracy,
    PassAtOne,
    extract_answer,
    grade_answers,
    multiple_choice_accuracy,
    normalize_number,
    pass_at_one,
)
from lit_attrib.modules import EvalModule

CONFIG = TINY_CONFIGS["llama"]
MC_TINY = REPO / "data" / "mc_tiny" / "mc.jsonl"
NAMES = ["Tom", "Ann", "Bea", "Kim", "Lou", "Max", "Ned", "Ola"]
THINGS = ["apples", "pears", "cats", "books", "pens", "cups", "hats", "eggs"]


# ----------------------------------------------------------------------------------- extraction
@pytest.mark.parametrize(("text", "expected"), [
    ("#### 1,234", "1234"),
    ("The answer is $5.00.", "5"),
    ("no number here", None),
    ("", None),
    ("-3", "-3"),
    ("It is −12 degrees", "-12"),
    ("#### 7\nbut 9 later", "7"),
    ("First 3, then 4, so 12 in all", "12"),
    ("She pays 3.50 dollars", "3.5"),
    ("about 0.250", "0.25"),
    ("7.0 hours", "7"),
    ("**42**.", "42"),
    ("a 3/4 share", "0.75"),
    ("2/6 of it", "1/3"),
    ("the range 3-4", "4"),
    ("H2O has no answer", None),
    ("1,000,000 people", "1000000"),
    ("#### \nthe total was 8", "8"),
    ("He has 0+2=2.\n#### 2", "2"),
    ("#### -0", "0"),
    ("123456789012345678901234567890.125 exactly", "123456789012345678901234567890.125"),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("3.50", "3.5"), ("7.0", "7"), ("-4", "-4"), ("1,234", "1234"), ("$1,234.00.", "1234"), ("(72)", "72"),
    ("50%", "50"), ("-$5", "-5"), ("3/4", "0.75"), (".5", "0.5"), ("0", "0"), ("12 apples", None), ("1,23", None),
    ("abc", None), (None, None),
])
def test_normalize_number(text, expected):
    assert normalize_number(text) == expected


# -------------------------------------------------------------------------------------- metrics
def test_pass_at_one_equals_a_hand_count():
    predictions = ["so #### 72", "The answer is $1,234.00.", "no number here", "#### 7\nbut 9 later", "3.50",
                   "it is 5 or 6"]
    references = ["... #### 72", "#### 1,234", "#### 5", "#### 9", "#### 3.5", "#### 5"]
    correct = [True, True, False, False, True, False]
    graded = grade_answers(predictions, references)
    assert [row["correct"] for row in graded] == correct
    assert [row["answer"] for row in graded] == ["72", "1234", None, "7", "3.5", "6"]
    assert pass_at_one(predictions, references) == 3 / 6
    metric = PassAtOne()
    metric.update(predictions[:4], references[:4])
    metric.update(predictions[4:], references[4:])
    assert metric.compute().item() == 3 / 6 and int(metric.correct) == 3 and int(metric.total) == 6
    assert pass_at_one([], []) == 0.0
    with pytest.raises(DataError, match="has no number"):
        pass_at_one(["5"], ["no answer given"])


def test_multiple_choice_accuracy_equals_a_hand_count():
    inf = float("-inf")
    scores = torch.tensor([[-1.0, -2.0, -3.0, -4.0],   # predicts 0
                           [-5.0, -1.0, inf, inf],     # 2 choices: predicts 1
                           [-2.0, -2.0, -3.0, inf],    # tie: the lowest index, 0
                           [-9.0, -8.0, -7.0, -1.0],   # predicts 3
                           [-1.0, -1.0, -1.0, -1.0]])  # all tied: 0
    answers = torch.tensor([0, 0, 0, 2, 1])
    assert multiple_choice_accuracy(scores, answers).item() == 2 / 5
    metric = MultipleChoiceAccuracy()
    metric.update(scores[:2], answers[:2])
    metric.update(scores[2:], answers[2:])
    assert metric.compute().item() == 2 / 5 and int(metric.total) == 5
    with pytest.raises(ValueError, match="missing"):
        multiple_choice_accuracy(scores[1:2], torch.tensor([2]))
    with pytest.raises(ValueError, match=r"scores \(items, choices\)"):
        multiple_choice_accuracy(scores[0], answers)


# ----------------------------------------------------------------------------------- generation
def _prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"  # TextDataModule's default prompt_template


def _prompt_ids(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor([[tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]])


@torch.no_grad()
def _greedy_loop(model, ids: torch.Tensor, max_new_tokens: int, eos: int) -> list[int]:
    """Cache-less greedy decoding of one unpadded prompt ``(1, P)``: argmax appended until eos."""
    new = []
    for _ in range(max_new_tokens):
        token = int(model(input_ids=ids).logits[0, -1].argmax())
        if token == eos:
            break
        new.append(token)
        ids = torch.cat([ids, torch.tensor([[token]])], 1)
    return new


@torch.no_grad()
def _peaked(model, tokenizer, prompts: list[str]) -> None:
    """Scale the lm_head ×30 (no near-tie argmaxes, so padding cannot flip a greedy token) and lift the
    digit tokens toward the mean final hidden state, so that some generations hold numbers."""
    model.lm_head.weight.mul_(30)
    hidden = torch.cat([model(input_ids=_prompt_ids(tokenizer, p), output_hidden_states=True).hidden_states[-1][0]
                        for p in prompts])
    direction = hidden.mean(0) / hidden.mean(0).norm()
    digits = tokenizer.convert_tokens_to_ids([str(d) for d in range(10)])
    model.lm_head.weight[digits] += 60 * direction


def _gsm_rows(n: int = 8) -> list[dict]:
    return [{"question": f"{name} has {i} {thing} and buys {7 * i + 2} more. How many {thing} now?",
             "answer": f"{name} has {i}+{7 * i + 2}={8 * i + 2} {thing}.\n#### {8 * i + 2}"}
            for i, (name, thing) in enumerate(zip(NAMES[:n], THINGS[:n]))]


def _gsm_setup(tmp_path, max_new_tokens: int = 6):
    """A peaked tiny Llama, the reference loop's generation of every row, and a GSM-style jsonl whose
    references agree with the loop's answer on every third row."""
    tokenizer = load_tokenizer(str(TOKENIZER))
    module = EvalModule(config=CONFIG, tokenizer=str(TOKENIZER), max_new_tokens=max_new_tokens,
                        output_dir=str(tmp_path / "eval"))
    module.configure_model()
    rows = _gsm_rows()
    _peaked(module.model, tokenizer, [_prompt(row["question"]) for row in rows])
    loop = [tokenizer.decode(_greedy_loop(module.model, _prompt_ids(tokenizer, _prompt(row["question"])),
                                          max_new_tokens, tokenizer.eos_token_id), skip_special_tokens=True).strip()
            for row in rows]
    for i, row in enumerate(rows):
        if i % 3 == 0 and extract_answer(loop[i]) is not None:
            row["answer"] = f"The model's own answer.\n#### {extract_answer(loop[i])}"
    write_jsonl(tmp_path / "gsm.jsonl", rows)
    return module, rows, loop


def test_generation_pass_at_one_matches_a_greedy_loop(tmp_path):
    """Whole-example batches (labels on the answer) and prompt-only batches give the loop's generations,
    and Pass@1 is the hand count of the loop's extracted answers against the references."""
    module, rows, loop = _gsm_setup(tmp_path)
    data = TextDataModule(path=str(tmp_path / "gsm.jsonl"), tokenizer=str(TOKENIZER), val_size=7, eval_batch_size=3,
                          predict_split="val")
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    returned = trainer.validate(module, datamodule=data)
    predictions = read_jsonl(tmp_path / "eval" / "predictions.jsonl")
    indices = [row["index"] for row in predictions]
    assert len(indices) == 7 and indices == sorted(indices)
    correct = [extract_answer(loop[i]) is not None and extract_answer(loop[i]) == extract_answer(rows[i]["answer"])
               for i in indices]
    assert 0 < sum(correct) < len(correct)  # a non-trivial fraction
    for row, right in zip(predictions, correct):
        i = row["index"]
        assert row["generated"] == loop[i] and row["answer"] == extract_answer(loop[i]) and row["correct"] == right
        assert row["prompt"] == _prompt(rows[i]["question"]) and row["reference"] == rows[i]["answer"]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert (metrics["task"], metrics["metric"], metrics["count"]) == ("generation", "pass@1", 7)
    assert metrics["correct"] == sum(correct) and metrics["value"] == sum(correct) / 7
    assert returned[0]["eval/pass@1"] == pytest.approx(sum(correct) / 7)
    # prompt-only batches (left-padded, no labels) of the same rows: the same results (the module replaces its own)
    data.setup("predict")
    trainer.validate(module, dataloaders=data.predict_dataloader())
    assert read_jsonl(tmp_path / "eval" / "predictions.jsonl") == predictions
    # stop strings end a generation before them
    stopped = EvalModule(config=CONFIG, tokenizer=str(TOKENIZER), max_new_tokens=6, stop=["5"],
                         output_dir=str(tmp_path / "stopped"))
    stopped.configure_model()
    stopped.load_state_dict(module.state_dict())
    trainer.validate(stopped, datamodule=data)
    generated = {row["index"]: row["generated"] for row in read_jsonl(tmp_path / "stopped" / "predictions.jsonl")}
    assert generated == {i: loop[i].split("5")[0].strip() for i in indices}


def test_models_from_a_checkpoint_and_a_saved_folder_are_the_same(tmp_path):
    """A CausalLMModule checkpoint (model named by its hyperparameters) and its model's save_pretrained
    folder evaluate alike."""
    from lit_attrib.modules import CausalLMModule

    trained = CausalLMModule(config=CONFIG, tokenizer=str(TOKENIZER), init_seed=3)
    trained.configure_model()
    torch.save({"state_dict": trained.state_dict(), "hyper_parameters": dict(trained.hparams)}, tmp_path / "m.ckpt")
    trained.model.save_pretrained(tmp_path / "saved")
    load_tokenizer(str(TOKENIZER)).save_pretrained(tmp_path / "saved")
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    results = []
    for source in ({"checkpoint": str(tmp_path / "m.ckpt")}, {"pretrained": str(tmp_path / "saved")}):
        folder = tmp_path / next(iter(source))
        data = MultipleChoiceDataModule(tokenizer=str(TOKENIZER), path=str(MC_TINY), num_samples=5)
        trainer.validate(EvalModule(task="multiple_choice", output_dir=str(folder), **source), datamodule=data)
        results.append(read_jsonl(folder / "predictions.jsonl"))
    assert results[0] == results[1] and len(results[0]) == 5


def test_crafted_generations_are_graded_and_a_number_less_one_is_wrong(tmp_path, monkeypatch):
    """Known generations injected through the whole validate path: extraction edge cases, no number."""
    rows = [{"question": f"q{i}", "answer": answer} for i, answer in
            enumerate(["#### 1,234", "#### 5", "#### -3", "#### 7", "#### 8", "#### 3.5", "#### 10", "#### 0"])]
    generated = ["The answer is $1,234.00.", "no number here", "-3", "#### 7\nbut 9 later", "8 apples, then 9",
                 "3.50 dollars", "", "#### 0"]
    write_jsonl(tmp_path / "crafted.jsonl", rows)
    module = EvalModule(config=CONFIG, tokenizer=str(TOKENIZER), output_dir=str(tmp_path / "eval"), tag="crafted")
    by_prompt = {_prompt(row["question"]): text for row, text in zip(rows, generated)}
    tokenizer = load_tokenizer(str(TOKENIZER))
    monkeypatch.setattr(module, "_generate", lambda input_ids, attention_mask: [
        by_prompt[text] for text in tokenizer.batch_decode(input_ids, skip_special_tokens=True)])
    data = TextDataModule(path=str(tmp_path / "crafted.jsonl"), tokenizer=str(TOKENIZER), val_size=7,
                          eval_batch_size=4)
    Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False).validate(module, datamodule=data)
    predictions = read_jsonl(tmp_path / "eval" / "predictions.jsonl")
    hand = {0: True, 1: False, 2: True, 3: True, 4: False, 5: True, 6: False, 7: True}
    assert {row["index"]: row["correct"] for row in predictions} == {row["index"]: hand[row["index"]]
                                                                     for row in predictions}
    assert [row["answer"] for row in predictions if row["index"] in (1, 6)] == [None] * sum(
        row["index"] in (1, 6) for row in predictions)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    expected = sum(hand[row["index"]] for row in predictions)
    assert metrics["tag"] == "crafted" and metrics["correct"] == expected and metrics["value"] == expected / 7


# ------------------------------------------------------------------------------ multiple choice
@torch.no_grad()
def _reference_scores(model, tokenizer, item: dict, score: str, normalize: str) -> list[float]:
    """One unpadded forward per choice, ``F.cross_entropy`` summed over the continuation's tokens."""
    letters = "ABCDEFGH"
    prompt = item["question"] + "\n" + "\n".join(f"{letters[i]}. {c}" for i, c in enumerate(item["choices"]))
    prompt += "\nAnswer:"
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    scores = []
    for i, choice in enumerate(item["choices"]):
        continuation = f" {letters[i]}" if score == "letter" else f" {choice}"
        continuation_ids = tokenizer(prompt + continuation, add_special_tokens=False)["input_ids"][len(prompt_ids):]
        ids = torch.tensor([[tokenizer.bos_token_id] + prompt_ids + continuation_ids])
        logits = model(input_ids=ids).logits[0]
        n = len(continuation_ids)
        nll = F.cross_entropy(logits[-n - 1:-1].double(), ids[0, -n:], reduction="sum").item()
        scores.append(-nll / (n if normalize == "tokens" else 1))
    return scores


@pytest.mark.parametrize(("score", "normalize"), [("letter", "none"), ("text", "tokens")])
def test_multiple_choice_accuracy_matches_a_per_choice_loop(tmp_path, score, normalize):
    module = EvalModule(task="multiple_choice", config=CONFIG, tokenizer=str(TOKENIZER),
                        output_dir=str(tmp_path / "eval"))
    module.configure_model()
    with torch.no_grad():
        module.model.lm_head.weight.mul_(30)
    data = MultipleChoiceDataModule(tokenizer=str(TOKENIZER), path=str(MC_TINY), score=score, normalize=normalize,
                                    batch_size=3)
    returned = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False).validate(
        module, datamodule=data)
    items = read_jsonl(MC_TINY)
    tokenizer = load_tokenizer(str(TOKENIZER))
    predictions = read_jsonl(tmp_path / "eval" / "predictions.jsonl")
    assert [row["index"] for row in predictions] == list(range(len(items)))
    hand = 0
    for row, item in zip(predictions, items):
        reference = _reference_scores(module.model, tokenizer, item, score, normalize)
        predicted = max(range(len(reference)), key=lambda i: (reference[i], -i))  # ties: the lowest index
        assert row["scores"] == pytest.approx(reference, rel=1e-5, abs=1e-5)
        assert (row["predicted"], row["answer"]) == (predicted, item["answer"])
        hand += predicted == item["answer"]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert (metrics["correct"], metrics["count"], metrics["value"]) == (hand, len(items), hand / len(items))
    assert returned[0]["eval/accuracy"] == pytest.approx(hand / len(items))


def test_bad_multiple_choice_items_name_the_row(tmp_path):
    rows = read_jsonl(MC_TINY)[:4]
    rows[1]["choices"][2] = ""
    rows[3]["answer"] = 7
    write_jsonl(tmp_path / "bad.jsonl", rows)
    data = MultipleChoiceDataModule(tokenizer=str(TOKENIZER), path=str(tmp_path / "bad.jsonl"))
    with pytest.raises(DataError, match=r"row 1 of .*choice 2 \(C\) is ''.*\n.*row 3 of .*answer is 7"):
        data.setup("validate")
    letters = read_jsonl(MC_TINY)[:3]
    for row in letters:
        row["answer"] = "ABCD"[row["answer"]]
    write_jsonl(tmp_path / "letters.jsonl", letters)
    data = MultipleChoiceDataModule(tokenizer=str(TOKENIZER), path=str(tmp_path / "letters.jsonl"))
    data.setup("validate")
    assert [item["answer"] for item in data.items] == [row["answer"] for row in read_jsonl(MC_TINY)[:3]]


def test_existing_results_stop_the_run_before_any_work(tmp_path):
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "metrics.json").write_text("{}")
    module = EvalModule(task="multiple_choice", config=CONFIG, tokenizer=str(TOKENIZER),
                        output_dir=str(tmp_path / "eval"))
    data = MultipleChoiceDataModule(tokenizer=str(TOKENIZER), path=str(MC_TINY), num_samples=3)
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    with pytest.raises(ArtifactError, match="metrics.json already exists.*overwrite=true"):
        trainer.validate(module, datamodule=data)
    assert module.model is None and (tmp_path / "eval" / "metrics.json").read_text() == "{}"
    with pytest.raises(ModelError, match="multiple-choice batches"):  # the wrong data for the task
        trainer.validate(EvalModule(config=CONFIG, tokenizer=str(TOKENIZER), output_dir=str(tmp_path / "g")),
                         datamodule=data)
    with pytest.raises(ConfigError, match="give the model"):  # bad arguments are ConfigErrors everywhere
        EvalModule(task="multiple_choice")


# ------------------------------------------------------------------------------------------ DDP
@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("task", ["generation", "multiple_choice"])
def test_two_process_ddp_results_equal_one_process(tmp_path, task):
    """2 CPU processes (ddp, gloo) and 1 process write the same metrics.json values and predictions.jsonl,
    for an odd number of examples; results go to the default folder under the run's log_dir."""
    if task == "generation":
        module, _, _ = _gsm_setup(tmp_path)
        data = {"class_path": "lit_attrib.data.TextDataModule", "init_args": {
            "path": str(tmp_path / "gsm.jsonl"), "tokenizer": str(TOKENIZER), "val_size": 7, "eval_batch_size": 2}}
        model_args = {"max_new_tokens": 6}
    else:
        module = EvalModule(task="multiple_choice", config=CONFIG, tokenizer=str(TOKENIZER))
        module.configure_model()
        with torch.no_grad():
            module.model.lm_head.weight.mul_(30)
        data = {"class_path": "lit_attrib.data.MultipleChoiceDataModule", "init_args": {
            "path": str(MC_TINY), "tokenizer": str(TOKENIZER), "num_samples": 9, "batch_size": 2}}
        model_args = {}
    # a CausalLMModule-like checkpoint that names its own model: no pretrained/config given below
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": {"config": CONFIG, "init_seed": 0}},
               tmp_path / "model.ckpt")
    results = {}
    for processes in (1, 2):
        root = tmp_path / f"run_{processes}"
        config = {
            "seed_everything": 0,
            "trainer": {"accelerator": "cpu", "devices": processes, "strategy": "ddp" if processes > 1 else "auto",
                        "logger": False, "enable_progress_bar": False, "default_root_dir": str(root)},
            "model": {"class_path": "lit_attrib.modules.EvalModule", "init_args": {
                "task": task, "checkpoint": str(tmp_path / "model.ckpt"), "tag": f"{processes} processes",
                **model_args}},
            "data": data,
        }
        if processes == 1:  # in-process: the same module class and data, half the start-up time of the CLI
            one = EvalModule(task=task, checkpoint=str(tmp_path / "model.ckpt"), tokenizer=str(TOKENIZER),
                             output_dir=str(root / "eval"), **model_args)
            datamodule = (TextDataModule if task == "generation" else MultipleChoiceDataModule)(**data["init_args"])
            Trainer(**config["trainer"]).validate(one, datamodule=datamodule)
        else:
            path = tmp_path / "eval_2.yaml"
            path.write_text(yaml.safe_dump(config))
            result = run_cli("validate", "-c", str(path))
            assert result.returncode == 0, result.stderr[-3000:]
        results[processes] = (json.loads((root / "eval" / "metrics.json").read_text()),
                              read_jsonl(root / "eval" / "predictions.jsonl"))
    (metrics_1, rows_1), (metrics_2, rows_2) = results[1], results[2]
    assert metrics_2["count"] == metrics_1["count"] == (7 if task == "generation" else 9)
    assert (metrics_2["correct"], metrics_2["value"]) == (metrics_1["correct"], metrics_1["value"])
    assert [row["index"] for row in rows_2] == [row["index"] for row in rows_1]
    for one, two in zip(rows_1, rows_2):
        if task == "multiple_choice":  # float32 models: rows padded differently differ in round-off only
            assert two.pop("scores") == pytest.approx(one.pop("scores"), rel=1e-5)
        assert two == one
    if task == "generation":
        assert 0 < metrics_1["correct"] < metrics_1["count"]
    assert not math.isnan(metrics_2["value"])
