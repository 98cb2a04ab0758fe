"""Aggregation maths: FedAvg reduction, text-anchored weighting, exact LoRA, update checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from savlt_model.config import Config, FederatedConfig, MethodsConfig
from savlt_model.errors import SavltError
from savlt_model.messages import class_sums_from, class_sums_metrics
from savlt_model.methods import HospitalStats
from savlt_model.methods.text_anchored import (
    TextAnchoredConfig,
    cap_weights,
    text_anchored_weights,
)
from savlt_model.model.adapters import fold_residuals, residual_matrices
from server.aggregation import (
    ClientUpdate,
    aggregate,
    check_update,
    class_mean_agreement,
    client_weights,
    prototype_agreement,
)

C = 4
LAYERS = {"clip.blk0.attn": (24, 16), "clip.blk1.attn.out_proj": (16, 16)}  # prefix: (out, in)
R = 3
SCALINGS = {"clip.blk0.attn": 2.0, "clip.blk1.attn.out_proj": 0.5}


def _state(gen: torch.Generator) -> dict[str, torch.Tensor]:
    state = {
        "prototypes": torch.randn(C, 8, generator=gen),
        "roi_pool.query": torch.randn(16, generator=gen),
        "clip.visual.proj": torch.randn(16, 8, generator=gen),
    }
    for prefix, (out, inp) in LAYERS.items():
        state[f"{prefix}.lora_A.weight"] = torch.randn(R, inp, generator=gen)
        state[f"{prefix}.lora_B.weight"] = torch.randn(out, R, generator=gen)
    return state


# The server's frozen text anchors T (C x 8), unit rows.
ANCHORS = torch.nn.functional.normalize(
    torch.randn(C, 8, generator=torch.Generator().manual_seed(7)), dim=-1
)


def _prototypes(agreement: list[float], gen: torch.Generator) -> torch.Tensor:
    """Prototype rows whose cosine with their anchor is exactly ``agreement`` (any norm)."""
    rows = []
    for t, a in zip(ANCHORS.double(), agreement, strict=True):
        u = torch.randn(8, generator=gen).double()
        u = torch.nn.functional.normalize(u - (u @ t) * t, dim=0)  # unit, orthogonal to T_c
        a = 0.0 if np.isnan(a) else a
        rows.append(3.0 * (a * t + np.sqrt(1 - a * a) * u))
    return torch.stack(rows).float()


def _updates(
    k: int = 3,
    seed: int = 0,
    counts: list[list[int]] | None = None,
    agreement: list[list[float]] | None = None,
) -> list[ClientUpdate]:
    """K updates; with ``agreement``, hospital k's prototypes sit at cos a_kc to T_c."""
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    updates = []
    for i in range(k):
        state = _state(gen)
        if agreement:
            state["prototypes"] = _prototypes(agreement[i], gen)
        updates.append(
            ClientUpdate(
                node=f"n{i}",
                state=state,
                num_examples=int(rng.integers(10, 100)),
                class_counts=counts[i] if counts else [5] * C,
            )
        )
    return updates


def _global(seed: int = 99, residual: str = "") -> dict[str, torch.Tensor]:
    """A global state; ``residual``: "dense" or "factors" (rank 2) adds an earlier one."""
    gen = torch.Generator().manual_seed(seed)
    state = _state(gen)
    for prefix, (out, inp) in LAYERS.items():
        if residual == "dense":
            state[f"residual.{prefix}"] = 0.1 * torch.randn(out, inp, generator=gen)
        elif residual == "factors":
            state[f"residual.{prefix}.B"] = 0.1 * torch.randn(out, 2, generator=gen)
            state[f"residual.{prefix}.A"] = torch.randn(2, inp, generator=gen)
    return state


def _fl(anchor_lambda: float, lora: str = "naive", cap: float = np.inf) -> Config:
    """Weighting maths without the cap unless asked (the cap has its own tests)."""
    return Config(
        fl=FederatedConfig(lora_aggregation=lora),  # type: ignore[arg-type]
        methods=MethodsConfig(
            text_anchored=TextAnchoredConfig(anchor_lambda=anchor_lambda, max_weight_ratio=cap)
        ),
    )


def _fedavg(updates: list[ClientUpdate], key: str) -> torch.Tensor:
    n = torch.tensor([float(u.num_examples) for u in updates], dtype=torch.float64)
    stacked = torch.stack([u.state[key].double() for u in updates])
    return torch.einsum("k,k...->...", n / n.sum(), stacked)


def test_weights_sum_to_one() -> None:
    counts = [[5, 0, 3, 1], [0, 0, 2, 7], [1, 0, 4, 0]]  # nobody has class 1
    updates = _updates(counts=counts)
    for method in ("fedavg", "fedprox", "text-anchored"):
        shared, proto = client_weights(updates, method, _fl(2.0), ANCHORS)
        assert shared.shape == (3,) and proto.shape == (3, C)
        np.testing.assert_allclose(shared.sum(), 1.0, rtol=1e-12)
        np.testing.assert_allclose(proto.sum(axis=0), np.ones(C), rtol=1e-12)
    shared, proto = client_weights(updates, "text-anchored", _fl(2.0), ANCHORS)
    np.testing.assert_array_equal(proto[:, 1], shared)  # no client has class 1: shared fallback


def _class_average(updates: list[ClientUpdate], c: int) -> torch.Tensor:
    """Prototype row c as the class-c sample-weighted average: sum_k n_kc P_kc / sum_k n_kc."""
    n = torch.tensor([float(u.class_counts[c]) for u in updates], dtype=torch.float64)
    rows = torch.stack([u.state["prototypes"][c].double() for u in updates])
    return (n / n.sum()) @ rows


def test_lambda_zero_same_class_mix_is_fedavg() -> None:
    """Every hospital holds every class in the same mix: lambda = 0 is FedAvg for every tensor
    (shared ones bitwise; prototypes up to float rounding, n_kc / sum n_kc == n_k / sum n_k)."""
    mix = [1, 2, 3, 4]
    updates = _updates(k=4)
    for u, scale in zip(updates, (3, 5, 11, 7), strict=True):
        u.class_counts = [scale * m for m in mix]
        u.num_examples = sum(u.class_counts)
    glob = _global()
    for mode in ("naive", "fedex"):
        fed, _, _ = aggregate(updates, glob, "fedavg", _fl(0.0, mode), SCALINGS, ANCHORS)
        anchored, _, _ = aggregate(
            updates, glob, "text-anchored", _fl(0.0, mode), SCALINGS, ANCHORS
        )
        assert fed.keys() == anchored.keys()
        for key in fed:
            if key != "prototypes":
                assert torch.equal(fed[key], anchored[key]), key
        torch.testing.assert_close(anchored["prototypes"], fed["prototypes"], rtol=0, atol=1e-6)
    for key in ("prototypes", "clip.visual.proj"):
        torch.testing.assert_close(fed[key], _fedavg(updates, key).float(), rtol=0, atol=1e-6)
    shared, proto = client_weights(updates, "text-anchored", _fl(0.0), ANCHORS)
    np.testing.assert_allclose(proto, np.repeat(shared[:, None], C, axis=1), rtol=1e-6)
    np.testing.assert_array_equal(shared, [30 / 260, 50 / 260, 110 / 260, 70 / 260])


def test_lambda_zero_with_a_missing_class_is_the_per_class_average() -> None:
    """Hospital 1 lacks class 2 and the mixes differ: shared tensors stay exactly FedAvg, each
    prototype row is the class's own sample-weighted average, which FedAvg's is not."""
    counts = [[25, 5, 5, 5], [1, 10, 0, 29], [4, 4, 4, 8]]
    updates = _updates(counts=counts)
    for u in updates:
        u.num_examples = sum(u.class_counts)  # 40, 40, 20
    glob = _global()
    fed, _, _ = aggregate(updates, glob, "fedavg", _fl(0.0), {}, ANCHORS)
    anchored, _, report = aggregate(updates, glob, "text-anchored", _fl(0.0), {}, ANCHORS)
    for key in fed:
        if key != "prototypes":
            assert torch.equal(fed[key], anchored[key]), key
    np.testing.assert_array_equal(report["weights"], [0.4, 0.4, 0.2])
    expected_proto = [[25 / 30, 1 / 30, 4 / 30], [5 / 19, 10 / 19, 4 / 19], [5 / 9, 0, 4 / 9]]
    expected_proto.append([5 / 42, 29 / 42, 8 / 42])
    np.testing.assert_allclose(report["prototype_weights"], np.array(expected_proto).T, rtol=1e-15)
    for c in range(C):
        torch.testing.assert_close(
            anchored["prototypes"][c], _class_average(updates, c).float(), rtol=0, atol=1e-6
        )
        assert not torch.allclose(anchored["prototypes"][c], fed["prototypes"][c], atol=1e-3)


def test_prototype_rows_are_weighted_by_class_counts() -> None:
    """Two hospitals of equal size with 1 and 25 images of class 0: weights 1/26 and 25/26,
    times exp(lambda a_kc); the shared weights stay n_k exp(lambda mean_c a_kc)."""
    counts = [[1, 9, 10, 10], [25, 1, 2, 2]]
    agreement = [[0.2, 0.4, 0.4, 0.4], [0.5, 0.1, 0.1, 0.1]]
    updates = _updates(k=2, counts=counts, agreement=agreement)
    for u in updates:
        u.num_examples = 30
    shared, proto = client_weights(updates, "text-anchored", _fl(2.0), ANCHORS)
    raw = np.array(counts, dtype=float) * np.exp(2.0 * np.array(agreement))
    np.testing.assert_allclose(proto, raw / raw.sum(axis=0), rtol=1e-6)  # float32 P
    np.testing.assert_allclose(
        proto[:, 0], [np.exp(0.4), 25 * np.exp(1.0)] / (np.exp(0.4) + 25 * np.exp(1.0)), rtol=1e-6
    )
    means = np.array(agreement).mean(axis=1)
    np.testing.assert_allclose(shared, np.exp(2 * means) / np.exp(2 * means).sum(), rtol=1e-6)
    _, proto0 = client_weights(updates, "text-anchored", _fl(0.0), ANCHORS)
    np.testing.assert_array_equal(proto0[:, 0], [1 / 26, 25 / 26])


def test_higher_agreement_gets_more_weight() -> None:
    updates = _updates(k=2, agreement=[[0.2] * C, [0.6] * C])
    for u in updates:
        u.num_examples = 50
    shared, proto = client_weights(updates, "text-anchored", _fl(5.0), ANCHORS)
    assert shared[1] > shared[0]
    np.testing.assert_allclose(shared[1] / shared[0], np.exp(5.0 * 0.4), rtol=1e-6)
    assert (proto[1] > proto[0]).all()
    shared, _ = client_weights(updates, "fedavg", _fl(5.0), ANCHORS)  # lambda is ignored by FedAvg
    np.testing.assert_array_equal(shared, [0.5, 0.5])


def test_client_without_class_does_not_drag_prototype() -> None:
    counts = [[5, 5, 5, 5], [5, 0, 5, 5], [5, 5, 5, 5]]
    agreement = [[0.3] * C, [0.9, float("nan"), 0.9, 0.9], [0.5] * C]  # NaN where n_kc == 0
    updates = _updates(counts=counts, agreement=agreement)
    _, proto = client_weights(updates, "text-anchored", _fl(3.0), ANCHORS)
    assert proto[1, 1] == 0.0
    new, _, _ = aggregate(updates, _global(), "text-anchored", _fl(3.0, "naive"), {}, ANCHORS)
    others = [updates[0], updates[2]]
    w = np.array(
        [u.class_counts[1] * np.exp(3.0 * a) for u, a in zip(others, (0.3, 0.5), strict=True)]
    )
    w /= w.sum()
    expected = sum(wk * u.state["prototypes"][1].double() for wk, u in zip(w, others, strict=True))
    torch.testing.assert_close(new["prototypes"][1], expected.float(), rtol=0, atol=1e-6)
    assert torch.isfinite(new["prototypes"]).all()


@pytest.mark.parametrize("k", [2, 5])  # (K-1) r = 3: factors are smaller; 12: dense is
@pytest.mark.parametrize("old_residual", ["", "dense", "factors"])
@pytest.mark.parametrize("method", ["fedavg", "text-anchored"])
def test_fedex_is_exact(method: str, old_residual: str, k: int) -> None:
    updates = _updates(k=k, seed=3)
    glob = _global(residual=old_residual)
    new, _, report = aggregate(updates, glob, method, _fl(1.5, "fedex"), SCALINGS, ANCHORS)
    shared, _ = client_weights(updates, method, _fl(1.5), ANCHORS)
    assert report["weights"] == shared.tolist()
    before, after = residual_matrices(glob), residual_matrices(new)
    for prefix, shape in LAYERS.items():
        s = SCALINGS[prefix]
        old = before.get(f"residual.{prefix}", torch.zeros(shape)).double()
        target = sum(
            w
            * (
                old
                + s
                * u.state[f"{prefix}.lora_B.weight"].double()
                @ u.state[f"{prefix}.lora_A.weight"].double()
            )
            for w, u in zip(shared, updates, strict=True)
        )
        merged = after[f"residual.{prefix}"].double() + s * (
            new[f"{prefix}.lora_B.weight"].double() @ new[f"{prefix}.lora_A.weight"].double()
        )
        torch.testing.assert_close(merged, target, rtol=0, atol=1e-5)
        assert all(v.dtype == torch.float32 for n, v in new.items() if n.startswith("residual."))


def _dense_fedex_residual(
    updates: list[ClientUpdate], glob: dict[str, torch.Tensor], prefix: str
) -> torch.Tensor:
    """The dense FedEx residual as it was computed before factors (float64): the running
    total plus s (sum_k w_k B_k A_k - B̄ Ā), with B̄ Ā from the float32 averages."""
    w, _ = client_weights(updates, "fedavg", _fl(0.0), ANCHORS)
    a = [u.state[f"{prefix}.lora_A.weight"].double() for u in updates]
    b = [u.state[f"{prefix}.lora_B.weight"].double() for u in updates]
    a_bar = sum(wk * ak for wk, ak in zip(w, a, strict=True)).float().double()
    b_bar = sum(wk * bk for wk, bk in zip(w, b, strict=True)).float().double()
    exact = sum(wk * bk @ ak for wk, ak, bk in zip(w, a, b, strict=True))
    old = residual_matrices(glob).get(f"residual.{prefix}", torch.zeros_like(exact)).double()
    return old + SCALINGS[prefix] * (exact - b_bar @ a_bar)


def test_a_hospital_replaying_the_steps_holds_the_servers_total_bit_for_bit() -> None:
    """A stateful hospital folds each round's step into the total it kept; a stateless one
    receives the total: both hold the same bits, through the turn to dense (round 3 of the
    16 x 16 layer, see below), and the step never outgrows the total."""
    glob, held = _global(), {}
    for round_ in range(5):
        new, step, _ = aggregate(
            _updates(k=2, seed=30 + round_), glob, "fedavg", _fl(0.0, "fedex"), SCALINGS, ANCHORS
        )
        held = fold_residuals(held, step)
        total = {k: v for k, v in new.items() if k.startswith("residual.")}
        assert sorted(held) == sorted(total)
        assert all(torch.equal(held[k], total[k]) for k in total), round_
        assert sum(v.numel() for v in step.values()) <= sum(v.numel() for v in total.values())
        assert all(k.startswith("residual.") for k in step)
        glob = new
    assert any(k.endswith(".B") for k in step)  # the step stays factorised


def test_factorised_residual_equals_the_dense_one_and_turns_dense_when_larger() -> None:
    """Per layer, rounds' factors sit side by side while (out + in) q < out in; then dense.

    K = 2, r = 3: the round's residual has rank (K-1) r = 3, so q = 3, 6, 9, 12 after 1-4
    rounds: the 16 x 16 layer turns dense in round 3 (32 x 9 > 256), the 24 x 16 one in
    round 4 (40 x 12 > 384).
    """
    glob = _global()
    layouts = []
    for round_ in range(4):
        updates = _updates(k=2, seed=10 + round_)
        new, _, report = aggregate(updates, glob, "fedavg", _fl(0.0, "fedex"), SCALINGS, ANCHORS)
        layouts.append(report["residual_layout"])
        got = residual_matrices(new)
        for prefix, (out, inp) in LAYERS.items():
            want = _dense_fedex_residual(updates, glob, prefix)
            rel = float((got[f"residual.{prefix}"].double() - want).norm() / want.norm())
            assert rel < 1e-6, (round_, prefix, rel)
            sent = sum(v.numel() for k, v in new.items() if k.startswith(f"residual.{prefix}"))
            assert sent <= out * inp  # never more than the dense matrix
        glob = new
        if round_ == 0:
            for prefix in LAYERS:
                assert new[f"residual.{prefix}.B"].shape[1] == 3
                assert f"residual.{prefix}" not in new
    assert layouts == [
        {"factorised": 2, "dense": 0},
        {"factorised": 2, "dense": 0},
        {"factorised": 1, "dense": 1},
        {"factorised": 0, "dense": 2},
    ]


def test_naive_error_reported() -> None:
    new, _, report = aggregate(
        _updates(seed=1), _global(), "fedavg", _fl(0.0, "naive"), {}, ANCHORS
    )
    assert not any(k.startswith("residual.") for k in new)
    assert report["lora_naive_rel_error"] > 0.3  # random factors: the product is badly wrong
    assert report["lora_max_rel_error"] >= report["lora_naive_rel_error"]
    glob = _global(residual="factors")
    kept, _, _ = aggregate(_updates(seed=1), glob, "fedavg", _fl(0.0, "naive"), {}, ANCHORS)
    for key in glob:  # naive mode leaves an earlier exact round's residual as it was
        if key.startswith("residual."):
            assert torch.equal(kept[key], glob[key])

    same = _updates(seed=1)
    for u in same[1:]:
        u.state = {k: v.clone() for k, v in same[0].state.items()}
    _, _, report = aggregate(same, _global(), "text-anchored", _fl(1.0, "fedex"), SCALINGS, ANCHORS)
    assert report["lora_naive_rel_error"] == pytest.approx(0.0, abs=1e-6)
    assert report["lora_max_rel_error"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("method", ["fedavg", "text-anchored"])
def test_ffa_aggregation_is_exact(method: str) -> None:
    """FFA-LoRA: the payload holds B alone (A is frozen and shared), so the plain weighted
    average of B is exact: s B̄ A = sum_k w_k s B_k A, with no residual to send."""
    gen = torch.Generator().manual_seed(5)
    frozen = {prefix: torch.randn(R, inp, generator=gen) for prefix, (_, inp) in LAYERS.items()}
    updates = _updates(k=4, seed=2)
    for u in updates:
        u.state = {k: v for k, v in u.state.items() if ".lora_A." not in k}
    glob = {k: v for k, v in _global().items() if ".lora_A." not in k}
    new, _, report = aggregate(updates, glob, method, _fl(1.5, "ffa"), {}, ANCHORS)
    shared, _ = client_weights(updates, method, _fl(1.5), ANCHORS)
    assert not any(k.startswith("residual.") or ".lora_A." in k for k in new)
    assert report["lora_naive_rel_error"] == 0.0
    for prefix in LAYERS:
        b_key, a = f"{prefix}.lora_B.weight", frozen[prefix].double()
        want = sum(w * u.state[b_key].double() @ a for w, u in zip(shared, updates, strict=True))
        got = new[b_key].double() @ a
        assert float((got - want).norm() / want.norm()) < 1e-6
    with pytest.raises(SavltError, match="ffa but the payload carries LoRA A"):
        aggregate(_updates(), _global(), "fedavg", _fl(0.0, "ffa"), {}, ANCHORS)


def test_aggregate_refuses_bad_arguments() -> None:
    updates, glob = _updates(), _global()
    with pytest.raises(SavltError, match="method"):
        aggregate(updates, glob, "fedmedian", _fl(0.0, "naive"), {}, ANCHORS)
    with pytest.raises(SavltError, match="lora_mode"):
        aggregate(updates, glob, "fedavg", _fl(0.0, "flora"), {}, ANCHORS)
    with pytest.raises(SavltError, match="no client updates"):
        aggregate([], glob, "fedavg", _fl(0.0, "naive"), {}, ANCHORS)
    with pytest.raises(SavltError, match="scaling"):
        aggregate(updates, glob, "fedavg", _fl(0.0, "fedex"), {"clip.blk0.attn": 1.0}, ANCHORS)


def _poked(shape: tuple[int, ...], value: float) -> torch.Tensor:
    t = torch.zeros(shape)
    t.view(-1)[1] = value
    return t


def _reason(glob: dict[str, torch.Tensor], drop: str = "", max_norm: float = 0.0, **edits):
    """check_update on a fresh good update with a key dropped, tensors replaced or fields set."""
    u = _updates(k=1)[0]
    u.state.pop(drop, None)
    for name, value in edits.items():
        if isinstance(value, torch.Tensor):
            u.state[name.replace("__", ".")] = value
        else:
            setattr(u, name, value)
    return check_update(u, glob, max_norm)


def test_check_update() -> None:
    glob = _global(residual="factors")  # residual keys in the reference are not expected back
    assert _reason(glob) is None
    assert "prototypes has non-finite" in _reason(glob, prototypes=_poked((C, 8), float("nan")))
    inf = _poked((16, 8), float("inf"))
    assert "clip.visual.proj has non-finite" in _reason(glob, clip__visual__proj=inf)
    assert "missing ['roi_pool.query']" in _reason(glob, drop="roi_pool.query")
    assert "extra ['bogus']" in _reason(glob, bogus=torch.zeros(1))
    assert "prototypes has shape (4, 9), expected (4, 8)" in _reason(
        glob, prototypes=torch.zeros(C, 9)
    )

    assert "dtype torch.float64" in _reason(glob, prototypes=torch.zeros(C, 8, dtype=torch.float64))

    good = _updates(k=1)[0]
    norm = torch.cat([(good.state[k] - glob[k]).flatten() for k in good.state]).norm().item()
    assert _reason(glob, max_norm=norm * 1.01) is None
    assert "exceeds the bound" in _reason(glob, max_norm=norm * 0.99)

    assert "num_examples" in _reason(glob, num_examples=0)
    assert "class_counts has 5" in _reason(glob, class_counts=[1] * (C + 1))
    assert "class_counts" in _reason(glob, class_counts=[3, -1, 2, 2])
    assert _reason(glob, class_counts=[3, 0, 2, 2]) is None  # a hospital may lack a class


def test_agreement_is_computed_from_the_uploaded_prototypes() -> None:
    """a_kc = cos(P_kc, T_c) from the upload and the server's anchors, whatever the norm; the
    weights follow it, and a hospital that uploads P = T gets exactly what that earns."""
    agreement = [[0.1, 0.2, 0.3, 0.4], [0.5, -0.5, 0.0, 0.9]]
    updates = _updates(k=2, agreement=agreement)
    for u, a in zip(updates, agreement, strict=True):
        np.testing.assert_allclose(
            prototype_agreement(u.state["prototypes"], ANCHORS), a, atol=1e-6
        )
    liar = _updates(k=3, agreement=[[0.3] * C] * 3)
    for u in liar:
        u.num_examples = 20
    liar[0].state["prototypes"] = 5.0 * ANCHORS  # the best an upload can do: a_kc = 1
    shared, proto = client_weights(liar, "text-anchored", _fl(5.0), ANCHORS)
    earned = np.exp(5.0 * np.array([1.0, 0.3, 0.3]))
    np.testing.assert_allclose(shared, earned / earned.sum(), rtol=1e-6)
    np.testing.assert_allclose(proto, np.repeat(shared[:, None], C, axis=1), rtol=1e-6)
    assert shared[0] == pytest.approx(0.943, abs=1e-3)  # uncapped: the upload buys 94 %


def test_cap_bounds_every_share_and_keeps_the_sum() -> None:
    """With the default cap of 2, the P = T hospital weighs at most twice its lambda = 0
    share; the rest is shared by the others in their own proportions."""
    liar = _updates(k=3, agreement=[[0.3] * C, [0.3] * C, [0.5] * C])
    for u, n in zip(liar, (20, 40, 40), strict=True):
        u.num_examples = n
        u.class_counts = [n // 4] * C
    liar[0].state["prototypes"] = 5.0 * ANCHORS
    capped = Config(methods=MethodsConfig(text_anchored=TextAnchoredConfig(anchor_lambda=5.0)))
    assert capped.methods.text_anchored.max_weight_ratio == 2.0  # the default cap
    shared, proto = client_weights(liar, "text-anchored", capped, ANCHORS)
    free, _ = client_weights(liar, "text-anchored", _fl(5.0), ANCHORS)
    assert free[0] > 0.7  # without the cap: 0.77
    np.testing.assert_allclose(shared[0], 2 * 0.2, rtol=1e-12)
    np.testing.assert_allclose(shared[1:] / shared[1:].sum(), free[1:] / free[1:].sum(), rtol=1e-12)
    np.testing.assert_allclose(shared.sum(), 1.0, rtol=1e-12)
    np.testing.assert_allclose(proto, np.repeat(shared[:, None], C, axis=1), rtol=1e-6)


@pytest.mark.parametrize("ratio", [1.0, 1.5, 3.0])
def test_cap_weights_water_fills(ratio: float) -> None:
    rng = np.random.default_rng(0)
    base = np.array([[0.1, 0.5], [0.2, 0.0], [0.3, 0.25], [0.4, 0.25]])
    weights = np.array([[0.7, 0.9], [0.2, 0.0], [0.05, 0.05], [0.05, 0.05]])
    out = cap_weights(weights, base, ratio)
    np.testing.assert_allclose(out.sum(axis=0), [1.0, 1.0], rtol=1e-12)
    assert (out <= ratio * base + 1e-15).all() and (out >= 0).all()
    assert out[1, 1] == 0.0  # a hospital without the class stays at zero
    if ratio == 1.0:
        np.testing.assert_allclose(out, base, rtol=1e-12)
    within = rng.dirichlet(np.ones(4), size=1).T * 0 + base  # already within the bounds
    assert np.array_equal(cap_weights(within, base, ratio), within)
    if ratio == 1.5:  # column 0: 0.7 -> 0.15, 0.2 -> 0.3 bound, the rest split 0.05 : 0.05
        np.testing.assert_allclose(out[:, 0], [0.15, 0.3, 0.275, 0.275], rtol=1e-12)


# --- per-class evidence: the class means of each hospital's own features ---------------------


def _class_means_cfg(anchor_lambda: float, cap: float = 2.0) -> TextAnchoredConfig:
    return TextAnchoredConfig(
        anchor_lambda=anchor_lambda, max_weight_ratio=cap, evidence="class-means"
    )


def test_class_means_down_weight_a_swapping_hospital_on_exactly_the_swapped_classes() -> None:
    """Hospital 2 grades classes 1 and 3 the other way: its class means there sit at cos 0.1
    from T instead of 0.5, elsewhere it agrees like the others. Its prototype rows 1 and 3
    lose their weight (by exp(-lambda 0.4)), rows 0, 2, 4 keep FedAvg's share exactly, and
    its shared weight loses only those two classes' images (2 of 5), not all of them."""
    counts = np.full((3, 5), 6.0)
    honest = np.full(5, 0.5)
    swapped = np.array([0.5, 0.1, 0.5, 0.1, 0.5])
    stats = HospitalStats(
        counts.sum(axis=1), counts, np.zeros((3, 5)), np.stack([honest, honest, swapped])
    )
    shared, proto = text_anchored_weights(stats, _class_means_cfg(5.0))
    say = np.exp(-5.0 * 0.4)
    for c in (1, 3):
        np.testing.assert_allclose(proto[:, c], np.array([1, 1, say]) / (2 + say), rtol=1e-12)
    for c in (0, 2, 4):
        np.testing.assert_allclose(proto[:, c], [1 / 3] * 3, rtol=1e-12)
    kept = (3 + 2 * say) / 5  # its images' mean say
    np.testing.assert_allclose(shared, np.array([1, 1, kept]) / (2 + kept), rtol=1e-12)
    # the prototypes' rule shrinks all of its say: n_k exp(lambda mean_c a_kc)
    whole, _ = text_anchored_weights(
        HospitalStats(stats.examples, counts, stats.class_agreement), TextAnchoredConfig(5.0)
    )
    assert whole[2] < shared[2] < 1 / 3
    # the pair is not special: another hospital and another pair, the same result
    moved = np.stack([honest, [0.5, 0.5, 0.1, 0.5, 0.1], honest])
    shared2, proto2 = text_anchored_weights(
        HospitalStats(stats.examples, counts, stats.agreement, moved), _class_means_cfg(5.0)
    )
    np.testing.assert_allclose(proto2[1, [2, 4]], say / (2 + say), rtol=1e-12)
    np.testing.assert_allclose(proto2[:, [0, 1, 3]], 1 / 3, rtol=1e-12)
    np.testing.assert_allclose(shared2[1], shared[2], rtol=1e-12)


def test_class_means_compare_with_the_typical_hospital_and_without_evidence_lose_nothing() -> None:
    """Say relative to the median hospital of each class, one-sided: above it earns nothing.
    NaN (fewer images than a class sum needs): nothing measured, nothing lost; a class a
    hospital does not hold gets no weight; a class nobody holds: the shared weights."""
    counts = np.array([[6.0, 2, 6, 0], [6, 6, 6, 0], [6, 6, 0, 0]])
    agree = np.array(
        [[0.2, np.nan, 0.5, np.nan], [0.6, 0.3, 0.5, np.nan], [0.6, 0.7, np.nan, np.nan]]
    )
    stats = HospitalStats(counts.sum(axis=1), counts, np.zeros((3, 4)), agree)
    shared, proto = text_anchored_weights(stats, _class_means_cfg(2.0, cap=np.inf))
    # class 0: median 0.6, hospital 0 is 0.4 below it; class 1: median of 0.3 and 0.7 is 0.5
    np.testing.assert_allclose(
        proto[:, 0], np.array([np.exp(-0.8), 1, 1]) / (2 + np.exp(-0.8)), rtol=1e-12
    )
    np.testing.assert_allclose(
        proto[:, 1], np.array([2, 6 * np.exp(-0.4), 6]) / (8 + 6 * np.exp(-0.4)), rtol=1e-12
    )
    assert proto[2, 2] == 0.0
    np.testing.assert_allclose(proto[:2, 2], [0.5, 0.5], rtol=1e-12)
    np.testing.assert_array_equal(proto[:, 3], shared)
    say = np.exp(2.0 * np.array([[-0.4, 0, 0, 0], [0, -0.2, 0, 0], [0, 0, 0, 0]]))
    expected = (counts * say).sum(axis=1)  # n_k times its images' mean say
    np.testing.assert_allclose(shared, expected / expected.sum(), rtol=1e-12)
    with pytest.raises(SavltError, match="class-means needs the hospitals' class feature sums"):
        text_anchored_weights(
            HospitalStats(stats.examples, counts, stats.agreement), _class_means_cfg(2.0)
        )


def test_class_means_lambda_zero_is_fedavg_bitwise() -> None:
    """lambda = 0 with class evidence: shared tensors exactly FedAvg's, prototype rows the
    class-c sample-weighted average, whatever the class sums say."""
    counts = [[25, 5, 5, 5], [1, 10, 0, 29], [4, 4, 4, 8]]
    updates = _updates(counts=counts)
    rng = np.random.default_rng(1)
    for u in updates:
        u.num_examples = sum(u.class_counts)
        u.class_sums = rng.normal(size=(C, 8)) * (np.array(u.class_counts) >= 3)[:, None]
    cfg = Config(
        fl=FederatedConfig(lora_aggregation="fedex"),  # type: ignore[arg-type]
        methods=MethodsConfig(text_anchored=_class_means_cfg(0.0)),
    )
    glob = _global()
    fed, _, _ = aggregate(updates, glob, "fedavg", cfg, SCALINGS, ANCHORS)
    anchored, _, report = aggregate(updates, glob, "text-anchored", cfg, SCALINGS, ANCHORS)
    for key in fed:
        if key != "prototypes":
            assert torch.equal(fed[key], anchored[key]), key
    for c in range(C):
        torch.testing.assert_close(
            anchored["prototypes"][c], _class_average(updates, c).float(), rtol=0, atol=1e-6
        )
    assert report["class_agreement"][1][2] is None  # no sum for a class it lacks
    expected = [class_mean_agreement(u.class_sums, ANCHORS) for u in updates]
    np.testing.assert_allclose(report["class_agreement"][0], expected[0], rtol=1e-12)


def test_class_mean_agreement_is_the_cosine_of_each_class_sum_with_its_anchor() -> None:
    """cos(sum_c, T_c) whatever the sum's length; NaN where no sum was sent."""
    rows = _prototypes([0.9, -0.3, 0.0, 0.4], torch.Generator().manual_seed(3)).double().numpy()
    sums = rows * np.array([[4.0], [1.0], [0.0], [7.5]])  # row 2: no evidence
    a = class_mean_agreement(sums, ANCHORS)
    np.testing.assert_allclose(a[[0, 1, 3]], [0.9, -0.3, 0.4], atol=1e-6)  # float32 rows
    assert np.isnan(a[2])


def test_a_reply_s_class_sums_are_checked_against_its_class_counts() -> None:
    """At most a count's length (a sum of unit features), zero under the minimum count, the
    declared shape, finite: anything else is a malformed reply."""
    counts = [3, 2, 5, 0]
    good = np.zeros((4, 8))
    good[0, 0], good[2, 1] = 2.9, -5.0
    metrics = class_sums_metrics(good + 1.0 * (np.arange(4) == 1)[:, None], np.array(counts))
    np.testing.assert_array_equal(class_sums_from(metrics, counts, 8), good)  # row 1 zeroed
    for bad, match in (
        (good + 10.0 * (np.arange(4) == 0)[:, None], "longer than its class count"),
        (good + 0.1 * (np.arange(4) == 1)[:, None], "under 3 images"),
        (np.full((4, 8), np.nan), "non-finite"),
    ):
        with pytest.raises(ValueError, match=match):
            class_sums_from({"class-feature-sums": bad.ravel().tolist()}, counts, 8)
    with pytest.raises(ValueError, match="expected 32 values"):
        class_sums_from({"class-feature-sums": [0.0] * 24}, counts, 8)


def test_class_sums_that_claim_perfect_agreement_earn_what_the_typical_hospital_earns() -> None:
    """Class sums are the hospital's own report: one that sends n_kc T_c (a_kc = 1 on every
    class) earns the say of the typical (median) hospital and no more; uncapped, the cap
    (twice its FedAvg share) would be the bound."""
    updates = _updates(k=3, counts=[[6] * C] * 3)
    gen = torch.Generator().manual_seed(5)
    for u, a in zip(updates, (1.0, 0.5, 0.3), strict=True):
        u.num_examples = 6 * C
        rows = _prototypes([a] * C, gen).double().numpy()  # cos a with T_c
        u.class_sums = 6 * rows / np.linalg.norm(rows, axis=1, keepdims=True)
    free = Config(methods=MethodsConfig(text_anchored=_class_means_cfg(50.0, cap=np.inf)))
    shared, proto = client_weights(updates, "text-anchored", free, ANCHORS)
    say = np.exp(50.0 * (0.3 - 0.5))  # hospital 2 sits 0.2 below the median (hospital 1)
    np.testing.assert_allclose(shared, np.array([1, 1, say]) / (2 + say), rtol=1e-6)
    np.testing.assert_allclose(proto, np.repeat(shared[:, None], C, axis=1), rtol=1e-6)
    assert shared[0] < 0.5 < 2 / 3  # the default cap does not even bind
