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

FedEx-LoRA adapters also carry dense residuals that the run adds to the frozen weights.
They are folded into the LoRA factors: per layer the effective update ``s B A + R`` is
re-factorised by SVD at its numerical rank (at most min(out, in), so it always fits), with
``rank_pattern`` / ``alpha_pattern`` giving those layers their new rank. The fold is exact up
to float32 rounding (the largest absolute error is recorded in ``savlt_head.json``), so a
pure-peft load needs nothing else; only the predictions' last bits can differ from the run's.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml
from peft import PeftModel, get_peft_model
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from savlt_model.adapters import (
    ADAPTER,
    OUT_PROJ,
    lora_pairs,
    out_proj_factor,
    residual_targets,
    stable_name,
)
from savlt_model.atomic import atomic_write, write_json
from savlt_model.backbone import load_backbone, vision_tower
from savlt_model.checkpoint import load_adapter
from savlt_model.config import Config, config_from_dict, resolve_path
from savlt_model.errors import SavltError
from savlt_model.model import SavltModel
from savlt_model.train import build_model, cached_backbone

log = logging.getLogger(__name__)

HEAD_JSON = "savlt_head.json"
HEAD_TENSORS = "savlt_head.safetensors"
UNET_FILE = "savlt_unet.safetensors"
PEFT_FILES = ("adapter_model.safetensors", "adapter_config.json")
FORMAT = "savlt-export/1"
_RESIDUAL = "residual."


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


def _is_out_proj(prefix: str) -> bool:
    return prefix.endswith(OUT_PROJ)


def _module_name(prefix: str) -> str:
    """Payload LoRA prefix -> the peft target module that owns its rank (MHA owns out_proj)."""
    return prefix.removesuffix(OUT_PROJ).removeprefix("clip.")


def _fold_residuals(
    model: SavltModel, state: dict[str, torch.Tensor], base: nn.Module
) -> tuple[PeftModel, dict[str, Any]]:
    """A fresh peft model whose LoRA factors alone give each layer the run's effective weight.

    The run computes ``W + R + f s B A`` (f: :func:`~savlt_model.adapters.out_proj_factor`
    for out_proj, else 1), so the folded delta is ``s B A + R / f``, applied by peft with
    the same f.
    """
    scalings = {k[len(_RESIDUAL) :]: s for k, (_, s) in residual_targets(model).items()}
    deltas: dict[str, torch.Tensor] = {}  # what the folded LoRA delta must equal, per layer
    for prefix, a_key, b_key in lora_pairs(list(state)):
        delta = scalings[prefix] * state[b_key].double() @ state[a_key].double()
        residual = state.get(_RESIDUAL + prefix, torch.zeros(())).double()
        deltas[prefix] = delta + residual / (out_proj_factor() if _is_out_proj(prefix) else 1.0)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    ranks: dict[str, int] = {}
    for prefix, delta in deltas.items():
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        tol = s.max() * max(delta.shape) * torch.finfo(torch.float32).eps
        k = max(1, int((s > tol).sum()))
        root = s[:k].sqrt()
        factors[prefix] = (u[:, :k] * root, root[:, None] * vh[:k])
        name = _module_name(prefix)
        ranks[name] = max(ranks.get(name, 0), k)

    peft_cfg = copy.deepcopy(model.clip.peft_config[ADAPTER])
    exact = {re.escape(n): r for n, r in ranks.items()}  # first match wins: exact names first
    peft_cfg.rank_pattern = {**exact, **peft_cfg.rank_pattern}
    peft_cfg.alpha_pattern = {**{k: float(r) for k, r in exact.items()}, **peft_cfg.alpha_pattern}
    folded = get_peft_model(copy.deepcopy(base), peft_cfg)
    holder = nn.Module()  # names as in SavltModel ("clip.<...>"), so payload keys line up
    holder.clip = folded
    new_scalings = {k[len(_RESIDUAL) :]: s for k, (_, s) in residual_targets(holder).items()}
    params = {stable_name(n): p for n, p in holder.named_parameters()}
    max_err = 0.0
    with torch.no_grad():
        for prefix, (b, a) in factors.items():
            a_param, b_param = params[f"{prefix}.lora_A.weight"], params[f"{prefix}.lora_B.weight"]
            a_param.zero_()
            b_param.zero_()
            k = a.shape[0]
            a_param[:k] = a.float()
            b_param[:, :k] = (b / new_scalings[prefix]).float()
            got = new_scalings[prefix] * b_param.double() @ a_param.double()
            max_err = max(max_err, float((got - deltas[prefix]).abs().max()))
    return folded, {"ranks": ranks, "max_abs_error": max_err}


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
    lora_keys = {k for _, a, b in lora_pairs(list(state)) for k in (a, b)}
    head = {k: v for k, v in state.items() if k not in lora_keys and not k.startswith(_RESIDUAL)}
    backbone = cached_backbone(cfg.model.name, cfg.model.pretrained)
    fold = None
    clip = model.clip
    if any(k.startswith(_RESIDUAL) for k in state):
        clip, fold = _fold_residuals(model, state, backbone.model)
        log.info("FedEx residuals folded into LoRA: ranks %s, max error %.3g", *fold.values())

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
        "unet": unet_file,
        "fedex_fold": fold,
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
