"""Per-example gradient features of the modules SDI tracks, and the steps they belong to (seed 001).

Plain PyTorch (no Lightning): :func:`step_layout` places each call of a tracked module in a step of
the forward (loop iterations, plus a prelude and a readout for modules called once), and
:class:`GradientFeatures` turns one call's activations ``a`` and output gradients ``g`` into each
example's sketched (or exact) gradient features, with the sums over a module's calls sketched once.
"""

from __future__ import annotations

from typing import Any

import torch

from lit_attrib.errors import ModelError
from lit_attrib.layers import LayerInfo
from lit_attrib.ops.kfac import append_bias_column
from lit_attrib.ops.sketch import (
    CountSketch,
    TensorSketch,
    block_seed,
    embedding_example_gradients,
    embedding_sketch,
    functional_example_gradients,
    layer_norm_example_gradients,
)

__all__ = ["GradientFeatures", "per_example_module", "proportional", "step_layout"]

_NORMS = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.RMSNorm)


def step_layout(uses: dict[str, int], calls: list[str]) -> tuple[list[str], dict[str, list[int]]]:
    """Which step each use of each module belongs to.

    Args:
        uses: calls of each tracked module in one forward.
        calls: the tracked modules in the order they were called.

    Returns:
        ``(step_names, steps)``: names such as ``["prelude", "loop 1", …, "loop S", "readout"]`` and,
        per module, the step index of each of its uses.

    Raises:
        ModelError: a module was never called, a count is neither 1 nor the largest, or a module
            called once sits inside the loop.
    """
    counts = sorted(set(uses.values()))
    loops = max(counts)
    if set(counts) - {1, loops}:
        detail = ", ".join(f"{name}: {count}" for name, count in sorted(uses.items(), key=lambda kv: kv[1])[:12])
        raise ModelError(
            f"the tracked modules are called different numbers of times in one forward ({detail}); SDI's steps are "
            f"the calls of the looped modules, and only modules called once (before or after the loop) can be "
            f"placed besides them. Narrow target_modules to the looped block (e.g. 'block'), or to modules "
            f"called equally often"
        )
    if loops == 1 or len(counts) == 1:
        names = [f"loop {s + 1}" for s in range(loops)] if loops > 1 else ["step 1"]
        return names, {name: list(range(count)) for name, count in uses.items()}
    positions = [i for i, name in enumerate(calls) if uses[name] == loops]
    first, last = min(positions), max(positions)
    place: dict[str, str] = {}
    inside = []
    for name, count in uses.items():
        if count == 1:
            at = calls.index(name)
            if at < first:
                place[name] = "prelude"
            elif at > last:
                place[name] = "readout"
            else:
                inside.append(name)
    if inside:
        raise ModelError(
            f"modules {inside[:8]} are called once, inside the loop of the modules called {loops} times; their "
            f"step is ambiguous. Leave them out of target_modules"
        )
    prelude = "prelude" in place.values()
    names = (["prelude"] if prelude else []) + [f"loop {s + 1}" for s in range(loops)]
    names += ["readout"] if "readout" in place.values() else []
    steps = {}
    for name, count in uses.items():
        if count == loops:
            steps[name] = [s + int(prelude) for s in range(loops)]
        else:
            steps[name] = [0 if place[name] == "prelude" else len(names) - 1]
    return names, steps


class GradientFeatures:
    """Per-example features of each tracked module's own parameters, from one use's ``a`` and ``g``.

    Sketched, ``shared``: every module adds its sketch into one ``(B, m)`` vector (independent hash
    tables per module). Sketched, ``split``: module ``b`` gets its own ``m_b`` coordinates of the ``m``,
    ``m_b ∝`` its parameter count (cheaper FFTs; the shared sketch adapts to where the gradient's
    energy is, the split one does not). Exact: each module's flattened gradient lives at its own
    offset of a ``(B, P)`` vector. Modules that share a weight (tied embeddings) share its hash tables
    and its coordinates.
    """

    def __init__(self, layers: dict[str, LayerInfo], sketch_dim: int, exact: bool, seed: int,
                 dtype: torch.dtype, device: torch.device, canonical: dict[int, str], sharing: str = "shared") -> None:
        self.exact, self.dtype = exact, dtype
        self.layers = layers
        self.sketches: dict[str, Any] = {}
        self.offsets: dict[str, tuple[int, int]] = {}
        self.blocks: list[dict] = []
        keys: dict[str, str] = {}
        for name, layer in layers.items():
            parameters = list(layer.module.parameters(recurse=False))
            key = keys[name] = canonical[id(parameters[0])]
            size = sum(p.numel() for p in parameters)
            known = next((b for b in self.blocks if b["parameters"] == key), None)
            if known is None:
                self.blocks.append({"parameters": key, "module": name, "type": type(layer.module).__name__,
                                    "numel": size})
            elif known["numel"] != size:
                raise ModelError(f"{name} shares its weight {key} with another tracked module but not its layout; "
                                 f"track one of them only")
        total = sum(b["numel"] for b in self.blocks)
        if exact:
            widths = [b["numel"] for b in self.blocks]
        elif sharing == "split":
            if sketch_dim < len(self.blocks):
                raise ValueError(f"sketch_sharing 'split' gives each of the {len(self.blocks)} tracked modules its own "
                                 f"coordinates; sketch_dim={sketch_dim} is too small (use at least {len(self.blocks)})")
            widths = proportional([b["numel"] for b in self.blocks], sketch_dim)
        else:
            widths = [sketch_dim] * len(self.blocks)
        start = 0
        by_key = {}
        for block, width in zip(self.blocks, widths):
            by_key[block["parameters"]] = (start if exact or sharing == "split" else 0, width)
            block.update(share=round(block["numel"] / total, 6), coordinates=list(by_key[block["parameters"]]))
            start += width
        for name, layer in layers.items():
            self.offsets[name] = by_key[keys[name]]
            width, block = self.offsets[name][1], block_seed(seed, keys[name])
            if layer.kind in ("linear", "conv1d"):
                self.sketches[name] = TensorSketch(layer.out_features, layer.in_features + int(layer.has_bias),
                                                   width, block, device)
            elif layer.kind == "embedding":
                self.sketches[name] = TensorSketch(layer.out_features, layer.in_features, width, block, device)
            else:
                numel = sum(p.numel() for p in layer.module.parameters(recurse=False))
                self.sketches[name] = CountSketch(numel, width, block, device)
        self.size = total if exact else sketch_dim
        self.placed = exact or sharing == "split"

    def __call__(self, layer: LayerInfo, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """``(B, size)`` features of this use (exact: only the module's own slice is filled)."""
        return self.finish(layer, [self.raw(layer, a, g)])

    def raw(self, layer: LayerInfo, a: torch.Tensor, g: torch.Tensor,
            uses: int = 1) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """This use's contribution in a form whose sum over a module's uses :meth:`finish` sketches once
        (a training example needs only the sum): a linear layer's ``(g, a)`` where forming the
        per-example gradient is cheaper than the FFT (the uses' tokens are then stacked into one
        product; ``uses`` of them share one scatter), other modules' flattened per-example gradients,
        else the sketch itself."""
        batch = g.shape[0]
        if layer.kind in ("linear", "conv1d"):
            a = a.reshape(batch, -1, a.shape[-1]).to(self.dtype)
            g = g.reshape(batch, -1, g.shape[-1]).to(self.dtype)
            if layer.has_bias:
                a = append_bias_column(a)
            sketch = self.sketches[layer.name]
            if self.exact or sketch.explicit_is_cheaper(a.shape[1] * uses, g.shape[-1], a.shape[-1]):
                return g, a
            return sketch.outer(g, a)
        if layer.kind == "embedding":
            padding = layer.module.padding_idx
            if not self.exact:
                return embedding_sketch(self.sketches[layer.name], a, g.to(self.dtype), padding)
            return embedding_example_gradients(a, g.to(self.dtype), layer.out_features, padding).flatten(1)
        if isinstance(layer.module, torch.nn.LayerNorm) and layer.module.elementwise_affine:
            return layer_norm_example_gradients(layer.module, a, g).to(self.dtype)
        return functional_example_gradients(layer.module, a, g.to(a.dtype)).to(self.dtype)  # in the module's dtype

    def finish(self, layer: LayerInfo, raws: list) -> torch.Tensor:
        """``(B, size)`` features of the sum of a module's :meth:`raw` contributions."""
        total = None
        for raw in raws:
            if not isinstance(raw, tuple):
                total = raw if total is None else total + raw
        pairs = [raw for raw in raws if isinstance(raw, tuple)]
        if pairs:  # linear layers: the uses' tokens stacked into one product
            g = torch.cat([g for g, _ in pairs], 1) if len(pairs) > 1 else pairs[0][0]
            a = torch.cat([a for _, a in pairs], 1) if len(pairs) > 1 else pairs[0][1]
            if self.exact:
                gradient = torch.bmm(g.mT, a)
                weight = gradient[..., : layer.in_features]
                parts = [(weight if layer.kind == "linear" else weight.mT).flatten(1)]
                if layer.has_bias:
                    parts.append(gradient[..., layer.in_features])
                part = torch.cat(parts, 1)
            else:
                part = self.sketches[layer.name].outer_explicit(g, a)
            total = part if total is None else total + part
        elif layer.kind == "other" and not self.exact:
            total = self.sketches[layer.name](total)
        return self._place(layer, total)

    def _place(self, layer: LayerInfo, gradient: torch.Tensor) -> torch.Tensor:
        if not self.placed:
            return gradient
        start, size = self.offsets[layer.name]
        out = gradient.new_zeros(gradient.shape[0], self.size)
        out[:, start: start + size] = gradient
        return out


def proportional(sizes: list[int], total: int) -> list[int]:
    """``total`` split into integer parts ``∝ sizes``, each at least 1 (largest remainders get the rest)."""
    weight = sum(sizes)
    spare = total - len(sizes)
    parts = [1 + spare * size // weight for size in sizes]
    remainders = sorted(range(len(sizes)), key=lambda i: (spare * sizes[i]) % weight, reverse=True)
    for i in remainders[: total - sum(parts)]:
        parts[i] += 1
    return parts


def per_example_module(module: torch.nn.Module) -> bool:
    """Modules whose per-example gradient torch.func can take from one input (norms and their kin)."""
    own = list(module.parameters(recurse=False))
    return (isinstance(module, _NORMS) or type(module).__name__.endswith("Norm")) and all(p.ndim == 1 for p in own)
