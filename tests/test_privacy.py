"""Central differential privacy (Flower's DP wrappers around SavltStrategy), through real Flower."""

from __future__ import annotations

import pytest
import torch

from savlt_model.checkpoint import load_adapter
from savlt_model.errors import SavltError
from savlt_model.model.adapters import trainable_state
from savlt_model.model.build import build_model
from simulation.runner import run_job
from tests.conftest import check_declared_replies


def _cfg(fed_config, *extra: str):
    """One round of FedAvg with naive LoRA averaging: what central DP is calibrated for."""
    return fed_config("fl.methods=[fedavg]", "fl.lora_aggregation=naive", "fl.rounds=1", *extra)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["fl.methods=[text-anchored]"], "text-anchored weights depend"),
        (["fl.lora_aggregation=fedex"], "fl.lora_aggregation: naive"),
        (["fl.min_hospitals=2"], "fl.min_hospitals: 0"),
        (["privacy.clipping_norm=0"], "privacy.clipping_norm"),
    ],
)
def test_dp_refuses_combinations_it_would_miscalibrate(fed_config, extra, message):
    with pytest.raises(SavltError, match=message):
        _cfg(fed_config, "privacy.mode=server-fixed", *extra)


@pytest.mark.slow
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
    )
    summary = run_job(dp_cfg, "fedavg", 42, tmp_path / "dp", resume=False)
    assert "Central DP (server-fixed)" in capsys.readouterr().out
    assert summary["history"][0]["hospitals"] == 3

    plain, _ = load_adapter(tmp_path / "plain" / "adapters" / "fedavg_seed42.safetensors")
    noised, _ = load_adapter(tmp_path / "dp" / "adapters" / "fedavg_seed42.safetensors")
    assert plain.keys() == noised.keys()
    for key in plain:  # noise of std 1.0 * 0.5 / 3 on every tensor
        assert bool(noised[key].isfinite().all()), key
        assert not torch.equal(plain[key], noised[key]), key

    check_declared_replies(train_replies, set(trainable_state(build_model(dp_cfg, 42))), n=3)
