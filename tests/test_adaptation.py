"""The label-free guard (savlt_model.adaptation): it refuses an adaptation that collapses
or reorders the predictions (cases built by hand), keeps "none" in distribution, and on a
common feature offset picks a map that restores the spread."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from savlt_model.adaptation import (
    MAX_AUC_COST,
    SELF_TRAINED,
    AdaptedFeatures,
    call_cost,
    choose,
    expected_auc_cost,
    guard,
    restandardised,
    shift_referral,
    site_calibration,
    t3a_classifier,
)
from savlt_model.calibration import Calibration, calibration_to_dict, shift_score
from savlt_model.metrics import pair_auc
from savlt_model.referral import accepted


def _p(rows: list[list[float]]) -> np.ndarray:
    return np.asarray(rows, dtype=np.float64)


# ten scans, three classes (class 0 is the high-risk one); "none" spreads them 4 / 3 / 3
NONE = _p(
    [
        *([0.9, 0.05, 0.05], [0.8, 0.1, 0.1], [0.7, 0.2, 0.1], [0.6, 0.3, 0.1]),
        *([0.3, 0.6, 0.1], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1]),
        *([0.15, 0.1, 0.75], [0.05, 0.15, 0.8], [0.02, 0.08, 0.9]),
    ]
)


def test_the_guard_refuses_an_adaptation_that_collapses_predictions():
    # same ranking of the high-risk score, but every scan called class 1
    high = NONE[:, 0] * 0.45
    collapsed = np.stack([high, 1 - high - 0.01, np.full(10, 0.01)], axis=1)
    got = choose({"none": NONE, "recentre": collapsed}, [0], 1.0, 0.5, 0.4)
    assert got.choice == "none"
    cand = got.candidates["recentre"]
    assert cand.shares.tolist() == [0.0, 1.0, 0.0]
    assert cand.auc_cost == 0.0  # the same ranking: the cost alone would not refuse it
    assert cand.refused == ["collapses: 100% of scans in one class"]
    # unsure: the threshold goes halfway from 0.4 to 1, and the shift's share (half of the
    # scans at 1.0) refers the five least confident (0.6, 0.6, 0.7, 0.7, 0.75)
    assert got.refer_below == 0.76
    assert "referring more" in got.reason


def test_the_guard_refuses_an_adaptation_that_reorders_the_scans():
    inverted = NONE[::-1].copy()  # the same 4 / 3 / 3 spread, the scans in reverse order
    got = choose({"none": NONE, "recentre": inverted}, [0], 1.0, 0.5, 0.4)
    assert got.choice == "none"
    assert got.candidates["recentre"].auc_cost > 0.3
    assert got.candidates["recentre"].refused[0].startswith("reorders the scans: expected AUC")


def test_a_candidate_fitted_to_the_models_calls_answers_to_those_calls():
    """T3A and TENT move the scans the model was unsure of, where the expected AUC cost is
    nearly blind: here the five scans just above the high-risk call and the five just
    below trade places (25 of the 20 x 20 call pairs reversed), at an expected cost under
    the budget. A feature map with the same probabilities passes; a self-trained one not."""
    q = np.linspace(0.05, 0.9, 40)  # P(high risk); called high-risk above 0.475

    def three(h: np.ndarray) -> np.ndarray:
        return np.stack([h, 0.95 - h, np.full(len(h), 0.05)], axis=1)

    near = np.argsort(np.abs(q - 0.475), kind="stable")[:10]
    moved = q.copy()
    moved[near] = np.where(q[near] > 0.475, q[near] - 0.1, q[near] + 0.1)
    assert call_cost(three(q), three(moved), [0]) == pytest.approx(25 / 400)
    assert call_cost(three(q), three(q**2), [0]) == 0.0  # the same order: nothing reversed
    got = choose(
        {"none": three(q), "t3a": three(moved), "recentre": three(moved)}, [0], 1.0, 0.5, 0.4
    )
    assert {"t3a", "tent"} == SELF_TRAINED
    for name in ("t3a", "recentre"):
        assert got.candidates[name].auc_cost < MAX_AUC_COST  # the expected cost lets both by
    assert got.candidates["recentre"].refused == []
    assert got.candidates["t3a"].refused == [
        "reorders the model's own calls it was fitted to: 6.2 % of high- / low-risk call pairs > 1"
    ]


def test_the_expected_auc_cost_is_the_auc_lost_if_the_unadapted_probabilities_are_right():
    """By hand, two scans with P(high risk) 0.9 and 0.1: the pairs weigh q_i (1 - q_j), so
    ranking them right scores 0.81 / 0.82 and inverting them 0.01 / 0.82 (style a: a map
    that inverts a ranking the model was sure of); ties count half."""
    q = np.array([0.9, 0.1])
    assert pair_auc(q, q, 1 - q) == pytest.approx(0.81 / 0.82)
    assert pair_auc(q[::-1], q, 1 - q) == pytest.approx(0.01 / 0.82)
    assert pair_auc(np.zeros(2), q, 1 - q) == pytest.approx(0.5)
    assert expected_auc_cost(q, q[::-1]) == pytest.approx(0.80 / 0.82)
    # any order-keeping map costs nothing; reordering scans the model was unsure of costs
    # little, the same reordering of confident scans much more
    assert expected_auc_cost(q, q**3) == 0.0
    unsure = np.array([0.9, 0.52, 0.48, 0.1])
    swapped_middle = np.array([0.9, 0.48, 0.52, 0.1])
    swapped_ends = np.array([0.1, 0.52, 0.48, 0.9])
    assert 0 < expected_auc_cost(unsure, swapped_middle) < MAX_AUC_COST * 3
    assert expected_auc_cost(unsure, swapped_ends) > 0.5


def test_the_guard_keeps_none_in_distribution_and_takes_a_safe_spreading_map():
    # "none" over-calls class 0 (9 of 10 scans); the map spreads 4 / 3 / 3 in the same order
    skewed = (NONE + np.array([0.8, 0.0, 0.0])) / 1.8
    assert choose({"none": skewed, "recentre": NONE}, [0], 0.1, 0.5, 0.4).choice == "none"
    got = choose({"none": skewed, "recentre": NONE}, [0], 1.0, 0.5, 0.4)
    assert got.candidates["none"].shares.tolist() == [0.9, 0.0, 0.1]
    assert got.candidates["recentre"].auc_cost == 0.0
    # safe, taken; the shift still refers more: (1.0 - 0.5) / (2 x 0.5) of the way to 1
    # (0.7), and at least that share of the scans under the map: the five below 0.76
    assert got.choice == "recentre" and got.refer_below == 0.76
    # the same map at a shift beyond 3 x the threshold is not trusted
    far = choose({"none": skewed, "recentre": NONE}, [0], 1.6, 0.5, 0.4)
    assert far.choice == "none" and "beyond 1.50" in far.candidates["recentre"].refused[0]


def test_restandardise_puts_the_site_on_the_reference_mean_and_spread():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(400, 8)) + 2.0
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    site = 0.3 * rng.normal(size=(200, 8)) + np.array([3.0, 0, 0, 0, 0, 0, 1.0, 0])
    site /= np.linalg.norm(site, axis=1, keepdims=True)
    mu = ref.mean(axis=0)
    assert shift_score(site, mu) > 1.0
    moved = restandardised(Calibration(reference=mu, recentre=True), site)
    assert shift_score(moved.features(site), mu) < 0.1
    assert not moved.recentre  # the site's statistics are fixed: new scans do not move them
    spread = np.sqrt(((moved.features(site) - mu) ** 2).sum(axis=1).mean())
    assert spread == pytest.approx(np.sqrt(1 - mu @ mu), rel=0.1)  # the reference's spread


def test_guard_on_a_common_feature_offset_picks_a_map_and_refers_by_the_shift():
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(3, 12))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    w = 6.0 * centres

    def scans(offset: float) -> np.ndarray:
        y = rng.integers(0, 3, 150)
        f = centres[y] + 0.6 * rng.normal(size=(150, 12)) + offset * centres[0]
        return f / np.linalg.norm(f, axis=1, keepdims=True)

    train = scans(0.0)
    inductive = Calibration(train.mean(axis=0), refer_below=0.5)
    centre = Calibration(train.mean(axis=0), recentre=True)
    site = scans(2.5)  # a display offset pushes every scan toward class 0
    got = guard(site, w, [0], inductive, centre, shift_threshold=0.5)
    assert got.candidates["none"].collapsed
    assert got.choice in ("recentre", "restandardise") and not got.candidates[got.choice].refused
    assert got.candidates[got.choice].shares.max() < 0.6
    picked = got.candidates[got.choice].probs
    assert got.refer_below == shift_referral(picked, 0.5, got.shift, 0.5) > 0.5  # by the shift
    assert 0 <= got.referral_rate <= 1
    # `savlt calibrate` stores exactly the map the guard took, with the site's statistics
    # fixed, so a stored model scores these scans as the guard's pick did, and later scans
    # of the site without re-estimating anything
    stored = site_calibration(got, inductive, centre, site)
    assert stored.refer_below == got.refer_below and not stored.recentre
    np.testing.assert_allclose(stored.probs(site, w), picked, atol=1e-12)
    for name in ("recentre", "restandardise"):  # either map, had the guard taken it
        took = replace(got, choice=name)
        np.testing.assert_allclose(
            site_calibration(took, inductive, centre, site).probs(site, w),
            got.candidates[name].probs,
            atol=1e-12,
        )
    # a map the guard refused is never stored: it keeps the model as trained, referring more
    kept = site_calibration(replace(got, choice="none"), inductive, centre, site)
    assert calibration_to_dict(kept) == calibration_to_dict(
        replace(inductive, refer_below=got.refer_below)
    )


def test_the_referral_threshold_rises_with_the_shift_to_every_scan_at_three_thresholds():
    # confidence 0.45 at every scan: the raised threshold refers them before the share does
    low = np.tile([0.45, 0.3, 0.25], (8, 1))
    assert shift_referral(low, 0.4, 0.3, 0.5) == 0.4  # in distribution: the model's own
    assert shift_referral(low, 0.4, 0.5, 0.5) == 0.4
    assert shift_referral(low, 0.4, 0.75, 0.5) == pytest.approx(0.55)  # a quarter of the way
    assert shift_referral(low, 0.4, 1.5, 0.5) == 1.0  # 3 x the threshold: every scan referred
    assert shift_referral(low, 0.4, 9.0, 0.5) == 1.0
    # in distribution the guard keeps the model's threshold; unsure beyond it, the larger
    # of halfway to 1 (0.7) and the shift's: at 0.75, 0.55 and a quarter of the scans, whose
    # tied confidences (0.6, 0.6, 0.7, 0.7) make it 0.71; at 1.2, 0.82 and 70 % (0.81)
    assert choose({"none": NONE}, [0], 0.4, 0.5, 0.4).refer_below == 0.4
    assert choose({"none": NONE}, [0], 0.75, 0.5, 0.4).refer_below == 0.71  # 4 of 10
    assert choose({"none": NONE}, [0], 1.2, 0.5, 0.4).refer_below == 0.82


def test_a_confidently_wrong_site_refers_the_share_of_scans_its_shift_asks_for():
    # every scan called class 0 at confidence 0.95-0.99: no raised threshold below 0.95
    # refers any, so the shift's share does: half of the scans at shift 1.0, the least
    # confident first
    sure = np.stack([np.linspace(0.95, 0.99, 20), *(np.linspace(0.025, 0.005, 20),) * 2], 1)
    t = shift_referral(sure, 0.4, 1.0, 0.5)
    referred = ~accepted(sure, t)
    assert referred.sum() == 10 and referred[:10].all()
    assert choose({"none": sure}, [0], 1.0, 0.5, 0.4).referral_rate == 0.5
    assert shift_referral(sure, 0.4, 0.5, 0.5) == 0.4  # in distribution: no share


def test_t3a_moves_a_class_weight_toward_its_confident_site_scans_at_the_same_norm():
    w = np.array([[2.0, 0.0], [0.0, 3.0]])
    site = np.array([[0.6, 0.8]] * 3)  # logits (1.2, 2.4): all predicted class 1
    got = t3a_classifier(site, w, Calibration(np.zeros(2)))
    np.testing.assert_allclose(got[0], [2.0, 0.0])  # no scan of class 0: unchanged
    mean = np.array([0.0 + 3 * 0.6, 1.0 + 3 * 0.8]) / 4  # (0.45, 0.85)
    np.testing.assert_allclose(got[1], 3.0 * mean / np.linalg.norm(mean))


def test_the_guard_refuses_an_adaptation_unstable_under_scanner_randomisation():
    """Style-a-like: a map that spreads the predictions and keeps the ranking (so collapse
    and reordering do not fire), but whose calls move with the scanner: on randomised
    views of the same scans half of them change class, while the model's own do not."""
    skewed = (NONE + np.array([0.8, 0.0, 0.0])) / 1.8  # "none": 9 of 10 scans in class 0
    flipped = NONE.copy()
    flipped[4:9] = flipped[4:9][:, [0, 2, 1]]  # the same scans called class 1 <-> 2
    views = {"none": [skewed, skewed], "recentre": [flipped, NONE]}
    got = choose({"none": skewed, "recentre": NONE}, [0], 1.0, 0.5, 0.4, views)
    cand = got.candidates["recentre"]
    assert cand.instability == pytest.approx(0.25) and got.candidates["none"].instability == 0.0
    assert cand.auc_cost <= MAX_AUC_COST and not cand.collapsed  # only instability refuses it
    assert cand.refused == [
        "unstable under scanner randomisation: 25% of scans change class (unadapted 0%)"
    ]
    assert got.choice == "none" and got.refer_below == 0.7  # unsure: refers more
    # the same map, stable on its views, is taken (as without views)
    calm = {"none": [skewed, skewed], "recentre": [NONE, NONE]}
    assert choose({"none": skewed, "recentre": NONE}, [0], 1.0, 0.5, 0.4, calm).choice == "recentre"
    assert choose({"none": skewed, "recentre": NONE}, [0], 1.0, 0.5, 0.4).choice == "recentre"
    # unstable as much as the unadapted model is not held against a map
    shaky = {"none": [flipped, NONE], "recentre": [flipped, NONE]}
    got = choose({"none": NONE, "recentre": NONE}, [0], 1.0, 0.5, 0.4, shaky)
    assert not got.candidates["recentre"].refused


def test_guard_scores_views_with_the_site_statistics_and_takes_model_changing_candidates():
    """Randomised views are mapped with the statistics of the site's own scans; a
    candidate that changes the model (TENT) brings its own features and views."""
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(3, 12))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    w = 6.0 * centres
    y = rng.integers(0, 3, 150)

    def unit(f: np.ndarray) -> np.ndarray:
        return f / np.linalg.norm(f, axis=1, keepdims=True)

    clean = centres[y] + 0.6 * rng.normal(size=(150, 12))
    train = unit(centres[rng.integers(0, 3, 150)] + 0.6 * rng.normal(size=(150, 12)))
    inductive = Calibration(train.mean(axis=0), refer_below=0.5)
    centre = Calibration(train.mean(axis=0), recentre=True)
    site = unit(clean + 2.5 * centres[0])  # a display offset pushes every scan toward class 0
    views = [unit(clean + 2.5 * centres[0] + 0.05 * rng.normal(size=(150, 12))) for _ in "ab"]
    # a TENT whose features undo the offset but whose views scatter: refused as unstable
    tent = AdaptedFeatures(unit(clean), tuple(unit(rng.normal(size=(150, 12))) for _ in "ab"))
    got = guard(site, w, [0], inductive, centre, 0.5, views=views, adapted={"tent": tent})
    assert set(got.candidates) == {"none", "recentre", "restandardise", "t3a", "tent"}
    assert got.candidates["none"].collapsed
    assert got.candidates["tent"].instability > 0.4
    assert any(
        r.startswith("unstable under scanner randomisation") for r in got.candidates["tent"].refused
    )
    assert got.candidates["recentre"].instability < 0.1  # mapped with the site's own mean
    assert got.choice in ("recentre", "restandardise") and not got.candidates[got.choice].refused
    # a stable TENT that undoes the offset is as good a candidate as the maps
    calm = AdaptedFeatures(
        unit(clean), tuple(unit(clean + 0.05 * rng.normal(size=(150, 12))) for _ in "ab")
    )
    again = guard(site, w, [0], inductive, centre, 0.5, views=views, adapted={"tent": calm})
    tent = again.candidates["tent"]
    assert tent.instability < 0.1 and not tent.collapsed  # stable, spread ...
    # ... and held to the same AUC bound as the maps: it re-ranks scans the model was sure of
    assert tent.refused == [
        f"reorders the scans: expected AUC cost {100 * tent.auc_cost:.1f} points > 1"
    ]
