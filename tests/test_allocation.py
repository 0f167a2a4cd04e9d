"""Tests for dynamo_jax.allocation (SPEC section 1)."""

import itertools
import re
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import dynamo_jax.allocation as alloc
from dynamo_jax.allocation import (
    AllocationPolicy,
    PromptStats,
    allocate_rollouts,
    allocation_objective,
    allocation_weights,
    bernoulli_variance,
    check_budget,
    continuous_allocation,
    official_allocation,
    official_priority,
)

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MEDIUM = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------------------------


def _scaled_w2(w):
    """Squared weights exactly as the module scales them (w / max w, tiny -> 0)."""
    w = np.asarray(w, dtype=np.float64)
    m = w.max() if w.size else 0.0
    ws = w / m if m > 0 else np.zeros_like(w)
    ws[ws < 1e-150] = 0.0
    return ws * ws


def greedy_reference(w, budget, n_low, n_high):
    """Textbook greedy on marginal gains, one unit at a time. Ties: fewer rollouts, then index."""
    w2 = _scaled_w2(w)
    n = np.full(len(w2), n_low, dtype=np.int64)
    for _ in range(budget - len(w2) * n_low):
        g = np.where(n < n_high, w2 / (n * (n + 1.0)), -1.0)
        cand = np.flatnonzero(g == g.max())
        n[cand[np.lexsort((cand, n[cand]))[0]]] += 1
    return n


def sorted_units_reference(w, budget, n_low, n_high):
    """Materialise every unit's gain and take the first R in (gain desc, n asc, index asc)."""
    w2 = _scaled_w2(w)
    N = len(w2)
    idx, n = np.meshgrid(np.arange(N), np.arange(n_low, n_high), indexing="ij")
    idx, n = idx.ravel(), n.ravel()
    g = w2[idx] / (n * (n + 1.0))
    order = np.lexsort((idx, n, -g))
    R = budget - N * n_low
    return n_low + np.bincount(idx[order[:R]], minlength=N)


def brute_force_min(w, budget, n_low, n_high):
    vals = np.array(list(itertools.product(range(n_low, n_high + 1), repeat=len(w))))
    vals = vals[vals.sum(axis=1) == budget]
    w = np.asarray(w, dtype=np.float64)
    return float(np.min(np.sum(w * w / vals, axis=1)))


@st.composite
def problems(draw, n_min=1, n_max=4, span_max=5, weights="mixed"):
    N = draw(st.integers(n_min, n_max))
    n_low = draw(st.integers(1, 4))
    n_high = n_low + draw(st.integers(0, span_max))
    budget = draw(st.integers(N * n_low, N * n_high))
    if weights == "mixed":
        elem = st.one_of(
            st.just(0.0),
            st.sampled_from([0.25, 1 / 3, 0.1, 1.0]),
            st.floats(1e-6, 1.0, allow_subnormal=False),
        )
    else:  # continuous, positive: ties have probability ~0
        elem = st.floats(1e-3, 1.0)
    w = draw(st.lists(elem, min_size=N, max_size=N))
    return np.array(w, dtype=np.float64), budget, n_low, n_high


def allocate_forced_bisection(w, budget, n_low, n_high):
    """`allocate_rollouts` with the threshold bisection driven to the end even on tiny inputs."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(alloc, "_SELECT_PER_PROMPT", 0)
        mp.setattr(alloc, "_SELECT_BASE", 0)
        return allocate_rollouts(w, budget, n_low, n_high)


# ---------------------------------------------------------------------------------------------
# bernoulli_variance / allocation_weights (SPEC 1.2)
# ---------------------------------------------------------------------------------------------


@FAST
@given(G=st.integers(2, 40), data=st.data())
def test_bernoulli_variance_is_sample_variance(G, data):
    k = data.draw(st.integers(0, G))
    outcomes = np.array([1.0] * k + [0.0] * (G - k))
    np.testing.assert_allclose(
        bernoulli_variance(k, G), np.var(outcomes, ddof=1), rtol=1e-12, atol=1e-15
    )


def test_bernoulli_variance_small_G_and_float_stats():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        P = bernoulli_variance([0, 0, 1, 1.5, 2.2, 3.7], [0, 1, 1, 1.5, 2.2, 3.7])
    assert P.dtype == np.float64
    np.testing.assert_array_equal(P, np.zeros(6))  # G < 2, or k == G after decay
    # Decayed counts: never negative, equals the formula.
    k, G = np.array([0.9 * 3 + 1]), np.array([0.9 * 8 + 4])
    np.testing.assert_allclose(bernoulli_variance(k, G), k * (G - k) / (G * (G - 1)))


def test_allocation_weights_hand_values():
    k = np.array([0, 1, 2, 5, 3, 0])
    G = np.array([0, 3, 4, 10, 4, 8])
    P = np.array([0, 0, 4 / 12, 25 / 90, 3 / 12, 0])  # k (G - k) / (G (G - 1))
    np.testing.assert_allclose(
        allocation_weights(k, G), [0.25, 0.25, P[2], P[3], P[4], 0.0], rtol=1e-15
    )
    np.testing.assert_allclose(
        allocation_weights(k, G, weight_exponent=0.5),
        [0.5, 0.5, np.sqrt(P[2]), np.sqrt(P[3]), 0.5, 0.0],
        rtol=1e-15,
    )
    np.testing.assert_allclose(
        allocation_weights(k, G, min_weight=0.3, unexplored_weight=1.0),
        [1.0, 1.0, P[2], 0.3, 0.3, 0.3],
        rtol=1e-15,
    )
    # min_history = 3: G = 3 is explored (P = 1*2/(3*2) = 1/3).
    np.testing.assert_allclose(allocation_weights(k, G, min_history=3)[:2], [0.25, 1 / 3])
    with pytest.raises(ValueError, match="weight_exponent"):
        allocation_weights(k, G, weight_exponent=-1.0)


# ---------------------------------------------------------------------------------------------
# variance mode (SPEC 1.3)
# ---------------------------------------------------------------------------------------------


def test_variance_hand_example():
    # w = (1, 2), B = 6, bounds 1..5: objective 1/n0 + 4/n1 over n0 + n1 = 6:
    # (1,5) 1.8, (2,4) 1.5, (3,3) 1.667, (4,2) 2.25  ->  (2, 4), as n proportional to w says.
    n = allocate_rollouts([1.0, 2.0], 6, 1, 5)
    assert n.dtype == np.int64
    np.testing.assert_array_equal(n, [2, 4])


@FAST
@given(problems(n_max=6, span_max=8))
def test_variance_invariants(problem):
    w, B, lo, hi = problem
    n = allocate_rollouts(w, B, lo, hi)
    assert n.dtype == np.int64 and n.shape == w.shape
    assert int(n.sum()) == B
    assert n.min() >= lo and n.max() <= hi
    np.testing.assert_array_equal(n, allocate_rollouts(w.copy(), B, lo, hi))
    np.testing.assert_array_equal(n, allocate_rollouts(list(w), B, lo, hi))


@FAST
@given(problems(n_max=4, span_max=5))
def test_variance_matches_brute_force(problem):
    w, B, lo, hi = problem
    n = allocate_rollouts(w, B, lo, hi)
    best = brute_force_min(w, B, lo, hi)
    assert allocation_objective(w, n) <= best * (1 + 1e-12) + 1e-300


@FAST
@given(problems(n_max=4, span_max=5))
def test_variance_matches_brute_force_forced_bisection(problem):
    w, B, lo, hi = problem
    n = allocate_forced_bisection(w, B, lo, hi)
    assert allocation_objective(w, n) <= brute_force_min(w, B, lo, hi) * (1 + 1e-12) + 1e-300
    np.testing.assert_array_equal(n, greedy_reference(w, B, lo, hi))


@MEDIUM
@given(problems(n_min=30, n_max=60, span_max=16))
def test_variance_matches_greedy_medium(problem):
    w, B, lo, hi = problem
    np.testing.assert_array_equal(allocate_rollouts(w, B, lo, hi), greedy_reference(w, B, lo, hi))


@MEDIUM
@given(problems(n_min=30, n_max=60, span_max=16))
def test_variance_matches_greedy_medium_forced_bisection(problem):
    w, B, lo, hi = problem
    np.testing.assert_array_equal(
        allocate_forced_bisection(w, B, lo, hi), greedy_reference(w, B, lo, hi)
    )


def test_variance_tie_break_fewer_rollouts_then_index():
    # w1 = sqrt(2/6) is chosen so that its first gain w1^2 / (1*2) equals prompt 0's second gain
    # 1 / (2*3) = 1/6 exactly in float64. Greedy from (1, 1): prompt 0 first (gain 1/2) ->
    # (2, 1); then a tie at 1/6: the prompt with fewer rollouts (prompt 1) wins -> (2, 2),
    # although prompt 0 has the lower index.
    w = np.array([1.0, 0.5773502691896257])
    assert w[1] * w[1] / 2.0 == 1.0 / 6.0
    np.testing.assert_array_equal(allocate_rollouts(w, 4, 1, 5), [2, 2])
    np.testing.assert_array_equal(allocate_forced_bisection(w, 4, 1, 5), [2, 2])
    np.testing.assert_array_equal(greedy_reference(w, 4, 1, 5), [2, 2])


def test_tiny_relative_weights_count_as_zero():
    # 1e-155 relative to the max is below the documented 1e-150 cut: it ties with the zero
    # weight, so after prompt 0 hits the cap the rest is spread evenly (not all to prompt 1).
    np.testing.assert_array_equal(allocate_rollouts([1.0, 1e-155, 0.0], 9, 1, 5), [5, 2, 2])
    np.testing.assert_array_equal(allocate_rollouts([1.0, 1e-140, 0.0], 9, 1, 5), [5, 3, 1])


@pytest.mark.parametrize("seed", range(4))
def test_count_gt_exact_at_gain_values(seed):
    # Thresholds equal to an actual gain are where the closed-form count can be off by one
    # (both directions), so every gain of the problem is tried as the threshold.
    rng = np.random.default_rng(seed)
    w2 = rng.random(40) ** 2
    n_low, cap = int(rng.integers(1, 10)), int(rng.integers(1, 25))
    n = n_low + np.arange(cap)
    gains = w2[:, None] / (n[None, :] * (n[None, :] + 1.0))
    for t in np.unique(gains):
        np.testing.assert_array_equal(
            alloc._count_gt(w2, float(t), n_low, cap), (gains > t).sum(axis=1)
        )


@pytest.mark.parametrize("seed", range(6))
def test_variance_large_matches_sorted_units(seed):
    # Large enough that the threshold bisection and its active set are exercised for real.
    rng = np.random.default_rng(seed)
    N, lo, hi = 3000, 8, 24
    w = rng.random(N) ** 2 * 0.25
    w[rng.random(N) < 0.2] = 0.0  # all-correct / all-wrong prompts
    w[rng.random(N) < 0.2] = 0.25  # unexplored: many exact ties
    if seed % 2:
        w = np.round(w * 40) / 40  # heavy ties
    B = int(rng.integers(N * lo, N * hi + 1)) if seed >= 2 else 16 * N
    n = allocate_rollouts(w, B, lo, hi)
    np.testing.assert_array_equal(n, sorted_units_reference(w, B, lo, hi))


@FAST
@given(problems(n_min=2, n_max=7, span_max=8, weights="positive"), st.randoms())
def test_variance_permutation_equivariant_without_ties(problem, rnd):
    w, B, lo, hi = problem
    # Only where no two marginal gains coincide, otherwise the index tie-break matters.
    w2 = _scaled_w2(w)
    gains = (
        w2[:, None] / (np.arange(lo, hi)[None, :] * (np.arange(lo, hi)[None, :] + 1.0))
    ).ravel()
    assume(np.unique(gains).size == gains.size)
    perm = np.arange(len(w))
    rnd.shuffle(perm)
    np.testing.assert_array_equal(
        allocate_rollouts(w[perm], B, lo, hi), allocate_rollouts(w, B, lo, hi)[perm]
    )


@MEDIUM
@given(problems(n_min=1, n_max=40, span_max=10), st.floats(1e-3, 1e3))
def test_variance_scale_invariant(problem, scale):
    w, B, lo, hi = problem
    n = allocate_rollouts(w, B, lo, hi)
    m = allocate_rollouts(w * scale, B, lo, hi)
    # Same objective (the integer vectors may differ only among exact float ties).
    np.testing.assert_allclose(allocation_objective(w, m), allocation_objective(w, n), rtol=1e-12)


@pytest.mark.parametrize("seed", range(20))
def test_water_level_sanity(seed):
    rng = np.random.default_rng(seed)
    N = int(rng.integers(5, 300))
    w = rng.random(N)
    w[rng.random(N) < 0.2] = 0.0
    lo, hi = 1, int(rng.integers(200, 3000))
    B = int(rng.integers(N * lo, N * hi))
    x = continuous_allocation(w, B, lo, hi)
    assert abs(x.sum() - B) <= 1e-9 * B
    free = (w > 0) & (x > lo + 1e-9) & (x < hi - 1e-9)
    if free.any():  # the free prompts share one water level lambda = x_i / w_i
        lam = x[free] / w[free]
        np.testing.assert_allclose(lam, lam[0], rtol=1e-9)
    n = allocate_rollouts(w, B, lo, hi)
    # For large B the integer optimum is the continuous one up to rounding.
    assert np.max(np.abs(n - x)) < 1.5
    assert np.mean(np.abs(n - x)) < 0.75


def test_all_zero_and_equal_weights_spread_evenly():
    # B = 17 over 5 prompts: 3 each plus 2 extra, to the lowest indices.
    for w in ([0.0] * 5, [0.3] * 5, [1e-200] * 5):
        np.testing.assert_array_equal(allocate_rollouts(w, 17, 2, 10), [4, 4, 3, 3, 3])
    # Bounds can bind: n_high = 4 and B = 19 -> only one prompt below the cap.
    np.testing.assert_array_equal(allocate_rollouts([0.0] * 5, 19, 2, 4), [4, 4, 4, 4, 3])


@FAST
@given(st.integers(1, 50), st.integers(1, 8), st.integers(0, 8), st.data())
def test_equal_weights_even_spread_property(N, lo, span, data):
    hi = lo + span
    B = data.draw(st.integers(N * lo, N * hi))
    value = data.draw(st.sampled_from([0.0, 0.25, 1.0]))
    n = allocate_rollouts(np.full(N, value), B, lo, hi)
    assert n.max() - n.min() <= 1
    assert np.all(np.diff(n) <= 0)  # the extras go to the lowest indices


def test_zero_weights_get_n_low_unless_positive_prompts_are_full():
    # Positive prompts can absorb everything: zero-weight prompts stay at n_low.
    n = allocate_rollouts([0.0, 1.0, 0.0, 2.0], 20, 2, 12)
    assert n[0] == n[2] == 2 and n.sum() == 20
    # Positive prompts at the cap 5 + 5; the other 7 units go evenly to the zero-weight ones
    # (2 each = 6, one extra to the lowest index).
    np.testing.assert_array_equal(allocate_rollouts([0, 1, 0, 2, 0], 17, 2, 5), [3, 5, 2, 5, 2])


@pytest.mark.parametrize(
    "N, B, lo, hi, pattern",
    [
        (4, 7, 2, 5, r"4 \* 2 = 8.*B = 7"),
        (4, 21, 2, 5, r"4 \* 5 = 20.*B = 21"),
        (3, 9, 4, 3, r"n_low=4.*n_high=3"),
        (3, 0, 0, 3, r"n_low must be >= 1.*n_low=0"),
        (0, 1, 1, 3, r"0 \* 3 = 0.*B = 1"),
    ],
)
def test_infeasible_configs_name_the_numbers(N, B, lo, hi, pattern):
    with pytest.raises(ValueError, match=pattern):
        allocate_rollouts(np.ones(N), B, lo, hi)
    with pytest.raises(ValueError, match=pattern):
        check_budget(N, B, lo, hi)


def test_bad_weights_and_empty_input():
    with pytest.raises(ValueError, match=r"weights\[1\] = -0.5"):
        allocate_rollouts([1.0, -0.5], 4, 1, 3)
    with pytest.raises(ValueError, match=r"weights\[0\] = nan"):
        allocate_rollouts([np.nan, 1.0], 4, 1, 3)
    with pytest.raises(ValueError, match="1-D"):
        allocate_rollouts(np.ones((2, 2)), 8, 1, 3)
    with pytest.raises(ValueError, match="unknown allocation mode"):
        allocate_rollouts([1.0], 1, 1, 1, mode="greedy")
    out = allocate_rollouts(np.zeros(0), 0, 8, 24)
    assert out.dtype == np.int64 and out.shape == (0,)


def test_variance_fast_for_100k_prompts():
    import time

    rng = np.random.default_rng(0)
    N = 100_000
    w = rng.random(N) * 0.25
    w[rng.random(N) < 0.3] = 0.0
    w[rng.random(N) < 0.2] = 0.25
    t0 = time.perf_counter()
    n = allocate_rollouts(w, 16 * N, 8, 24)
    assert time.perf_counter() - t0 < 1.0
    assert n.sum() == 16 * N


# ---------------------------------------------------------------------------------------------
# uniform mode
# ---------------------------------------------------------------------------------------------


def test_uniform_mode():
    np.testing.assert_array_equal(
        allocate_rollouts(np.zeros(3), 48, 8, 24, mode="uniform"), [16, 16, 16]
    )
    n = allocate_rollouts(np.zeros(3), 96, 8, 24, mode="uniform", rollouts_per_prompt=32)
    np.testing.assert_array_equal(n, [32, 32, 32])  # bounds are not used by plain GRPO
    assert n.dtype == np.int64
    with pytest.raises(ValueError, match=r"3 \* 16 = 48.*B = 50"):
        allocate_rollouts(np.zeros(3), 50, 8, 24, mode="uniform", rollouts_per_prompt=16)
    with pytest.raises(ValueError, match=r"3 \* 16 = 48.*B = 50"):
        allocate_rollouts(np.zeros(3), 50, 8, 24, mode="uniform")


# ---------------------------------------------------------------------------------------------
# official mode (SPEC 1.3), hand-computed
# ---------------------------------------------------------------------------------------------


def test_official_priority_rules():
    k = np.array([0, 3, 9, 17, 0, 1, 2])
    G = np.array([0, 3.9, 10, 20, 10, 5, 5])
    # G < 4 -> -1; acc 0.9 and exactly 0.85 -> 0.01; acc 0: P = 0, 0 + 1e-6 -> floor 0.01;
    # k=1,G=5: P = 4/20 = 0.2, + 1e-6 * 0.8;  k=2,G=5: P = 6/20 = 0.3, + 1e-6 * 0.6.
    np.testing.assert_allclose(
        official_priority(k, G),
        [-1, -1, 0.01, 0.01, 0.01, 0.2 + 0.8e-6, 0.3 + 0.6e-6],
        rtol=1e-15,
    )


def test_official_hand_example_unexplored_easy_and_cap_redistribution():
    # n_low = 1, n_high = 10, B = 30, b0 = max(1, 4) = 4.
    #   p  G   k  rho                        minimum max(1, 4 - G)
    #   0  0   0  -1 (unexplored)            4
    #   1  2   1  -1 (unexplored)            2
    #   2  10  9  0.01 (acc 0.9 >= 0.85)     1
    #   3  5   1  0.2 + 0.8e-6               1
    #   4  5   2  0.3 + 0.6e-6               1
    # Minimums sum to 9, 21 left. Round 1 over {2, 3, 4} (sum rho ~ 0.51):
    #   shares 21 * rho / 0.51 = 0.412, 8.235, 12.353 -> floors 0, 8, 12 (20), leftover 1 to the
    #   largest remainder (0.412, prompt 2) -> +1, +8, +12; prompt 4 is capped at 10 (+9).
    #   n = [4, 2, 2, 9, 10], 3 left.
    # Round 2 over {2, 3} (sum 0.21): shares 0.143, 2.857 -> floors 0, 2, leftover 1 to prompt 3
    #   -> +0, +3, capped at 10 (+1). n = [4, 2, 2, 10, 10], 2 left.
    # Round 3 over {2}: +2.  Result [4, 2, 4, 10, 10].
    k = [0, 1, 9, 1, 2]
    G = [0, 2, 10, 5, 5]
    n = official_allocation(k, G, 30, 1, 10)
    assert n.dtype == np.int64
    np.testing.assert_array_equal(n, [4, 2, 4, 10, 10])
    np.testing.assert_array_equal(
        allocate_rollouts(None, 30, 1, 10, mode="official", stats=(k, G)), n
    )


def test_official_remainder_ties_go_to_lower_index():
    # Two equal priorities, minimums max(2, 4 - 10) = 2 each, 5 left: shares 2.5, 2.5 ->
    # floors 2, 2, the leftover unit to the lower index.
    np.testing.assert_array_equal(official_allocation([5, 5], [10, 10], 9, 2, 10), [5, 4])


def test_official_fallback_does_not_exceed_n_high():
    # n_low = 1, n_high = 4, b0 = 4. Prompts: G = 0, 1, 2 unexplored (minimums 4, 3, 2) and one
    # explored prompt (G = 10, k = 5, minimum 1). B = 14: 4 left, all to prompt 3 -> capped at 4
    # (+3). 1 left, no positive-priority prompt below the cap: the official code would overshoot
    # n_high; here it goes to the unexplored prompt with the fewest rollouts (prompt 2: 2 -> 3).
    k, G = [0, 0, 2, 5], [0, 1, 2, 10]
    np.testing.assert_array_equal(official_allocation(k, G, 14, 1, 4), [4, 3, 3, 4])
    # B = 15: two left -> prompt 2 (2 -> 3), then the tie 3/3 goes to the lower index, prompt 1.
    np.testing.assert_array_equal(official_allocation(k, G, 15, 1, 4), [4, 4, 3, 4])
    np.testing.assert_array_equal(official_allocation(k, G, 16, 1, 4), [4, 4, 4, 4])
    with pytest.raises(ValueError, match=r"4 \* 4 = 16.*B = 17"):
        official_allocation(k, G, 17, 1, 4)
    # Default bounds (b0 = n_low = 8): everyone starts at 8; the explored prompt takes 16 more up
    # to the cap 24 and the remaining 8 go to the unexplored prompt.
    np.testing.assert_array_equal(official_allocation([0, 5], [0, 10], 40, 8, 24), [16, 24])
    # First step (nothing explored): an even spread.
    np.testing.assert_array_equal(
        official_allocation(np.zeros(4), np.zeros(4), 64, 8, 24), [16] * 4
    )


def test_official_minimums_exceeding_budget_raise():
    # Three unexplored prompts need max(1, 4 - 0) = 4 each = 12 > B = 10.
    with pytest.raises(ValueError, match=r"sum to 12, more than the budget B = 10"):
        official_allocation([0, 0, 0], [0, 0, 0], 10, 1, 8)
    with pytest.raises(ValueError, match="needs stats"):
        allocate_rollouts(np.ones(3), 30, 1, 10, mode="official")


@FAST
@given(st.data())
def test_official_invariants(data):
    N = data.draw(st.integers(1, 30))
    lo = data.draw(st.integers(1, 8))
    hi = lo + data.draw(st.integers(0, 16))
    G = np.array(data.draw(st.lists(st.integers(0, 40), min_size=N, max_size=N)), float)
    k = np.array([data.draw(st.integers(0, int(g))) for g in G], float)
    mins = np.minimum(np.maximum(max(lo, 4) - G, lo), hi)
    B = data.draw(st.integers(int(mins.sum()), N * hi))
    n = official_allocation(k, G, B, lo, hi)
    assert n.dtype == np.int64 and n.sum() == B
    assert np.all(n >= mins) and np.all(n <= hi)
    np.testing.assert_array_equal(n, official_allocation(k, G, B, lo, hi))


# ---------------------------------------------------------------------------------------------
# PromptStats (SPEC 1.1)
# ---------------------------------------------------------------------------------------------


def test_prompt_stats_cumulative_updates():
    s = PromptStats()
    s.update([10, 11], n=[8, 16], correct=[2, 16])
    s.update(np.array([11, 12]), n=[4, 8], correct=[1, 0])
    k, G = s.get([10, 11, 12, 13])
    np.testing.assert_array_equal(k, [2, 17, 0, 0])
    np.testing.assert_array_equal(G, [8, 20, 8, 0])
    assert len(s) == 3 and 11 in s and 13 not in s
    assert k.dtype == G.dtype == np.float64
    # Weights: 10 -> P = 2*6/(8*7), 11 -> 17*3/(20*19), 12 -> 0, 13 unseen -> 0.25.
    np.testing.assert_allclose(s.weights([10, 11, 12, 13]), [12 / 56, 51 / 380, 0, 0.25])


def test_prompt_stats_decay_only_touches_the_batch():
    s = PromptStats()
    s.update(["a", "b"], [8, 8], [4, 0])
    s.update(["a"], [4], [4], decay=0.5)  # G = 0.5*8 + 4 = 8, k = 0.5*4 + 4 = 6
    s.update(["a"], [10], [1], decay=0.9)  # G = 0.9*8 + 10 = 17.2, k = 0.9*6 + 1 = 6.4
    k, G = s.get(["a", "b"])
    np.testing.assert_allclose(G, [17.2, 8.0], rtol=1e-15)
    np.testing.assert_allclose(k, [6.4, 0.0], rtol=1e-15)


def test_prompt_stats_errors_are_atomic():
    s = PromptStats()
    s.update([1, 2], [4, 4], [1, 1])
    before = s.state_dict()
    with pytest.raises(ValueError, match="duplicate prompt id 7"):
        s.update([3, 7, 7], [4, 4, 4], [0, 0, 0])
    with pytest.raises(ValueError, match=r"prompt 2: .*correct=5, n=4"):
        s.update([1, 2], [4, 4], [0, 5])
    with pytest.raises(ValueError, match="decay"):
        s.update([1], [4], [0], decay=1.5)
    with pytest.raises(TypeError, match="int ids"):
        s.update(["x"], [4], [0])
    with pytest.raises(TypeError, match="int or str"):
        s.update([1.5], [4], [0])
    after = s.state_dict()
    for key in before:
        np.testing.assert_array_equal(before[key], after[key])
    assert len(s) == 2


@pytest.mark.parametrize("ids", [[5, -3, 2**40, 0], ["gsm8k/12", "aime24/3", "x,y", "é"]])
def test_prompt_stats_state_round_trip(ids):
    s = PromptStats()
    s.update(ids, [16, 8, 24, 1], [3, 8, 0, 1])
    s.update(ids[1:3], [9, 7], [2, 5], decay=0.37)
    s.update(ids[:1], [5], [4], decay=0.91)
    state = s.state_dict()
    assert set(state) == {"ids", "k", "G"}
    assert all(isinstance(v, np.ndarray) for v in state.values())
    assert state["k"].dtype == state["G"].dtype == np.float64
    r = PromptStats.from_state_dict(state)
    for key, v in r.state_dict().items():
        np.testing.assert_array_equal(v, state[key])  # exact, including decayed floats
    for a, b in zip(s.get(ids), r.get(ids), strict=True):
        np.testing.assert_array_equal(a, b)
    # The restored store continues exactly like the original.
    s.update(ids[::-1], [3, 3, 3, 3], [1, 2, 3, 0], decay=0.5)
    r.update(ids[::-1], [3, 3, 3, 3], [1, 2, 3, 0], decay=0.5)
    np.testing.assert_array_equal(s.state_dict()["G"], r.state_dict()["G"])
    empty = PromptStats.from_state_dict(PromptStats().state_dict())
    assert len(empty) == 0


def test_prompt_stats_from_bad_state():
    with pytest.raises(ValueError, match="duplicate prompt id 3"):
        PromptStats.from_state_dict({"ids": np.array([3, 3]), "k": [0, 0], "G": [1, 1]})
    with pytest.raises(ValueError, match="shapes"):
        PromptStats.from_state_dict({"ids": np.array([3]), "k": [0, 0], "G": [1, 1]})


def test_prompt_stats_table():
    s = PromptStats()
    s.update([1, 2], [4, 2], [1, 1])
    # id 1: p = 1/4, P = 1*3/(4*3) = 0.25, weight 0.25; id 2: p = 0.5, P = 1*1/(2*1) = 0.5,
    # weight = unexplored (G = 2 < 4) = 0.25.
    assert s.to_table() == (
        "id,G,k,p_hat,variance,weight\n1,4.0,1.0,0.25,0.25,0.25\n2,2.0,1.0,0.5,0.5,0.25\n"
    )
    rows = s.as_rows(weight_exponent=0.5)
    assert rows[0] == {"id": 1, "G": 4.0, "k": 1.0, "p_hat": 0.25, "variance": 0.25, "weight": 0.5}
    s2 = PromptStats()
    s2.update(["a,b"], [0], [0])
    assert re.fullmatch(
        r'id,G,k,p_hat,variance,weight\n"a,b",0.0,0.0,nan,0.0,0.25\n', s2.to_table()
    )


# ---------------------------------------------------------------------------------------------
# AllocationPolicy: step vs epoch refresh (SPEC 1.3)
# ---------------------------------------------------------------------------------------------


def test_epoch_refresh_freezes_weights_within_an_epoch():
    stats = PromptStats()
    stats.update([0, 1, 2], [8, 8, 8], [4, 8, 1])
    ids = [0, 1, 2, 3]
    pol = AllocationPolicy(refresh="epoch", n_low=2, n_high=8, rollouts_per_prompt=4)
    step = AllocationPolicy(refresh="step", n_low=2, n_high=8, rollouts_per_prompt=4)
    pol.start_epoch(stats, epoch=0)
    w0 = pol.weights(stats, ids)
    n0 = pol.allocate(stats, ids)
    # w: P(4 of 8) = 16/56, P(8 of 8) = 0, P(1 of 8) = 7/56, unseen -> 0.25
    np.testing.assert_allclose(w0, [16 / 56, 0, 7 / 56, 0.25])
    assert n0.sum() == 16

    stats.update([0, 1, 3], [8, 8, 8], [8, 4, 4])  # changes all but prompt 2
    np.testing.assert_array_equal(pol.weights(stats, ids, epoch=0), w0)
    np.testing.assert_array_equal(pol.allocate(stats, ids, epoch=0), n0)
    assert not np.array_equal(step.weights(stats, ids), w0)

    w1 = pol.weights(stats, ids, epoch=1)  # new epoch: refreshed snapshot
    np.testing.assert_array_equal(w1, step.weights(stats, ids))
    assert pol.epoch == 1

    # Snapshot survives a checkpoint round trip.
    restored = AllocationPolicy(refresh="epoch", n_low=2, n_high=8, rollouts_per_prompt=4)
    restored.load_state_dict(pol.state_dict())
    stats.update([2], [8], [8])
    np.testing.assert_array_equal(restored.weights(stats, ids, epoch=1), w1)


def test_policy_modes_and_config():
    stats = PromptStats()
    stats.update([0, 1, 2], [10, 10, 10], [5, 9, 1])
    ids = [0, 1, 2, 3]
    base = dict(n_low=1, n_high=10, rollouts_per_prompt=6)
    n_off = AllocationPolicy(mode="official", **base).allocate(stats, ids)
    np.testing.assert_array_equal(n_off, official_allocation(*stats.get(ids), 24, 1, 10))
    n_uni = AllocationPolicy(mode="uniform", **base).allocate(stats, ids)
    np.testing.assert_array_equal(n_uni, [6, 6, 6, 6])
    n_var = AllocationPolicy(**base).allocate(stats, ids, budget=20)
    np.testing.assert_array_equal(n_var, allocate_rollouts(stats.weights(ids), 20, 1, 10))
    with pytest.raises(ValueError, match="refresh"):
        AllocationPolicy(refresh="never")

    class NS:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    cfg = NS(
        rollouts_per_prompt=16,
        allocation=NS(
            mode="variance",
            refresh="epoch",
            n_low=8,
            n_high=24,
            min_history=4,
            unexplored_weight=None,
            weight_exponent=0.5,
            min_weight=0.0,
        ),
    )
    pol = AllocationPolicy.from_config(cfg)
    assert (pol.refresh, pol.weight_exponent, pol.n_high) == ("epoch", 0.5, 24)
