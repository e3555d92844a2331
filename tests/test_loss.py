"""The per-example / per-token loss contract against an explicit F.cross_entropy reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_CONFIGS

from lit_attrib.data import TextDataModule
from lit_attrib.modules import CausalLMModule
from lit_attrib.ops import IGNORE_INDEX, loss_mask, token_nll


def _reference_token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """One F.cross_entropy call per labelled token: the loop the vectorised version must equal."""
    out = torch.zeros(labels.shape, dtype=torch.float64)
    for b in range(labels.shape[0]):
        for t in range(1, labels.shape[1]):
            if labels[b, t] != IGNORE_INDEX:
                out[b, t] = F.cross_entropy(logits[b, t - 1].double().unsqueeze(0), labels[b, t].unsqueeze(0))
    return out


def test_token_nll_matches_loop():
    logits = torch.randn(3, 7, 11, dtype=torch.float64)
    labels = torch.randint(0, 11, (3, 7))
    labels[0, :3] = IGNORE_INDEX
    labels[2, 5:] = IGNORE_INDEX
    got = token_nll(logits, labels)
    torch.testing.assert_close(got.double(), _reference_token_nll(logits, labels))
    assert torch.equal(got != 0, loss_mask(labels))


def test_token_nll_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"logits \(2, 5, 3\) and labels \(2, 4\)"):
        token_nll(torch.zeros(2, 5, 3), torch.zeros(2, 4, dtype=torch.long))


@pytest.fixture(scope="module")
def qa_batch(facts_path, tokenizer_path):
    data = TextDataModule(path=facts_path, tokenizer=tokenizer_path, num_samples=40, val_size=0, batch_size=4)
    data.setup("fit")
    loader = data.train_dataloader()
    return data, next(iter(torch.utils.data.DataLoader(data.train_dataset.select(range(4)), batch_size=4,
                                                       collate_fn=loader.collate_fn)))


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_per_token_and_per_example_loss_match_reference(model_type, qa_batch, tokenizer_path):
    data, batch = qa_batch
    module = CausalLMModule(config=TINY_CONFIGS[model_type], tokenizer=tokenizer_path)
    module.configure_model()
    module.double().eval()
    per_token = module.per_token_loss(batch)
    logits = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    reference = _reference_token_nll(logits, batch["labels"])
    torch.testing.assert_close(per_token.double(), reference)
    torch.testing.assert_close(module.per_example_loss(batch).double(), reference.sum(-1))

    # Prompt and padding positions carry no loss; every answer token (and the closing eos) does.
    for row in range(batch["input_ids"].shape[0]):
        prompt_length = data.train_dataset[row]["prompt_length"]
        length = int(batch["attention_mask"][row].sum())
        assert torch.all(per_token[row, :prompt_length] == 0)
        assert torch.all(per_token[row, length:] == 0)
        assert torch.all(per_token[row, prompt_length:length] > 0)


def test_per_example_loss_ignores_padding(qa_batch, tokenizer_path):
    """An example's loss is the same alone as in a right-padded batch with a longer row."""
    _, batch = qa_batch
    module = CausalLMModule(config=TINY_CONFIGS["llama"], tokenizer=tokenizer_path)
    module.configure_model()
    module.double().eval()
    batched = module.per_example_loss(batch)
    for row in range(batch["input_ids"].shape[0]):
        length = int(batch["attention_mask"][row].sum())
        alone = {key: batch[key][row:row + 1, :length] for key in ("input_ids", "attention_mask", "labels")}
        torch.testing.assert_close(module.per_example_loss(alone), batched[row:row + 1])


def test_per_token_loss_is_float32_under_bf16_autocast(qa_batch, tokenizer_path):
    _, batch = qa_batch
    module = CausalLMModule(config=TINY_CONFIGS["llama"], tokenizer=tokenizer_path)
    module.configure_model()
    module.eval()
    reference = module.per_token_loss(batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = module.per_token_loss(batch)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, reference, atol=0.1, rtol=0.05)
