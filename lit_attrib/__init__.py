"""lit_attrib: training-data attribution and analysis of language models with PyTorch Lightning."""

from lit_attrib.callbacks import GenerationWriter, TrainingMonitor
from lit_attrib.data import TextDataModule
from lit_attrib.errors import ArtifactError, DataError, LitAttribError, ModelError, TrainingError
from lit_attrib.modules import CausalLMModule

__version__ = "0.1.0"

__all__ = [
    "ArtifactError",
    "CausalLMModule",
    "DataError",
    "GenerationWriter",
    "LitAttribError",
    "ModelError",
    "TextDataModule",
    "TrainingError",
    "TrainingMonitor",
    "__version__",
]
