"""The step budget: stated in every record, fair by default, pinned by a hospital's policy."""

from __future__ import annotations

import pytest

from client.policy import policy_for, refusal
from savlt_model.budget import budget, local_steps
from savlt_model.config import load_config
from savlt_model.errors import SavltError
from savlt_model.messages import RoundPlan
from savlt_model.methods import LossTerms

DEFAULT = "configs/default.yaml"  # K = 16 x 10 iterations = 160 central steps, 2 rounds, 3 sites


def _plan(cfg) -> RoundPlan:
    steps = local_steps(cfg)
    return RoundPlan(cfg, "fedavg", 42, 1, steps, steps * cfg.fl.rounds, "b", "a", LossTerms())


def test_per_hospital_is_the_default_and_same_total_is_the_old_split() -> None:
    fair = load_config(DEFAULT)
    assert fair.fl.budget == "per-hospital" and local_steps(fair) == 80  # 160 / 2 rounds
    old = load_config(DEFAULT, ["fl.budget=same-total", "fl.rounds=5"])
    assert local_steps(old) == 11  # ceil(160 / (5 rounds x 3 hospitals)): main's split
    assert local_steps(load_config(DEFAULT, ["fl.budget=same-total"])) == 27  # 160 / (2 x 3)
    explicit = load_config(DEFAULT, ["fl.local_steps=7", "fl.budget=same-total"])
    assert local_steps(explicit) == 7
    assert budget(explicit, "fedavg", [25])["budget"].startswith("fl.local_steps=7 (explicit")


def test_every_method_states_what_it_trained() -> None:
    cfg = load_config(DEFAULT)
    sites = [25, 29, 26]  # the default partition's hospitals: each under one batch of 32
    assert budget(cfg, "central", sites) == {  # one model on the pooled 80
        "budget": "central",
        "local_steps": None,
        "rounds": None,
        "steps_per_hospital": 160,
        "total_steps": 160,
        "examples_seen": 160 * 32,
    }
    fed = budget(cfg, "fedavg", sites)
    assert (fed["local_steps"], fed["rounds"], fed["steps_per_hospital"]) == (80, 2, 160)
    # a hospital's step sees all of its images when it has fewer than a batch
    assert (fed["total_steps"], fed["examples_seen"]) == (480, 160 * 80)  # 3 hospitals
    assert budget(cfg, "fedavg", [40, 40, 40])["examples_seen"] == 480 * 32
    assert budget(cfg, "local", sites) == {**fed, "budget": "per-hospital"}
    sampled = budget(load_config(DEFAULT, ["fl.fraction_train=0.34"]), "fedavg", [20, 40, 60])
    # one hospital scheduled per round: 160 steps, of (20 + 32 + 32) / 3 examples expected
    assert (sampled["total_steps"], sampled["examples_seen"]) == (160, 160 * 28)


def test_a_policy_approved_under_the_old_split_refuses_the_new_default() -> None:
    old = load_config(DEFAULT, ["fl.budget=same-total", "fl.rounds=5"])
    policy = policy_for(old, fingerprints=("b", "a"))
    assert policy.max_local_steps == 11
    assert refusal(policy, _plan(old)) is None
    new = load_config(DEFAULT)
    reason = refusal(policy, _plan(new))
    assert reason == "80 local steps per round exceed the approved max_local_steps 11"
    assert policy_for(new, fingerprints=("b", "a")).max_local_steps == 80  # savlt policy


@pytest.mark.parametrize("key", ["fl.budget=all", "fl.budget=per_hospital"])
def test_a_bad_budget_is_one_line_naming_the_key(key: str) -> None:
    with pytest.raises(SavltError, match=r"config key 'fl\.budget' must be one of"):
        load_config(DEFAULT, [key])
