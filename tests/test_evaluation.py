"""Tests for dynamo_jax.evaluation: pass@k vs brute force, maj@k, results tables."""

import itertools
import json
import math

import numpy as np
import pytest

from dynamo_jax.evaluation import (
    maj_at_k,
    majority_answer,
    mean_pass_at_k,
    pass_at_1,
    pass_at_k,
    results_table,
    vote_key,
)


def brute_force_pass_at_k(n, c, k):
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_matches_brute_force(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_vectorised_and_edges():
    n = np.array([4, 4, 4, 10, 16])
    c = np.array([0, 4, 2, 3, 1])
    out = pass_at_k(n, c, 2)
    assert out.shape == (5,)
    expected = [brute_force_pass_at_k(a, b, 2) for a, b in zip(n, c, strict=True)]
    np.testing.assert_allclose(out, expected, atol=1e-12)
    assert pass_at_k(5, 0, 3) == 0.0  # c = 0
    assert pass_at_k(5, 5, 3) == 1.0  # c = n
    assert pass_at_k(5, 1, 5) == 1.0  # k = n, any correct
    assert pass_at_k(5, 0, 5) == 0.0
    assert pass_at_k(7, 3, 1) == pytest.approx(3 / 7)  # pass@1 = c / n
    assert isinstance(pass_at_k(3, 1, 1), float)


def test_pass_at_k_is_stable_for_large_n():
    # Binomials here overflow floats; the product form must not.
    n, c, k = 2000, 7, 100
    exact = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-12)
    assert 0.0 <= pass_at_k(np.full(3, 1024), np.array([0, 1, 1024]), 512).min()


@pytest.mark.parametrize(
    "n,c,k",
    [(5, 1, 6), (5, 1, 0), (5, 6, 1), (5, -1, 1), (5, 1, 1.5), (5.0, 1, 1), (5, 1, True)],
)
def test_pass_at_k_errors(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_mean_pass_at_k_and_pass_at_1():
    assert mean_pass_at_k([4, 4], [1, 3], 1) == pytest.approx(0.5)
    correct = [[True, False, False, False], [True, True, True, False]]
    assert pass_at_1(correct) == pytest.approx(0.5)
    assert mean_pass_at_k([4, 4], [sum(c) for c in correct], 4) == 1.0


def test_no_problems_or_no_samples_raise_instead_of_nan():
    with pytest.raises(ValueError, match="no problems"):
        pass_at_1([])
    with pytest.raises(ValueError, match="problem 1 has no samples"):
        pass_at_1([[True], []])
    with pytest.raises(ValueError, match="no problems"):
        mean_pass_at_k([], [], 1)
    with pytest.raises(ValueError):
        mean_pass_at_k([2, 0], [1, 0], 1)  # k > n for the second problem
    with pytest.raises(ValueError, match="problem 1 has no samples"):
        maj_at_k([["1"], []], [[True], []])
    assert pass_at_1(np.array([[True, False], [True, True]])) == pytest.approx(0.75)
    assert mean_pass_at_k(4, 2, 2) == pytest.approx(5 / 6)  # scalars still work


def test_majority_vote_groups_by_normalised_answer():
    answers = ["\\frac{1}{2}", "\\dfrac{1}{2}", "3", "3", "$\\frac{1}{2}$", None]
    assert majority_answer(answers) == 0  # 3 votes for 1/2 (first at index 0) vs 2 for 3
    assert majority_answer(["3", "4", "4", "3"]) == 0  # tie -> earliest first occurrence
    assert majority_answer(["4", "3", "3", "4"]) == 0
    assert majority_answer([None, "", "  "]) is None


def test_equal_numbers_in_different_forms_vote_together():
    """Four correct samples write 1/2 four ways, two wrong ones write 3 alike: the vote must
    pool the four (their text differs, their value does not)."""
    answers = ["\\frac{1}{2}", "1/2", "3", "0.5", "\\frac12", "3"]
    correct = [True, True, False, True, True, False]
    assert majority_answer(answers) == 0
    assert maj_at_k([answers], [correct]).tolist() == [True]
    assert {vote_key(a) for a in ("-0.50", "-\\frac{1}{2}", "\\frac{-1}{2}", "-1/2")} == {"=-1/2"}
    assert vote_key("3.0") == vote_key("3") != vote_key("3.01")
    assert vote_key("1/0") == "1/0"  # no value: votes by its text
    assert vote_key("2\\sqrt{3}") == "2\\sqrt{3}" and vote_key(None) == ""


def test_maj_at_k():
    answers = [
        ["1", "2", "2", "1", "1"],  # all 5: "1" wins (3 votes); first 3: "2" wins
        ["5", None, None, None, None],
        [None, None, None, None, None],
    ]
    correct = [
        [True, False, False, True, True],
        [True, False, False, False, False],
        [False] * 5,
    ]
    assert maj_at_k(answers, correct).tolist() == [True, True, False]
    assert maj_at_k(answers, correct, k=3).tolist() == [False, True, False]
    assert maj_at_k(answers, correct, k=1).tolist() == [True, True, False]
    with pytest.raises(ValueError):
        maj_at_k(answers, correct, k=6)
    with pytest.raises(ValueError):
        maj_at_k(answers, correct[:2])


def test_results_table():
    per_benchmark = {
        "math500": {"pass@1": 0.5, "maj@8": np.float32(0.625), "num_problems": 500},
        "aime24": {"pass@1": 0.1, "maj@8": 0.2, "num_problems": 30},
        "amc23": {"pass@1": 0.3, "num_problems": 40},
    }
    table, data = results_table(per_benchmark)
    lines = table.strip().split("\n")
    assert lines[0] == "| benchmark | pass@1 | maj@8 | num_problems |"
    assert lines[2] == "| math500 | 50.0 | 62.5 | 500 |"
    assert lines[4] == "| amc23 | 30.0 | - | 40 |"
    assert lines[5] == "| **average** | 30.0 | 41.2 | 570 |"
    json.dumps(data)  # JSON-able (numpy scalars converted)
    assert data["average"]["pass@1"] == pytest.approx(0.3)
    assert data["average"]["maj@8"] == pytest.approx(0.4125)
    assert data["average"]["num_problems"] == 570
    assert data["benchmarks"]["math500"]["maj@8"] == pytest.approx(0.625)
    raw, _ = results_table({"b": {"acc": 0.25}}, percent=False)
    assert "| b | 0.250 |" in raw
    empty, data = results_table({})
    assert data["average"] == {}
