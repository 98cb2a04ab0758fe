"""peft LoRA on the frozen backbone, and the trainable set as a named payload.

The payload (:func:`trainable_state`) is exactly what a hospital uploads: LoRA factors, ROI
pooling, prototypes, the visual projection and optional prompt context. Names are stable
across processes and machines (peft's saved-adapter names, adapter name removed), so
the server can average them key by key and :func:`load_trainable_state` can put them back.
"""

from __future__ import annotations

import math
import re
import zlib

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

from savlt_model.config import LoraConfig as LoraSettings
from savlt_model.errors import SavltError
from savlt_model.model.attention import lora_targets
from savlt_model.model.backbone import VisionTower

ADAPTER = "default"
# FedEx-LoRA residuals in a global state: ``residual.<prefix>`` (dense, out x in) or the
# factors ``residual.<prefix>.B`` (out x q) and ``residual.<prefix>.A`` (q x in), R = B A.
RESIDUAL = "residual."
FACTOR_B, FACTOR_A = ".B", ".A"
# One round's residual step on the wire (to a hospital that holds the previous total):
# the same layout under this prefix, so it can never be mistaken for a total.
RESIDUAL_STEP = "residual-step."


PROTOTYPES = "prototypes"  # payload key of the visual prototypes (class-wise rows)


def _alternation(names: list[str]) -> str:
    return "(?:" + "|".join(re.escape(n) for n in names) + ")"


def inject_lora(clip: nn.Module, tower: VisionTower, cfg: LoraSettings) -> PeftModel:
    """Wrap ``clip`` with LoRA on the attention of the last N vision blocks (and optionally text).

    LoRA adapts every Linear projection of those attention modules: q, k, v (fused) and the
    output projection. open_clip's ``nn.MultiheadAttention`` is first split into Linears
    (:mod:`savlt_model.model.attention`), so every adapted layer is an ordinary peft LoRA Linear.
    """
    n_blocks = len(tower.attention_modules)
    last_n = n_blocks if cfg.last_n_blocks is None else cfg.last_n_blocks
    if not 1 <= last_n <= n_blocks:
        raise SavltError(f"model.lora.last_n_blocks must be in 1..{n_blocks}, got {last_n}")
    vision = lora_targets(clip, tower.attention_modules[n_blocks - last_n :])
    vision_re = _alternation(vision)
    if not cfg.text:
        lora = LoraConfig(
            r=cfg.r,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            bias="none",
            target_modules=vision_re,
        )
    else:
        if not hasattr(clip, "transformer"):
            raise SavltError("model.lora.text needs open_clip's native text tower; set it to false")
        blocks = range(len(clip.transformer.resblocks))
        text = lora_targets(clip, [f"transformer.resblocks.{i}.attn" for i in blocks])
        # Text modules take the default rank; the vision pattern overrides it for vision modules.
        lora = LoraConfig(
            r=cfg.text_r,
            lora_alpha=cfg.text_alpha,
            lora_dropout=cfg.dropout,
            bias="none",
            target_modules=_alternation(vision + text),
            rank_pattern={vision_re: cfg.r},
            alpha_pattern={vision_re: cfg.alpha},
        )
    return get_peft_model(clip, lora)


def freeze_lora_a(model: nn.Module, seed: int) -> None:
    """FFA-LoRA: redraw every LoRA A from ``seed`` and the layer's name, and freeze it.

    Drawn from its own generator (peft's kaiming-uniform init), not the global RNG, so every
    hospital and the server hold the same A whatever else they built first; A then never
    travels, and averaging B alone is exact: sum_k w_k s B_k A = s B̄ A.
    """
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
                weight = module.lora_A[ADAPTER].weight
                gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
                bound = 1 / math.sqrt(weight.shape[1])  # kaiming_uniform_(a=sqrt(5)) bound
                drawn = torch.rand(weight.shape, generator=gen, dtype=torch.float64)
                weight.copy_((2 * drawn - 1) * bound)
                weight.requires_grad_(False)


def frozen_lora_a(model: nn.Module) -> dict[str, torch.Tensor]:
    """Payload-style keys of the frozen FFA-LoRA A factors (none in other modes): what an
    export needs besides the trained payload."""
    return {
        stable_name(n): p.detach().cpu()
        for n, p in model.named_parameters()
        if ".lora_A." in n and not p.requires_grad
    }


def stable_name(param_name: str) -> str:
    """Model parameter name -> payload key (drops the peft wrapper prefix and adapter name)."""
    return param_name.replace("clip.base_model.model.", "clip.").replace(f".{ADAPTER}.", ".")


def payload_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The trainable parameters by payload key, in a stable (sorted) order."""
    params = {stable_name(n): p for n, p in model.named_parameters() if p.requires_grad}
    return dict(sorted(params.items()))


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Exactly the trainable tensors (detached CPU copies): the federated payload."""
    return {k: p.detach().to("cpu", copy=True) for k, p in payload_parameters(model).items()}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`trainable_state`; refuses missing, extra or mis-shaped tensors."""
    params = payload_parameters(model)
    missing = sorted(set(params) - set(state))
    extra = sorted(set(state) - set(params))
    if missing or extra:
        raise SavltError(
            f"adapter payload does not match this model: missing {missing[:3]}, unexpected "
            f"{extra[:3]} (different model.lora / prompt settings?)"
        )
    with torch.no_grad():
        for key, p in params.items():
            t = state[key]
            if tuple(t.shape) != tuple(p.shape):
                raise SavltError(
                    f"adapter payload tensor {key} has shape {tuple(t.shape)}, "
                    f"expected {tuple(p.shape)}"
                )
            p.copy_(t.to(p.device, p.dtype))


def lora_pairs(keys: list[str]) -> list[tuple[str, str, str]]:
    """(prefix, A key, B key) for every LoRA factor pair in a payload."""
    out = []
    for key in keys:
        if key.endswith(".lora_A.weight"):
            prefix = key[: -len(".lora_A.weight")]
            out.append((prefix, key, f"{prefix}.lora_B.weight"))
    return out


def residual_targets(model: nn.Module) -> dict[str, tuple[torch.Tensor, float]]:
    """``residual.<prefix>`` -> (frozen base weight, LoRA scaling) for every LoRA layer.

    The exact (FedEx-LoRA) aggregation sends the part of sum_k w_k B_k A_k that the averaged
    factors cannot express as a residual; clients add it to these frozen weights.
    """
    out: dict[str, tuple[torch.Tensor, float]] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
            prefix = stable_name(f"{name}.").rstrip(".")
            out[f"{RESIDUAL}{prefix}"] = (
                module.get_base_layer().weight,
                float(module.scaling[ADAPTER]),
            )
    return out


def residual_matrices(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``residual.<prefix>`` -> the dense float32 residual, whether ``state`` holds it dense or
    as factors (rebuilt as B A in float64, then rounded once: the same bits everywhere)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not key.startswith(RESIDUAL) or key.endswith(FACTOR_A):
            continue
        if key.endswith(FACTOR_B):
            base = key[: -len(FACTOR_B)]
            a = state.get(base + FACTOR_A)
            if a is None:
                raise SavltError(f"global state has {key} but not {base + FACTOR_A}")
            out[base] = (value.double() @ a.double()).float()
        else:
            out[key] = value
    return out


def _smaller_as_factors(out: int, inp: int, rank: int) -> bool:
    return (out + inp) * rank < out * inp


def residual_step(key: str, b: torch.Tensor, a: torch.Tensor) -> dict[str, torch.Tensor]:
    """One round's residual ``b @ a`` under ``key``, in its smaller float32 form: the factors
    (``key.B``, ``key.A``) or the dense matrix (``key``)."""
    if _smaller_as_factors(b.shape[0], a.shape[1], a.shape[0]):
        return {key + FACTOR_B: b.float(), key + FACTOR_A: a.float()}
    return {key: (b.double() @ a.double()).float()}


def _layer(state: dict[str, torch.Tensor], key: str) -> torch.Tensor | tuple | None:
    """Layer ``key`` of a residual dict: its dense matrix, its (B, A) factors, or None."""
    if key in state:
        return state[key]
    if key + FACTOR_B in state:
        return state[key + FACTOR_B], state[key + FACTOR_A]
    return None


def _as_dense(layer: torch.Tensor | tuple) -> torch.Tensor:
    if isinstance(layer, tuple):
        return layer[0].double() @ layer[1].double()
    return layer.double()


def fold_residuals(
    total: dict[str, torch.Tensor], step: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Running FedEx residuals ``total`` plus one round's ``step`` (both keyed
    ``residual.<prefix>``, each layer dense or factorised): the new total.

    Factors are kept side by side while that is smaller than the dense matrix; a layer turns
    dense once it is not, and stays dense. A pure function of float32 inputs, computed in
    float64 and rounded once: the server's total and a hospital's replay of the steps agree
    bit for bit, which is what lets a hospital that kept its total receive only the step.
    """
    out = dict(total)
    layers = {k.removesuffix(FACTOR_B) for k in step if not k.endswith(FACTOR_A)}
    for key in sorted(layers):
        old, new = _layer(out, key), _layer(step, key)
        for stale in (key, key + FACTOR_B, key + FACTOR_A):
            out.pop(stale, None)
        if isinstance(new, tuple) and not isinstance(old, torch.Tensor):
            b, a = new
            if old is not None:
                b, a = torch.cat([old[0], b], dim=1), torch.cat([old[1], a], dim=0)
            if _smaller_as_factors(b.shape[0], a.shape[1], a.shape[0]):
                out.update({key + FACTOR_B: b, key + FACTOR_A: a})
                continue
            out[key] = (b.double() @ a.double()).float()
            continue
        dense = _as_dense(new) if old is None else _as_dense(old) + _as_dense(new)
        out[key] = dense.float()
    return dict(sorted(out.items()))


def snapshot_base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the frozen weights under every LoRA layer, taken before any residual.

    FedEx residuals are running totals: every round restores these weights and adds the
    new total, so a model reused across rounds (and every process) stays exact.
    """
    return {k: w.detach().clone() for k, (w, _) in residual_targets(model).items()}


def apply_global_state(
    model: nn.Module, state: dict[str, torch.Tensor], base: dict[str, torch.Tensor]
) -> None:
    """Load a server state: restore the frozen weights from ``base``, add the FedEx residuals
    (dense or factorised), load the payload. Exact for a model reused across rounds
    (residuals are totals)."""
    targets = residual_targets(model)
    residuals = residual_matrices(state)
    unknown = [k for k in residuals if k not in targets]
    if unknown:
        raise SavltError(f"global state has residuals for layers this model lacks: {unknown[:3]}")
    with torch.no_grad():
        for key, (weight, _) in targets.items():
            weight.copy_(base[key])
            if key in residuals:
                weight.add_(residuals[key].to(weight.device, weight.dtype))
    load_trainable_state(model, {k: v for k, v in state.items() if not k.startswith(RESIDUAL)})


def lora_scalings(model: nn.Module) -> dict[str, float]:
    """LoRA scaling (alpha / r) per payload prefix: the server forms s B A with it, exactly."""
    return {k[len(RESIDUAL) :]: s for k, (_, s) in residual_targets(model).items()}
