"""The hospital's trust boundary, through the real ServerApp, strategy and ClientApp.

One in-process simulation (tests/inprocess.py) runs every case as its own job over the same
three hospitals: partition 0 holds a run policy (client/policy.py) that the ServerApp
rewrites before each job, as a hospital would approve or not approve a study. Checked: a
server config that names a local path is refused with the key named; the policy refuses a
disallowed method, a foreign backbone and too many rounds and accepts an approved config; no
file under the hospitals' data folder is created or modified; and docs/deploy.md's table of
what leaves a hospital matches the replies of every method."""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import re

import pytest
import yaml
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import ServerApp

from client.app import SimulatedHospitals, simulation_node_config
from client.app import app as client_app
from client.policy import Policy, load_policy, policy_for, refusal, write_policy
from savlt_model.config import PROJECT_ROOT, config_from_dict, load_config
from savlt_model.data.protocol import center_work_dir
from savlt_model.errors import SavltError
from savlt_model.messages import (
    ARRAYS,
    CONFIG,
    METRICS,
    RoundPlan,
    local_keys_set,
    run_config_hash,
)
from savlt_model.methods import LossTerms, federated_methods
from savlt_model.model.backbone import load_backbone
from server import calibration as calibration_module
from server import strategy as strategy_module
from server.federation import FederatedJob, run_federated
from tests.conftest import assert_no_local_text, tree_hashes
from tests.inprocess import run_in_process

CENTRES = ("mixed", "xiangya", "huaxi")


# One worker runs this module, and its federation is built once: session scope, because a
# module-scoped fixture is torn down and rebuilt whenever that worker runs another module's
# test between two of these (xdist does not keep a group's tests together).
pytestmark = pytest.mark.xdist_group("trust")


@pytest.fixture(scope="session")
def federation(fed_config, fed_data_root, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("trust")
    policy_file = out / "hospital0-policy.yaml"
    evil = out / "server-chosen" / "split.json"
    cfg = fed_config("fl.rounds=1", "fl.min_hospitals=2")
    approved = policy_for(cfg, pin_config=True)  # what hospital 0 reviewed and accepted
    foreign = load_backbone("savlt-tiny", init_seed=7).fingerprint  # other weights
    # every condition of the docs table on, so every row must show up in real replies
    table = (
        "fl.rounds=1",
        "fl.local_steps=2",  # FedProx's term acts from the second step: its own model
        "fl.feature_centring=true",
        "fl.client_eval=true",
        "model.lora.text=true",
        "model.prompt_context=2",
        "methods.text_anchored.evidence=class-means",
    )
    table_cfg = fed_config(*table)
    local = {"data.split_file": str(evil), "model.roi.unet_checkpoint": str(out / "u.pt")}
    cases: dict[str, tuple] = {
        "local-path": (cfg, "fedavg", approved, local),
        "method": (cfg, "fedprox", dataclasses.replace(approved, methods=["fedavg"]), None),
        "backbone": (
            cfg,
            "fedavg",
            dataclasses.replace(approved, backbone_fingerprint=foreign),
            None,
        ),
        "rounds": (fed_config("fl.rounds=2", "fl.min_hospitals=2"), "fedavg", approved, None),
        "approved": (cfg, "fedavg", approved, None),
    }
    for i, method in enumerate(federated_methods()):
        # each table case trains a model of its own (its own lr): SCAFFOLD's first round
        # (c = 0) is FedAvg's model bit for bit, FedAvgM's first step nearly so, and this one
        # Flower run refuses the calibration queries of a model it has answered already
        own = fed_config(*table, f"train.lr={0.001 * (1 + i / 10)}") if i else table_cfg
        cases[f"table-{method}"] = (own, method, policy_for(own, methods=[method]), None)

    results: dict = {"before": tree_hashes(fed_data_root), "cases": {}, "evil": evil}
    state: dict = {}
    captured: dict[str, dict[str, list[Message]]] = {}

    def keep(kind: str, replies) -> list[Message]:
        replies = list(replies)
        captured.setdefault(state["case"], {}).setdefault(kind, []).extend(replies)
        return replies

    def configure_train(self, server_round, arrays, config, grid):
        messages = list(original["configure_train"](self, server_round, arrays, config, grid))
        keep("sent", messages)
        if state["inject"]:  # one hospital is sent a config naming paths on its disk
            first = messages[0]
            raw = json.loads(str(first.content[CONFIG]["savlt-config"]))
            for key, value in state["inject"].items():
                section, name = key.rsplit(".", 1)
                node = raw
                for part in section.split("."):
                    node = node[part]
                node[name] = value
            record = ConfigRecord({**first.content[CONFIG], "savlt-config": json.dumps(raw)})
            messages[0] = Message(
                content=RecordDict({ARRAYS: first.content[ARRAYS], CONFIG: record}),
                message_type=first.metadata.message_type,
                dst_node_id=first.metadata.dst_node_id,
            )
        return messages

    def aggregate_train(self, server_round, replies):
        return original["aggregate_train"](self, server_round, keep("train", replies))

    def aggregate_evaluate(self, server_round, replies):
        return original["aggregate_evaluate"](self, server_round, keep("evaluate", replies))

    def ask(grid, message_type, content, timeout, event):
        return keep(message_type, original["ask"](grid, message_type, content, timeout, event))

    original = {
        "configure_train": strategy_module.SavltStrategy.configure_train,
        "aggregate_train": strategy_module.SavltStrategy.aggregate_train,
        "aggregate_evaluate": strategy_module.SavltStrategy.aggregate_evaluate,
        "ask": calibration_module._ask,
    }
    server_app = ServerApp()

    @server_app.main()
    def main(grid, context) -> None:
        for name, (job_cfg, method, policy, inject) in cases.items():
            state.update(case=name, inject=inject)
            write_policy(policy_file, policy)
            job = FederatedJob(job_cfg, method, 42, out / name)
            try:
                results["cases"][name] = run_federated(grid, job)
            except SavltError as exc:
                results["cases"][name] = exc

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(strategy_module.SavltStrategy, "configure_train", configure_train)
        mp.setattr(strategy_module.SavltStrategy, "aggregate_train", aggregate_train)
        mp.setattr(strategy_module.SavltStrategy, "aggregate_evaluate", aggregate_evaluate)
        mp.setattr(calibration_module, "_ask", ask)
        run_in_process(
            server_app=server_app,
            client_app=SimulatedHospitals(
                client_app, simulation_node_config(cfg), {0: {"policy": str(policy_file)}}
            ),
            num_supernodes=3,
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
        )
    results.update(after=tree_hashes(fed_data_root), captured=captured, cfg=cfg)
    results["table_cfg"] = table_cfg
    return results


def _refusals(summary: dict) -> list[dict]:
    """The round's refused hospitals (training replies that came back as errors)."""
    return [e for e in summary["events"] if e["event"] == "failed"]


@pytest.mark.slow  # one Flower simulation for the module
def test_a_server_config_naming_a_local_path_is_refused_with_the_key_named(federation):
    summary = federation["cases"]["local-path"]
    (event,) = _refusals(summary)
    assert event["reason"] == "local-key"  # the key names stay in the hospital's own log
    assert_no_local_text([e["reason"] for e in summary["events"]], [federation["evil"]])
    assert summary["history"][0]["hospitals"] == 2  # the others trained
    assert not federation["evil"].parent.exists()  # nothing written where the server said


@pytest.mark.slow  # one Flower simulation for the module
def test_the_server_sends_no_local_path(federation, fed_data_root):
    """Every training message carries the hospital-local keys at their defaults only."""
    sent = federation["captured"]["approved"]["sent"]
    assert len(sent) == 3
    for msg in sent:
        text = str(msg.content[CONFIG]["savlt-config"])
        assert str(fed_data_root) not in text
        assert str(federation["cfg"].data.work_dir) not in text
        assert local_keys_set(config_from_dict(json.loads(text), local=False)) == []


@pytest.mark.slow  # one Flower simulation for the module
@pytest.mark.parametrize("case", ["method", "backbone", "rounds"])
def test_the_policy_refuses_a_run_outside_it_before_training(federation, case):
    """The server learns the code ``policy`` only; why (the method, the fingerprint, the
    rounds) stays in the hospital's log (``client.policy.refusal`` is tested below)."""
    summary = federation["cases"][case]
    refusals = _refusals(summary)
    assert refusals and all(e["reason"] == "policy" for e in refusals)
    assert_no_local_text([e["reason"] for e in summary["events"]])
    assert all(row["hospitals"] == 2 for row in summary["history"])
    # the calibration queries are refused too: hospital 0 gives nothing to this run. The
    # cases share one Flower run, and the method and backbone cases end at the very model
    # the local-path case did (hospital 0 out, one FedProx step is one FedAvg step): the
    # others answered its queries already, once per run and model, and refuse them now.
    others = [e for e in summary["events"] if e not in refusals]
    assert {e["event"] for e in others} == {"calibration-failed"}
    reasons = {e["reason"] for e in others}
    assert "policy" in reasons and reasons <= {"policy", "query-repeated"}


@pytest.mark.slow  # one Flower simulation for the module
def test_the_policy_accepts_the_approved_config(federation):
    summary = federation["cases"]["approved"]
    assert summary["events"] == []
    assert summary["history"][0]["hospitals"] == 3
    assert summary["calibration"]["inductive"] is not None


@pytest.mark.slow  # one Flower simulation for the module
def test_the_federation_leaves_every_data_folder_byte_identical(federation, fed_data_root):
    before, after = federation["before"], federation["after"]
    assert before and after == before  # no file created, changed or removed
    assert not [p for p in after if p.endswith("split.json") or "few_shot" in p]
    for centre in CENTRES:  # the splits and draws went to the work directory instead
        work = center_work_dir(federation["cfg"], fed_data_root, centre)
        assert (work / "split.json").is_file()
        assert list((work / "few_shot").glob("train_k*_seed42.json"))


# --- docs/deploy.md: what leaves a hospital ---------------------------------------------

CONDITIONS = {  # the table's "sent when" cells, evaluated on a config
    "always": lambda cfg: True,
    "`fl.feature_centring`": lambda cfg: cfg.fl.feature_centring,
    "`fl.client_eval`": lambda cfg: cfg.fl.client_eval,
    "`model.lora.text`": lambda cfg: cfg.model.lora.text,
    "`model.prompt_context` > 0": lambda cfg: cfg.model.prompt_context > 0,
    "`model.train_visual_proj`": lambda cfg: cfg.model.train_visual_proj,
    "`methods.text_anchored.evidence: class-means`": (
        lambda cfg: cfg.methods.text_anchored.evidence == "class-means"
    ),
}
MESSAGES = {  # the table's (message, kind) cells -> (captured replies, record)
    ("train reply", "tensor"): ("train", ARRAYS),
    ("train reply", "metric"): ("train", METRICS),
    ("evaluate reply", "metric"): ("evaluate", METRICS),
    ("`query.feature_stats` reply", "metric"): ("query.feature_stats", METRICS),
    ("`query.calibration_stats` reply", "metric"): ("query.calibration_stats", METRICS),
}


def leaves_site_table() -> list[dict[str, str]]:
    """The rows of docs/deploy.md's table under "What leaves a hospital"."""
    text = (PROJECT_ROOT / "docs" / "deploy.md").read_text(encoding="utf-8")
    section = text[text.index("## 9. What leaves a hospital") :]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["message", "kind", "name", "methods", "sent when", "what it is"]
    rows = [dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True))
            for line in lines[2:]]  # fmt: skip
    assert rows
    return rows


def expected(rows: list[dict[str, str]], cfg, method: str, message: str, kind: str) -> list[str]:
    """The names (globs for tensors) the table lists for one reply of ``method``."""
    out = []
    for row in rows:
        assert row["sent when"] in CONDITIONS, row
        assert (row["message"], row["kind"]) in MESSAGES, row
        methods = row["methods"]
        assert methods == "all" or set(methods.split(", ")) <= set(federated_methods()), row
        ours = MESSAGES[row["message"], row["kind"]]
        if ours != (message, kind) or not CONDITIONS[row["sent when"]](cfg):
            continue
        if methods == "all" or method in methods.split(", "):
            out += re.findall(r"`([^`]+)`", row["name"])
    return out


@pytest.mark.slow  # one Flower simulation for the module
@pytest.mark.parametrize("method", federated_methods())
def test_the_table_of_what_leaves_a_hospital_matches_real_replies(federation, method):
    rows = leaves_site_table()
    cfg = federation["table_cfg"]
    replies = federation["captured"][f"table-{method}"]
    assert {"train", "evaluate", "query.feature_stats", "query.calibration_stats"} <= set(replies)
    for message, kind in MESSAGES.values():
        names = expected(rows, cfg, method, message, kind)
        assert names, (message, kind)
        msgs = replies[message]
        assert len(msgs) == 3 and not any(m.has_error() for m in msgs)
        for msg in msgs:
            assert set(msg.content.array_records) | set(msg.content.metric_records) <= {
                ARRAYS,
                METRICS,
            }
            assert not msg.content.config_records  # nothing free-form travels back
            record = msg.content[kind]
            sent = set(record.keys())
            unlisted = [k for k in sent if not any(fnmatch.fnmatchcase(k, n) for n in names)]
            assert not unlisted, f"{method} {message}: sent but not in docs/deploy.md: {unlisted}"
            unsent = [n for n in names if not any(fnmatch.fnmatchcase(k, n) for k in sent)]
            assert not unsent, f"{method} {message}: in docs/deploy.md but not sent: {unsent}"
        if kind == ARRAYS:  # with no tensor in the other replies
            for other in ("evaluate", "query.feature_stats", "query.calibration_stats"):
                assert all(not m.content.array_records for m in replies[other])


# --- the policy file and its checks, without Flower --------------------------------------


def _plan(cfg, method: str = "fedavg", round_: int = 1, steps: int = 1, fp=("b", "a")) -> RoundPlan:
    return RoundPlan(cfg, method, 42, round_, steps, steps, *fp, LossTerms())


def test_policy_limits_dp_and_the_pinned_hash():
    cfg = load_config("configs/smoke.yaml", ["fl.rounds=3", "fl.local_steps=5"])
    policy = policy_for(cfg, fingerprints=("b", "a"), pin_config=True)
    assert policy.max_rounds == 3 and policy.max_local_steps == 5 and not policy.require_dp
    assert policy.run_config_sha256 == run_config_hash(cfg)
    assert refusal(policy, _plan(cfg)) is None
    assert "4 rounds exceed" in refusal(policy, _plan(cfg, round_=4))  # a round number past it
    assert "6 local steps per round exceed" in refusal(policy, _plan(cfg, steps=6))
    assert "text-anchor fingerprint" in refusal(policy, _plan(cfg, fp=("b", "x")))
    other = load_config("configs/smoke.yaml", ["fl.rounds=3", "fl.local_steps=5", "train.lr=0.1"])
    assert "is not the approved one" in refusal(policy, _plan(other))
    # the hash covers what the server decides, not the hospitals' own paths
    moved = load_config(
        "configs/smoke.yaml", ["fl.rounds=3", "fl.local_steps=5", "data.root=/elsewhere"]
    )
    assert run_config_hash(moved) == run_config_hash(cfg)

    dp = ["privacy.mode=server-fixed", "privacy.noise_multiplier=0.8", "fl.methods=[fedavg]"]
    dp += ["fl.lora_aggregation=naive"]
    dp_cfg = load_config("configs/smoke.yaml", dp)
    needs_dp = policy_for(dp_cfg, fingerprints=("b", "a"))
    assert needs_dp.require_dp and needs_dp.min_noise_multiplier == 0.8
    assert refusal(needs_dp, _plan(dp_cfg)) is None
    plain = load_config("configs/smoke.yaml", ["fl.methods=[fedavg]"])
    assert "requires central DP" in refusal(needs_dp, _plan(plain))
    weaker = load_config("configs/smoke.yaml", [*dp[:1], "privacy.noise_multiplier=0.5", *dp[2:]])
    assert "noise_multiplier 0.5 is below the approved minimum 0.8" in refusal(
        needs_dp, _plan(weaker)
    )


MISSING = object()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"backbone_fingerprint": MISSING}, "key 'backbone_fingerprint' is missing"),
        ({"methods": "fedavg"}, "key 'methods' must be a non-empty list of method names"),
        ({"methods": ["central"]}, "key 'methods' must be federated methods"),
        ({"max_rounds": "ten"}, "key 'max_rounds' must be an integer >= 1, got 'ten'"),
        ({"max_local_steps": 0}, "key 'max_local_steps' must be an integer >= 1"),
        ({"require_dp": "yes please"}, "key 'require_dp' must be true or false"),
        ({"min_noise_multiplier": -1}, "key 'min_noise_multiplier' must be a number >= 0"),
        ({"run_config_sha256": "abc"}, "key 'run_config_sha256' must be null or the 64 hex"),
        ({"max_round": 3}, "key 'max_round' is unknown; allowed: methods"),
        ("[1, 2]\n", "must hold a mapping of methods"),
        ("methods: [\n", "is not valid YAML"),
    ],
)
def test_a_bad_policy_file_is_one_line_naming_the_file_and_key(tmp_path, edit, message):
    good = Policy(["fedavg"], "b", "a", 3, 5)
    path = write_policy(tmp_path / "policy.yaml", good)
    assert load_policy(path) == good
    if isinstance(edit, str):
        path.write_text(edit)
    else:
        raw = {**dataclasses.asdict(good), **edit}
        path.write_text(yaml.safe_dump({k: v for k, v in raw.items() if v is not MISSING}))
    with pytest.raises(SavltError) as info:
        load_policy(path)
    line = str(info.value)
    assert "\n" not in line and str(path) in line and message in line


def test_a_missing_policy_file_is_named(tmp_path):
    with pytest.raises(SavltError, match=r"policy file .*missing.yaml does not exist"):
        load_policy(tmp_path / "missing.yaml")
