"""Server-side aggregation maths: client weights, tensor averaging, exact LoRA merging.

Pure tensors and numpy, no Flower, so the maths is testable and benchmarkable on its own;
the Flower strategy only unpacks messages, calls :func:`check_update` and :func:`aggregate`,
and logs the report (docs/method.md, "The federated extension").

- the client weights come from the method's entry in :mod:`savlt_model.methods`
  (FedAvg's n_k, text-anchored's anchor agreement, ...); this module checks and applies them.
- the anchor agreement a_kc = cos(P_kc, T_c) is computed here, from the prototypes the
  hospital uploads and the frozen anchors T the server builds itself
  (:func:`prototype_agreement`). A hospital cannot report it: a self-reported number could
  not be checked (the server has no images to recompute a feature mean) and would let one
  hospital buy up to e^(2 lambda) times the weight. Gaming the upload instead (sending
  P_k = T) is bounded by the method's weight cap, and the prototype it sends is the one
  averaged.
- LoRA ``naive`` averages A and B separately (mean(B) mean(A) != mean(B A): the error is
  measured and reported); ``fedex`` (FedEx-LoRA) also sends the difference as a residual,
  which clients add to their frozen weights, so the merged effective weight is exactly the
  weighted average of the clients' effective weights. The weights sum to 1, so the round's
  difference is s sum_k w_k B_k (A_k - Ā) = s sum_{k<K} w_k (B_k - B_K)(A_k - Ā): two
  factors of rank (K-1) r (the round's step). The running total keeps every round's
  factors side by side (``residual.<prefix>.B``, ``.A``) while that is smaller than the
  dense matrix, and is folded into a dense ``residual.<prefix>`` once it is not, per layer
  (:func:`~savlt_model.model.adapters.fold_residuals`, which hospitals that keep the total
  replay on the step alone). Factors are kept,
  not re-factorised by SVD: on random updates an SVD of the total finds exactly (K-1) r
  per round (benchmarks/README.md), so it would only add rounding. ``ffa`` (FFA-LoRA): A
  is frozen from the seed at every hospital and never sent, so the payload holds B alone
  and its plain average is exact.
- a server optimiser (FedAvgM, FedAdam: the method's ``server_step``) then steps from the
  aggregate instead of taking it (:func:`server_step`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from savlt_model.config import Config
from savlt_model.errors import SavltError
from savlt_model.methods import HospitalStats, get_method
from savlt_model.model.adapters import (
    FACTOR_B,
    PROTOTYPES,
    RESIDUAL,
    fold_residuals,
    lora_pairs,
    residual_matrices,
    residual_step,
)

LORA_MODES = ("naive", "fedex", "ffa")
LORA_B = ".lora_B.weight"


@dataclass
class ClientUpdate:
    """One hospital's reply: its trained payload plus what the weighting needs."""

    node: str  # node id, for log lines
    state: dict[str, torch.Tensor]
    num_examples: int
    class_counts: list[int]  # n_kc
    # (C, d) sums of its class-c train features under the incoming global model, when the
    # round plan asks (checked by savlt_model.messages.class_sums_from); else None
    class_sums: np.ndarray | None = None


def _payload_keys(state: dict[str, torch.Tensor]) -> list[str]:
    """Keys clients train and send: everything but the server-owned dense residuals."""
    return sorted(k for k in state if not k.startswith(RESIDUAL))


def update_norm(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """L2 norm of a whole payload minus the global one it answers (float64): what the
    update bound and DP clipping measure."""
    return math.sqrt(
        sum(
            float((state[k].double() - reference[k].double()).square().sum())
            for k in _payload_keys(reference)
        )
    )


def update_kind(state: dict[str, torch.Tensor]) -> str:
    """The LoRA aggregation an update's payload is built for: ``ffa`` carries B alone (A is
    frozen from the seed), ``naive`` / ``fedex`` carry both factors."""
    keys = sorted(state)
    return "ffa" if any(k.endswith(LORA_B) for k in keys) and not lora_pairs(keys) else "lora"


def check_update(
    update: ClientUpdate,
    reference: dict[str, torch.Tensor],
    max_norm: float = 0.0,
    lora_mode: str | None = None,
) -> str | None:
    """None if ``update`` may be averaged in, else a one-line reason to refuse it.

    ``reference`` is the global state that was sent; ``max_norm > 0`` bounds the L2 norm of
    the whole update (state - reference), a cheap guard against diverged or hostile clients;
    ``lora_mode`` (the run's ``fl.lora_aggregation``) is the kind the payload must be.
    """
    lora = lora_mode is not None and any(k.endswith(LORA_B) for k in reference)
    if lora and update_kind(update.state) != ("ffa" if lora_mode == "ffa" else "lora"):
        return f"the update's LoRA aggregation kind is not the run's {lora_mode}"
    expected = _payload_keys(reference)
    missing = sorted(set(expected) - set(update.state))
    extra = sorted(set(update.state) - set(expected))
    if missing or extra:
        return f"payload keys differ: missing {missing[:3]}, extra {extra[:3]}"
    for key in expected:
        got, ref = update.state[key], reference[key]
        if tuple(got.shape) != tuple(ref.shape):
            return f"{key} has shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
        if got.dtype != ref.dtype:
            return f"{key} has dtype {got.dtype}, expected {ref.dtype}"
        if not bool(torch.isfinite(got).all()):
            return f"{key} has non-finite values"
    norm = update_norm(update.state, reference)
    if max_norm > 0 and norm > max_norm:
        return f"update norm {norm:.4g} exceeds the bound {max_norm:.4g}"
    if update.num_examples <= 0:
        return f"num_examples is {update.num_examples}"
    n_classes = reference[PROTOTYPES].shape[0] if PROTOTYPES in reference else None
    counts = update.class_counts
    if n_classes is not None and len(counts) != n_classes:
        return f"class_counts has {len(counts)} entries, expected {n_classes}"
    if any(n < 0 for n in counts) or sum(counts) == 0:
        return f"class_counts {list(counts)} must be non-negative with a positive total"
    return None


def prototype_agreement(prototypes: torch.Tensor, anchors: torch.Tensor) -> np.ndarray:
    """(C,) a_c = cos(P_c, T_c) in float64: how close each uploaded prototype is to its anchor.

    The prototypes are what the fused classifier uses next to T, and the local anchoring
    term pulls them toward T, so a hospital whose class-c images fit the shared reference
    leaves P_c near T_c.
    """
    p, t = F.normalize(prototypes.double(), dim=-1), F.normalize(anchors.double(), dim=-1)
    return (p * t).sum(dim=-1).numpy()


def class_mean_agreement(sums: np.ndarray, anchors: torch.Tensor) -> np.ndarray:
    """(C,) cos(sum_c, T_c) in float64: how close a hospital's class-c mean feature is to
    its anchor; NaN for a class it sent no sum for (too few images: no evidence)."""
    t = F.normalize(anchors.double(), dim=-1).numpy()
    norms = np.linalg.norm(sums, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norms > 0, (sums * t).sum(axis=1) / norms, np.nan)


def hospital_stats(updates: list[ClientUpdate], anchors: torch.Tensor) -> HospitalStats:
    """The numbers a weighting rule may use, checked for consistency across hospitals;
    the agreement comes from each upload's prototypes and the server's ``anchors``, and the
    class agreement (when every hospital sent class sums) from those sums."""
    if not updates:
        raise SavltError("no client updates to aggregate")
    n_classes = {len(u.class_counts) for u in updates} | {anchors.shape[0]}
    if len(n_classes) != 1:
        raise SavltError(f"clients disagree on the number of classes: {sorted(n_classes)}")
    n = np.array([float(u.num_examples) for u in updates])
    if (n <= 0).any():
        raise SavltError(f"every client needs num_examples > 0, got {n.astype(int).tolist()}")
    counts = np.array([u.class_counts for u in updates], dtype=np.float64).reshape(len(updates), -1)
    agreement = np.stack([prototype_agreement(u.state[PROTOTYPES], anchors) for u in updates])
    sums = [u.class_sums for u in updates]
    by_class = None
    if all(s is not None for s in sums):
        by_class = np.stack([class_mean_agreement(s, anchors) for s in sums])
    return HospitalStats(n, counts, agreement, by_class)


def client_weights(
    updates: list[ClientUpdate], method: str, cfg: Config, anchors: torch.Tensor
) -> tuple[np.ndarray, np.ndarray]:
    """(shared weights (K,), prototype weights (K, C)) by the method's registered rule.

    Whatever the rule, the weights must be finite and non-negative, and the vector and each
    column must sum to 1, or the aggregate would silently be no average at all.
    """
    return _weights(hospital_stats(updates, anchors), method, cfg)


def _weights(stats: HospitalStats, method: str, cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    """:func:`client_weights` from the hospitals' numbers already gathered."""
    entry = get_method(method)
    if entry.weighting is None:
        raise SavltError(f"method {method!r} is not federated; it has no aggregation weights")
    shared, proto = entry.weighting(stats, entry.settings(cfg.methods))
    k, c = stats.class_counts.shape
    for name, w, shape in (("shared", shared, (k,)), ("prototype", proto, (k, c))):
        if w.shape != shape or not np.isfinite(w).all() or (w < 0).any():
            raise SavltError(f"method {method!r} gave bad {name} weights {w.tolist()}")
        if not np.allclose(w.sum(axis=0), 1.0):
            raise SavltError(f"method {method!r}: {name} weights do not sum to 1")
    return shared, proto


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Clients' tensors as one float64 (K, ...) block: a few large ops, not K small ones each."""
    return torch.stack(tensors).double()


def _weighted_sum(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_k weights[k] * stacked[k] in float64; ``weights`` is (K,) or (K, C) for prototypes."""
    w = weights.reshape(weights.shape + (1,) * (stacked.dim() - weights.dim()))
    return (w * stacked).sum(dim=0)


def _weighted_factors(b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """[w_1 B_1, ..., w_K B_K] (out, K r) from ``b`` (K, out, r): times the stacked A_k
    ((K r, in)) it is sum_k w_k B_k A_k in one matmul."""
    k, out, r = b.shape
    return (w[:, None, None] * b).permute(1, 0, 2).reshape(out, k * r)


def aggregate(
    updates: list[ClientUpdate],
    global_state: dict[str, torch.Tensor],
    method: str,
    cfg: Config,
    scalings: dict[str, float],
    anchors: torch.Tensor,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """New global state (float32, CPU), the round's FedEx residual step, and a report for the
    round's log line.

    The step (``residual.<prefix>`` keys, each layer as factors or dense, whichever is
    smaller; empty unless fedex) is what turned the previous residual totals into the new
    ones (:func:`savlt_model.model.adapters.fold_residuals`): all that a hospital holding
    the previous totals needs to receive (:mod:`server.downlink`).

    ``anchors`` is the server's own frozen T (C x d), for the agreement of the uploads.
    Report: ``weights`` (shared, per client), ``prototype_weights`` (K lists of C),
    ``agreement`` (K lists of C: a_kc, whatever the method, so FedAvg runs show it too),
    ``class_agreement`` (K lists of C from the class sums, None where a hospital sent no
    evidence; None when the round asked for no sums),
    ``lora_naive_rel_error`` / ``lora_max_rel_error``: mean / max over LoRA layers of
    ||sum_k w_k B_k A_k - B̄ Ā||_F / ||sum_k w_k B_k A_k||_F (the scaling cancels), i.e. how
    wrong naive averaging is this round, whichever mode was used; ``residual_layout``
    (fedex): how many layers' residuals are factorised and how many dense.
    """
    lora_mode = cfg.fl.lora_aggregation
    if lora_mode not in LORA_MODES:
        raise SavltError(f"unknown lora_mode {lora_mode!r}; choose one of {LORA_MODES}")
    stats = hospital_stats(updates, anchors)
    shared_np, proto_np = _weights(stats, method, cfg)
    keys = _payload_keys(global_state)
    for u in updates:
        if sorted(u.state) != keys:
            raise SavltError(f"client {u.node} sent keys that differ from the global state")
    pairs = lora_pairs(keys)
    if lora_mode == "ffa" and pairs:
        raise SavltError(
            f"fl.lora_aggregation is ffa but the payload carries LoRA A ({pairs[0][1]}); "
            "hospitals must build their model with the same config (A frozen from the seed)"
        )
    if lora_mode == "fedex":
        unscaled = sorted(p for p, _, _ in pairs if p not in scalings)
        if unscaled:
            raise SavltError(f"no LoRA scaling for {unscaled[:3]}: fedex needs alpha/r per layer")

    shared = torch.from_numpy(shared_np)
    lora_keys = {key for _, a_key, b_key in pairs for key in (a_key, b_key)}
    new: dict[str, torch.Tensor] = {}
    step: dict[str, torch.Tensor] = {}  # fedex: this round's gap, added to the carried totals
    for key in keys:  # one key at a time: peak memory is one tensor x K clients in float64
        if key not in lora_keys:
            w = torch.from_numpy(proto_np) if key == PROTOTYPES else shared
            new[key] = _weighted_sum(_stack([u.state[key] for u in updates]), w).float()

    errors = []
    for prefix, a_key, b_key in pairs:
        a = _stack([u.state[a_key] for u in updates])
        b = _stack([u.state[b_key] for u in updates])
        new[a_key] = _weighted_sum(a, shared).float()
        new[b_key] = _weighted_sum(b, shared).float()
        wb = _weighted_factors(b, shared)
        exact = wb @ a.reshape(-1, a.shape[-1])
        # B̄ Ā from the float32 tensors clients will load, so the residual closes that exact gap
        gap = exact - new[b_key].double() @ new[a_key].double()
        norm = float(torch.linalg.matrix_norm(exact))
        errors.append(float(torch.linalg.matrix_norm(gap)) / norm if norm > 0 else 0.0)
        if lora_mode == "fedex" and len(updates) > 1:  # one hospital: no gap
            # s gap = s sum_{k<K} w_k (B_k - B_K)(A_k - Ā), up to the float32 rounding of the
            # B̄ and Ā the clients load: factors (out, (K-1) r) and ((K-1) r, in)
            db = _weighted_factors(b[:-1] - b[-1], shared[:-1])
            da = (a[:-1] - new[a_key].double()).reshape(-1, a.shape[-1])
            step.update(residual_step(RESIDUAL + prefix, scalings[prefix] * db, da))
    # residuals carry over (clients' frozen weights include them), plus the step
    new.update(
        fold_residuals({k: v for k, v in global_state.items() if k.startswith(RESIDUAL)}, step)
    )
    residual_keys = [k for k in new if k.startswith(RESIDUAL)]
    factorised = sum(k.endswith(FACTOR_B) for k in residual_keys)
    report = {
        "weights": shared_np.tolist(),
        "prototype_weights": proto_np.tolist(),
        "agreement": stats.agreement.tolist(),
        "class_agreement": None
        if stats.class_agreement is None
        else np.where(np.isnan(stats.class_agreement), None, stats.class_agreement).tolist(),
        "lora_naive_rel_error": float(np.mean(errors)) if errors else 0.0,
        "lora_max_rel_error": max(errors, default=0.0),
        "residual_layout": {
            "factorised": factorised,
            "dense": len(residual_keys) - 2 * factorised,
        },
    }
    return dict(sorted(new.items())), step, report


def server_step(
    global_state: dict[str, torch.Tensor],
    aggregated: dict[str, torch.Tensor],
    step: dict[str, torch.Tensor],
    method: str,
    cfg: Config,
    moments: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(new global state, its residual step, the optimiser's new state): x+ = x - s(g) with
    the method's server step s over the pseudo-gradient g = x - aggregate of every tensor the
    server holds.

    ``global_state`` is x as sent, ``aggregated`` and ``step`` what :func:`aggregate` made of
    the round. naive: g over both factors, like any tensor; ffa: over B alone (A is frozen
    and shared, so on the merged weights sB A too). fedex: its aggregate is (Ā, B̄, R + gap)
    with the product average exact, so the residual is one more tensor the server holds,
    g_R = -gap; its step is dense (FedAdam's per-element step has no low-rank form) and goes
    to the hospitals as the round's residual step. With FedAvgM at server_lr 1 and momentum 0
    each mode's aggregate comes back (to float rounding).
    """
    entry = get_method(method)
    if entry.server_step is None:
        raise SavltError(f"method {method!r} has no server optimiser")
    keys = _payload_keys(global_state)
    grads = {k: global_state[k].double() - aggregated[k].double() for k in keys}
    layers = []
    if cfg.fl.lora_aggregation == "fedex":
        gaps = residual_matrices(step)
        for prefix, a_key, b_key in lora_pairs(keys):
            key = RESIDUAL + prefix
            shape = (global_state[b_key].shape[0], global_state[a_key].shape[1])
            gap = gaps.get(key)
            grads[key] = torch.zeros(shape, dtype=torch.float64) if gap is None else -gap.double()
            layers.append(key)
    moved, moments = entry.server_step(grads, moments, entry.settings(cfg.methods))
    new = {k: (global_state[k].double() - moved[k]).float() for k in keys}
    new_step = {k: (-moved[k]).float() for k in layers}
    carried = {k: v for k, v in global_state.items() if k.startswith(RESIDUAL)}
    new.update(fold_residuals(carried, new_step))
    return dict(sorted(new.items())), new_step, moments
