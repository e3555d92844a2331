"""The looped transformer and the algorithmic data it trains on (issue 5 groundwork)."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer

from lit_attrib.data.algorithmic import EOS, EQUALS, PLUS, AlgorithmicDataModule, addition_row
from lit_attrib.errors import DataError
from lit_attrib.modules.looped import LoopedTransformerModule
from lit_attrib.ops import IGNORE_INDEX
from lit_attrib.engine.tracking import LayerTracker, find_layers


def test_addition_rows_hold_the_reversed_sum():
    ids, labels = addition_row(57, 68, 2)
    assert ids == [5, 7, PLUS, 6, 8, EQUALS, 5, 2, 1, EOS]  # 125 least significant digit first
    assert labels == [IGNORE_INDEX] * 6 + [5, 2, 1, EOS]
    data = AlgorithmicDataModule(digits=2, num_train=40, num_val=10)
    data.setup("fit")
    assert [r["index"] for r in data.rows] == list(range(50))
    assert len({tuple(r["input_ids"]) for r in data.rows}) == 50  # no validation row is a training row
    with pytest.raises(DataError, match="do not fit"):
        AlgorithmicDataModule(task="parity", digits=3, num_train=8, num_val=1)


def test_the_block_is_used_once_per_loop_and_the_readout_once():
    module = LoopedTransformerModule(vocab_size=14, d_model=16, n_heads=2, d_ff=32, n_loops=3)
    layers = find_layers(module, ["block.*_proj", "head"])
    tracker = LayerTracker(layers)
    with tracker:
        module(torch.randint(0, 14, (2, 7)))
    assert {name: tracker.uses[name] for name in layers} == {**{n: 3 for n in layers if n != "head"}, "head": 1}


def test_weights_are_tied_across_loops_and_padding_does_not_leak():
    module = LoopedTransformerModule(vocab_size=14, d_model=16, n_heads=2, d_ff=32, n_loops=2).double()
    ids = torch.randint(0, 13, (1, 6))
    padded = torch.cat([ids, torch.full((1, 3), 13)], 1)
    mask = torch.cat([torch.ones(1, 6), torch.zeros(1, 3)], 1).long()
    torch.testing.assert_close(module(padded, mask)[:, :6], module(ids), rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_it_learns_addition(tmp_path):
    data = AlgorithmicDataModule(digits=2, num_train=800, num_val=100, batch_size=32, seed=0)
    module = LoopedTransformerModule(vocab_size=data.vocab_size, d_model=64, n_heads=4, d_ff=128, n_loops=3,
                                     learning_rate=3e-3, warmup_steps=20)
    data.setup("fit")
    batch = next(iter(data.val_dataloader()))
    before = float(module.per_example_loss(batch).mean())
    Trainer(accelerator="cpu", max_epochs=8, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, default_root_dir=tmp_path).fit(module, data)
    after = float(module.per_example_loss(batch).mean())
    assert after < before / 3, (before, after)
