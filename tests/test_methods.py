"""The method registry: every layer reads it, and one entry adds a federated method."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from savlt_model.config import MethodsConfig, load_config
from savlt_model.errors import SavltError
from savlt_model.methods import METHODS, HospitalStats, Method, federated_methods, get_method
from savlt_model.methods.fedprox import FedProxConfig
from server import strategy as strategy_module
from server.federation import FederatedJob, job_summary
from simulation.baselines import BASELINES
from simulation.runner import simulate_federated


def uniform_weights(stats: HospitalStats, params: None) -> tuple[np.ndarray, np.ndarray]:
    """The toy method's maths: every hospital weighs the same, whatever its size."""
    k, c = stats.class_counts.shape
    return np.full(k, 1.0 / k), np.full((k, c), 1.0 / k)


def test_every_baseline_has_a_runner_and_every_federated_method_a_weighting() -> None:
    assert set(BASELINES) == {n for n, m in METHODS.items() if not m.federated}
    assert all(METHODS[n].weighting is not None for n in federated_methods())
    assert get_method("fedprox").losses(MethodsConfig(fedprox=FedProxConfig(mu=0.3))).prox_mu == 0.3
    with pytest.raises(SavltError, match=r"unknown method 'fedmedian'; choose from \["):
        get_method("fedmedian")


def test_config_reads_the_registry_and_names_renamed_keys() -> None:
    with pytest.raises(SavltError, match=r"fl\.methods.*unknown \['fedmedian'\]"):
        load_config("configs/smoke.yaml", ["fl.methods=[fedavg, fedmedian]"])
    with pytest.raises(SavltError, match=r"'fl\.protocol' was renamed to 'fl\.partition'"):
        load_config("configs/smoke.yaml", ["fl.protocol=paper"])


@pytest.mark.slow
@pytest.mark.usefixtures("in_process")
def test_a_toy_method_by_one_registry_entry_runs_through_flower(
    fed_config, tmp_path, train_replies, monkeypatch
) -> None:
    toy = Method("uniform", "every hospital weighs the same", True, uniform_weights)
    monkeypatch.setitem(METHODS, toy.name, toy)
    reports: list[dict] = []
    real = strategy_module.aggregate

    def spy(*args, **kwargs):  # the real aggregation, its report kept
        state, step, report = real(*args, **kwargs)
        reports.append(report)
        return state, step, report

    monkeypatch.setattr(strategy_module, "aggregate", spy)
    cfg = fed_config("fl.partition=paper")  # sub-sites of unequal size: uniform != FedAvg
    job = FederatedJob(cfg, "uniform", 42, tmp_path)
    simulate_federated(cfg, [job])

    state, summary = job_summary(job)
    assert summary["rounds"] == 2 and summary["events"] == []
    sizes = [int(m.content.metric_records["metrics"]["num-examples"]) for m in train_replies]
    assert len(set(sizes)) > 1  # FedAvg would weigh these hospitals differently
    assert len(reports) == 2
    for report in reports:  # the registry entry's maths, not FedAvg's, weighted every round
        np.testing.assert_allclose(report["weights"], [1 / 3] * 3, rtol=0, atol=1e-12)
    last = train_replies[-3:]  # prototypes: the plain mean of the second round's replies
    protos = torch.stack(
        [m.content.array_records["arrays"].to_torch_state_dict()["prototypes"] for m in last]
    ).double()
    torch.testing.assert_close(state["prototypes"].double(), protos.mean(0), rtol=0, atol=1e-6)
