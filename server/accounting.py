"""The (epsilon, delta) that central DP buys over a run, from Opacus's RDP accountant.

Client-level DP: every round the server averages the hospitals' clipped updates (clipped
by the server, or in ``client-fixed`` by each hospital before upload) and adds Gaussian
noise of std z C / n. Adding or removing one hospital's whole contribution moves the
average by at most C / n: a Gaussian mechanism with noise multiplier z per round
(``epsilon``, add/remove-one). Replacing it by any other (any change to its data) moves
it by up to 2 C / n, the mechanism at multiplier z / 2 (``epsilon_replace_one``): at
z = 1, delta = 1e-5, one round that is about 10.7, not 4.73.
Every hospital is sampled every round (DP requires ``fl.fraction_train: 1``), so there is
no subsampling amplification: sample rate q = 1, and R rounds compose to
RDP(a) = R a / (2 z^2), the same for both supported modes (server-fixed, client-fixed).
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

    def spent(z: float) -> tuple[float | None, float | None]:
        if z == 0:
            return None, None
        if rounds == 0:
            return 0.0, None
        accountant = RDPAccountant()
        accountant.history = [(z, 1.0, rounds)]
        eps, order = accountant.get_privacy_spent(delta=p.delta)
        return (float(eps) if math.isfinite(eps) else None), float(order)

    epsilon, order = spent(p.noise_multiplier)
    return {
        "mode": p.mode,
        "epsilon": epsilon,  # add/remove-one hospital
        "epsilon_replace_one": spent(p.noise_multiplier / 2)[0],  # sensitivity 2 C / n
        "delta": p.delta,
        "noise_multiplier": p.noise_multiplier,
        "rounds": rounds,
        "sample_rate": 1.0,
        "rdp_order": order,
        "accountant": ACCOUNTANT,
    }


def epsilon_text(spent: dict) -> str:
    """A :func:`privacy_spent` result's two epsilons as printed: 3 digits, or "unbounded"."""

    def text(eps: float | None) -> str:
        return "unbounded" if eps is None else f"{eps:.3g}"

    replace = text(spent.get("epsilon_replace_one")) if "epsilon_replace_one" in spent else "?"
    return f"{text(spent['epsilon'])} add/remove-one, {replace} replace-one"
