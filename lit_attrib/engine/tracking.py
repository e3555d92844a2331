"""Which layers an analysis watches, and the hooks that hand it every use's activations and gradients.

Shared by the curvature, influence and sketching callbacks. Plain PyTorch (no Lightning): hooks
capture a layer's input ``a (B, T, in)`` in the forward pass and the gradient ``g (B, T, out)`` of its
output in the backward pass, for **every** call of the layer in one forward (weight tying, looped
blocks): use ``s`` of a layer is its ``s``-th call since :meth:`LayerTracker.reset`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from lit_attrib.errors import ConfigError, ModelError
from lit_attrib.layers import LayerInfo, is_supported, layer_info

__all__ = ["LayerInfo", "LayerTracker", "exclusive", "find_layers", "find_parameter_modules", "layer_info", "observed_by"]

def find_layers(root: nn.Module, patterns: Iterable[str]) -> dict[str, LayerInfo]:
    """The modules of ``root`` whose names match any fnmatch ``patterns``, in model order.

    Raises:
        ModelError: a pattern matches nothing (the message lists the supported layers that exist), or
            matches a module of a type lit_attrib cannot track.
    """
    patterns = list(patterns)
    if not patterns:
        raise ModelError("target_modules is empty; give fnmatch patterns such as '*.mlp.*_proj'")
    named = [(name, module) for name, module in root.named_modules() if name]
    selected: dict[str, LayerInfo] = {}
    problems = []
    for pattern in patterns:
        matches = [(name, module) for name, module in named if fnmatch.fnmatchcase(name, pattern)]
        if not matches:
            candidates = [name for name, module in named if is_supported(module)]
            shown = ", ".join(candidates[:12]) + (f", … ({len(candidates)} in all)" if len(candidates) > 12 else "")
            problems.append(f"pattern '{pattern}' matches no module; supported layers are named like: {shown}")
            continue
        supported = [(name, module) for name, module in matches if is_supported(module)]
        # Containers ("*.mlp") and parameter-free leaves (activations, dropout) are skipped; a leaf with
        # weights of another type (a norm, an embedding) is an error: its curvature would be missing.
        unsupported = [f"{name} ({type(module).__name__})" for name, module in matches
                       if not is_supported(module) and next(module.children(), None) is None
                       and next(module.parameters(recurse=False), None) is not None]
        if unsupported:
            problems.append(f"pattern '{pattern}' matches modules of unsupported types: {unsupported[:8]} "
                            f"(supported: nn.Linear, transformers Conv1D); narrow the pattern")
        elif not supported:
            problems.append(f"pattern '{pattern}' matches only containers {[n for n, _ in matches][:8]}; "
                            f"add a suffix such as '.*_proj' to reach their linear layers")
        for name, module in supported:
            selected.setdefault(name, layer_info(name, module))
    if problems:
        raise ModelError("cannot select the layers to track:\n  - " + "\n  - ".join(problems))
    order = {name: i for i, (name, _) in enumerate(named)}
    return dict(sorted(selected.items(), key=lambda item: order[item[0]]))


def find_parameter_modules(root: nn.Module, patterns: Iterable[str] | None) -> dict[str, LayerInfo]:
    """Every module with parameters of its own that ``patterns`` select, in model order.

    A pattern naming a container (``"block"``, ``"model.layers.*"``) selects all modules inside it;
    ``None`` selects the whole model. Unlike :func:`find_layers`, any module type is returned (kind
    ``"other"`` where it is neither linear nor an embedding); callers decide what they support.

    Raises:
        ModelError: a pattern matches nothing (the message lists module names that exist).
    """
    named = [(name, module) for name, module in root.named_modules() if name]
    owners = [name for name, module in named if next(module.parameters(recurse=False), None) is not None]
    if patterns is None:
        chosen = set(owners)
    else:
        patterns = list(patterns)
        if not patterns:
            raise ModelError("target_modules is empty; give fnmatch patterns such as 'block' or '*.mlp.*'")
        chosen, problems = set(), []
        for pattern in patterns:
            roots = [name for name, _ in named if fnmatch.fnmatchcase(name, pattern)]
            hits = {name for name in owners if any(name == r or name.startswith(r + ".") for r in roots)}
            if not hits:
                shown = ", ".join(owners[:12]) + (f", … ({len(owners)} in all)" if len(owners) > 12 else "")
                problems.append(f"pattern '{pattern}' matches no module with parameters; those are named like: {shown}")
            chosen |= hits
        if problems:
            raise ModelError("cannot select the modules to track:\n  - " + "\n  - ".join(problems))
    modules = dict(named)
    return {name: layer_info(name, modules[name]) for name in owners if name in chosen}


_EXCLUSIVE: list[object] = []


@contextmanager
def exclusive(owner: object) -> Iterator[None]:
    """While inside, only ``owner``'s hooks report (``owner`` a :class:`LayerTracker`, or any object to
    silence every tracker): an analysis's own forward/backward must not be seen by the other analyses
    watching the same layers (K-FAC in ``fit`` beside online SDI's query pass)."""
    _EXCLUSIVE.append(owner)
    try:
        yield
    finally:
        _EXCLUSIVE.pop()


def observed_by(owner: object) -> bool:
    """Whether the forward running now may be recorded by ``owner`` (no other pass holds it exclusively)."""
    return not _EXCLUSIVE or _EXCLUSIVE[-1] is owner


ActivationFn = Callable[[LayerInfo, int, torch.Tensor], None]
GradientFn = Callable[[LayerInfo, int, torch.Tensor, torch.Tensor], None]


class LayerTracker:
    """Forward hooks on the selected layers that report each use's ``a`` and, later, its ``g``.

    Args:
        layers: from :func:`find_layers`.
        on_activation: called as ``on_activation(layer, use, a)`` in the forward pass.
        on_gradient: called as ``on_gradient(layer, use, a, g)`` when the output's gradient is known.

    ``uses`` counts each layer's calls and ``calls`` lists the layers in the order they were called.
    Only ``enabled`` layers report, and only while ``active``; activations are detached. With
    ``force_grad`` (an analysis pass of its own), an output that does not require a gradient (a
    frozen model) is made a leaf that does, and every reported output is kept in ``outputs`` until
    :meth:`reset`, to take gradients with respect to (leaving the parameters' ``.grad`` alone). Use as a context manager or
    call :meth:`attach` / :meth:`detach`.
    """

    def __init__(self, layers: dict[str, LayerInfo], on_activation: ActivationFn | None = None,
                 on_gradient: GradientFn | None = None) -> None:
        self.layers = layers
        self.on_activation = on_activation
        self.on_gradient = on_gradient
        self.enabled: set[str] = set(layers)
        self.active = True
        self.force_grad = False
        self.uses: dict[str, int] = {}
        self.received: dict[str, int] = {}  # gradients delivered per layer since reset (see last_use)
        self.calls: list[str] = []
        self.outputs: list[torch.Tensor] = []
        self.reached: set[str] = set()
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def attach(self) -> LayerTracker:
        if not self._handles:
            for layer in self.layers.values():
                self._handles.append(layer.module.register_forward_hook(self._hook(layer)))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def reset(self) -> None:
        """Start counting uses afresh and forget kept outputs (call before each forward pass)."""
        self.uses.clear()
        self.received.clear()
        self.calls.clear()
        self.outputs.clear()
        self.reached.clear()

    def __enter__(self) -> LayerTracker:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def _hook(self, layer: LayerInfo):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if not self.active or layer.name not in self.enabled or not observed_by(self):
                return None
            if not isinstance(output, torch.Tensor):
                raise ConfigError(
                    f"tracked module '{layer.name}' ({type(module).__name__}) returns a {type(output).__name__}, not "
                    f"one tensor, so its output gradient cannot be hooked; leave it out of target_modules and track "
                    f"the linear layers inside or around it (e.g. nn.MultiheadAttention's own in_proj weight cannot "
                    f"be tracked)"
                )
            use = self.uses.get(layer.name, 0)
            self.uses[layer.name] = use + 1
            self.calls.append(layer.name)
            activation = inputs[0].detach()
            if self.on_activation is not None:
                self.on_activation(layer, use, activation)
            if self.force_grad and not output.requires_grad and torch.is_grad_enabled():
                output = output.detach().requires_grad_(True)
            if self.on_gradient is not None and output.requires_grad:
                output.register_hook(lambda grad: self._gradient(layer, use, activation, grad))
                if self.force_grad:  # an own pass takes gradients with respect to these
                    self.outputs.append(output)
            return output

        return hook

    def _gradient(self, layer: LayerInfo, use: int, activation: torch.Tensor, grad: torch.Tensor) -> None:
        self.reached.add(layer.name)
        self.received[layer.name] = self.received.get(layer.name, 0) + 1
        self.on_gradient(layer, use, activation, grad.detach())

    def last_use(self, name: str) -> bool:
        """Inside ``on_gradient``: whether every use of layer ``name`` in the forward since :meth:`reset` has
        now delivered its gradient (a per-example buffer of the layer can be finished and freed)."""
        return self.received.get(name, 0) == self.uses.get(name)

    def check_seen(self, what: str = "the loss") -> None:
        """Raise a :class:`ConfigError` naming the enabled layers that were never called through ``forward``
        since :meth:`reset` (their hooks saw nothing: their results would be zeros)."""
        if unseen := [name for name in self.layers if name in self.enabled and name not in self.uses]:
            raise ConfigError(
                f"tracked layer(s) {unseen[:8]} were never called through their forward() while computing {what}: "
                f"their weights are used some other way (e.g. nn.MultiheadAttention's out_proj, whose weight "
                f"F.multi_head_attention_forward reads directly) or not at all. Leave them out of target_modules"
            )

    def check_reached(self) -> None:
        """Raise a :class:`ConfigError` naming the called layers whose outputs got no gradient (the loss does
        not depend on them)."""
        if unreached := [name for name in self.layers if name in self.uses and name not in self.reached]:
            raise ConfigError(
                f"the loss does not depend on the output of tracked layer(s) {unreached[:8]} (no gradient reached "
                f"them); leave them out of target_modules"
            )
