"""Tokenizers: any Hugging Face tokenizer by hub id or path, plus a tiny offline BPE for demos and tests."""

from __future__ import annotations

import functools
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from lit_attrib.errors import DataError
from lit_attrib.hub import load_from_hub_or_path

__all__ = ["load_tokenizer", "train_bpe_tokenizer"]

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 768) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` (deterministic for the same texts and size).

    Byte-level BPE can encode any string, so a model trained with it never meets an unknown token.
    """
    tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)


@functools.lru_cache(maxsize=8)
def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """Load a tokenizer by hub id or local directory, cached per process.

    A tokenizer without a padding token (Llama, GPT-2) pads with its end-of-sequence token; padding
    never carries loss, so the choice does not change any result.

    Raises:
        DataError: the path does not exist or the hub id cannot be fetched.
    """
    tokenizer = load_from_hub_or_path(name, AutoTokenizer.from_pretrained, what="tokenizer", error=DataError)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise DataError(f"tokenizer '{name}' has neither a pad nor an eos token; add one with add_special_tokens")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
