"""Scanner robustness: intensity standardisation, scanner augmentation, label-free calibration."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn.calibration import calibration_curve

from savlt_model.calibration import (
    Calibration,
    FeatureStats,
    ValStats,
    brier_score,
    calibration_from_dict,
    calibration_to_dict,
    em_prior_shift,
    expected_calibration_error,
    fit_calibration,
    shift_score,
    site_val_stats,
    softmax,
)
from savlt_model.data.augment import ScannerAugment
from savlt_model.data.intensity import standardise_bscan, standardise_rgb, tissue_mask
from tools.inference import warn_if_shifted

D, C = 16, 3


def _normalise(f: np.ndarray) -> np.ndarray:
    return f / np.linalg.norm(f, axis=1, keepdims=True)


def _clusters(n: int, seed: int, noise: float = 0.35) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit features in C clusters, their labels, and a classifier W that separates them."""
    rng = np.random.default_rng(seed)
    centres = _normalise(rng.normal(size=(C, D)))
    labels = rng.integers(0, C, n)
    feats = _normalise(centres[labels] + noise * rng.normal(size=(n, D)))
    return feats, labels, 10.0 * centres


def _bscan(seed: int = 0) -> np.ndarray:
    """A grey [0, 1] B-scan: dark above a tilted surface, bright speckled tissue below."""
    rng = np.random.default_rng(seed)
    h, w = 96, 160
    rows = np.arange(h)[:, None]
    surface = 20 + 0.05 * np.arange(w)[None, :]
    tissue = rows >= surface
    depth = np.clip(rows - surface, 0, None) / h
    img = np.where(tissue, 0.7 - 0.4 * depth, 0.05) + 0.03 * rng.normal(size=(h, w))
    return np.clip(img, 0.0, 1.0)


def test_a_known_feature_shift_is_undone_by_recentring():
    feats, labels, w = _clusters(600, seed=0)
    reference = FeatureStats.of(feats)
    delta = 1.2 * w[:1] / 10.0  # another scanner pushes every scan toward class 0
    shifted = _normalise(feats + delta)
    acc = lambda p: float((p.argmax(1) == labels).mean())  # noqa: E731
    plain = Calibration(reference.mean)
    assert acc(plain.probs(shifted, w)) < acc(plain.probs(feats, w)) - 0.3
    recentring = Calibration(reference.mean, recentre=True)
    restored = recentring.at_centre(shifted).features(shifted)
    assert acc(softmax(restored @ w.T)) > acc(plain.probs(feats, w)) - 0.03
    # exact when the offset is applied before normalisation
    raw = feats + delta
    back = recentring.at_centre(raw).features(raw)
    np.testing.assert_allclose(back, _normalise(feats - feats.mean(0) + reference.mean), atol=1e-12)


def test_feature_stats_of_hospitals_add_up_to_the_pooled_ones():
    feats, _, _ = _clusters(90, seed=2)
    parts = FeatureStats.of(feats[:20]) + FeatureStats.of(feats[20:55])
    parts = parts + FeatureStats.of(feats[55:])
    assert parts.count == 90
    np.testing.assert_allclose(parts.mean, feats.mean(0), atol=1e-12)


def test_ece_matches_a_reference_computation():
    rng = np.random.default_rng(3)
    probs = softmax(rng.normal(scale=2.0, size=(2000, 4)))
    labels = rng.integers(0, 4, 2000)
    conf, correct = probs.max(1), (probs.argmax(1) == labels).astype(int)
    acc, mean_conf = calibration_curve(correct, conf, n_bins=15, strategy="uniform")
    counts = np.histogram(conf, bins=np.linspace(0, 1, 16))[0]
    expected = float(np.sum(counts[counts > 0] / len(conf) * np.abs(acc - mean_conf)))
    assert expected_calibration_error(probs, labels) == pytest.approx(expected, abs=1e-9)
    perfect = np.eye(4)[labels]
    assert expected_calibration_error(perfect, labels) == 0.0
    assert brier_score(perfect, labels) == 0.0
    assert brier_score(np.roll(perfect, 1, axis=1), labels) == pytest.approx(2.0)


def test_temperature_fit_recovers_the_generating_temperature():
    rng = np.random.default_rng(4)
    logits = rng.normal(scale=3.0, size=(5000, C))
    labels = np.array([rng.choice(C, p=p) for p in softmax(logits / 2.0)])
    assert ValStats.of(logits, labels).temperature == pytest.approx(2.0, rel=0.08)


def test_hospitals_validation_sums_add_up_to_the_pooled_ones():
    feats, labels, w = _clusters(120, seed=8, noise=1.0)
    reference = feats.mean(0)
    bounds = ((0, 50), (50, 120))
    parts = [site_val_stats(feats[a:b], labels[a:b], w, reference) for a, b in bounds]
    pooled = ValStats.of(feats @ w.T, labels)
    summed = parts[0][0] + parts[1][0]
    np.testing.assert_allclose(summed.nll, pooled.nll, rtol=1e-12)
    np.testing.assert_allclose(summed.posterior, pooled.posterior, rtol=1e-12)
    np.testing.assert_array_equal(summed.counts, np.bincount(labels, minlength=C))
    assert summed.temperature == pooled.temperature
    # re-centred sums: each site moved from its own mean onto the reference
    own = _normalise(feats[:50] - feats[:50].mean(0) + reference)
    np.testing.assert_allclose(parts[0][1].nll, ValStats.of(own @ w.T, labels[:50]).nll)


def test_debias_removes_a_constant_class_bias_measured_on_balanced_val():
    feats, labels, w = _clusters(900, seed=5, noise=1.0)  # soft posteriors, as few-shot
    biased = w.copy()
    biased[0] *= 1.6  # the model over-calls class 0 everywhere
    cal = fit_calibration(ValStats.of(feats @ biased.T, labels), FeatureStats.of(feats), False)
    truth = np.bincount(labels, minlength=C) / len(feats)
    before = np.abs(softmax(feats @ biased.T / cal.temperature).mean(0) - truth).max()
    after = np.abs(cal.probs(feats, biased).mean(0) - truth).max()
    assert after < before / 3
    again = calibration_from_dict(calibration_to_dict(cal))
    np.testing.assert_allclose(again.probs(feats, biased), cal.probs(feats, biased), atol=1e-12)


def test_em_recovers_shifted_class_priors():
    rng = np.random.default_rng(6)
    true_priors = np.array([0.6, 0.3, 0.1])
    labels = rng.choice(3, size=4000, p=true_priors)
    means = np.eye(3) * 2.0
    x = means[labels] + rng.normal(size=(4000, 3))
    log_lik = -0.5 * ((x[:, None, :] - means[None]) ** 2).sum(-1)  # uniform-prior posteriors
    _, priors = em_prior_shift(softmax(log_lik))
    np.testing.assert_allclose(priors, true_priors, atol=0.03)


def test_shift_score_is_quiet_in_distribution_and_fires_on_shifted_scans(caplog):
    feats, _, w = _clusters(2000, seed=7)
    reference = feats[:1000].mean(0)
    model = SimpleNamespace(positive=[0], classifier=lambda: torch.from_numpy(w))
    for n in (10, 50, 1000):  # in distribution: near 0 whatever the number of scans
        assert shift_score(feats[1000 : 1000 + n], reference) < 0.5
    shifted = _normalise(feats[1000:1050] + _normalise(np.ones((1, D))))
    assert shift_score(shifted, reference) > 0.8
    info = {
        "calibration": calibration_to_dict(Calibration(reference)),
        "config": {"calibration": {"shift_threshold": 0.5}},
    }
    with caplog.at_level(logging.WARNING, logger="tools.inference"):
        assert warn_if_shifted(model, info, None, feats[1000:1050], "site A") < 0.5
        assert not caplog.records
        assert warn_if_shifted(model, info, None, shifted, "site B") > 0.8
    (record,) = caplog.records
    assert "site B: shift score" in record.getMessage() and "exceeds 0.50" in record.getMessage()
    assert "the label-free guard picks" in record.getMessage()
    assert "savlt calibrate" not in record.getMessage()


def test_percentile_standardisation_undoes_gain_and_range():
    img = _bscan()
    mask = tissue_mask(img)
    assert 0.6 < mask.mean() < 0.9 and not mask[:10].any()  # tissue is below the surface
    other_scanner = np.clip(0.55 * img + 0.2, 0.0, 1.0)  # lower range, higher gain
    a = standardise_bscan(img, mask)
    b = standardise_bscan(other_scanner, tissue_mask(other_scanner))
    np.testing.assert_allclose(a, b, atol=0.02)
    assert np.percentile(a[mask], 1) == pytest.approx(0.05, abs=0.01)
    assert np.percentile(a[mask], 99) == pytest.approx(0.95, abs=0.01)
    rgb = np.repeat((img * 255).astype(np.uint8)[..., None], 3, axis=2)
    assert standardise_rgb(rgb, "none") is rgb
    assert standardise_rgb(rgb, "percentile").shape == rgb.shape
    with pytest.raises(ValueError, match="unknown intensity mode"):
        standardise_rgb(rgb, "histogram")


def test_equalisation_undoes_any_monotone_display_curve_where_percentiles_do_not():
    img = _bscan()
    mask = tissue_mask(img)
    # another scanner's look-up table: gamma 1.8, lower range, higher gain, top clipped
    other_scanner = np.clip(0.15 + 0.9 * img**1.8, 0.0, 0.8)
    other_mask = tissue_mask(other_scanner)
    a = standardise_bscan(img, mask, "equalise")
    b = standardise_bscan(other_scanner, other_mask, "equalise")
    both = mask & other_mask
    assert np.median(np.abs(a - b)[both]) < 0.01  # the same tissue, ranks kept
    linear = np.abs(standardise_bscan(img, mask) - standardise_bscan(other_scanner, other_mask))
    assert np.median(linear[both]) > 0.05  # an affine map cannot undo the gamma
    assert np.mean(a[mask]) == pytest.approx(0.5, abs=0.02)  # tissue spread evenly
    assert a.min() >= 0.05 and a.max() <= 0.95
    assert standardise_rgb(np.zeros((4, 4, 3), np.uint8), "equalise").shape == (4, 4, 3)


def test_equalisation_gives_each_pixel_the_mid_rank_of_its_level_among_tissue_pixels():
    rng = np.random.default_rng(3)
    gray = rng.integers(0, 40, (30, 50)) / 39.0  # few levels: many ties
    mask = np.zeros_like(gray, dtype=bool)
    mask[12:] = True
    tissue = np.sort(gray[mask])
    below = np.searchsorted(tissue, gray, "left")
    upto = np.searchsorted(tissue, gray, "right")
    expected = 0.05 + (below + upto) / (2.0 * mask.sum()) * (0.95 - 0.05)
    np.testing.assert_array_equal(standardise_bscan(gray, mask, "equalise"), expected)
    # a failed mask (under 64 pixels) ranks against the whole frame
    whole = np.sort(gray.ravel())
    frame = (np.searchsorted(whole, gray, "left") + np.searchsorted(whole, gray, "right")) / (
        2.0 * gray.size
    )
    np.testing.assert_array_equal(
        standardise_bscan(gray, np.zeros_like(mask), "equalise"), 0.05 + frame * (0.95 - 0.05)
    )


def test_the_default_equalises_and_any_scanner_is_it_at_twice_the_steps():
    from savlt_model.budget import budget
    from savlt_model.config import load_config

    cfg, default = load_config("configs/any-scanner.yaml"), load_config("configs/default.yaml")
    assert default.data.intensity == "equalise" == load_config(None).data.intensity
    assert (cfg.data.intensity, cfg.train.lr, default.train.lr) == ("equalise", 1e-3, 2e-3)
    central = [budget(c, "central", [80])["total_steps"] for c in (cfg, default)]
    assert central == [320, 160]
    assert budget(cfg, "fedavg", [25, 29, 26])["steps_per_hospital"] == 320  # as central


def test_scanner_augment_is_seeded_and_stays_an_image():
    image = torch.from_numpy(_bscan()).float()[None].expand(3, -1, -1).contiguous()
    augment = ScannerAugment(p=1.0)
    torch.manual_seed(0)
    a = augment(image)
    torch.manual_seed(0)
    b = augment(image)
    torch.manual_seed(1)
    c = augment(image)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == image.shape and float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert torch.equal(a[0], a[1])  # still a grey B-scan
