"""Pure tensor math (no Lightning imports): where lit_attrib's correctness lives."""

from lit_attrib.ops.loss import IGNORE_INDEX, loss_mask, token_nll

__all__ = ["IGNORE_INDEX", "loss_mask", "token_nll"]
