"""Bytes per hospital and round, both ways, per LoRA aggregation mode, and their exactness.

Why: hospitals sit behind slow, metered links, so traffic is counted in both directions.
Table 1 (``rows``): the upload (the trainable payload) vs the frozen backbone, LoRA r
4/8/16; target: one upload < 1% of the ViT-B/16 weights. Table 2 (``traffic``): at the
default r 8 and K = 3 / 10 / 20 hospitals, one round of the server's real aggregation
(:func:`server.aggregation.aggregate`) on client states of the real payload shapes, for
naive averaging, FedEx with the dense residual, FedEx with the factorised residual (what
is sent) and FFA-LoRA; bytes are the serialised ArrayRecord, as the strategy counts them.
Targets: ViT-B/16, K = 3: exact (relative error <= 1e-6) with <= 15 MiB downlink; the
downlink grows no faster than linearly in K and never exceeds the dense one. The FedEx
residual is a running total: resent whole to a stateless hospital, its factors grow by
(K-1) r per round, so ``rounds factorised`` says after how many rounds the first layer turns
dense. Table 3 (``rounds``): K = 3, five FedEx rounds in a row, the message
:class:`server.downlink.Downlink` builds after each for a hospital that keeps state (payload
+ the round's step) and for one that does not (payload + the whole total); the kept total,
replayed from the steps, is checked to equal the server's bit for bit. Random weights: only
shapes count (and, for the error, float rounding).

    .venv/bin/python benchmarks/bench_payload.py [--quick]
"""

from __future__ import annotations

import gc

import numpy as np
import torch
from common import machine, parser, report, setup, table
from flwr.app import ArrayRecord

from savlt_model.config import Config, FederatedConfig, load_config
from savlt_model.model.adapters import (
    fold_residuals,
    freeze_lora_a,
    frozen_lora_a,
    lora_pairs,
    lora_scalings,
    residual_matrices,
    residual_targets,
    trainable_state,
)
from savlt_model.model.backbone import load_backbone
from savlt_model.model.savlt import SavltModel
from server.aggregation import ClientUpdate, aggregate
from server.downlink import Downlink
from server.strategy import array_bytes

RANKS = (4, 8, 16)
HOSPITALS = (3, 10, 20)
MODES = ("naive", "fedex-dense", "fedex-factorised", "ffa")
ROUNDS = 5  # the default config's
MIB = 2**20


def _bytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _clients(
    start: dict[str, torch.Tensor], k: int, ffa: bool, gen: torch.Generator
) -> list[ClientUpdate]:
    """K trained-looking states: every tensor moved a little from ``start`` (B from zero)."""
    updates = []
    for i in range(k):
        state = {
            key: v + 0.01 * torch.randn(v.shape, generator=gen)
            for key, v in start.items()
            if not (ffa and ".lora_A." in key) and not key.startswith("residual.")
        }
        counts = [
            int(c) for c in torch.randint(5, 40, (start["prototypes"].shape[0],), generator=gen)
        ]
        updates.append(ClientUpdate(f"h{i}", state, sum(counts), counts))
    return updates


def _exactness(
    new: dict[str, torch.Tensor],
    residuals: dict[str, torch.Tensor],
    updates: list[ClientUpdate],
    weights: list[float],
    scalings: dict[str, float],
    frozen_a: dict[str, torch.Tensor],
) -> float:
    """Mean over LoRA layers of ||s B̄ Ā + R - s sum_k w_k B_k A_k||_F / ||s sum_k ...||_F:
    the hospitals' merged effective weights vs the exact average, in float64."""
    errors = []
    for prefix, a_key, b_key in lora_pairs(sorted({**new, **frozen_a})):
        s = scalings[prefix]
        exact = sum(
            w * s * u.state[b_key].double() @ frozen_a.get(a_key, u.state.get(a_key)).double()
            for w, u in zip(weights, updates, strict=True)
        )
        got = s * new[b_key].double() @ frozen_a.get(a_key, new.get(a_key)).double()
        if f"residual.{prefix}" in residuals:
            got = got + residuals[f"residual.{prefix}"].double()
        errors.append(
            float(torch.linalg.matrix_norm(got - exact) / torch.linalg.matrix_norm(exact))
        )
    return float(np.mean(errors))


def _dense(new: dict[str, torch.Tensor], updates, weights, scalings) -> dict[str, torch.Tensor]:
    """The pre-factor FedEx downlink: the same round's residual as one dense matrix per layer,
    s (sum_k w_k B_k A_k - B̄ Ā) from the float32 averages, as it was computed before."""
    out = {k: v for k, v in new.items() if not k.startswith("residual.")}
    for prefix, a_key, b_key in lora_pairs(sorted(new)):
        exact = sum(
            w * u.state[b_key].double() @ u.state[a_key].double()
            for w, u in zip(weights, updates, strict=True)
        )
        gap = exact - new[b_key].double() @ new[a_key].double()
        out[f"residual.{prefix}"] = (scalings[prefix] * gap).float()
    return out


def _rounds_factorised(model: SavltModel, k: int, r: int) -> int:
    """Rounds a stateless hospital's FedEx residual stays factorised in every layer: the
    first layer turns dense once R (K-1) r (out + in) >= out in."""
    sizes = [w.shape for w, _ in residual_targets(model).values()]
    return min((o * i - 1) // ((o + i) * (k - 1) * r) for o, i in sizes)


def _traffic(name: str, model: SavltModel, ks: tuple[int, ...], seed: int) -> list[tuple]:
    """One aggregation round per (K, mode): bytes up and down per hospital, error."""
    rows = []
    r = model.clip.peft_config["default"].r
    scalings = lora_scalings(model)
    anchors = model.anchors.detach().cpu()
    start = trainable_state(model)
    freeze_lora_a(model, seed)  # FFA: A frozen from the seed, not in the payload
    frozen_a = frozen_lora_a(model)
    for k in ks:
        gen = torch.Generator().manual_seed(seed + k)
        for mode in MODES:
            ffa = mode == "ffa"
            glob = {key: v for key, v in start.items() if not (ffa and ".lora_A." in key)}
            updates = _clients(glob, k, ffa, gen)
            fl = Config(fl=FederatedConfig(lora_aggregation=mode.split("-")[0]))  # type: ignore[arg-type]
            new, _, report_ = aggregate(updates, glob, "fedavg", fl, scalings, anchors)
            weights = report_["weights"]
            if mode == "fedex-dense":
                new = _dense(new, updates, weights, scalings)
            residuals = residual_matrices(new)
            error = (
                report_["lora_naive_rel_error"]
                if mode == "naive"
                else _exactness(new, residuals, updates, weights, scalings, frozen_a if ffa else {})
            )
            up = array_bytes(ArrayRecord(updates[0].state))
            down = array_bytes(ArrayRecord(new))
            after = _rounds_factorised(model, k, r) if mode == "fedex-factorised" else "-"
            rows.append((name, k, mode, up / MIB, down / MIB, error, after))
            del updates, new, residuals
            gc.collect()
    return rows


def _rounds(name: str, model: SavltModel, k: int, rounds: int, seed: int) -> list[tuple]:
    """FedEx over ``rounds`` rounds: MiB sent after each to a hospital that keeps state and
    to one that does not; raises if the kept total, replayed from the steps, is not the
    server's bit for bit."""
    scalings, anchors = lora_scalings(model), model.anchors.detach().cpu()
    fl = Config(fl=FederatedConfig(lora_aggregation="fedex"))
    gen = torch.Generator().manual_seed(seed)
    glob, kept, downlink, rows = trainable_state(model), {}, Downlink(0), []
    for round_ in range(1, rounds + 1):
        new, step, _ = aggregate(
            _clients(glob, k, False, gen), glob, "fedavg", fl, scalings, anchors
        )
        downlink.advance(round_, step)
        downlink.record("keeps", round_ - 1)
        kept = fold_residuals(kept, step)
        if any(not torch.equal(v, new[key]) for key, v in kept.items()):
            raise AssertionError(f"{name} round {round_}: the replayed total differs")
        stateful, _ = downlink.content("keeps", new)
        stateless, _ = downlink.content("keeps nothing", new)
        sizes = [array_bytes(ArrayRecord(t)) / MIB for t in (stateful, stateless)]
        rows.append((name, k, round_, *sizes))
        glob = new
        gc.collect()
    return rows


def _svd_ranks(rounds: int = 5, k: int = 3, r: int = 8, shape=(576, 192)) -> list[list[int]]:
    """[kept factor rank, SVD numerical rank] of one layer's FedEx total after each of
    ``rounds`` rounds of random client steps: would re-factorising by SVD send less?"""
    gen = torch.Generator().manual_seed(0)
    out, inp = shape
    anchors = torch.nn.functional.normalize(torch.randn(4, 8, generator=gen), dim=-1)
    glob = {
        "prototypes": torch.randn(4, 8, generator=gen),
        "l.lora_A.weight": 0.05 * torch.randn(r, inp, generator=gen),
        "l.lora_B.weight": torch.zeros(out, r),
    }
    ranks = []
    for _ in range(rounds):
        updates = _clients(glob, k, False, gen)
        fl = Config(fl=FederatedConfig(lora_aggregation="fedex"))
        glob, _, _ = aggregate(updates, glob, "fedavg", fl, {"l": 1.0}, anchors)
        total = residual_matrices(glob)["residual.l"].double()
        sv = torch.linalg.svdvals(total)
        tol = sv.max() * max(total.shape) * torch.finfo(torch.float32).eps
        ranks.append([glob["residual.l.B"].shape[1], int((sv > tol).sum())])
    return ranks


def _targets(rows: list[tuple], by_round: list[tuple]) -> list[str]:
    """Each traffic target, met or not, from the ViT-B/16 rows."""
    vit = {(k, m): (up, down, err) for n, k, m, up, down, err, _ in rows if n == "ViT-B-16"}
    if not vit:
        return []
    kept = [down for n, _, _, down, _ in by_round if n == "ViT-B-16"]
    _, down3, err3 = vit[(3, "fedex-factorised")]
    ks = sorted({k for k, _ in vit})
    down = {k: vit[(k, "fedex-factorised")][1] for k in ks}
    linear = all(down[k] <= down[ks[0]] * k / ks[0] for k in ks)  # per-K cost never grows
    never_dense = all(down[k] <= vit[(k, "fedex-dense")][1] for k in ks)
    return [
        f"ViT-B/16 K=3 FedEx factorised: {down3:.2f} MiB down (<= 15), error {err3:.2g} "
        f"(<= 1e-6): {'met' if down3 <= 15 and err3 <= 1e-6 else 'not met'}",
        f"ViT-B/16 K=3, hospitals that keep state, every one of {len(kept)} rounds: at most "
        f"{max(kept):.2f} MiB down (<= 15): {'met' if max(kept) <= 15 else 'not met'}",
        f"downlink linear in K and never above dense: "
        f"{'met' if linear and never_dense else 'not met'}",
    ]


def main() -> None:
    args = parser(__doc__).parse_args()
    device = setup(args)
    start = machine(device)
    names = ["savlt-tiny", "ViT-B-16"] + ([] if args.quick else ["ViT-L-14"])
    ks = HOSPITALS[:1] if args.quick else HOSPITALS
    rows, traffic, by_round = [], [], []
    for name in names:
        backbone = load_backbone(name)
        full = _bytes(list(backbone.model.state_dict().values()))
        for r in RANKS:
            cfg = load_config(None, [f"model.name={name}", f"model.lora.r={r}"])
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = SavltModel(cfg, backbone)
            upload = _bytes(list(trainable_state(model).values()))
            residual = _bytes([w for w, _ in residual_targets(model).values()])
            pct = 100 * upload / full
            target = ("met" if pct < 1 else "not met") if name == "ViT-B-16" else "-"
            rows.append((name, r, full / MIB, upload / MIB, pct, residual / MIB, target))
            if r == 8:  # _traffic freezes A for FFA-LoRA: the FedEx rounds come first
                by_round += _rounds(name, model, 3, ROUNDS, seed=0)
                traffic += _traffic(name, model, ks, seed=0)
            del model
            gc.collect()
        del backbone
        gc.collect()
    headers = ("model", "r", "backbone MiB", "upload MiB", "upload %", "FedEx resid MiB", "target")
    traffic_cols = ["model", "K", "mode", "up MiB", "down MiB", "rel error", "rounds factorised"]
    round_cols = ["model", "K", "rounds aggregated", "keeps state MiB", "stateless MiB"]
    targets = _targets(traffic, by_round)
    svd = _svd_ranks()
    print()
    report(
        "payload",
        args,
        device,
        headers,
        rows,
        start,
        traffic={"columns": traffic_cols, "rows": [list(t) for t in traffic]},
        rounds={"columns": round_cols, "rows": [list(t) for t in by_round]},
        targets=targets,
        svd_ranks={"columns": ["kept factor rank", "SVD numerical rank"], "rounds": svd},
    )
    print("\nround 1, r 8, per hospital:\n" + table(traffic_cols, traffic))
    print("\nFedEx downlink per hospital after each round, r 8:\n" + table(round_cols, by_round))
    print("\n".join(targets))
    print(f"one layer's FedEx total, [kept rank, SVD rank] per round (K 3, r 8): {svd}")


if __name__ == "__main__":
    main()
