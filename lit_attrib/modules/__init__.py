"""LightningModules: fine-tuning and analysis passes."""

from lit_attrib.modules.causal_lm import SCHEDULERS, CausalLMModule
from lit_attrib.modules.curvature_edit import CurvatureEditModule
from lit_attrib.modules.evaluation import EvalModule
from lit_attrib.modules.loading import TESTED_MODEL_TYPES, build_causal_lm
from lit_attrib.modules.looped import LoopedTransformerModule

__all__ = [
    "SCHEDULERS", "TESTED_MODEL_TYPES", "CausalLMModule", "CurvatureEditModule", "EvalModule",
    "LoopedTransformerModule",
    "build_causal_lm",
]
