"""benchmarks/layer_sweep.py's command line: layer sets and grid axes are parsed (and refused) before the model
loads."""

from __future__ import annotations

import argparse

import pytest
from conftest import benchmark_module


@pytest.fixture(scope="module")
def layer_sweep():
    return benchmark_module("layer_sweep")


def test_layer_sets_are_ranges_or_lists(layer_sweep):
    assert layer_sweep.layer_set("2-6") == [2, 3, 4, 5, 6]
    assert layer_sweep.layer_set("2,4,6") == [2, 4, 6]
    assert layer_sweep.layer_set("7") == [7]


@pytest.mark.parametrize("spec", ["2-", "a-b", "6-2", "-1,2", ""])
def test_a_malformed_or_empty_layer_set_is_refused(layer_sweep, spec):
    with pytest.raises(argparse.ArgumentTypeError, match="range like 2-6"):
        layer_sweep.layer_set(spec)


def test_grid_axes_name_an_hparam_and_numbers(layer_sweep):
    assert layer_sweep.grid_axis("mom2_update_weight=2500,5000") == ("mom2_update_weight", [2500.0, 5000.0])
    with pytest.raises(argparse.ArgumentTypeError, match="KEY an hparam"):
        layer_sweep.grid_axis("lambda=1,2")
    with pytest.raises(argparse.ArgumentTypeError, match="must be numbers"):
        layer_sweep.grid_axis("rel_eps=small")
