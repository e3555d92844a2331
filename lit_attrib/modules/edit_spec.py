"""Seed 003's layer spec for the curvature edit: ``{"31": {"gate": 0.8, "up": 0.8, "down": 0.8}}``.

Keys are decoder-layer indices (as strings or numbers), values map an MLP projection (``gate``, ``up``,
``down``) to ``ρ``, the fraction of curvature mass it keeps. The spec is given as JSON text, a path to
a JSON file, or a mapping; :func:`parse_layer_spec` checks it and says where it is wrong, and
:func:`spec_targets` finds each projection's module and checks the factors hold it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from lit_attrib.errors import ArtifactError, DataError

__all__ = ["PROJECTIONS", "parse_layer_spec", "spec_targets"]

PROJECTIONS = ("gate", "up", "down")


def parse_layer_spec(spec: str | Mapping) -> dict[int, dict[str, float]]:
    """``{layer: {projection: rho}}`` from JSON text, a JSON file's path or a mapping.

    Raises:
        DataError: the spec is not JSON or not a mapping, a layer is not an integer, a projection is not
            one of ``gate``/``up``/``down``, or a ρ is not a number in ``[0, 1]`` (the message names where).
    """
    if isinstance(spec, str):
        text = spec
        if not spec.lstrip().startswith("{") and Path(spec).is_file():
            text = Path(spec).read_text()
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"the layer spec is not valid JSON ({error.msg} at line {error.lineno}, column "
                            f"{error.colno}); write it like {{\"31\": {{\"gate\": 0.8, \"up\": 0.8}}}}") from None
    if not isinstance(spec, Mapping) or not spec:
        raise DataError(f"the layer spec must be a non-empty mapping of layer index to projections, like "
                        f"{{\"31\": {{\"gate\": 0.8}}}}; got {spec!r}")
    parsed: dict[int, dict[str, float]] = {}
    for layer, projections in spec.items():
        where = f"spec[{json.dumps(layer) if isinstance(layer, str) else layer}]"
        if isinstance(layer, bool) or not re.fullmatch(r"\d+", str(layer)):
            raise DataError(f"{where}: a layer must be a non-negative integer index; got {layer!r}")
        if not isinstance(projections, Mapping) or not projections:
            raise DataError(f"{where}: expected a mapping of projections ({', '.join(PROJECTIONS)}) to rho; "
                            f"got {projections!r}")
        entry = {}
        for projection, rho in projections.items():
            here = f"{where}[{json.dumps(projection)}]"
            if projection not in PROJECTIONS:
                raise DataError(f"{here}: unknown projection; use one of {list(PROJECTIONS)}")
            if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0.0 <= float(rho) <= 1.0:
                raise DataError(f"{here}: rho (the fraction of curvature mass kept) must be a number in [0, 1]; "
                                f"got {rho!r}")
            entry[projection] = float(rho)
        parsed[int(layer)] = entry
    return parsed


def spec_targets(spec: Mapping[int, Mapping[str, float]], module_names: Iterable[str],
                 factor_names: Iterable[str]) -> dict[str, float]:
    """``{module name: rho}``: each spec projection's module (``...layers.<i>.mlp.<proj>_proj``).

    Raises:
        ArtifactError: a projection has no module in the model, or the factors hold none for it (the
            message lists the projections that have factors).
    """
    names = list(module_names)
    factors = set(factor_names)
    targets, problems = {}, []
    for layer, projections in spec.items():
        for projection, rho in projections.items():
            suffix = f"layers.{layer}.mlp.{projection}_proj"
            matches = [name for name in names if name == suffix or name.endswith("." + suffix)]
            if not matches:
                problems.append(f"layer {layer} {projection}: the model has no module named like '*{suffix}'")
            elif matches[0] not in factors:
                problems.append(f"layer {layer} {projection}: no factors for '{matches[0]}'")
            else:
                targets[matches[0]] = rho
    if problems:
        have = sorted(factors)
        shown = ", ".join(have[:12]) + (f", … ({len(have)} in all)" if len(have) > 12 else "")
        raise ArtifactError("the layer spec names projections the factors cannot edit:\n  - " + "\n  - ".join(problems)
                            + f"\nthe factors hold: {shown or 'nothing'}; collect factors for these layers or edit "
                              f"the spec")
    return targets
