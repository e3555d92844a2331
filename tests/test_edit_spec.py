"""Seed 003's layer spec: parsing, where it is wrong, and which modules and factors it names."""

from __future__ import annotations

import pytest

from lit_attrib.errors import ArtifactError, DataError
from lit_attrib.modules.edit_spec import parse_layer_spec, spec_targets

NAMES = [f"model.model.layers.{i}.mlp.{p}_proj" for i in range(3) for p in ("gate", "up", "down")]


def test_spec_from_text_file_and_mapping(tmp_path):
    expected = {2: {"gate": 0.8, "up": 0.6}}
    assert parse_layer_spec('{"2": {"gate": 0.8, "up": 0.6}}') == expected
    path = tmp_path / "spec.json"
    path.write_text('{"2": {"gate": 0.8, "up": 0.6}}')
    assert parse_layer_spec(str(path)) == expected
    assert parse_layer_spec({2: {"gate": 0.8, "up": 0.6}}) == expected
    assert spec_targets(expected, NAMES, NAMES) == {"model.model.layers.2.mlp.gate_proj": 0.8,
                                                    "model.model.layers.2.mlp.up_proj": 0.6}


@pytest.mark.parametrize(("spec", "message"), [
    ('{"31": {"gate": 0.8', r"not valid JSON \(.* at line 1"),
    ('[1, 2]', "non-empty mapping"),
    ('{"x": {"gate": 0.8}}', r'spec\["x"\]: a layer must be a non-negative integer'),
    ('{"3": {"gate": 0.8, "mlp": 0.5}}', r'spec\["3"\]\["mlp"\]: unknown projection'),
    ('{"3": {"up": 1.5}}', r'spec\["3"\]\["up"\]: rho .* must be a number in \[0, 1\]; got 1.5'),
    ('{"3": {"up": -0.1}}', r"got -0.1"),
    ('{"3": 0.8}', r'spec\["3"\]: expected a mapping of projections'),
])
def test_malformed_specs_say_where(spec, message):
    with pytest.raises(DataError, match=message):
        parse_layer_spec(spec)


def test_projections_without_factors_list_what_exists():
    factors = NAMES[:3]  # layer 0 only
    with pytest.raises(ArtifactError, match=r"layer 1 up: no factors for 'model.model.layers.1.mlp.up_proj'"
                                            r"(.|\n)*the factors hold: model.model.layers.0.mlp.down_proj"):
        spec_targets({1: {"up": 0.5}}, NAMES, factors)
    with pytest.raises(ArtifactError, match=r"layer 9 gate: the model has no module named like"):
        spec_targets({9: {"gate": 0.5}}, NAMES, NAMES)
