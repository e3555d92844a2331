"""Lightning callbacks: orchestration only (stages, ranks, logging, state, files)."""

from lit_attrib.callbacks.generation_writer import GenerationWriter
from lit_attrib.callbacks.kfac_collector import KFACCollectorCallback
from lit_attrib.callbacks.training_monitor import TrainingMonitor

__all__ = ["GenerationWriter", "KFACCollectorCallback", "TrainingMonitor"]
