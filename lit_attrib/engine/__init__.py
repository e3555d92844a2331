"""The analysis engine: everything between a user's LightningModule and the math in ``ops``.

- :mod:`~lit_attrib.engine.task`: the user contract (:class:`Task`), detected for lit_attrib's own
  modules and for modules wrapping a Hugging Face causal LM;
- :mod:`~lit_attrib.engine.tracking`: which layers an analysis watches, and hooks that hand every use's
  activations ``a`` and output gradients ``g`` to it;
- :mod:`~lit_attrib.engine.gradient_pass`: an analysis's own forward/backward, and the scale from a
  training loss's gradient to each example's summed loss in ``fit``;
- :mod:`~lit_attrib.engine.data`: data handed to a callback directly, example ids, ``predict`` without
  a ``predict_step``.

A callback says *when* and *where*; an accumulator in ``ops`` says *what*; the engine connects them.
"""

from lit_attrib.engine.data import DataSource, ExampleIds, ensure_predict_step, release_predict_step, resolve_loader
from lit_attrib.engine.gradient_pass import TrainLossScale, own_backward
from lit_attrib.engine.task import CausalLMTask, HFCausalLMTask, Task, resolve_task
from lit_attrib.engine.tracking import LayerTracker, find_layers, find_parameter_modules

__all__ = [
    "CausalLMTask",
    "DataSource",
    "ExampleIds",
    "HFCausalLMTask",
    "LayerTracker",
    "Task",
    "TrainLossScale",
    "ensure_predict_step",
    "find_layers",
    "find_parameter_modules",
    "own_backward",
    "release_predict_step",
    "resolve_loader",
    "resolve_task",
]
