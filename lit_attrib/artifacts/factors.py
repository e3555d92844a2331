"""The curvature-factors artifact: ``factors.safetensors`` + ``factors.json``.

Tensors per tracked module ``<name>`` (bias-appended layout, ``in`` includes the bias column):

- ``<name>.activation_covariance`` ``(in, in)`` — ``A = E[a aᵀ]`` over non-padding tokens
- ``<name>.gradient_covariance`` ``(out, out)`` — ``G = E[g gᵀ]``
- ``<name>.activation_eigenvalues`` / ``.activation_eigenvectors`` — ``A = Q_A diag(μ) Q_Aᵀ``
- ``<name>.gradient_eigenvalues`` / ``.gradient_eigenvectors`` — ``G = Q_G diag(λ) Q_Gᵀ``
- ``<name>.lambda`` ``(out, in)`` — EKFAC's corrected eigenvalues (``strategy: ekfac``) or
  ``λ_i μ_j`` (``strategy: kfac``)

``factors.json`` holds the arguments that produced them, each module's type, shapes, token and
example counts, and library versions. It is written last: a folder without it is incomplete.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from lit_attrib.errors import ArtifactError
from lit_attrib.io import save_tensors_streaming, write_json
from lit_attrib.layers import is_supported, layer_info

__all__ = ["FACTOR_KEYS", "PRECONDITIONING_KEYS", "Factors", "factors_exist", "load_factors", "save_factors"]

TENSORS_FILE = "factors.safetensors"
METADATA_FILE = "factors.json"
FORMAT = "lit_attrib.factors/1"
PRECONDITIONING_KEYS = ("activation_eigenvectors", "gradient_eigenvectors", "lambda")
"""What :func:`lit_attrib.ops.kfac.factors_inverse_hvp` reads of a module's factors."""
FACTOR_KEYS = (
    "activation_covariance",
    "gradient_covariance",
    "activation_eigenvalues",
    "activation_eigenvectors",
    "gradient_eigenvalues",
    "gradient_eigenvectors",
    "lambda",
)


@dataclass
class Factors:
    """Loaded curvature factors: ``factors[module_name][key]`` and the metadata they were saved with."""

    modules: dict[str, dict[str, torch.Tensor]]
    metadata: dict = field(default_factory=dict)

    def __getitem__(self, name: str) -> dict[str, torch.Tensor]:
        return self.modules[name]

    def __iter__(self):
        return iter(self.modules)

    def __len__(self) -> int:
        return len(self.modules)

    def release(self, names: Iterable[str]) -> None:
        """Drop the tensors of modules ``names`` (once their use is over; the metadata stays)."""
        for name in names:
            if name in self.modules:
                self.modules[name] = {}


def factors_exist(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a complete factors artifact."""
    return (Path(path) / METADATA_FILE).is_file() and (Path(path) / TENSORS_FILE).is_file()


def save_factors(path: str | os.PathLike,
                 modules: Mapping[str, dict[str, torch.Tensor]] | Iterable[tuple[str, dict[str, torch.Tensor]]],
                 metadata: dict) -> Path:
    """Write the artifact atomically: tensors first, ``factors.json`` last.

    ``modules`` maps each module's name to its tensors, or yields ``(name, tensors)`` pairs: a generator
    that makes one module's tensors at a time keeps only those in memory (each module is written to disk
    before the next is asked for).
    """
    path = Path(path)
    pairs = modules.items() if isinstance(modules, Mapping) else modules
    flat = ((f"{name}.{key}", tensor) for name, factors in pairs for key, tensor in factors.items())
    save_tensors_streaming(path / TENSORS_FILE, flat, metadata={"format": FORMAT})
    write_json(path / METADATA_FILE, {"format": FORMAT, **metadata})
    return path


def load_factors(path: str | os.PathLike, model: nn.Module | None = None, device: str | torch.device = "cpu",
                 names: Iterable[str] | None = None, keys: Iterable[str] | None = None) -> Factors:
    """Load factors, and check them against ``model`` if one is given.

    Args:
        path: the folder holding ``factors.safetensors`` and ``factors.json``.
        model: the model (or LightningModule) the factors will be used with; its module names, types
            and shapes must match the saved ones.
        device: where to put the tensors.
        names: load only these modules' tensors (the metadata still lists every module).
        keys: load only these of each module's tensors (of :data:`FACTOR_KEYS`; preconditioning needs
            ``activation_eigenvectors``, ``gradient_eigenvectors`` and ``lambda``, half of the file).

    Raises:
        ArtifactError: the artifact is missing or incomplete, or differs from ``model`` (every
            difference is listed).
    """
    path = Path(path)
    if not factors_exist(path):
        found = sorted(p.name for p in path.iterdir()) if path.is_dir() else "no such folder"
        raise ArtifactError(f"no complete factors in '{path}' (expected {TENSORS_FILE} and {METADATA_FILE}; "
                            f"found {found}). Run KFACCollectorCallback first.")
    metadata = json.loads((path / METADATA_FILE).read_text())
    if metadata.get("format") != FORMAT:
        raise ArtifactError(f"'{path / METADATA_FILE}' is format {metadata.get('format')!r}, expected {FORMAT!r}")
    wanted_keys = FACTOR_KEYS if keys is None else tuple(keys)
    if unknown := [key for key in wanted_keys if key not in FACTOR_KEYS]:
        raise ValueError(f"unknown factor keys {unknown}; choose among {list(FACTOR_KEYS)}")
    wanted = None if names is None else set(names)
    if names is None and keys is None:
        flat = load_file(str(path / TENSORS_FILE), device=str(device))
    else:  # only these modules' (and keys') tensors are read
        with safe_open(str(path / TENSORS_FILE), framework="pt", device=str(device)) as handle:
            stored = handle.keys()  # a safetensors handle, not a dict
            flat = {key: handle.get_tensor(key) for key in stored
                    if (wanted is None or key.rpartition(".")[0] in wanted) and key.rpartition(".")[2] in wanted_keys}
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in flat.items():
        name, _, factor = key.rpartition(".")
        modules.setdefault(name, {})[factor] = tensor
    order = list(metadata.get("modules", {}))
    modules = {name: modules[name] for name in order if name in modules} | modules  # model order, as saved
    missing = [f"{name}.{key}" for name in metadata.get("modules", {}) for key in wanted_keys
               if (wanted is None or name in wanted) and key not in modules.get(name, {})]
    if missing:
        raise ArtifactError(f"'{path / TENSORS_FILE}' lacks tensors {missing[:8]}; the artifact is damaged, recompute it")
    factors = Factors(modules, metadata)
    if model is not None:
        check_factors_against_model(factors, model)
    return factors


def check_factors_against_model(factors: Factors, model: nn.Module) -> None:
    """Raise an :class:`ArtifactError` listing every saved module that is absent or shaped differently."""
    named = {name: module for name, module in model.named_modules() if name}
    problems = []
    for name, saved in factors.metadata.get("modules", {}).items():
        module = named.get(name)
        if module is None:
            # The usual cause: factors of a LightningModule ("model.x") checked against its inner model ("x").
            hint = [n for n in named if name.endswith("." + n) or n.endswith("." + name)][:1]
            problems.append(f"'{name}' is not a module of the model"
                            + (f" (did you mean '{hint[0]}'? pass the same module the factors were collected on)"
                               if hint else ""))
            continue
        if not is_supported(module):
            problems.append(f"'{name}' is a {type(module).__name__} in the model, saved as {saved['kind']}")
            continue
        current = layer_info(name, module).describe()
        for key in ("kind", "in_features", "out_features", "bias"):
            if current[key] != saved[key]:
                problems.append(f"'{name}': {key} is {current[key]} in the model but {saved[key]} in the factors")
    if problems:
        raise ArtifactError("the factors do not match the model:\n  - " + "\n  - ".join(problems))
