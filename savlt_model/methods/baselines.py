"""The baselines: listed in the registry so that ``fl.methods`` is validated in one place;
they run in the simulation layer, not through Flower."""

from __future__ import annotations

from savlt_model.methods.base import Method

CENTRAL = Method("central", "centralised SAVLT on the pooled data (the original protocol)", False)
LOCAL = Method("local", "each hospital alone, with its per-hospital federated compute", False)
