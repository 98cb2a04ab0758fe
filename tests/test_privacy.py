"""Central differential privacy (Flower's DP wrappers around SavltStrategy), through real Flower."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from client.app import SimulatedHospitals, simulation_node_config
from savlt_model.checkpoint import load_adapter
from savlt_model.config import PrivacyConfig
from savlt_model.errors import SavltError
from savlt_model.model.adapters import trainable_state
from savlt_model.model.build import build_model
from server import privacy as privacy_module
from server.accounting import privacy_spent
from server.aggregation import update_norm
from server.federation import FederatedJob
from server.privacy import epsilon_line
from simulation.runner import run_job, server_app_for
from tests.conftest import check_declared_replies
from tests.faulty_clientapp import app as app_without_clipping


def _cfg(fed_config, *extra: str):
    """One round of FedAvg with naive LoRA averaging: what central DP is calibrated for."""
    return fed_config("fl.methods=[fedavg]", "fl.lora_aggregation=naive", "fl.rounds=1", *extra)


@pytest.mark.parametrize("mode", ["server-fixed", "client-fixed"])
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["fl.methods=[text-anchored]"], "text-anchored weights depend"),
        (["fl.lora_aggregation=fedex"], "fl.lora_aggregation: naive"),
        (["fl.min_hospitals=2"], "fl.min_hospitals: 0"),
        (["privacy.clipping_norm=0"], "privacy.clipping_norm"),
        (["privacy.delta=0"], "privacy.delta"),
    ],
)
def test_dp_refuses_combinations_it_would_miscalibrate(fed_config, mode, extra, message):
    with pytest.raises(SavltError, match=message) as info:
        _cfg(fed_config, f"privacy.mode={mode}", *extra)
    assert "\n" not in str(info.value)  # one line, naming the key


def test_ffa_lora_is_a_plain_average_so_dp_accepts_it(fed_config):
    cfg = _cfg(fed_config, "privacy.mode=server-fixed", "fl.lora_aggregation=ffa")
    assert cfg.fl.lora_aggregation == "ffa"


@pytest.mark.parametrize(("z", "rounds"), [(1.0, 5), (1.0, 1), (2.0, 10), (0.5, 3)])
def test_epsilon_matches_gaussian_rdp_composition(z: float, rounds: int) -> None:
    """Reference computed here, not by Opacus: R rounds of the Gaussian mechanism (q = 1)
    have RDP(a) = R a / (2 z^2); Balle et al. (2020, Thm 21) convert it to
    eps = min_a RDP(a) + log((a - 1) / a) - (log delta + log a) / (a - 1), minimised over a
    fine grid of orders. Opacus minimises over a coarser grid: at most 0.1 % above. The
    classic conversion min_a RDP(a) + log(1/delta) / (a - 1) has the closed form
    R / (2 z^2) + sqrt(2 R log(1/delta)) / z, a looser upper bound."""
    delta = 1e-5
    spent = privacy_spent(PrivacyConfig("server-fixed", z, delta=delta), rounds)
    a = np.linspace(1.001, 256, 2_000_000)
    rdp = rounds * a / (2 * z * z)
    reference = float(np.min(rdp + np.log((a - 1) / a) - (math.log(delta) + np.log(a)) / (a - 1)))
    classic = rounds / (2 * z * z) + math.sqrt(2 * rounds * math.log(1 / delta)) / z
    assert reference <= spent["epsilon"] <= reference * 1.001
    assert spent["epsilon"] < classic
    assert spent["delta"] == delta and spent["sample_rate"] == 1.0 and spent["rounds"] == rounds
    # z = 1, 5 rounds, delta = 1e-5: about 12.3 (no subsampling: every hospital every round)
    if (z, rounds) == (1.0, 5):
        assert spent["epsilon"] == pytest.approx(12.30, abs=0.01)


def test_no_noise_is_unbounded_epsilon() -> None:
    """Clipping alone buys no DP: epsilon is None (JSON null, as results.json needs)."""
    spent = privacy_spent(PrivacyConfig("server-fixed", noise_multiplier=0.0), 3)
    assert spent["epsilon"] is None
    assert (
        "(epsilon, delta) = (unbounded add/remove-one, unbounded replace-one, 1e-05) after 3 rounds"
        in epsilon_line(spent)
    )


@pytest.mark.slow
@pytest.mark.usefixtures("in_process")  # Flower's DP wrapper is server-side: Ray adds nothing
def test_server_side_dp_noises_the_adapter_and_replies_stay_declared(
    fed_config, tmp_path, capsys, train_replies
):
    plain_cfg = _cfg(fed_config)
    run_job(plain_cfg, "fedavg", 42, tmp_path / "plain", resume=False)
    train_replies.clear()

    dp_cfg = _cfg(
        fed_config,
        "privacy.mode=server-fixed",
        "privacy.noise_multiplier=1.0",
        "privacy.clipping_norm=0.5",
        "fl.server_eval=true",  # scored: results records are written (with epsilon)
    )
    summary = run_job(dp_cfg, "fedavg", 42, tmp_path / "dp", resume=False)
    printed = capsys.readouterr().out
    assert "Central DP (server-fixed)" in printed
    assert summary["history"][0]["hospitals"] == 3
    # one round at z = 1: epsilon reported for the stated delta, at the start and the end,
    # in the job summary and in every results record
    spent = summary["privacy"]
    assert spent["rounds"] == 1 and spent["delta"] == 1e-5
    assert spent["epsilon"] == pytest.approx(4.73, abs=0.01)
    line = "(epsilon, delta) = (4.73 add/remove-one, 10.7 replace-one, 1e-05) after 1 rounds"
    assert printed.count(line) == 2
    assert summary["records"]
    assert all(r["epsilon"] == spent["epsilon"] and r["delta"] == 1e-5 for r in summary["records"])

    plain, _ = load_adapter(tmp_path / "plain" / "adapters" / "fedavg_seed42.safetensors")
    noised, _ = load_adapter(tmp_path / "dp" / "adapters" / "fedavg_seed42.safetensors")
    assert plain.keys() == noised.keys()
    for key in plain:  # noise of std 1.0 * 0.5 / 3 on every tensor
        assert bool(noised[key].isfinite().all()), key
        assert not torch.equal(plain[key], noised[key]), key

    check_declared_replies(train_replies, set(trainable_state(build_model(dp_cfg, 42))), n=3)


@pytest.fixture
def uploads(monkeypatch) -> list[float]:
    """The L2 norm of every training reply as it reached the server (reply minus the global
    payload sent), before any server-side check: a spy on the real DP wrapper, no mock."""
    norms: list[float] = []
    original = privacy_module._CheckedNoisedRound.aggregate_train

    def spy(self, server_round, replies):
        replies = list(replies)
        norms.extend(
            update_norm(m.content["arrays"].to_torch_state_dict(), self.strategy.sent)
            for m in replies
        )
        return original(self, server_round, replies)

    monkeypatch.setattr(privacy_module._CheckedNoisedRound, "aggregate_train", spy)
    return norms


@pytest.mark.slow
@pytest.mark.usefixtures("in_process")
def test_client_side_clipping_bounds_every_upload_and_reports_epsilon(
    fed_config, tmp_path, capsys, uploads
):
    """client-fixed: each hospital clips its own update (Flower's fixedclipping_mod in the
    real ClientApp); the server only adds the noise. 2 rounds, FFA-LoRA, clip 0.05."""
    clip = 0.05
    cfg = _cfg(
        fed_config,
        "privacy.mode=client-fixed",
        "privacy.noise_multiplier=1.0",
        f"privacy.clipping_norm={clip}",
        "fl.lora_aggregation=ffa",
        "fl.rounds=2",
        "fl.server_eval=true",  # scored: results records are written (with epsilon)
    )
    summary = run_job(cfg, "fedavg", 42, tmp_path / "dp", resume=False)
    printed = capsys.readouterr().out

    # (a) 3 hospitals x 2 rounds reached the server, every one within the clip, and the
    # clip acted (the updates are larger than 0.05 unclipped: they sit on the bound)
    assert len(uploads) == 6
    assert max(uploads) <= clip + 1e-5
    assert min(uploads) == pytest.approx(clip, rel=1e-4)
    assert [r["hospitals"] for r in summary["history"]] == [3, 3] and not summary["events"]
    assert "Central DP (client-fixed)" in printed and "by the hospital itself" in printed

    # (b) epsilon: privacy_spent's value, printed at the start and the end, in the job
    # summary and in every results record
    spent = privacy_spent(cfg.privacy, 2)
    assert spent["epsilon"] == pytest.approx(7.08, abs=0.01)  # z = 1, 2 rounds, delta 1e-5
    assert summary["privacy"] == spent
    assert printed.count(epsilon_line(spent)) == 2
    assert summary["records"]
    assert all(r["epsilon"] == spent["epsilon"] and r["delta"] == 1e-5 for r in summary["records"])


@pytest.mark.slow
@pytest.mark.usefixtures("in_process")
def test_client_fixed_refuses_a_hospital_that_did_not_clip(fed_config, tmp_path, caplog):
    """The noise is calibrated to the clip: a ClientApp without the clipping mod (the test
    app runs the real training, no mod) sends unclipped updates, and every one is refused."""
    import flwr.simulation

    cfg = _cfg(fed_config, "privacy.mode=client-fixed", "privacy.clipping_norm=0.05")
    failures: list[BaseException] = []
    flwr.simulation.run_simulation(
        server_app=server_app_for(FederatedJob(cfg, "fedavg", 42, tmp_path), failures=failures),
        client_app=SimulatedHospitals(app_without_clipping, simulation_node_config(cfg)),
        num_supernodes=3,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    assert caplog.text.count("above privacy.clipping_norm 0.05: the hospital did not clip") == 3
    (failure,) = failures
    assert isinstance(failure, SavltError) and "no round completed" in str(failure)
