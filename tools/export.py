"""Export a trained adapter as a standard peft model directory plus a small SAVLT head.

``MODEL_DIR`` holds:

- ``adapter_model.safetensors`` + ``adapter_config.json``: written by peft itself, so
  ``PeftModel.from_pretrained(open_clip_model, MODEL_DIR)`` adapts the vision (and optional
  text) tower of a fresh open_clip model of the same backbone.
- ``savlt_head.safetensors`` + ``savlt_head.json``: what peft cannot hold, i.e. ROI
  attention pooling, prototypes, the trained visual projection, optional prompt context, and
  everything needed to rebuild and check the classifier (classes, descriptions, positive
  classes, align weight, logit scale, backbone id and weights, fingerprints, preprocessing).
- ``savlt_unet.safetensors``: a copy of the tissue U-Net, only when ``model.roi.source=unet``.

The run adapts Linear projections (open_clip's ``nn.MultiheadAttention`` split by
:mod:`savlt_model.model.attention`); the export targets the plain open_clip modules instead, so
each layer's effective update ``s B A`` (+ a FedEx-LoRA residual ``R``) is rewritten as
peft factors of that layout, re-factorised by SVD at its numerical rank where a residual
is folded in. It is exact up to float rounding (the largest absolute error is recorded in
``savlt_head.json``), so a pure-peft load needs nothing else; only the predictions' last
bits can differ from the run's.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from savlt_model.atomic import atomic_write, write_json
from savlt_model.checkpoint import load_adapter
from savlt_model.config import Config, config_from_dict, resolve_path
from savlt_model.errors import SavltError
from savlt_model.model.adapters import (
    ADAPTER,
    RESIDUAL,
    frozen_lora_a,
    lora_pairs,
    lora_scalings,
    residual_matrices,
    stable_name,
)
from savlt_model.model.backbone import load_backbone, vision_tower
from savlt_model.model.build import build_model, cached_backbone
from savlt_model.model.savlt import SavltModel

log = logging.getLogger(__name__)

HEAD_JSON = "savlt_head.json"
HEAD_TENSORS = "savlt_head.safetensors"
UNET_FILE = "savlt_unet.safetensors"
PEFT_FILES = ("adapter_model.safetensors", "adapter_config.json")
FORMAT = "savlt-export/1"


def _pick_adapter(run_dir: Path, method: str | None, seed: int | None) -> tuple[Path, dict, dict]:
    """The one adapter file matching ``method`` (a method or a file stem) and ``seed``."""
    if not run_dir.is_dir():
        raise SavltError(f"run directory {run_dir} does not exist")
    files = sorted((run_dir / "adapters").glob("*.safetensors"))
    if not files:
        raise SavltError(f"{run_dir} has no adapters/*.safetensors; is it a finished run?")
    loaded = {f.stem: load_adapter(f) for f in files}
    matches = [
        stem
        for stem, (_, meta) in loaded.items()
        if (method is None or method in (stem, meta.get("method")))
        and (seed is None or meta.get("seed") == seed)
    ]
    if len(matches) != 1:
        what = "no adapter matches" if not matches else "several adapters match"
        choices = matches or list(loaded)
        raise SavltError(
            f"{what} method={method} seed={seed} in {run_dir / 'adapters'}; pick one with "
            f"--method NAME_OR_FILE [--seed S] from: {', '.join(choices)}"
        )
    state, meta = loaded[matches[0]]
    return files[[f.stem for f in files].index(matches[0])], state, meta


def _run_config(run_dir: Path) -> Config:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise SavltError(f"{path} not found; export needs the run's effective config")
    return config_from_dict(yaml.safe_load(path.read_text(encoding="utf-8")))


def _peft_layer(base: nn.Module, prefix: str) -> tuple[str, str, float]:
    """A run's LoRA layer -> (peft target module, payload prefix, times peft applies it) on
    the plain backbone.

    The run adapts Linears; where the plain open_clip model has an ``nn.MultiheadAttention``
    (which the run split into qkv / out_proj Linears), peft adapts it as one target whose
    LoRA covers the in-projection and ``base_layer.out_proj``.
    """
    name = prefix.removeprefix("clip.")
    parent, _, leaf = name.rpartition(".")
    if not isinstance(base.get_submodule(parent), nn.MultiheadAttention):
        return name, prefix, 1.0
    if leaf == "qkv":
        return parent, f"clip.{parent}", 1.0
    return parent, f"clip.{parent}.base_layer.out_proj", _out_proj_factor()


def _plain_peft(
    model: SavltModel, state: dict[str, torch.Tensor], base: nn.Module
) -> tuple[PeftModel, dict[str, Any]]:
    """peft on a fresh copy of the plain backbone whose LoRA alone gives every adapted layer
    the run's effective weight ``W + R + s B A``.

    Each layer's delta is written as peft factors with scaling 1: ``(s B, A)`` as they are,
    or, where a FedEx residual is folded in, ``s B A + R`` re-factorised by SVD at its
    numerical rank (at most min(out, in), so it always fits). A module's rank is the largest
    of its layers' (zero-padded). Exact up to float rounding; the largest error is recorded.
    """
    scalings = lora_scalings(model)
    residuals = residual_matrices(state)  # dense or factorised in the file: dense here
    layers: dict[str, tuple[torch.Tensor, torch.Tensor, float, torch.Tensor]] = {}
    ranks: dict[str, int] = {}
    for prefix, a_key, b_key in lora_pairs(list(state)):
        module, target, times = _peft_layer(base, prefix)
        b, a = scalings[prefix] * state[b_key].double(), state[a_key].double()
        delta = b @ a
        if RESIDUAL + prefix in residuals:
            delta = delta + residuals[RESIDUAL + prefix].double()
            u, sv, vh = torch.linalg.svd(delta, full_matrices=False)
            tol = sv.max() * max(delta.shape) * torch.finfo(torch.float32).eps
            k = max(1, int((sv > tol).sum()))
            b, a = u[:, :k] * sv[:k].sqrt(), sv[:k].sqrt()[:, None] * vh[:k]
        layers[target] = (b, a, times, delta)  # peft applies b a `times` times
        ranks[module] = max(ranks.get(module, 0), a.shape[0])

    exact = {f"^{re.escape(n)}$": r for n, r in ranks.items()}
    peft_cfg = copy.deepcopy(model.clip.peft_config[ADAPTER])
    peft_cfg.target_modules = "|".join(re.escape(n) for n in ranks)  # full-name match
    peft_cfg.rank_pattern = exact
    peft_cfg.alpha_pattern = {k: float(r) for k, r in exact.items()}  # scaling alpha / r = 1
    plain = get_peft_model(copy.deepcopy(base), peft_cfg)
    holder = nn.Module()  # names as in SavltModel ("clip.<...>"), so payload keys line up
    holder.clip = plain
    params = {stable_name(n): p for n, p in holder.named_parameters()}
    max_err = 0.0
    with torch.no_grad():
        for target, (b, a, times, delta) in layers.items():
            a_param, b_param = params[f"{target}.lora_A.weight"], params[f"{target}.lora_B.weight"]
            a_param.zero_()
            b_param.zero_()
            a_param[: a.shape[0]] = a.float()
            b_param[:, : a.shape[0]] = (b / times).float()
            got = times * b_param.double() @ a_param.double()
            max_err = max(max_err, float((got - delta).abs().max()))
    folded = bool(residuals)
    info = {"ranks": ranks, "max_abs_error": max_err, "fedex_residuals_folded": folded}
    return plain, info


@functools.cache
def _out_proj_factor() -> float:
    """How many times the installed peft applies a MultiheadAttention out_proj LoRA delta.

    peft 0.21 merges it twice in every forward (huggingface/peft PR #3774). Measured, not
    assumed, so that the export stays exact once peft applies it once.
    """
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)
        holder = nn.Module()
        holder.attn = nn.MultiheadAttention(4, 1)
        plain = copy.deepcopy(holder.attn)
        attn = get_peft_model(
            holder, LoraConfig(r=1, target_modules=["attn"])
        ).base_model.model.attn
        out_proj = attn.base_layer.out_proj
        out_proj.lora_B[ADAPTER].weight.fill_(1.0)
        x = torch.randn(2, 1, 4)
        ref = plain(x, x, x, need_weights=False)[0]
        got = attn(x, x, x, need_weights=False)[0]
        plain.out_proj.weight += out_proj.get_delta_weight(ADAPTER)
        once = plain(x, x, x, need_weights=False)[0]
    return float(round(float((got - ref).sum() / (once - ref).sum())))


def export_model(
    run_dir: Path, out: Path, method: str | None = None, seed: int | None = None
) -> Path:
    """Write MODEL_DIR for one adapter of a run; returns ``out``.

    ``method`` is a method name (``central``, ``fedavg``, ...) or an adapter file stem
    (``local_seed42_h0``); it and ``seed`` may be left out when they leave one adapter.
    """
    run_dir, out = Path(run_dir), Path(out)
    adapter_file, state, meta = _pick_adapter(run_dir, method, seed)
    cfg = _run_config(run_dir)
    model = build_model(cfg, int(meta.get("seed", cfg.seeds[0]))).cpu()
    for key in ("backbone_fingerprint", "anchor_fingerprint"):
        if meta.get(key) != getattr(model, key):
            raise SavltError(
                f"{adapter_file} was trained with {key} {meta.get(key)}, but the run's config "
                f"now builds {getattr(model, key)} (backbone weights or prompts changed?)"
            )
    model.load_global_state(state)
    state = {**frozen_lora_a(model), **state}  # FFA-LoRA: A is frozen, not in the adapter
    lora_keys = {k for _, a, b in lora_pairs(list(state)) for k in (a, b)}
    head = {k: v for k, v in state.items() if k not in lora_keys and not k.startswith(RESIDUAL)}
    backbone = cached_backbone(cfg.model.name, cfg.model.pretrained)
    clip, layout = _plain_peft(model, state, backbone.model)
    log.info("LoRA written for plain %s: max error %.3g", cfg.model.name, layout["max_abs_error"])

    out.mkdir(parents=True, exist_ok=True)
    clip.save_pretrained(str(out))
    unet_file = None
    if cfg.model.roi.source == "unet":
        unet_file = UNET_FILE
        shutil.copyfile(resolve_path(cfg.model.roi.unet_checkpoint), out / UNET_FILE)
    info = {
        "format": FORMAT,
        "source": {"run": str(run_dir.resolve()), "adapter": adapter_file.name},
        "method": meta.get("method"),
        "seed": meta.get("seed"),
        "backbone": model.backbone_id,
        "model_name": cfg.model.name,
        "pretrained": cfg.model.pretrained,
        "backbone_fingerprint": model.backbone_fingerprint,
        "anchor_fingerprint": model.anchor_fingerprint,
        "classes": model.classes,
        "descriptions": model.descriptions,
        "positive": [model.classes[i] for i in model.positive],
        "align_weight": model.align_weight,
        "logit_scale": float(model.logit_scale),
        "image_size": backbone.image_size,
        "mean": list(backbone.mean),
        "std": list(backbone.std),
        "intensity": cfg.data.intensity,
        "calibration": meta.get("calibration"),
        "centre_calibration": meta.get("centre_calibration"),
        "unet": unet_file,
        "lora": layout,
        "config": cfg.to_dict(),
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in head.items()}
    atomic_write(out / HEAD_TENSORS, lambda p: save_file(tensors, str(p)))
    write_json(out / HEAD_JSON, info)
    return out


def _read_head(model_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    if not model_dir.is_dir():
        raise SavltError(f"model directory {model_dir} does not exist; create it with savlt export")
    missing = [f for f in (*PEFT_FILES, HEAD_JSON, HEAD_TENSORS) if not (model_dir / f).is_file()]
    if missing:
        raise SavltError(
            f"{model_dir} is not a savlt export (missing {', '.join(missing)}); "
            "create it with `savlt export --run RUN_DIR --out MODEL_DIR`"
        )
    try:
        info = json.loads((model_dir / HEAD_JSON).read_text(encoding="utf-8"))
        tensors = load_file(str(model_dir / HEAD_TENSORS))
    except (json.JSONDecodeError, SafetensorError, OSError) as exc:
        raise SavltError(f"{model_dir}: corrupt savlt head ({exc})") from exc
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise SavltError(f"{model_dir / HEAD_JSON}: not a {FORMAT} head file")
    return info, tensors


def load_exported(model_dir: Path) -> SavltModel:
    """Rebuild the full SAVLT classifier (eval mode, CPU) from MODEL_DIR alone.

    The backbone is created afresh from the recorded id and weights and must match the
    recorded fingerprint; peft loads the adapter; the head fills in the rest.
    """
    model_dir = Path(model_dir)
    info, head = _read_head(model_dir)
    backbone = load_backbone(info["model_name"], info["pretrained"])
    if backbone.fingerprint != info["backbone_fingerprint"]:
        raise SavltError(
            f"backbone fingerprint mismatch: {model_dir} was trained on {info['backbone']} "
            f"weights '{info['pretrained'] or 'random'}' with fingerprint "
            f"{info['backbone_fingerprint']}, these load as {backbone.fingerprint}"
        )
    raw = copy.deepcopy(info["config"])
    if info["unet"]:
        raw["model"]["roi"]["unet_checkpoint"] = str((model_dir / info["unet"]).resolve())
    with tempfile.TemporaryDirectory() as tmp:  # the descriptions travel in the head JSON
        prompts = Path(tmp) / "prompts.yaml"
        descriptions = dict(zip(info["classes"], info["descriptions"], strict=True))
        prompts.write_text(yaml.safe_dump({"export": descriptions}), encoding="utf-8")
        raw["task"].update(prompts=str(prompts), prompt_set="export")
        model = SavltModel(config_from_dict(raw), backbone)
    if model.anchor_fingerprint != info["anchor_fingerprint"]:
        raise SavltError(
            f"text anchor fingerprint mismatch for {model_dir}: recorded "
            f"{info['anchor_fingerprint']}, rebuilt {model.anchor_fingerprint} (tokenizer changed?)"
        )
    # Swap in the peft-loaded CLIP; the tower must then describe its modules, not the stand-in's.
    model.clip = PeftModel.from_pretrained(copy.deepcopy(backbone.model), str(model_dir))
    model.tower = vision_tower(model.clip.base_model.model)
    _load_head(model, head)
    return model.eval()


def _load_head(model: SavltModel, head: dict[str, torch.Tensor]) -> None:
    params = {stable_name(n): p for n, p in model.named_parameters()}
    with torch.no_grad():
        for key, tensor in head.items():
            if key not in params or params[key].shape != tensor.shape:
                raise SavltError(f"savlt head tensor {key} does not fit this model")
            params[key].copy_(tensor)
    model.requires_grad_(False)
