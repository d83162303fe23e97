"""Window statistics for hidden attacks (count test, heavy clients, ranking, alert rule) and the event scorer."""

from __future__ import annotations

import math

import numpy as np
import pytest

from workers.eventscore import EventScorer
from workers.mmd import MMDTester
from workers.hidden_attacks import (
    alert_opens,
    count_test,
    heavy_client_tests,
    rank_events,
    rate_bound,
)


def test_count_test_is_the_exact_binomial_tail():
    n, q = 50, 0.03
    for k in (0, 1, 4, 9, 50):
        brute = sum(math.comb(n, j) * q**j * (1 - q) ** (n - j) for j in range(k, n + 1))
        assert float(count_test(k, n, q)) == pytest.approx(brute, rel=1e-9)
    p = count_test(np.array([[0, 3], [10, 20]]), 200, 0.02)  # broadcasts over windows
    assert p.shape == (2, 2) and p[0, 0] == 1.0 and p[1, 1] < p[1, 0] < p[0, 1]
    with pytest.raises(ValueError):
        count_test(5, 4, 0.1)
    with pytest.raises(ValueError):
        count_test(1, 4, 0.0)


def test_count_test_level_under_h0():
    """Clean windows (flags ~ Bin(n, q)): rejections at 1% stay at or under 1% (the test is exact, discrete)."""
    rng = np.random.default_rng(0)
    k = rng.binomial(200, 0.02, size=20000)
    rate = np.mean(count_test(k, 200, 0.02) <= 0.01)
    assert 0.002 <= rate <= 0.011, rate


def test_rate_bound_is_a_beta_quantile_around_the_calibration_rate():
    median = rate_bound(7, 360, 0.5)
    upper = rate_bound(7, 360, 0.95)
    assert 7 / 360 < median < 8 / 360 < upper < 0.04
    with pytest.raises(ValueError):
        rate_bound(360, 360)


def test_alert_opens_needs_consecutive_positives():
    pos = np.array([[1, 0, 1, 0], [0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=bool)
    assert alert_opens(pos, 2).tolist() == [False, True, True, False]
    assert alert_opens(pos, 1).tolist() == [True, True, True, False]
    assert alert_opens(pos, 4).tolist() == [False, False, True, False]
    assert alert_opens(pos[:, :1], 2).tolist() == [False] * 4


def test_rank_events_favours_events_both_scores_put_high():
    event = np.array([0.1, 5.0, 4.0, 0.2, 3.0])
    witness = np.array([0.0, 0.1, 0.9, 0.8, 0.7])
    order = rank_events(event, witness)
    assert order[0] == 2  # second by either score alone, first by both
    assert sorted(order.tolist()) == list(range(5))
    with pytest.raises(ValueError):
        rank_events(event, witness[:3])


def test_rank_events_on_clean_scales_keeps_an_event_score_far_outside_its_clean_range():
    rng = np.random.default_rng(3)
    event = np.r_[rng.normal(size=150), rng.normal(size=50) + 10.0]  # the last 50 are adversarial
    witness = rng.normal(size=200)  # a witness that sees nothing: clean-like values
    order = rank_events(event, witness, event_reference=rng.normal(size=400), witness_reference=rng.normal(size=400))
    borda = rank_events(event, witness)
    assert (order[:50] >= 150).mean() == 1.0
    assert (borda[:50] >= 150).mean() <= 0.9  # equal rank weights let the blind witness in
    with pytest.raises(ValueError):
        rank_events(event, witness, event_reference=np.zeros(3))


def test_reference_witness_is_the_witness_function_at_the_reference_rows():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(60, 3)), rng.normal(size=(30, 3)) + 0.5
    tester = MMDTester(x, n_permutations=10, seed=0, device="cpu", dtype="float64")
    res = tester.scores(y, k=5)
    s = np.array(tester.bandwidths)
    kern = lambda a, b: np.mean([np.exp(-((a[:, None] - b[None]) ** 2).sum(-1) / (2 * w * w)) for w in s], 0)  # noqa: E731
    xs = (x - x.mean(0)) / x.std(0, ddof=1)
    ys = (y - x.mean(0)) / x.std(0, ddof=1)
    k_xx, k_xy = kern(xs, xs), kern(xs, ys)
    brute = k_xy.mean(1) - (k_xx.sum(1) - 1.0) / (len(x) - 1)
    np.testing.assert_allclose(res.reference_witness, brute, rtol=1e-9, atol=1e-12)


def test_heavy_client_alone_exposes_an_attacker_hidden_in_clean_traffic():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(300, 8))
    tester = MMDTester(ref, n_permutations=200, seed=0, device="cpu")
    clean = rng.normal(size=(160, 8))
    attack = rng.normal(size=(40, 8)) + np.r_[1.5, 1.5, np.zeros(6)]
    window = np.vstack([clean, attack])
    ids = np.r_[np.repeat(["a", "b", "c", "d"], 40), np.repeat("mallory", 40)]
    ids[:3] = "light"  # too few events to be tested alone
    flags = np.r_[np.zeros(160, bool), np.ones(40, bool)]
    flags[::40] = True  # a few clean flags
    tests = heavy_client_tests(ids, 20, tester=tester, layers=window, flags=flags, rate=0.02)
    assert {t.client for t in tests} == {"a", "b", "c", "d", "mallory"}
    assert tests[0].client == "mallory" and tests[0].p_adjusted <= 0.001
    assert tests[0].mmd_p_adjusted == pytest.approx(min(1.0, 5 * tests[0].mmd_p))
    assert all(t.p_adjusted > 0.01 for t in tests[1:])
    assert tester.test(window).mmd2 < tester.test(attack).mmd2 / 5  # the whole window dilutes the attacker
    with pytest.raises(ValueError):
        heavy_client_tests(ids, 20, flags=flags)  # flags need the clean rate


def test_event_scorer_is_calibrated_on_new_clean_events_and_flags_shifted_ones():
    rng = np.random.default_rng(2)
    centers = rng.normal(size=(3, 16)) * 3

    def draw(n, shift=0.0):
        y = rng.integers(0, 3, n)
        return {"l1": centers[y] + rng.normal(size=(n, 16)) + shift, "l2": rng.normal(size=(n, 4))}, y

    ref, y_ref = draw(600)
    scorer = EventScorer(ref, y_ref, seed=0)
    threshold = scorer.threshold(0.05)
    clean, y_clean = draw(4000)
    flagged = (scorer.score(clean, y_clean) > threshold).mean()
    assert 0.03 <= flagged <= 0.07, flagged  # cross-fitted calibration: close to the target on new data
    attacked, y_att = draw(500, shift=2.0)
    assert (scorer.score(attacked, y_att) > threshold).mean() >= 0.9
    p = scorer.p_values(scorer.score(clean, y_clean))
    assert 0.03 <= np.mean(p <= 0.05) <= 0.07
    with pytest.raises(KeyError):
        scorer.score({"l1": clean["l1"]}, y_clean)


def test_docstring_examples_run():
    import doctest

    import workers.eventscore
    import workers.hidden_attacks

    for module in (workers.eventscore, workers.hidden_attacks):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__


def test_no_client_is_singled_out_when_the_whole_window_shifts() -> None:
    from workers.hidden_attacks import HiddenAttackTest

    rng = np.random.default_rng(3)
    test = HiddenAttackTest({"pen": rng.normal(size=(600, 6))}, rng.integers(0, 3, 600))
    clients = np.array([f"c{i % 5}" for i in range(200)])
    count, singled = test.analyze({"pen": rng.normal(size=(200, 6)) + 3.0}, np.zeros(200, int), clients)
    assert count.p_value < 1e-12 and singled == []
    window = rng.normal(size=(200, 6))
    window[clients == "c2"] += 3.0  # one client of five
    count, singled = test.analyze({"pen": window}, np.zeros(200, int), clients)
    assert [c.client for c in singled] == ["c2"]
