"""Bradley-Terry and annotator quality, on hand-checked examples.

    .venv/bin/python -m pytest tests/test_quality.py
"""

import pytest

from collector.quality import (
    annotator_quality,
    binomial_two_sided_p,
    bradley_terry,
    outcomes_from_votes,
    win_rates_with_intervals,
)


def _games(a, b, wins_a, wins_b, ties=0):
    return [(a, b, 1.0)] * wins_a + [(a, b, 0.0)] * wins_b + [(a, b, 0.5)] * ties


def test_bradley_terry_reproduces_a_hand_checked_example():
    # Strengths 4 : 2 : 1 give P(A>B) = 2/3, P(B>C) = 2/3, P(A>C) = 4/5. With exactly those results
    # the likelihood equations hold (A: 6 wins = 3*2/3 + 5*4/5; B: 3 = 3*1/3 + 3*2/3; C: 2 = 3*1/3 +
    # 5*1/5), so the maximum-likelihood fit is exactly 4 : 2 : 1.
    outcomes = _games("A", "B", 2, 1) + _games("B", "C", 2, 1) + _games("A", "C", 4, 1)
    s = bradley_terry(outcomes)
    assert s["A"] / s["C"] == pytest.approx(4.0, rel=1e-6)
    assert s["B"] / s["C"] == pytest.approx(2.0, rel=1e-6)


def test_ties_count_half_and_intervals_bracket_the_estimate():
    outcomes = _games("round-0001", "base", 2, 1, ties=2)  # 3 points of 5
    rates = win_rates_with_intervals(outcomes, anchor="base", samples=300)
    est, lo, hi = rates["round-0001"]
    assert est == pytest.approx(0.6, rel=1e-6)
    assert lo <= est <= hi and lo < 0.6 < hi


def test_no_arena_votes_yet_gives_no_rates():
    assert bradley_terry([]) == {} and win_rates_with_intervals([]) == {}


def test_outcomes_come_from_arena_votes_only():
    rows = [
        {"model_left": "round-0001", "model_right": "base", "choice": "right"},
        {"model_left": "base", "model_right": "base", "choice": "left"},  # same policy: not arena
        {"model_left": "base", "model_right": "round-0001", "choice": "both_bad"},
    ]
    assert outcomes_from_votes(rows) == [("round-0001", "base", 0.0)]


def test_position_bias_flags_an_annotator_who_always_picks_left():
    rows = [{"annotator": "lefty", "choice": "left", "latency_ms": 900} for _ in range(30)]
    rows += [{"annotator": "fair", "choice": c, "latency_ms": 4000} for c in ["left", "right"] * 14 + ["tie"] * 2]
    q = {x.annotator: x for x in annotator_quality(rows)}
    assert q["lefty"].position_biased and q["lefty"].left_share == 1.0
    assert q["lefty"].left_p_value == pytest.approx(2 * 0.5**30)
    assert not q["fair"].position_biased and q["fair"].tie_rate == pytest.approx(2 / 30)
    assert q["fair"].median_seconds == 4.0


def test_binomial_p_value_matches_known_values():
    assert binomial_two_sided_p(5, 10) == pytest.approx(1.0)
    assert binomial_two_sided_p(9, 10) == pytest.approx(22 / 1024)
    # Thousands of votes (one busy annotator): a finite answer, not an OverflowError.
    assert binomial_two_sided_p(2_500, 5_000) == pytest.approx(1.0)
    assert binomial_two_sided_p(2_700, 5_000) < 1e-7
    assert binomial_two_sided_p(520, 1_040) == pytest.approx(1.0)
