"""The (epsilon, delta) that central DP buys over a run, from Opacus's RDP accountant.

Client-level DP: every round the server averages the hospitals' clipped updates (clipped
by the server, or in ``client-fixed`` by each hospital before upload) and adds Gaussian
noise of std z C / n, so one hospital's whole contribution (any change to its data) moves
the average by at most C / n: a Gaussian mechanism with noise multiplier z per round.
Every hospital is sampled every round (DP requires ``fl.fraction_train: 1``), so there is
no subsampling amplification: sample rate q = 1, and R rounds compose to
RDP(a) = R a / (2 z^2). Flower's adaptive clipping takes z as the effective multiplier of
the update and its noised clipped-count query together (Andrew et al. 2021), so the same
accounting holds for every mode.
"""

from __future__ import annotations

import math

from savlt_model.config import PrivacyConfig

ACCOUNTANT = "opacus RDP (Gaussian mechanism, client level, q = 1)"


def privacy_spent(p: PrivacyConfig, rounds: int) -> dict:
    """epsilon after ``rounds`` rounds at ``p.delta``, with what it assumed (for results).

    ``epsilon`` is None when unbounded (noise multiplier 0: clipping alone buys no DP).
    """
    # Opacus's import costs seconds (it loads its whole training stack): only runs with DP pay
    from opacus.accountants import RDPAccountant

    epsilon, order = (None, None) if p.noise_multiplier == 0 else (0.0, None)
    if p.noise_multiplier > 0 and rounds > 0:
        accountant = RDPAccountant()
        accountant.history = [(p.noise_multiplier, 1.0, rounds)]
        eps, order = accountant.get_privacy_spent(delta=p.delta)
        epsilon = float(eps) if math.isfinite(eps) else None
    return {
        "mode": p.mode,
        "epsilon": epsilon,
        "delta": p.delta,
        "noise_multiplier": p.noise_multiplier,
        "rounds": rounds,
        "sample_rate": 1.0,
        "rdp_order": None if order is None else float(order),
        "accountant": ACCOUNTANT,
    }


def epsilon_text(spent: dict) -> str:
    """A :func:`privacy_spent` result's epsilon as printed: 3 digits, or "unbounded"."""
    return "unbounded" if spent["epsilon"] is None else f"{spent['epsilon']:.3g}"
