"""The one registry of training methods: each is declared once, in its own module, with its
maths and its hyperparameters.

A federated method is its name, the loss terms a hospital adds to the SAVLT loss, the rule
that turns the hospitals' reported statistics into aggregation weights, its hyperparameter
dataclass (config section ``methods.<name>``) and its help text. Config validation, the CLI,
the server's strategy (which sends the loss terms in every round's plan, so a ClientApp
needs no per-method code) and the simulation runner all read :data:`METHODS`. Adding a
method is one module plus one line in the tuple below.
"""

from __future__ import annotations

from savlt_model.errors import SavltError
from savlt_model.methods.base import HospitalStats, LossTerms, Method, Weighting
from savlt_model.methods.baselines import CENTRAL, LOCAL
from savlt_model.methods.fedadam import FEDADAM
from savlt_model.methods.fedavg import FEDAVG
from savlt_model.methods.fedavgm import FEDAVGM
from savlt_model.methods.fedprox import FEDPROX
from savlt_model.methods.scaffold import SCAFFOLD
from savlt_model.methods.text_anchored import TEXT_ANCHORED

__all__ = ["METHODS", "HospitalStats", "LossTerms", "Method", "Weighting"]

_DEFAULT = (CENTRAL, LOCAL, FEDAVG, FEDPROX, TEXT_ANCHORED)
METHODS: dict[str, Method] = {m.name: m for m in (*_DEFAULT, SCAFFOLD, FEDAVGM, FEDADAM)}

# What fl.methods runs by default: the first five declared above (not the drift-control and
# server-optimiser methods, which a run names; nor ones added at run time, e.g. by a test,
# which a ClientApp process started elsewhere would not know).
DEFAULT_METHODS = tuple(m.name for m in _DEFAULT)


def get_method(name: str) -> Method:
    """The registered method ``name``, or a one-line error listing the known ones."""
    if name not in METHODS:
        raise SavltError(f"unknown method {name!r}; choose from {sorted(METHODS)}")
    return METHODS[name]


def federated_methods() -> tuple[str, ...]:
    return tuple(name for name, m in METHODS.items() if m.federated)


def describe() -> str:
    """One line per method for ``--help``: name, what it does, the keys it reads."""
    return "\n".join(
        f"{m.name}: {m.help}" + (f" ({', '.join(m.config_keys)})" if m.config_keys else "")
        for m in METHODS.values()
    )
