"""Adapter files: the trainable tensors in safetensors, with the fingerprints that make them
safe to load (the backbone and the text anchors they were trained against)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from savlt_model.atomic import atomic_write
from savlt_model.errors import SavltError


def save_adapter(path: str | Path, state: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write tensors + JSON metadata atomically (a crash leaves the previous file intact)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    return atomic_write(
        path, lambda p: save_file(tensors, str(p), metadata={"savlt": json.dumps(meta)})
    )


def load_adapter(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    path = Path(path)
    if not path.is_file():
        raise SavltError(f"adapter file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {}).get("savlt", "{}"))
        return load_file(str(path)), meta
    except (SafetensorError, OSError, json.JSONDecodeError) as exc:
        raise SavltError(f"adapter file {path} is corrupt or not safetensors: {exc}") from exc
