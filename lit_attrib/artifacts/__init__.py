"""Artifacts on disk: safetensors tensors + JSON metadata, written atomically, checked when loaded."""

from lit_attrib.artifacts.factors import Factors, factors_exist, load_factors, save_factors

__all__ = ["Factors", "factors_exist", "load_factors", "save_factors"]
