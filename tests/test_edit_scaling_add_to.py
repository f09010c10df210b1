"""benchmarks/edit_scaling.py --add-to: rows measured in separate sittings join one table only when the setting
(model, method, workers, data, resolved hparams) is the same; the hparams file's name and notes do not count."""

from __future__ import annotations

import pytest
from conftest import benchmark_module


@pytest.fixture(scope="module")
def edit_scaling():
    return benchmark_module("edit_scaling")


def config(**hparams: object) -> dict:
    return {
        "model": "gemma3-270m",
        "method": "memit",
        "workers": 2,
        "requests": "counterfact sha256:ab",
        "hparams_file": "gemma3-270m-fast.json",
        "hparams": {"mom2_update_weight": 600.0, "notes": "shipped", **hparams},
    }


def test_runs_join_only_results_of_the_same_setting(edit_scaling):
    same = edit_scaling._setting
    copy = {**config(notes="a copy"), "hparams_file": "copy.json"}
    assert same(copy) == same(config())
    assert same(config(mom2_update_weight=1200.0)) != same(config())
    assert same({**config(), "workers": 1}) != same(config())
    assert same({**config(), "requests": "counterfact sha256:cd"}) != same(config())
