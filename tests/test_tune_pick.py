"""The rule benchmarks/tune_split.py uses to choose shipped hparams: the bar on both tune sets first (fewest
points missed), the best mean Score second; a row that failed on either set is never chosen."""

from __future__ import annotations

import pytest
from conftest import benchmark_module


@pytest.fixture(scope="module")
def tune_split():
    return benchmark_module("tune_split")


UNEDITED = {"tune": {"ns": 80.0}, "tune_facts": {"ns": 90.0}}


def row(name: str, tune: tuple[float, float, float], facts: tuple[float, float, float]) -> dict:
    def result(es: float, ps: float, ns: float) -> dict:
        return {"es": es, "ps": ps, "ns": ns, "score": (es + ps + ns) / 3}

    return {"name": name, **result(*tune), "tune_facts": result(*facts)}


def test_shortfall_sums_the_points_below_each_bar(tune_split):
    assert tune_split.shortfall({"es": 95, "ps": 75, "ns": 76}, unedited_ns=80) == 0
    # ES 2 below 90, PS 5 below 70, NS 3 below 80 - 5.
    assert tune_split.shortfall({"es": 88, "ps": 65, "ns": 72}, unedited_ns=80) == pytest.approx(10)


def test_a_row_meeting_the_bar_on_both_sets_beats_a_higher_scoring_one_that_misses(tune_split):
    rows = [
        row("high score, facts NS 6 below", (100, 100, 80), (100, 100, 84)),
        row("meets both", (92, 72, 76), (91, 71, 86)),
    ]
    assert tune_split.pick(rows, UNEDITED)["name"] == "meets both"


def test_among_rows_meeting_the_bar_the_best_mean_score_wins(tune_split):
    rows = [row("lower", (92, 72, 76), (91, 71, 86)), row("higher", (99, 90, 78), (95, 80, 88))]
    assert tune_split.pick(rows, UNEDITED)["name"] == "higher"


def test_when_no_row_meets_the_bar_the_smallest_miss_wins_then_the_score(tune_split):
    rows = [
        row("misses by 4", (100, 95, 75), (100, 90, 81)),  # tune NS 0, facts NS 4 below 85
        row("misses by 1", (90, 70, 75), (90, 70, 84)),
        row("misses by 1, better score", (100, 95, 75), (100, 95, 84)),
    ]
    assert tune_split.pick(rows, UNEDITED)["name"] == "misses by 1, better score"


def test_a_row_that_failed_on_either_set_is_never_chosen(tune_split):
    failed = row("failed on the facts", (100, 100, 80), (100, 100, 90))
    failed["tune_facts"]["score"] = None
    rows = [failed, row("ran", (80, 60, 70), (80, 60, 80))]
    assert tune_split.pick(rows, UNEDITED)["name"] == "ran"
