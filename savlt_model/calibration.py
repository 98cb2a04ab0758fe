"""Label-free centre calibration and confidence scores, on the model's image features.

Why (measured, docs/scanner-shift.md): at a centre the model was not trained on, the image
features move by a common offset, so one class's logit rises for every scan while the
ranking within the centre survives. Everything here works on the L2-normalised features f
and the fused classifier W (logits = f W^T), so each step is exact and cheap:

- :class:`FeatureStats`: count and sum of features. Statistics of disjoint sets add, so the
  training hospitals' reference mean is a sum the server can form without seeing images;
- :class:`ValStats`: sums over labelled validation scans (NLL and mean posterior at each
  temperature of a fixed grid, class counts) that also add across hospitals, so temperature
  and class bias are fitted from every hospital's validation split without moving a scan;
- :func:`fit_calibrations`: temperature and class-bias correction from those sums
  (inductive), and the re-centring variant;
- :meth:`Calibration.at_centre`: re-centre a centre's features on the reference using that
  centre's own unlabelled scans (label-free, transductive: its scores use its own images);
- :func:`em_prior_shift`: re-estimate a centre's class priors by EM (Saerens et al. 2002);
- :func:`shift_score`: how far a set of scans sits from the reference, for the shift warning;
- :func:`expected_calibration_error`, :func:`brier_score`: the confidence scores reported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from savlt_model.config import CalibrationConfig
from savlt_model.referral import ReferralCounts, threshold_for_coverage

# Temperatures tried when fitting: log T in [-3, 3] in steps of 0.025 (T from 0.05 to 20,
# 2.5 % apart). A grid, not a 1-D search, so that each hospital can send its sums at every
# point once and the server picks the best for everyone.
LOG_T_GRID = np.linspace(-3.0, 3.0, 241)


def _normalise(f: np.ndarray) -> np.ndarray:
    return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class FeatureStats:
    """Count and sum of a set of L2-normalised feature vectors (no image, no single feature)."""

    count: int
    total: np.ndarray  # (d,)

    @classmethod
    def of(cls, features: np.ndarray) -> FeatureStats:
        f = np.asarray(features, dtype=np.float64)
        return cls(len(f), f.sum(axis=0))

    def __add__(self, other: FeatureStats) -> FeatureStats:
        return FeatureStats(self.count + other.count, self.total + other.total)

    @property
    def mean(self) -> np.ndarray:
        return self.total / max(self.count, 1)


def shift_score(features: np.ndarray, reference: np.ndarray) -> float:
    """Distance of the scans' mean feature from the reference mean, in units of the
    reference spread, with the sampling noise of a mean of n scans removed.

    For unit vectors the spread is sqrt(trace cov) = sqrt(1 - |mu_ref|^2), and a mean of n
    scans from the reference itself lies about 1/sqrt(n) away, so the score is
    sqrt(max(0, d^2 - 1/n)): near 0 in distribution whatever n, not only for large n.
    """
    f = np.asarray(features, dtype=np.float64)
    mu_ref = np.asarray(reference, dtype=np.float64)
    spread = math.sqrt(max(1.0 - float(mu_ref @ mu_ref), 1e-12))
    d = float(np.linalg.norm(f.mean(axis=0) - mu_ref)) / spread
    return math.sqrt(max(0.0, d * d - 1.0 / len(f)))


@dataclass(frozen=True)
class Calibration:
    """What turns features into calibrated probabilities: f -> [re-centre] -> f W^T / T + b.

    ``reference`` is the training hospitals' mean feature; ``center_mean`` the mean of the
    centre being scored (None: not re-centred), ``center_scale`` what its spread around
    that mean is multiplied by on the way to the reference (1: re-centring alone; the
    spread's ratio: re-standardising, savlt_model.adaptation.restandardised); ``log_bias``
    removes the class bias the model shows on the balanced validation split.
    """

    reference: np.ndarray
    temperature: float = 1.0
    log_bias: np.ndarray | None = None
    center_mean: np.ndarray | None = None
    center_scale: float = 1.0
    recentre: bool = False  # whether at_centre() re-centres (fixed when it was fitted)
    em_priors: bool = False  # re-estimate the scored centre's class priors (EM)
    # confidence below which a scan is referred (savlt_model.referral); None: never
    refer_below: float | None = None

    def at_centre(self, features: np.ndarray) -> Calibration:
        """This calibration for the centre whose unlabelled ``features`` are given."""
        if not self.recentre:
            return self
        return replace(self, center_mean=np.asarray(features, dtype=np.float64).mean(axis=0))

    def features(self, features: np.ndarray) -> np.ndarray:
        f = np.asarray(features, dtype=np.float64)
        if self.center_mean is None:
            return f
        return _normalise((f - self.center_mean) * self.center_scale + self.reference)

    def probs(self, features: np.ndarray, classifier: np.ndarray) -> np.ndarray:
        z = self.features(features) @ np.asarray(classifier, dtype=np.float64).T
        z = z / self.temperature
        if self.log_bias is not None:
            z = z + self.log_bias
        return em_prior_shift(softmax(z))[0] if self.em_priors else softmax(z)


@dataclass(frozen=True)
class ValStats:
    """Sums over labelled validation scans at every temperature of :data:`LOG_T_GRID`:
    the NLL, the posteriors and the class counts. Sums of disjoint sets add, so hospitals'
    statistics add up to those of their pooled validation splits."""

    nll: np.ndarray  # (G,) summed negative log-likelihood
    posterior: np.ndarray  # (G, C) summed softmax posteriors
    counts: np.ndarray  # (C,) scans per class

    @classmethod
    def of(cls, logits: np.ndarray, labels: np.ndarray) -> ValStats:
        z = np.asarray(logits, dtype=np.float64)
        y = np.asarray(labels)
        nll = np.empty(len(LOG_T_GRID))
        posterior = np.empty((len(LOG_T_GRID), z.shape[1]))
        for g, log_t in enumerate(LOG_T_GRID):
            s = z / math.exp(log_t)
            s = s - s.max(axis=1, keepdims=True)
            log_p = s - np.log(np.exp(s).sum(axis=1, keepdims=True))
            nll[g] = -log_p[np.arange(len(y)), y].sum()
            posterior[g] = np.exp(log_p).sum(axis=0)
        return cls(nll, posterior, np.bincount(y, minlength=z.shape[1]).astype(np.float64))

    def __add__(self, other: ValStats) -> ValStats:
        return ValStats(
            self.nll + other.nll, self.posterior + other.posterior, self.counts + other.counts
        )

    @property
    def best(self) -> int:
        """Grid index of the temperature with the lowest validation NLL."""
        return int(np.argmin(self.nll))

    @property
    def temperature(self) -> float:
        return math.exp(float(LOG_T_GRID[self.best]))


def fit_calibration(
    val: ValStats,
    reference: FeatureStats,
    recentre: bool,
    debias: bool = True,
    em_priors: bool = False,
) -> Calibration:
    """Temperature (lowest validation NLL) and class bias from validation sums.

    ``val`` must describe the features as they will be scored: re-centred on each site's own
    mean when ``recentre``. ``debias`` divides by the model's mean posterior on the
    validation split, whose classes are balanced by construction (K-shot, min(K, 16) each),
    so a class the model over-calls on balanced data is called less everywhere.
    """
    bias = None
    if debias:
        prior = val.counts / val.counts.sum()
        mean_posterior = val.posterior[val.best] / val.counts.sum()
        bias = np.log(np.maximum(prior, 1e-12)) - np.log(np.maximum(mean_posterior, 1e-12))
    return Calibration(
        reference=reference.mean,
        temperature=val.temperature,
        log_bias=bias,
        recentre=recentre,
        em_priors=em_priors,
    )


def referral_counts_of(logits: np.ndarray, labels: np.ndarray) -> ReferralCounts:
    """Scans and correct predictions per confidence bin at every temperature of
    :data:`LOG_T_GRID` (rows), so the server can read them at the temperature it fits."""
    z = np.asarray(logits, dtype=np.float64)
    rows = [ReferralCounts.of(softmax(z / math.exp(t)), labels) for t in LOG_T_GRID]
    return ReferralCounts(np.stack([r.count for r in rows]), np.stack([r.correct for r in rows]))


def site_val_stats(
    features: np.ndarray, labels: np.ndarray, classifier: np.ndarray, reference: np.ndarray
) -> tuple[ValStats, ValStats, ReferralCounts]:
    """One site's validation sums: (as the model scores, re-centred on the site's own mean,
    referral counts of the scores at every temperature)."""
    f = np.asarray(features, dtype=np.float64)
    w = np.asarray(classifier, dtype=np.float64)
    recentred = Calibration(reference, recentre=True).at_centre(f).features(f)
    plain = f @ w.T
    referral = referral_counts_of(plain, labels)
    return ValStats.of(plain, labels), ValStats.of(recentred @ w.T, labels), referral


@dataclass(frozen=True)
class CalibrationSums:
    """Everything the training sites contribute to a model's calibration, summed over them:
    the reference feature statistics and both kinds of validation sums."""

    reference: FeatureStats
    plain: ValStats
    recentred: ValStats
    referral: ReferralCounts | None = None  # (G, B): per temperature, per confidence bin


def fit_calibrations(
    sums: CalibrationSums, cfg: CalibrationConfig
) -> tuple[Calibration, Calibration | None]:
    """(inductive, re-centring) calibrations of a trained model.

    The inductive one only rescales (temperature). The re-centring one (None when
    ``calibration.recentre`` is off) also moves each scored centre onto the reference and
    removes the class bias (``calibration.debias``), optionally with EM priors.

    The referral threshold (``calibration.referral_coverage`` of the validation scans
    accepted) is set on the inductive calibration's confidence, at its fitted temperature,
    and the re-centring one keeps it: re-centring is meant to restore that confidence.
    """
    inductive = fit_calibration(sums.plain, sums.reference, recentre=False, debias=False)
    if sums.referral is not None:
        count = sums.referral.count[sums.plain.best]
        inductive = replace(
            inductive, refer_below=threshold_for_coverage(count, cfg.referral_coverage)
        )
    if not cfg.recentre:
        return inductive, None
    recentred = fit_calibration(
        sums.recentred, sums.reference, True, debias=cfg.debias, em_priors=cfg.priors == "em"
    )
    return inductive, replace(recentred, refer_below=inductive.refer_below)


def em_prior_shift(
    probs: np.ndarray, max_iter: int = 100, tol: float = 1e-6
) -> tuple[np.ndarray, np.ndarray]:
    """Posteriors adjusted to a centre's own class priors, estimated by EM from its
    unlabelled scans (Saerens et al. 2002); the inputs assume uniform priors.
    Returns (adjusted posteriors, estimated priors)."""
    p = np.asarray(probs, dtype=np.float64)
    k = p.shape[1]
    priors = np.full(k, 1.0 / k)
    adjusted = p
    for _ in range(max_iter):
        weighted = p * (priors * k)
        adjusted = weighted / weighted.sum(axis=1, keepdims=True)
        new = adjusted.mean(axis=0)
        done = float(np.abs(new - priors).max()) < tol
        priors = new
        if done:
            break
    return adjusted, priors


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE of the top-class confidence: 15 equal-width bins, weighted |accuracy - confidence|."""
    p = np.asarray(probs, dtype=np.float64)
    conf, pred = p.max(axis=1), p.argmax(axis=1)
    correct = pred == np.asarray(labels)
    which = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)  # (b/B, (b+1)/B]
    ece = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            ece += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(ece)


def reliability(
    probs: np.ndarray, labels: np.ndarray, bins: int = 15
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per bin: (mean confidence, accuracy, count); empty bins give NaN. For the diagram."""
    p = np.asarray(probs, dtype=np.float64)
    conf, correct = p.max(axis=1), p.argmax(axis=1) == np.asarray(labels)
    which = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    mean_conf = np.bincount(which, weights=conf, minlength=bins) / np.maximum(count, 1)
    acc = np.bincount(which, weights=correct.astype(float), minlength=bins) / np.maximum(count, 1)
    empty = count == 0
    return np.where(empty, np.nan, mean_conf), np.where(empty, np.nan, acc), count


def brier_score(probs: np.ndarray, labels: np.ndarray) -> float:
    """Multiclass Brier score: mean over scans of sum_c (p_c - 1[y = c])^2 (0 best, 2 worst)."""
    p = np.asarray(probs, dtype=np.float64)
    onehot = np.eye(p.shape[1])[np.asarray(labels)]
    return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))


def calibration_to_dict(cal: Calibration) -> dict:
    """JSON form, stored with an adapter and in an exported model's head."""
    return {
        "reference": cal.reference.tolist(),
        "temperature": cal.temperature,
        "log_bias": None if cal.log_bias is None else cal.log_bias.tolist(),
        "center_mean": None if cal.center_mean is None else cal.center_mean.tolist(),
        "center_scale": cal.center_scale,
        "recentre": cal.recentre,
        "em_priors": cal.em_priors,
        "refer_below": cal.refer_below,
    }


def calibration_from_dict(raw: dict) -> Calibration:
    def arr(key: str) -> np.ndarray | None:
        return None if raw.get(key) is None else np.asarray(raw[key], dtype=np.float64)

    return Calibration(
        reference=np.asarray(raw["reference"], dtype=np.float64),
        temperature=float(raw["temperature"]),
        log_bias=arr("log_bias"),
        center_mean=arr("center_mean"),
        center_scale=float(raw.get("center_scale", 1.0)),
        recentre=bool(raw.get("recentre", False)),
        em_priors=bool(raw.get("em_priors", False)),
        refer_below=None if raw.get("refer_below") is None else float(raw["refer_below"]),
    )
