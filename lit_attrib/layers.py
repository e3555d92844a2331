"""What lit_attrib knows about a tracked layer, in its linear convention ``y = W a (+ b)``, ``W (out, in)``.

Plain PyTorch (no Lightning, no transformers): ``ops``, ``artifacts`` and the engine all describe layers
with :class:`LayerInfo`. Transformers' GPT-2 ``Conv1D`` (weight stored ``(in, out)``) is recognised by
its class, without importing transformers.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = ["LayerInfo", "is_conv1d", "is_supported", "layer_info"]


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` (GPT-2's linear layer with its weight stored ``(in, out)``)."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers") and hasattr(module, "nf")


def is_supported(module: nn.Module) -> bool:
    """Whether lit_attrib's linear-layer analyses (factors, influence) can track ``module``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


@dataclass(frozen=True)
class LayerInfo:
    """A tracked layer in lit_attrib's linear convention ``y = W a (+ b)``, ``W (out, in)``.

    ``kind`` is ``"linear"`` (``nn.Linear``, weight stored ``(out, in)``), ``"conv1d"`` (transformers'
    GPT-2 ``Conv1D``, weight stored ``(in, out)``), ``"embedding"`` (``out`` = rows, ``in`` = width) or
    ``"other"`` (any other module with parameters of its own; only the sketching callback takes these).
    """

    name: str
    module: nn.Module
    kind: str
    in_features: int
    out_features: int
    has_bias: bool

    @property
    def gradient_shape(self) -> tuple[int, int]:
        """``(out, in + bias)``: the shape of this layer's gradient in the bias-appended layout."""
        return self.out_features, self.in_features + int(self.has_bias)

    def describe(self) -> dict:
        return {"kind": self.kind, "in_features": self.in_features, "out_features": self.out_features,
                "bias": self.has_bias}


def layer_info(name: str, module: nn.Module) -> LayerInfo:
    """The :class:`LayerInfo` of ``module`` named ``name``."""
    if isinstance(module, nn.Embedding):
        return LayerInfo(name, module, "embedding", module.embedding_dim, module.num_embeddings, False)
    if isinstance(module, nn.Linear):
        return LayerInfo(name, module, "linear", module.in_features, module.out_features, module.bias is not None)
    if is_conv1d(module):
        in_features, out_features = module.weight.shape  # Conv1D stores (in, out)
        return LayerInfo(name, module, "conv1d", in_features, out_features, module.bias is not None)
    return LayerInfo(name, module, "other", 0, 0, False)
