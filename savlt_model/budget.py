"""The step budget of every method, stated: how many local steps a federated round takes and
what each run spent, so a results table compares methods, not budgets (docs/federation.md).

``fl.budget: per-hospital`` (default): each hospital does central's step count over the
rounds, so the federation's sequential depth equals central's. ``same-total``: central's
steps are shared by every hospital of every round (the split before this key existed).
An explicit ``fl.local_steps`` wins over both.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from savlt_model.config import Config


def local_steps(cfg: Config) -> int:
    """Per-round local steps of one hospital."""
    if cfg.fl.local_steps:
        return cfg.fl.local_steps
    share = cfg.fl.rounds if cfg.fl.budget == "per-hospital" else cfg.fl.rounds * cfg.fl.hospitals
    return max(1, math.ceil(cfg.total_iterations / share))


def budget_rule(cfg: Config) -> str:
    """What set the local steps: the budget key, or an explicit ``fl.local_steps``."""
    if cfg.fl.local_steps:
        return f"fl.local_steps={cfg.fl.local_steps} (explicit; fl.budget {cfg.fl.budget} unused)"
    return cfg.fl.budget


def budget(cfg: Config, method: str, train_sizes: Sequence[int]) -> dict:
    """What one (method, seed) run trains: the fields every results record carries.

    ``central``: one model, central's steps. ``local``: each hospital alone, with the
    steps one hospital does in the federation. Federated: ``local_steps`` per round per
    hospital, every scheduled hospital in every round (``fl.fraction_train``).
    ``train_sizes``: each hospital's training images (central pools them). A step sees
    ``min(batch_size, n)`` of a set of n (savlt_model/train.py), so ``examples_seen`` counts
    that; when Flower samples a fraction of the hospitals, it is the count expected under
    its uniform sampling.
    """
    batch = cfg.train.batch_size
    if method == "central":
        steps = cfg.total_iterations
        return {
            "budget": "central",
            "local_steps": None,
            "rounds": None,
            "steps_per_hospital": steps,
            "total_steps": steps,
            "examples_seen": steps * min(batch, sum(train_sizes)),
        }
    per_round = local_steps(cfg)
    per_hospital = per_round * cfg.fl.rounds
    trainers = cfg.fl.hospitals if method == "local" else _per_round(cfg)
    total = per_hospital * trainers
    per_step = [min(batch, n) for n in train_sizes]
    return {
        "budget": budget_rule(cfg),
        "local_steps": per_round,
        "rounds": cfg.fl.rounds,
        "steps_per_hospital": per_hospital,
        "total_steps": total,
        "examples_seen": round(total * sum(per_step) / len(per_step)),
    }


def _per_round(cfg: Config) -> int:
    """Hospitals scheduled to train in a round (Flower samples ``fraction_train`` of them)."""
    return max(1, int(cfg.fl.fraction_train * cfg.fl.hospitals))
