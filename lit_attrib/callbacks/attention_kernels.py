"""Finding a model's attention layers and seeing what its attention kernel receives.

:class:`~lit_attrib.callbacks.attention_capture.AttentionCaptureCallback` needs the maps a
Llama-family model really uses. Two pieces of transformers-specific plumbing live here, apart from
the callback's bookkeeping and from the math in :mod:`lit_attrib.ops.attention`:

- :func:`attention_modules` recognises the self-attention modules of Llama, DiffLlama, Mistral,
  Qwen2/3, OLMo-2 and their kin by their projections, in layer order;
- :func:`capture_kernel_inputs` wraps an entry of transformers' attention-kernel registry
  (``AttentionInterface``: ``sdpa``, ``flash_attention_2``, ...) while it is open, so that every call
  also reports the tensors the kernel received (queries and keys after RoPE and norms, the mask, the
  keyword arguments) and the weights it returned. The kernel's output is unchanged and the registry
  is restored on exit, also when captures nest or end out of order. transformers' source is never
  modified.

Under ``eager`` no interception is needed: the attention module returns the kernel's weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from torch import nn

__all__ = ["attention_modules", "capture_kernel_inputs"]

_ATTENTION_ATTRIBUTES = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "config")


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The self-attention modules of a Llama-family model, in layer order.

    Recognised: modules with ``q_proj``, ``k_proj``, ``v_proj`` and ``o_proj`` projections, a
    ``head_dim`` and a ``config`` (Llama, DiffLlama, Mistral, Qwen2/3, OLMo-2 and their kin).
    """
    found = [(name, module) for name, module in model.named_modules()
             if all(hasattr(module, attr) for attr in _ATTENTION_ATTRIBUTES)]
    return sorted(found, key=lambda item: (getattr(item[1], "layer_idx", None) is None,
                                           getattr(item[1], "layer_idx", 0) or 0))


@contextlib.contextmanager
def capture_kernel_inputs(implementation: str, record: Callable[..., None]) -> Iterator[None]:
    """While open, every call of transformers' ``implementation`` attention kernel (``sdpa``,
    ``flash_attention_2``, ...) also calls ``record(module, query, key, attention_mask, kwargs, weights)``.

    The kernel's output is returned unchanged. The registry entry is restored on exit (also on
    errors); ``eager`` needs no interception (the module returns its weights).

    Args:
        implementation: the key of the kernel in transformers' ``AttentionInterface`` registry (the
            model config's ``_attn_implementation``); an unknown key captures nothing.
        record: called after every kernel call while the capture is open; ``query`` is
            ``(B, H, T, d)``, ``key`` ``(B, H_kv, S, d)``, ``weights`` ``None`` unless the kernel
            returns them.

    Example::

        with capture_kernel_inputs("sdpa", lambda module, q, k, mask, kwargs, w: seen.append(q.shape)):
            model(input_ids)
    """
    from transformers.modeling_utils import AttentionInterface

    mapping = AttentionInterface._global_mapping
    original = mapping.get(implementation)
    if original is None:
        yield
        return

    active = [True]

    def kernel(module, query, key, value, attention_mask, *args, **kwargs):
        output, weights = original(module, query, key, value, attention_mask, *args, **kwargs)
        if active[0]:
            record(module, query, key, attention_mask, kwargs, weights)
        return output, weights

    kernel.lit_attrib_capture = (original, active)
    mapping[implementation] = kernel
    try:
        yield
    finally:
        active[0] = False
        # Restore only our own entry: another capture may have wrapped ours meanwhile. It unwinds on its
        # exit, past every capture that has ended (ours then included), back to the first live entry.
        if mapping.get(implementation) is kernel:
            while hasattr(original, "lit_attrib_capture") and not original.lit_attrib_capture[1][0]:
                original = original.lit_attrib_capture[0]
            mapping[implementation] = original
