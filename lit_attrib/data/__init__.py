"""LightningDataModules, sources and tokenizers."""

from lit_attrib.data.algorithmic import AlgorithmicDataModule
from lit_attrib.data.collate import CausalLMCollator
from lit_attrib.data.gsm8k import NoisyGSM8KDataModule
from lit_attrib.data.memorization import MemorizationDataModule
from lit_attrib.data.multiple_choice import MultipleChoiceDataModule
from lit_attrib.data.sources import load_source
from lit_attrib.data.text import TextDataModule, normalize_text
from lit_attrib.data.tofu import TofuDataModule
from lit_attrib.data.tokenizer import load_tokenizer, train_bpe_tokenizer

__all__ = [
    "AlgorithmicDataModule", "CausalLMCollator", "MemorizationDataModule", "MultipleChoiceDataModule", "NoisyGSM8KDataModule", "TextDataModule", "TofuDataModule", "load_source", "load_tokenizer", "normalize_text",
    "train_bpe_tokenizer",
]
