"""Drift control and server optimisers: SCAFFOLD, FedAvgM, FedAdam (savlt_model/methods/).

The maths against numbers computed by hand; then, in process through the real ServerApp,
strategy and ClientApp (tests/inprocess.py), SCAFFOLD's controls on both sides of the wire,
a hospital that crashes or keeps no state, and a server resumed from its checkpoint.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
from flwr.app import ConfigRecord, Context, RecordDict
from flwr.serverapp import ServerApp

from client.app import SimulatedHospitals, simulation_node_config
from client.app import app as client_app
from client.controls import KEPT_CONTROL, OWN, PENDING, RoundControl, keep_control, round_control
from savlt_model.config import Config, FederatedConfig, MethodsConfig, TrainConfig, load_config
from savlt_model.data.partition import build_partition
from savlt_model.errors import SavltError
from savlt_model.messages import (
    ARRAYS,
    CONFIG,
    CONTROL,
    CONTROL_COUNTED,
    CONTROL_EPOCH,
    METRICS,
)
from savlt_model.methods.fedadam import FedAdamConfig, adam_step
from savlt_model.methods.fedavgm import FedAvgMConfig, momentum_step
from savlt_model.methods.scaffold import control_delta
from savlt_model.model.adapters import RESIDUAL, fold_residuals, residual_matrices, trainable_state
from savlt_model.model.build import build_model, image_sets
from savlt_model.train import lr_sums, train_steps
from server import strategy as strategy_module
from server.aggregation import ClientUpdate, aggregate, server_step
from server.controls import Controls
from server.federation import FederatedJob, run_federated
from server.strategy import load_checkpoint
from tests.inprocess import FIRST_NODE, run_in_process
from tools.cli import main

QUERY = "roi_pool.query"
A, B = "blk.lora_A.weight", "blk.lora_B.weight"
ANCHORS = torch.eye(2)  # two classes, prototypes of width 2


def _t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# x, and two hospitals' updates y_1 (n = 1) and y_2 (n = 3): FedAvg shares 0.25 and 0.75
X = {QUERY: _t([1.0, 2.0]), "prototypes": _t([[1, 0], [0, 1]]), A: _t([[1, 0]]), B: _t([[0], [0]])}
Y1 = {QUERY: _t([0.5, 2.5]), "prototypes": _t([[0.5, 0], [0, 1]]), A: _t([[1, 0.5]])}
Y1[B] = _t([[0.2], [0]])
Y2 = {QUERY: _t([1.5, 1.0]), "prototypes": _t([[1, 0.5], [0, 0]]), A: _t([[0.5, 0]])}
Y2[B] = _t([[0], [0.4]])
# the schedule: lr 0.3, min_lr 0.1 over 2 steps is 0.3 then 0.2, so L = 0.5 (and 1.0 for the
# prototypes at prototype_lr_scale 2)
TRAIN = TrainConfig(lr=0.3, min_lr=0.1, prototype_lr_scale=2.0)


def _cfg(lora: str, methods: MethodsConfig | None = None) -> Config:
    return Config(
        train=TRAIN,
        fl=FederatedConfig(lora_aggregation=lora, hospitals=2),  # type: ignore[arg-type]
        methods=methods or MethodsConfig(),
    )


def _only(state: dict, lora: str) -> dict:
    """The payload of ``lora``'s kind: ffa trains and sends B alone."""
    return {k: v for k, v in state.items() if not (lora == "ffa" and k == A)}


def _close(got: torch.Tensor, want, atol: float = 1e-6) -> None:
    torch.testing.assert_close(got.double(), torch.as_tensor(want).double(), rtol=0, atol=atol)


@pytest.mark.parametrize("lora", ["naive", "fedex", "ffa"])
def test_scaffold_two_hospital_round_by_hand(lora: str) -> None:
    """c = (0.2, -0.4) on the query (0 elsewhere), c_1 = (0.8, -0.4), c_2 = (0, -0.4) (so c
    is their weighted mean). By hand: c_1+ - c_1 = (x - y_1) / L - c = (1, -1) - c =
    (0.8, -0.6), c_2+ - c_2 = (-1, 2) - c = (-1.2, 2.4), c+ = c + 0.25 (0.8, -0.6) +
    0.75 (-1.2, 2.4) = (-0.5, 1.25), the weighted mean of c_1+ = (1.6, -1) and c_2+ =
    (-1.2, 2); the new global query is 0.25 y_1 + 0.75 y_2 = (1.25, 1.375)."""
    cfg = _cfg(lora)
    x, y1, y2 = _only(X, lora), _only(Y1, lora), _only(Y2, lora)
    keys = sorted(x)
    lr = lr_sums(cfg, keys, 0, 2, 2)
    assert lr[QUERY] == pytest.approx(0.5) and lr["prototypes"] == pytest.approx(1.0)
    c = {k: torch.zeros_like(v) for k, v in x.items()} | {QUERY: _t([0.2, -0.4])}
    updates = [ClientUpdate("h1", y1, 1, [1, 0]), ClientUpdate("h2", y2, 3, [2, 1])]
    state, _, report = aggregate(updates, x, "scaffold", cfg, {"blk": 1.0}, ANCHORS)
    assert report["weights"] == [0.25, 0.75]
    _close(state[QUERY], [1.25, 1.375])
    _close(state["prototypes"], [[0.875, 0.375], [0, 0.25]])

    controls = Controls(dict(c), epoch="e1")
    controls.update(1, x, [("h1", y1, True), ("h2", y2, True)], [0.25, 0.75], lr)
    _close(controls.c[QUERY], [-0.5, 1.25])
    # prototypes, L = 1: 0.25 (x - y_1) + 0.75 (x - y_2) with c = 0 there
    _close(controls.c["prototypes"], [[0.125, -0.375], [0, 0.75]])
    for key in (B, A) if lora != "ffa" else (B,):  # the LoRA factors: the same rule
        want = sum(w * (x[key] - y[key]) / 0.5 for w, y in ((0.25, y1), (0.75, y2)))
        _close(controls.c[key], want)
    assert (A in controls.c) == (lora != "ffa")  # exactly the trained tensors
    assert controls.counted == {"h1": 1, "h2": 1}

    # hospital 1's side: it kept c_1 and the pending change, and adds it once counted
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    own = {k: torch.zeros_like(v) for k, v in x.items()} | {QUERY: _t([0.8, -0.4])}
    keep_control(ctx, RoundControl("e1", c, own, False), x, y1, lr, 1, keep=True)
    tags = ConfigRecord({CONTROL_EPOCH: "e1", CONTROL_COUNTED: 1})
    nxt = round_control(tags, controls.c, ctx, True, "h1")
    _close(nxt.own[QUERY], [1.6, -1.0])
    _close(nxt.correction[QUERY], [-0.5 - 1.6, 1.25 + 1.0])
    # c_2+ = (-1.2, 2): c+ is the weighted mean of the hospitals' new controls
    _close(0.25 * nxt.own[QUERY] + 0.75 * _t([-1.2, 2.0]), controls.c[QUERY])
    # not counted (a rejected or lost update): the pending change is dropped
    assert torch.equal(
        round_control(ConfigRecord({**tags, CONTROL_COUNTED: 0}), c, ctx, True, "h1").own[QUERY],
        own[QUERY],
    )


def test_a_hospital_control_that_is_lost_or_not_kept_is_zero_and_flagged(caplog) -> None:
    """Nothing kept but counted by the server: c_i = 0 and ``reset``; kept nothing (keep-state
    false) and never counted: c_i = 0, no reset; a new epoch: c_i = 0, no reset."""
    caplog.set_level(logging.INFO, logger="client.controls")
    c = {QUERY: _t([0.2, -0.4])}
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    lost = round_control(ConfigRecord({CONTROL_EPOCH: "e", CONTROL_COUNTED: 3}), c, ctx, True, "h")
    assert lost.reset and torch.equal(lost.own[QUERY], torch.zeros(2))
    assert "h lost its SCAFFOLD control variate" in caplog.text
    keep_control(ctx, lost, X, Y1, {QUERY: 0.5}, 4, keep=True)
    assert KEPT_CONTROL not in ctx.state  # it keeps nothing until the server's new epoch
    stateless = round_control(
        ConfigRecord({CONTROL_EPOCH: "e", CONTROL_COUNTED: -1}), c, ctx, False, "h"
    )
    assert not stateless.reset and "h keeps no state" in caplog.text
    fresh = RoundControl("e", c, {QUERY: _t([1.0, 1.0])}, False)
    keep_control(ctx, fresh, X, Y1, {QUERY: 0.5}, 4, keep=True)
    other = round_control(
        ConfigRecord({CONTROL_EPOCH: "e2", CONTROL_COUNTED: -1}), c, ctx, True, "h"
    )
    assert not other.reset and torch.equal(other.own[QUERY], torch.zeros(2))


def test_fedavgm_and_fedadam_steps_by_hand() -> None:
    """g = x - aggregate = (0.5, -1) then (0.1, 0.2).
    FedAvgM (lr 1, momentum 0.9): m_1 = g_1, m_2 = 0.9 (0.5, -1) + (0.1, 0.2) = (0.55, -0.7).
    FedAdam (lr 0.1, betas 0.9 / 0.99, tau 1e-3): m_1 = (0.05, -0.1), v_1 = (0.0025, 0.01), so
    the step is 0.1 (0.05 / 0.051, -0.1 / 0.101); m_2 = 0.9 m_1 + 0.1 g_2 = (0.055, -0.07),
    v_2 = 0.99 v_1 + 0.01 g_2^2 = (0.002575, 0.0103)."""
    g1, g2 = (
        {"w": torch.tensor([0.5, -1.0], dtype=torch.float64)},
        {"w": torch.tensor([0.1, 0.2], dtype=torch.float64)},
    )
    p = FedAvgMConfig(server_lr=1.0, momentum=0.9)
    step, state = momentum_step(g1, {}, p)
    _close(step["w"], [0.5, -1.0])
    step, state = momentum_step(g2, state, p)
    _close(step["w"], [0.55, -0.7])
    step, _ = momentum_step(g2, state, FedAvgMConfig(server_lr=1.0, momentum=0.0))
    _close(step["w"], [0.1, 0.2])  # no momentum: the aggregate itself (FedAvg)

    q = FedAdamConfig(server_lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    step, state = adam_step(g1, {}, q)
    _close(step["w"], [0.1 * 0.05 / 0.051, -0.1 * 0.1 / 0.101])
    _close(state["m.w"], [0.05, -0.1])
    _close(state["v.w"], [0.0025, 0.01])
    step, state = adam_step(g2, state, q)
    _close(state["m.w"], [0.055, -0.07])
    _close(state["v.w"], [0.002575, 0.0103], atol=1e-9)
    want = [0.1 * 0.055 / (math.sqrt(0.002575) + 1e-3), -0.1 * 0.07 / (math.sqrt(0.0103) + 1e-3)]
    _close(step["w"], want)


@pytest.mark.parametrize("lora", ["naive", "fedex", "ffa"])
def test_a_server_optimiser_steps_every_tensor_the_server_holds(lora: str) -> None:
    """x+ = x - step(x - aggregate) on each payload tensor; under fedex also on the residual
    (g_R = -gap, dense) so the merged model moves as the state does; FedAvgM with lr 1 and
    momentum 0 gives each mode's own aggregate back; a hospital folding the dense step it
    is sent holds the server's residual bit for bit."""
    x = _only(X, lora) | ({f"{RESIDUAL}blk": 0.1 * torch.ones(2, 2)} if lora == "fedex" else {})
    updates = [
        ClientUpdate("h1", _only(Y1, lora), 1, [1, 0]),
        ClientUpdate("h2", _only(Y2, lora), 3, [2, 1]),
    ]
    plain = _cfg(lora, MethodsConfig(fedavgm=FedAvgMConfig(server_lr=1.0, momentum=0.0)))
    agg, step, _ = aggregate(updates, x, "fedavgm", plain, {"blk": 1.0}, ANCHORS)
    same, same_step, _ = server_step(x, agg, step, "fedavgm", plain, {})
    for key in agg:
        if not key.startswith(RESIDUAL):
            _close(same[key], agg[key], atol=1e-7)
    if lora == "fedex":
        merged = residual_matrices(agg)[f"{RESIDUAL}blk"]
        _close(same[f"{RESIDUAL}blk"], merged, atol=1e-7)
        assert set(same_step) == {f"{RESIDUAL}blk"}  # dense
    else:
        assert same_step == {} and not any(k.startswith(RESIDUAL) for k in same)

    adam = FedAdamConfig(server_lr=0.1)
    cfg = _cfg(lora, MethodsConfig(fedadam=adam))
    agg, step, _ = aggregate(updates, x, "fedadam", cfg, {"blk": 1.0}, ANCHORS)
    new, new_step, moments = server_step(x, agg, step, "fedadam", cfg, {})
    for key in sorted(k for k in x if not k.startswith(RESIDUAL)):
        g = x[key].double() - agg[key].double()
        want = x[key].double() - 0.1 * (0.1 * g) / ((0.1 * g).abs() + adam.tau)  # sqrt(0.01 g^2)
        _close(new[key], want)
        assert f"m.{key}" in moments and f"v.{key}" in moments
    if lora == "fedex":
        gap = residual_matrices(step)[f"{RESIDUAL}blk"].double()
        want = x[f"{RESIDUAL}blk"].double() - 0.1 * (-0.1 * gap) / ((0.1 * gap).abs() + adam.tau)
        _close(new[f"{RESIDUAL}blk"], want)
        held = fold_residuals({f"{RESIDUAL}blk": x[f"{RESIDUAL}blk"]}, new_step)
        assert torch.equal(held[f"{RESIDUAL}blk"], new[f"{RESIDUAL}blk"])


@pytest.mark.slow
def test_the_correction_is_applied_after_adamw_at_the_steps_lr(fed_config) -> None:
    """One local step from the same start and batch: with the correction d the trained
    state is AdamW's minus lr_0 d, so option II's (x - y) / L recovers AdamW's direction + d."""
    cfg = fed_config("train.weight_decay=0.01")
    hospital = build_partition(cfg, 42).hospitals[0]
    data = image_sets(cfg, {"t": hospital.train}, True)["t"]
    model = build_model(cfg, 42)
    start = {k: v.clone() for k, v in trainable_state(model).items()}
    gen = torch.Generator().manual_seed(0)
    d = {k: 1e-2 * torch.randn(v.shape, generator=gen) for k, v in start.items()}
    ends = []
    for correction in (None, d):
        model.load_global_state(start)
        train_steps(model, data, cfg, 1, seed=5, start_step=0, total_steps=2, correction=correction)
        ends.append(trainable_state(model))
    lr = lr_sums(cfg, sorted(start), 0, 1, 2)
    assert lr["roi_pool.query"] == cfg.train.lr  # step 0 of the cosine: the peak lr
    for key in start:
        _close(ends[1][key], ends[0][key].double() - lr[key] * d[key].double(), atol=1e-7)
    zero = {k: torch.zeros_like(v) for k, v in start.items()}
    plain = control_delta(start, ends[0], zero, lr)
    corrected = control_delta(start, ends[1], zero, lr)
    for key in start:
        _close(corrected[key], plain[key] + d[key].double(), atol=2e-4)


def test_impossible_combinations_are_refused_at_config_load(tmp_path, capsys) -> None:
    dp = ["privacy.mode=server-fixed", "fl.lora_aggregation=naive"]
    with pytest.raises(SavltError, match="scaffold control variates follow each hospital's own"):
        load_config("configs/smoke.yaml", [*dp, "fl.methods=[fedavg, scaffold]"])
    with pytest.raises(SavltError, match="fedadam under central DP is not implemented"):
        load_config("configs/smoke.yaml", [*dp, "fl.methods=[fedadam]"])
    with pytest.raises(SavltError, match=r"'methods\.fedadam\.server_lr' and '\.tau' must be > 0"):
        load_config("configs/smoke.yaml", ["methods.fedadam.beta1=1.0"])
    with pytest.raises(SavltError, match=r"'methods\.fedavgm\.momentum' in \[0, 1\)"):
        load_config("configs/smoke.yaml", ["methods.fedavgm.momentum=-0.1"])
    args = ["train", "--config", "configs/smoke.yaml", "--out", str(tmp_path)]
    for item in (*dp, "fl.methods=[scaffold]"):
        args += ["--set", item]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "scaffold control variates" in err[0]
    # every LoRA mode is exact with each of them: no refusal without DP
    for lora in ("naive", "fedex", "ffa"):
        load_config(
            "configs/smoke.yaml",
            [f"fl.lora_aggregation={lora}", "fl.methods=[scaffold, fedavgm, fedadam]"],
        )


# --- through Flower, in process ----------------------------------------------------------


class Hospitals:
    """The simulated hospitals, one of which can crash: lose its ``Context.state`` just
    before a given round's training message."""

    def __init__(self, cfg: Config) -> None:
        self.inner = SimulatedHospitals(client_app, simulation_node_config(cfg))
        self.contexts: dict[int, Context] = {}
        self.crash: tuple[int, int] | None = None  # (partition, round)

    def __call__(self, message, context: Context):
        pid = int(context.node_config["partition-id"])
        self.contexts[pid] = context
        round_ = int(message.content[CONFIG]["global-round"])
        if message.metadata.message_type == "train" and self.crash == (pid, round_):
            context.state, self.crash = RecordDict(), None
        return self.inner(message, context)


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def runs(fed_config, tmp_path_factory) -> dict:
    """Every case as its own job over the same three hospitals, in one in-process run."""
    out = tmp_path_factory.mktemp("drift")
    cfg = fed_config()  # fedex, 2 rounds of 1 step
    crash_cfg = fed_config("fl.rounds=4", "fl.min_hospitals=2")
    hospitals = Hospitals(cfg)
    seen: dict[str, dict] = {}
    now: dict = {"case": "", "die_at": None}
    original = {
        "configure_train": strategy_module.SavltStrategy.configure_train,
        "aggregate_train": strategy_module.SavltStrategy.aggregate_train,
    }

    def configure_train(self, server_round, arrays, config, grid):
        if now["die_at"] == self.offset + server_round:  # the server dies before this round
            now["die_at"] = None
            raise RuntimeError("server killed")
        messages = list(original["configure_train"](self, server_round, arrays, config, grid))
        seen[now["case"]]["sent"].append(messages)
        return messages

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        seen[now["case"]]["replies"].append(replies)
        result = original["aggregate_train"](self, server_round, replies)
        c = None if self.controls is None else {k: v.clone() for k, v in self.controls.c.items()}
        seen[now["case"]]["c"].append(c)
        return result

    cases = [
        ("fedavg", cfg, "fedavg", {}),
        ("scaffold", cfg, "scaffold", {}),
        ("scaffold-resumed", cfg, "scaffold", {"die_at": 2}),
        ("fedadam", cfg, "fedadam", {}),
        ("fedadam-resumed", cfg, "fedadam", {"die_at": 2}),
        ("crash", crash_cfg, "scaffold", {"crash": (0, 2)}),
        ("stateless", cfg, "scaffold", {"stateless": True}),
    ]
    results: dict = {"seen": seen, "kept": {}, "cfg": {}, "summary": {}, "final": {}}
    server_app = ServerApp()

    @server_app.main()
    def main(grid, context) -> None:
        for case, job_cfg, method, how in cases:
            now.update(case=case, die_at=how.get("die_at"))
            seen[case] = {"sent": [], "replies": [], "c": []}
            hospitals.crash = how.get("crash")
            hospitals.inner.per_partition = (
                {0: {"keep-state": "false"}} if how.get("stateless") else {}
            )
            job = FederatedJob(job_cfg, method, 42, out / case)
            if "die_at" in how:
                try:
                    run_federated(grid, job)
                except RuntimeError:
                    job = FederatedJob(job_cfg, method, 42, out / case, resume=True)
            results["summary"][case] = run_federated(grid, job)
            results["final"][case] = load_checkpoint(job.checkpoint)
            results["cfg"][case] = job_cfg
            results["kept"][case] = {
                pid: dict(ctx.state[KEPT_CONTROL].to_torch_state_dict())
                if KEPT_CONTROL in ctx.state
                else None
                for pid, ctx in hospitals.contexts.items()
            }

    lines = Lines()
    loggers = [logging.getLogger(n) for n in ("client.controls", "server.controls")]
    levels = [lg.level for lg in loggers]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(strategy_module.SavltStrategy, "configure_train", configure_train)
        mp.setattr(strategy_module.SavltStrategy, "aggregate_train", aggregate_train)
        for lg in loggers:
            lg.addHandler(lines)
            lg.setLevel(logging.INFO)
        try:
            run_in_process(server_app, hospitals, num_supernodes=3)
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.removeHandler(lines)
                lg.setLevel(level)
    results["log"] = lines.lines
    return results


def _payload(msg) -> dict[str, torch.Tensor]:
    tensors = msg.content[ARRAYS].to_torch_state_dict()
    return {k: v for k, v in tensors.items() if not k.startswith(("residual.", "residual-step."))}


def _by_node(sent) -> dict[int, object]:
    return {int(m.metadata.dst_node_id): m for m in sent}


def _replies(runs, case: str, round_: int) -> dict[int, object]:
    """The round's training replies by node, refusals left out."""
    replies = runs["seen"][case]["replies"][round_ - 1]
    return {int(m.metadata.src_node_id): m for m in replies if not m.has_error()}


def _expected_c(runs, case: str, round_: int, c, counted: set[int]) -> dict[str, torch.Tensor]:
    """c + sum over the counted hospitals of p_i ((x - y_i) / L - c), recomputed here from the
    round's messages: p_i = n_i / sum n over the round's replies x their share of hospitals."""
    cfg = runs["cfg"][case]
    sent = runs["seen"][case]["sent"][round_ - 1]
    x = _payload(sent[0])
    replies = _replies(runs, case, round_)
    n = {node: int(m.content[METRICS]["num-examples"]) for node, m in replies.items()}
    share = len(replies) / cfg.fl.hospitals
    steps = cfg.fl.local_steps
    lr = lr_sums(cfg, sorted(x), (round_ - 1) * steps, steps, steps * cfg.fl.rounds)
    out = {k: v.double().clone() for k, v in c.items()}
    for node in sorted(counted):
        y = replies[node].content[ARRAYS].to_torch_state_dict()
        p = n[node] / sum(n.values()) * share
        for k in out:
            out[k] += p * ((x[k].double() - y[k].double()) / lr[k] - c[k].double())
    return out


def _assert_same(got: dict, want: dict, atol: float = 2e-5) -> None:
    assert sorted(got) == sorted(want)
    for k in got:
        torch.testing.assert_close(got[k].double(), want[k].double(), rtol=1e-5, atol=atol)


NODES = {FIRST_NODE, FIRST_NODE + 1, FIRST_NODE + 2}


@pytest.mark.slow
def test_scaffold_through_flower_both_sides_count_the_same_controls(runs) -> None:
    """Round 1 (c = 0) trains exactly as FedAvg does; the server's c after each round is the
    rule applied to the real replies; round 2 brings it with every hospital counted; and
    what the hospitals keep (c_i and the pending change) averages to the server's c."""
    seen = runs["seen"]["scaffold"]
    fedavg = _replies(runs, "fedavg", 1)
    for node, msg in _replies(runs, "scaffold", 1).items():
        mine = msg.content[ARRAYS].to_torch_state_dict()
        theirs = fedavg[node].content[ARRAYS].to_torch_state_dict()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    first, second = seen["sent"]
    epochs = {str(m.content[CONFIG][CONTROL_EPOCH]) for m in first + second}
    assert len(epochs) == 1
    for msg in first:
        assert int(msg.content[CONFIG][CONTROL_COUNTED]) == -1
        assert all(not v.any() for v in msg.content[CONTROL].to_torch_state_dict().values())
        assert sorted(msg.content[CONTROL].to_torch_state_dict()) == sorted(_payload(msg))
    zero = {k: torch.zeros_like(v) for k, v in seen["c"][0].items()}
    c1 = _expected_c(runs, "scaffold", 1, zero, NODES)
    _assert_same(seen["c"][0], c1)
    assert max(float(v.abs().max()) for v in c1.values()) > 0.1  # not a vacuous check
    for msg in second:
        assert int(msg.content[CONFIG][CONTROL_COUNTED]) == 1
        _assert_same(msg.content[CONTROL].to_torch_state_dict(), seen["c"][0], atol=0)
    c2 = _expected_c(runs, "scaffold", 2, seen["c"][0], NODES)
    _assert_same(seen["c"][1], c2)
    # c after round 2 = the weighted mean of what the hospitals hold: own + pending
    replies = _replies(runs, "scaffold", 2)
    n = {node: int(m.content[METRICS]["num-examples"]) for node, m in replies.items()}
    mean = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in c2.items()}
    for pid, kept in runs["kept"]["scaffold"].items():
        for k in mean:
            mean[k] += (
                n[FIRST_NODE + pid]
                / sum(n.values())
                * (kept[OWN + k].double() + kept[PENDING + k].double())
            )
    _assert_same(mean, seen["c"][1])
    assert runs["summary"]["scaffold"]["events"] == []


@pytest.mark.slow
@pytest.mark.parametrize("method", ["scaffold", "fedadam"])
def test_a_resumed_server_ends_where_an_uninterrupted_one_does(runs, method: str) -> None:
    """The server dies before round 2 and resumes from round 1's checkpoint, which holds c
    (SCAFFOLD; the hospitals keep their c_i) or FedAdam's moments: the same final model."""
    full, _, history = runs["final"][method]
    resumed, rounds, _ = runs["final"][f"{method}-resumed"]
    assert rounds == 2 and sorted(full) == sorted(resumed)
    assert any(k.startswith("residual.") for k in full)  # fedex: FedAdam steps its residual too
    for key in full:
        assert torch.equal(full[key], resumed[key]), key
    prefixes = ("control.",) if method == "scaffold" else ("m.", "v.")
    assert history.server_state and all(k.startswith(prefixes) for k in history.server_state)


@pytest.mark.slow
def test_a_crashed_hospital_resets_its_control_and_still_contributes(runs) -> None:
    """Hospital 0 loses its state before round 2: the downlink delta is refused that round
    (its residuals are gone too); in round 3 it gets the full state, finds its counted
    control gone, says so in its log and reply, trains with c_i = 0 and is aggregated; the
    server starts a new control epoch, and after round 4 c is again the weighted mean of
    the controls the hospitals hold."""
    summary = runs["summary"]["crash"]
    events = [(e["round"], int(e["node"]), e["event"], e["reason"]) for e in summary["events"]]
    assert (2, FIRST_NODE, "failed", "state-mismatch") in events
    assert (3, FIRST_NODE, "control-reset", "lost its control variate; new control epoch") in events
    assert [r["hospitals"] for r in summary["history"]] == [3, 2, 3, 3]
    assert int(_replies(runs, "crash", 3)[FIRST_NODE].content[METRICS]["control-reset"]) == 1
    assert all(
        int(m.content[METRICS]["control-reset"]) == 0
        for r in (1, 2, 4)
        for m in _replies(runs, "crash", r).values()
    )
    assert any("lost its SCAFFOLD control variate" in line for line in runs["log"])
    assert any("new control epoch" in line for line in runs["log"])
    sent = runs["seen"]["crash"]["sent"]
    third = _by_node(sent[2])
    assert int(third[FIRST_NODE].content[CONFIG][CONTROL_COUNTED]) == 1  # round 1 was counted
    for msg in sent[3]:  # round 4: a new epoch, c = 0, nothing counted
        assert int(msg.content[CONFIG][CONTROL_COUNTED]) == -1
        assert str(msg.content[CONFIG][CONTROL_EPOCH]) != str(
            third[FIRST_NODE].content[CONFIG][CONTROL_EPOCH]
        )
        assert all(not v.any() for v in msg.content[CONTROL].to_torch_state_dict().values())
    c = runs["seen"]["crash"]["c"]
    zero = {k: torch.zeros_like(v) for k, v in c[3].items()}
    _assert_same(c[3], _expected_c(runs, "crash", 4, zero, NODES))
    replies = _replies(runs, "crash", 4)
    n = {node: int(m.content[METRICS]["num-examples"]) for node, m in replies.items()}
    mean = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in c[3].items()}
    for pid, kept in runs["kept"]["crash"].items():
        assert all(not kept[OWN + k].any() for k in mean)  # everyone restarted from zero
        for k in mean:
            mean[k] += n[FIRST_NODE + pid] / sum(n.values()) * kept[PENDING + k].double()
    _assert_same(mean, c[3])


@pytest.mark.slow
def test_a_stateless_hospital_trains_with_a_zero_control_and_is_not_counted(runs) -> None:
    """keep-state false: hospital 0 keeps no control, says so in its log every round, trains
    with c_i = 0, and the server counts none of its changes, so c stays the weighted mean
    of what the hospitals hold (its share: zero)."""
    c = runs["seen"]["stateless"]["c"]
    others = NODES - {FIRST_NODE}
    zero = {k: torch.zeros_like(v) for k, v in c[0].items()}
    _assert_same(c[0], _expected_c(runs, "stateless", 1, zero, others))
    _assert_same(c[1], _expected_c(runs, "stateless", 2, c[0], others))
    second = _by_node(runs["seen"]["stateless"]["sent"][1])
    assert int(second[FIRST_NODE].content[CONFIG][CONTROL_COUNTED]) == -1
    assert all(int(second[n].content[CONFIG][CONTROL_COUNTED]) == 1 for n in others)
    kept = runs["kept"]["stateless"]
    assert kept[0] is None
    assert sum("keeps no state" in line for line in runs["log"]) >= 2
    replies = _replies(runs, "stateless", 2)
    n = {node: int(m.content[METRICS]["num-examples"]) for node, m in replies.items()}
    mean = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in c[1].items()}
    for pid in (1, 2):
        for k in mean:
            mean[k] += (
                n[FIRST_NODE + pid]
                / sum(n.values())
                * (kept[pid][OWN + k].double() + kept[pid][PENDING + k].double())
            )
    _assert_same(mean, c[1])
    assert runs["summary"]["stateless"]["events"] == []
