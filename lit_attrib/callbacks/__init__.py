"""Lightning callbacks: orchestration only (stages, ranks, logging, state, files)."""

from lit_attrib.callbacks.attention_capture import AttentionCaptureCallback
from lit_attrib.callbacks.generation_writer import GenerationWriter
from lit_attrib.callbacks.gradient_index import GradientIndexCallback
from lit_attrib.callbacks.influence import InfluenceCallback
from lit_attrib.callbacks.kfac_collector import KFACCollectorCallback
from lit_attrib.callbacks.memorized_set import MemorizedSetCallback
from lit_attrib.callbacks.sketched_grad import SketchedGradCallback
from lit_attrib.callbacks.token_influence import TokenInfluenceCallback
from lit_attrib.callbacks.training_monitor import TrainingMonitor

__all__ = ["AttentionCaptureCallback", "GenerationWriter", "GradientIndexCallback", "InfluenceCallback", "KFACCollectorCallback", "MemorizedSetCallback", "SketchedGradCallback", "TokenInfluenceCallback", "TrainingMonitor"]
