"""Central differential privacy (Flower's DP wrappers around SavltStrategy), through real Flower."""

from __future__ import annotations

import pytest
import torch

from savlt_model.adapters import trainable_state
from savlt_model.checkpoint import load_adapter
from savlt_model.errors import SavltError
from savlt_model.train import build_model
from savlt_model.wire import TRAIN_METRIC_KEYS
from server import strategy as strategy_module
from simulation.runner import run_job


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
    fed_config, tmp_path, monkeypatch, capsys
):
    plain_cfg = _cfg(fed_config)
    run_job(plain_cfg, "fedavg", 42, tmp_path / "plain", resume=False)

    seen: list = []
    original = strategy_module.SavltStrategy.aggregate_train

    def spy(self, server_round, replies):
        replies = list(replies)
        seen.extend(replies)
        return original(self, server_round, replies)

    monkeypatch.setattr(strategy_module.SavltStrategy, "aggregate_train", spy)
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

    # what crossed the network: only the declared tensors and metric names, numbers only
    payload = set(trainable_state(build_model(dp_cfg, 42)))
    assert len(seen) == 3
    for msg in seen:
        assert set(msg.content.array_records) == {"arrays"}
        assert set(msg.content.array_records["arrays"]) == payload
        assert not msg.content.config_records
        metrics = msg.content.metric_records["metrics"]
        assert set(metrics) <= TRAIN_METRIC_KEYS
        for value in metrics.values():
            items = value if isinstance(value, list) else [value]
            assert all(isinstance(v, (int, float)) for v in items)
