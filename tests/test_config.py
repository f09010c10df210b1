"""Strict typed configs: unknown keys, missing keys and wrong types fail with the source named."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from fastedit.config import config_to_dict, load_dataclass, load_dataclass_file
from fastedit.errors import ConfigError


@dataclass
class Example:
    layers: list[int]
    lam: float = 1.0
    name: str | None = None
    flags: tuple[str, ...] = field(default=())


def test_loads_and_coerces():
    cfg = load_dataclass(Example, {"layers": [1, 2], "lam": 3, "flags": ["a"]})
    assert cfg == Example(layers=[1, 2], lam=3.0, flags=("a",))
    assert config_to_dict(cfg) == {"layers": [1, 2], "lam": 3.0, "name": None, "flags": ["a"]}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"layers": [1], "lamda": 2}, "unknown key"),
        ({"lam": 2.0}, "missing key"),
        ({"layers": [1.5]}, "expected an integer"),
        ({"layers": [1], "lam": "big"}, "expected a number"),
        ({"layers": [1], "lam": True}, "expected a number"),
    ],
)
def test_rejects_bad_configs(data, message):
    with pytest.raises(ConfigError, match=message):
        load_dataclass(Example, data, "hp.json")


def test_file_errors_name_the_file(tmp_path):
    path = tmp_path / "hp.json"
    path.write_text(json.dumps({"layers": [1], "oops": 1}))
    with pytest.raises(ConfigError, match=r"hp\.json: unknown key"):
        load_dataclass_file(Example, path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_dataclass_file(Example, tmp_path / "missing.json")
