"""A label-free guard: adapt to a new site's unlabelled scans only when it is safe.

Why (issue #24): on scanners the generator does not contain, mean-shift re-centring can
turn a poor ranking into an inverted one (binary AUC 55.6 -> 16.2). A post-hoc map fitted
on known scanners cannot be trusted on an unknown one, so every map is a *candidate* the
guard checks on the site's own scans, without labels, and refuses when it looks harmful:

- ``none``: the model as trained (inductive calibration);
- ``recentre``: today's calibration (features moved from the site's mean onto the
  training reference, class bias removed);
- ``restandardise``: the LayerNorm analogue of AdaBN. The final features are re-estimated
  at the site with their mean *and* spread (one scale, as LayerNorm uses one variance
  across channels): f' = mu_ref + (f - mu_site) * s_ref / s_site, re-normalised. For unit
  features the reference spread is known from its mean alone, s_ref^2 = 1 - |mu_ref|^2,
  so it needs no statistic beyond those the federation already sums;
- ``t3a``: T3A (Iwasawa & Matsuo 2021), the classifier adjusted from confident site
  features: each class's weight becomes the mean direction of itself and the site's
  :data:`T3A_SUPPORT` lowest-entropy scans predicted as that class, at the weight's norm;
- ``tent``: TENT (:mod:`savlt_model.tent`), the LayerNorms re-fitted on the site's scans.
  It changes the model, not the features, so the caller that holds the model passes its
  features in (:class:`AdaptedFeatures`); they are scored with the inductive calibration.

Signals, each a reason to refuse a candidate: its predictions collapse onto one class
(largest predicted-class share above :data:`MAX_CLASS_SHARE`), it reorders the scans where
the unadapted model was sure (:func:`expected_auc_cost` above :data:`MAX_AUC_COST`: the
binary AUC it would lose if the unadapted probabilities were right; a label-free map should
move the operating point, not invent a new ranking), it is built from the model's own
calls (:data:`SELF_TRAINED`: T3A's support, TENT's entropy) and reorders the scans that
the unadapted model calls high-risk against those it calls low-risk (:func:`call_cost`
above :data:`MAX_AUC_COST`), its predictions are unstable under the
training-time scanner randomisation (given the features of randomised views of the same
scans, :data:`GUARD_VIEWS` of them at :data:`GUARD_VIEW_P`: the share of scans whose class
changes between a scan and its views exceeds the unadapted model's by more than
:data:`MAX_EXTRA_INSTABILITY`, i.e. the adaptation rests on what the scanner changes rather
than on the tissue), or the site lies beyond the shifts the maps were checked on
(:data:`MAX_ADAPT_SHIFT` times ``calibration.shift_threshold``). Among the candidates left,
it takes the one that spreads the predictions most (highest entropy of the predicted-class
histogram), and only if that beats ``none`` by :data:`MIN_GAIN`; when unsure it keeps
``none`` and refers more (the referral threshold is raised halfway to 1).

Beyond ``calibration.shift_threshold`` referral also rises with the shift
(:func:`shift_referral`), whatever the pick: confidence learnt on the training scanners
is worth less the farther a site lies from them (on the held-out style family, the shift
score ranks the centres' AUC at Spearman -0.7 to -0.9, docs/scanner-shift.md), and a map
that moves the features' mean back does not restore what the scanner lost. It rises as a
threshold *and* as a share of the site's scans, because a model that is confidently wrong
at a site keeps its scans above any raised threshold.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from savlt_model.calibration import Calibration, shift_score
from savlt_model.metrics import pair_auc
from savlt_model.referral import CONFIDENCE_BINS, accepted, bin_of, confidence

MAX_CLASS_SHARE = 0.6  # more than 60 % of a site's scans in one class: collapsed
# Half of issue #24's harm budget (a candidate may never cost more than 2 AUC points): the
# cost is estimated with the unadapted model's own probabilities, which a shift miscalibrates.
MAX_AUC_COST = 0.01
MAX_ADAPT_SHIFT = 3.0  # x shift_threshold: beyond it, no map is trusted
MIN_GAIN = 0.05  # entropy (nats) a candidate must add over "none"
MIN_SCANS = 10  # fewer scans give no usable site statistics
T3A_SUPPORT = 10  # confident site scans per class that adjust its weight (fixed, not tuned)
GUARD_VIEWS = 2  # randomised views of each site scan (savlt_model.data.augment)
GUARD_VIEW_P = 0.5  # probability of each scanner effect in those views
MAX_EXTRA_INSTABILITY = 0.1  # class changes under randomisation, above the unadapted model's
# Candidates fitted to the unadapted model's own calls on the site. They move the scans it
# was unsure of, where the expected AUC cost (weighted by its probabilities) sees almost
# nothing, so they also answer to the calls themselves (call_cost). Measured: T3A passed the
# expected cost at 0.9 points and lost 3.5 and 5.0 (FedAvg, docs/scanner-shift.md).
SELF_TRAINED = frozenset({"t3a", "tent"})


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def restandardised(centre: Calibration, site: np.ndarray) -> Calibration:
    """The re-centring calibration ``centre`` re-standardising instead, from the ``site``'s
    scans: their mean moved onto the reference and their spread (one number, the RMS
    distance to their mean) scaled to the reference's (sqrt(1 - |mu_ref|^2) for unit
    features), with the site statistics fixed."""
    s = np.asarray(site, dtype=np.float64)
    mu_ref = np.asarray(centre.reference, dtype=np.float64)
    mu = s.mean(axis=0)
    s_site = math.sqrt(max(float(((s - mu) ** 2).sum(axis=1).mean()), 1e-12))
    s_ref = math.sqrt(max(1.0 - float(mu_ref @ mu_ref), 1e-12))
    return replace(centre, recentre=False, center_mean=mu, center_scale=s_ref / s_site)


def t3a_classifier(site: np.ndarray, classifier: np.ndarray, inductive: Calibration) -> np.ndarray:
    """T3A's adjusted classifier for a site: per class, the unit mean of its own weight
    direction and the site's most confident scans of that class, rescaled to the weight's
    norm (so the temperature fitted on validation still applies)."""
    f = np.asarray(site, dtype=np.float64)
    w = np.asarray(classifier, dtype=np.float64)
    p = inductive.probs(f, w)
    entropy = -(p * np.log(np.maximum(p, 1e-12))).sum(axis=1)
    pred = p.argmax(axis=1)
    out = np.empty_like(w)
    for c in range(len(w)):
        mine = np.flatnonzero(pred == c)
        support = mine[np.argsort(entropy[mine], kind="stable")[:T3A_SUPPORT]]
        direction = _unit(np.vstack([_unit(w[c]), f[support]]).mean(axis=0))
        out[c] = direction * np.linalg.norm(w[c])
    return out


def class_shares(probs: np.ndarray) -> np.ndarray:
    """Share of scans predicted as each class."""
    p = np.asarray(probs)
    return np.bincount(p.argmax(axis=1), minlength=p.shape[1]) / max(len(p), 1)


def _entropy(shares: np.ndarray) -> float:
    s = shares[shares > 0]
    return float(-(s * np.log(s)).sum())


def _auc_lost(before: np.ndarray, after: np.ndarray, positive: np.ndarray) -> float:
    """The binary AUC that ranking by ``after`` loses against ``before`` when each scan is
    high-risk with weight ``positive`` (and low-risk with 1 - it); never below 0."""
    w = np.asarray(positive, dtype=np.float64)
    return max(0.0, pair_auc(before, w, 1.0 - w) - pair_auc(after, w, 1.0 - w))


def expected_auc_cost(unadapted: np.ndarray, adapted: np.ndarray) -> float:
    """The binary AUC that ranking by ``adapted`` high-risk scores loses against the
    ``unadapted`` ones, if the unadapted scores are the true probabilities. Never below 0
    (the true probabilities rank best); large when the map reorders scans the unadapted
    model told apart with confidence, small when it reorders only scans it was unsure of."""
    q = np.asarray(unadapted, dtype=np.float64)
    return _auc_lost(q, adapted, q)


def call_cost(unadapted: np.ndarray, adapted: np.ndarray, positive: list[int]) -> float:
    """:func:`expected_auc_cost` with the unadapted model's class calls, not its
    probabilities, taken as the truth (``unadapted``, ``adapted``: class probabilities):
    the share of (called high-risk, called low-risk) scan pairs that the adapted high-risk
    scores order worse than the unadapted ones (ties half). 0 when the unadapted model
    calls every scan one way."""
    p, a = np.asarray(unadapted), np.asarray(adapted)
    called = np.isin(p.argmax(axis=1), positive)
    return _auc_lost(p[:, positive].sum(axis=1), a[:, positive].sum(axis=1), called)


def instability(probs: np.ndarray, views: Sequence[np.ndarray]) -> float:
    """Share of (scan, view) pairs whose predicted class differs from the scan's own."""
    pred = np.asarray(probs).argmax(axis=1)
    return float(np.mean([np.asarray(v).argmax(axis=1) != pred for v in views]))


@dataclass(frozen=True)
class AdaptedFeatures:
    """A candidate that changes the model (TENT): the site's features under it, and those
    of the same randomised views as the unadapted model's."""

    features: np.ndarray
    views: tuple[np.ndarray, ...] = ()


@dataclass(frozen=True)
class Candidate:
    """One candidate's probabilities on the site and the signals the guard read."""

    name: str
    probs: np.ndarray
    shares: np.ndarray
    auc_cost: float  # expected_auc_cost against "none"
    call_cost: float  # call_cost against "none"
    instability: float | None = None  # None: no randomised views were given
    refused: list[str] = field(default_factory=list)  # reasons; empty: acceptable

    @property
    def collapsed(self) -> bool:
        return float(self.shares.max()) > MAX_CLASS_SHARE

    @property
    def spread(self) -> float:
        return _entropy(self.shares)


@dataclass(frozen=True)
class GuardChoice:
    """The guard's pick for one site, with everything a site check reports."""

    choice: str
    reason: str
    shift: float
    refer_below: float  # the referral threshold to use at this site
    candidates: dict[str, Candidate]

    @property
    def probs(self) -> np.ndarray:
        return self.candidates[self.choice].probs

    @property
    def referral_rate(self) -> float:
        """Share of the site's scans that would be referred (expected referral rate)."""
        return float(1 - accepted(self.probs, self.refer_below).mean())


def candidate_probs(
    features: np.ndarray,
    classifier: np.ndarray,
    inductive: Calibration,
    centre: Calibration | None,
    site: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Each candidate's calibrated probabilities for ``features``, with the site statistics
    taken from ``site`` (default: the features themselves; a labelled spot check is scored
    with the statistics of all the site's scans). ``recentre`` and ``restandardise`` need
    the re-centring calibration's class bias and temperature."""
    f = np.asarray(features, dtype=np.float64)
    s = f if site is None else np.asarray(site, dtype=np.float64)
    out = {"none": inductive.probs(f, classifier)}
    out |= {name: cal.probs(f, classifier) for name, cal in feature_maps(centre, s).items()}
    out["t3a"] = inductive.probs(f, t3a_classifier(s, classifier, inductive))
    return out


def feature_maps(centre: Calibration | None, site: np.ndarray) -> dict[str, Calibration]:
    """The candidates that only move the features, as calibrations with the ``site``'s
    statistics fixed: what the guard scores and what ``savlt calibrate`` stores (none
    without the re-centring calibration, whose class bias and temperature they use)."""
    if centre is None:
        return {}
    return {
        "recentre": replace(centre.at_centre(site), recentre=False),
        "restandardise": restandardised(centre, site),
    }


def guard(
    features: np.ndarray,
    classifier: np.ndarray,
    positive: list[int],
    inductive: Calibration,
    centre: Calibration | None,
    shift_threshold: float,
    views: Sequence[np.ndarray] = (),
    adapted: dict[str, AdaptedFeatures] | None = None,
) -> GuardChoice:
    """Pick one candidate for a site (or ``none``) from its unlabelled ``features``, the
    features of randomised ``views`` of the same scans (each a feature-only candidate
    maps with the site statistics of the scans themselves) and the candidates that change
    the model (``adapted``)."""
    f = np.asarray(features, dtype=np.float64)
    probs = candidate_probs(f, classifier, inductive, centre)
    on_views = {k: [] for k in probs} if views else {}
    for v in views:
        for k, p in candidate_probs(v, classifier, inductive, centre, site=f).items():
            on_views[k].append(p)
    for name, a in (adapted or {}).items():
        probs[name] = inductive.probs(a.features, classifier)
        if views:
            on_views[name] = [inductive.probs(v, classifier) for v in a.views]
    shift = shift_score(f, inductive.reference)
    return choose(
        probs, positive, shift, shift_threshold, inductive.refer_below or 0.0, on_views or None
    )


def _toward_one(refer_below: float, fraction: float) -> float:
    """The referral threshold moved ``fraction`` of the way to 1, on the shared bin grid."""
    raised = refer_below + (1 - refer_below) * min(max(fraction, 0.0), 1.0)
    return round(raised * CONFIDENCE_BINS) / CONFIDENCE_BINS


def shift_referral(
    probs: np.ndarray, refer_below: float, shift: float, shift_threshold: float
) -> float:
    """The referral threshold at a site of this shift, given the site's predictions
    ``probs``: the model's own up to ``shift_threshold``; beyond, with the excess
    e = (shift - threshold) / ((MAX_ADAPT_SHIFT - 1) x threshold), moved e of the way to 1
    and high enough that at least a share e of the site's scans, the least confident, is
    referred; every scan at :data:`MAX_ADAPT_SHIFT` x the threshold, where no map was
    checked either. The share is what refers at a site where the model is confidently
    wrong, its scans above any raised threshold (FedAvg's model on the style family,
    docs/scanner-shift.md)."""
    excess = min(max((shift - shift_threshold) / ((MAX_ADAPT_SHIFT - 1) * shift_threshold), 0), 1)
    bins = bin_of(confidence(probs))
    share = next(k for k in range(CONFIDENCE_BINS + 1) if (bins < k).mean() >= excess)
    return max(_toward_one(refer_below, excess), share / CONFIDENCE_BINS)


def choose(
    probs: dict[str, np.ndarray],
    positive: list[int],
    shift: float,
    shift_threshold: float,
    refer_below: float,
    views: dict[str, list[np.ndarray]] | None = None,
) -> GuardChoice:
    """The guard's rule on the candidates' probabilities (``probs["none"]`` required) and,
    when given, their probabilities on randomised views of the same scans (``views``,
    the same candidates)."""
    n = len(probs["none"])
    unsure = _toward_one(refer_below, 0.5)
    high = {k: np.asarray(p)[:, positive].sum(axis=1) for k, p in probs.items()}
    unstable = {k: instability(probs[k], v) for k, v in (views or {}).items()}
    cands: dict[str, Candidate] = {}
    for name, p in probs.items():
        c = Candidate(
            name,
            np.asarray(p),
            class_shares(p),
            expected_auc_cost(high["none"], high[name]),
            call_cost(probs["none"], p, positive),
            unstable.get(name),
        )
        if name != "none":
            if c.collapsed:
                c.refused.append(f"collapses: {c.shares.max():.0%} of scans in one class")
            if c.auc_cost > MAX_AUC_COST:
                c.refused.append(
                    f"reorders the scans: expected AUC cost {100 * c.auc_cost:.1f} points > "
                    f"{100 * MAX_AUC_COST:.0f}"
                )
            if name in SELF_TRAINED and c.call_cost > MAX_AUC_COST:
                c.refused.append(
                    f"reorders the model's own calls it was fitted to: {100 * c.call_cost:.1f}"
                    f" % of high- / low-risk call pairs > {100 * MAX_AUC_COST:.0f}"
                )
            if c.instability is not None and c.instability > (
                unstable["none"] + MAX_EXTRA_INSTABILITY
            ):
                c.refused.append(
                    f"unstable under scanner randomisation: {c.instability:.0%} of scans "
                    f"change class (unadapted {unstable['none']:.0%})"
                )
            if shift > MAX_ADAPT_SHIFT * shift_threshold:
                c.refused.append(
                    f"shift {shift:.2f} beyond {MAX_ADAPT_SHIFT * shift_threshold:.2f}, "
                    "where no map was checked"
                )
            if n < MIN_SCANS:
                c.refused.append(f"{n} scans; site statistics need {MIN_SCANS}")
        cands[name] = c
    none = cands["none"]
    if shift <= shift_threshold:
        return GuardChoice("none", "in distribution: nothing to adapt", shift, refer_below, cands)
    ok = [c for c in cands.values() if c.name != "none" and not c.refused]
    best = max(ok, key=lambda c: c.spread, default=None)
    if best is not None and best.spread >= none.spread + MIN_GAIN:
        why = (
            f"spreads the predictions (entropy {none.spread:.2f} -> {best.spread:.2f}) and "
            f"keeps the ranking (expected AUC cost {100 * best.auc_cost:.1f} points)"
        )
        at_site = shift_referral(best.probs, refer_below, shift, shift_threshold)
        return GuardChoice(best.name, why, shift, at_site, cands)
    why = "no candidate is safe and better than none; referring more"
    if none.collapsed:
        why += f" (the model itself puts {none.shares.max():.0%} of scans in one class)"
    at_site = shift_referral(none.probs, refer_below, shift, shift_threshold)
    return GuardChoice("none", why, shift, max(at_site, unsure), cands)


def site_calibration(
    picked: GuardChoice, inductive: Calibration, centre: Calibration, site: np.ndarray
) -> Calibration:
    """What ``savlt calibrate`` stores for a site from the guard's pick on its scans'
    features ``site``: the feature map it took (``recentre``, ``restandardise``) with the
    site's statistics fixed, else the model as trained (``none``; ``t3a`` and ``tent``
    change the model and are applied by site-check only); always with the guard's referral
    threshold for the site. A map the guard refused is never stored: that is how the
    calibration that turned style a's AUC 55.6 into 16.2 is stopped."""
    cal = feature_maps(centre, site).get(picked.choice, inductive)
    return replace(cal, refer_below=picked.refer_below)
