"""FedAvg: every tensor, prototype rows included, weighted by the hospital's n_k."""

from __future__ import annotations

from typing import Any

import numpy as np

from savlt_model.methods.base import HospitalStats, Method, softweights


def sample_weights(stats: HospitalStats, params: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """n_k / sum n for the shared tensors and for every prototype row."""
    k, c = stats.class_counts.shape
    shared = softweights(stats.examples, np.zeros(k), np.ones(k, dtype=bool))
    proto = softweights(stats.examples[:, None], np.zeros((k, c)), np.ones((k, c), dtype=bool))
    return shared, proto


FEDAVG = Method("fedavg", "FedAvg: every tensor weighted by its n_k", True, sample_weights)
