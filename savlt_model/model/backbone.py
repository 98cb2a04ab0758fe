"""The frozen CLIP backbone, loaded through open_clip.

Accepts an open_clip model name with a pretrained tag, an ``hf-hub:`` id (BiomedCLIP), a local
checkpoint file, or no weights at all (random init, with a warning). The offline default
``savlt-tiny`` is registered from ``model_configs/`` so that it needs no download.

:class:`VisionTower` hides the difference between open_clip's own ViT and timm ViTs
(BiomedCLIP), so the SAVLT head can read patch tokens from either.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from open_clip.timm_model import TimmModel
from open_clip.transformer import VisionTransformer
from torch import nn

from savlt_model.errors import SavltError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "savlt-tiny"
_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
open_clip.add_model_config(_CONFIG_DIR)


@dataclass
class VisionTower:
    """Patch tokens and projection of a ViT vision tower, whatever its implementation."""

    embed: Callable[[torch.Tensor], torch.Tensor]  # images -> tokens entering the first block
    blocks: nn.ModuleList
    norm: nn.Module  # final LayerNorm over all tokens
    project: Callable[[torch.Tensor], torch.Tensor]  # pooled width -> embedding dim
    projection_params: dict[str, nn.Parameter]  # the trainable visual projection, by CLIP name
    attention_modules: list[str]  # each block's self-attention, relative to the CLIP model
    num_prefix_tokens: int
    grid: tuple[int, int]
    width: int


@dataclass
class Backbone:
    model: nn.Module  # an open_clip CLIP / CustomTextCLIP, all weights frozen
    tokenizer: Callable[[list[str]], torch.Tensor]
    model_id: str
    weights: str  # "random", a pretrained tag, an hf-hub id or a file path
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    fingerprint: str


def _looks_like_path(value: str) -> bool:
    return "/" in value or "\\" in value or value.endswith((".pt", ".pth", ".bin", ".safetensors"))


def load_backbone(
    name: str = DEFAULT_MODEL, pretrained: str | None = None, init_seed: int = 0
) -> Backbone:
    """Create the open_clip model; every weight is frozen and fingerprinted.

    Random initialisation is seeded with ``init_seed`` so that every hospital that runs
    without weights builds the very same backbone (the fingerprint check relies on it).
    """
    weights = pretrained or "random"
    kwargs: dict = {}
    model_id = name
    if pretrained and pretrained.startswith("hf-hub:"):
        model_id = pretrained
    elif pretrained and (Path(pretrained).expanduser().is_file() or _looks_like_path(pretrained)):
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise SavltError(
                f"model.pretrained: checkpoint file {path} does not exist; give a file, "
                "an open_clip tag or an hf-hub: id"
            )
        kwargs["pretrained"] = str(path)
    elif pretrained:
        if not name.startswith("hf-hub:"):
            tags = open_clip.list_pretrained_tags_by_model(name)
            if pretrained not in tags:
                raise SavltError(
                    f"model.pretrained: '{pretrained}' is not an open_clip tag for {name}; "
                    f"known tags: {tags or 'none'} (or give a checkpoint file / hf-hub: id)"
                )
        kwargs["pretrained"] = pretrained
    if not name.startswith("hf-hub:") and name not in open_clip.list_models():
        raise SavltError(
            f"model.name: unknown open_clip model '{name}'; try {DEFAULT_MODEL}, ViT-B-16 or "
            "an hf-hub: id"
        )
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            model = open_clip.create_model(model_id, **kwargs)
    except (RuntimeError, OSError, ValueError, KeyError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SavltError(
            f"model: could not load {model_id} with weights '{weights}': {first} "
            "(offline? point model.pretrained at a local checkpoint file)"
        ) from exc
    if weights == "random" and not model_id.startswith("hf-hub:"):
        log.warning(
            "No pretrained weights: %s is randomly initialised (seed %d). Its text anchors "
            "carry no language meaning; set model.pretrained for real CLIP weights or "
            "model.text_tower: minilm for a pretrained offline text tower.",
            model_id,
            init_seed,
        )
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    pp = open_clip.get_model_preprocess_cfg(model)
    size = pp.get("size", 224)
    size = size[0] if isinstance(size, (tuple, list)) else size
    return Backbone(
        model=model,
        tokenizer=open_clip.get_tokenizer(model_id),
        model_id=model_id,
        weights=weights,
        image_size=int(size),
        mean=tuple(pp.get("mean", open_clip.OPENAI_DATASET_MEAN)),
        std=tuple(pp.get("std", open_clip.OPENAI_DATASET_STD)),
        fingerprint=fingerprint_tensors(model.state_dict().items()),
    )


def fingerprint_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """A short SHA-256 over names, shapes and exact bytes: equal only for identical weights."""
    h = hashlib.sha256()
    for name, tensor in sorted(named, key=lambda kv: kv[0]):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def vision_tower(model: nn.Module) -> VisionTower:
    """Describe the vision tower of an open_clip model, or say why it is not supported."""
    visual = model.visual
    if isinstance(visual, VisionTransformer):
        if visual.attn_pool is not None or visual.final_ln_after_pool:
            raise SavltError(
                "model.name: ViTs with attentional or post-pool LayerNorm are not supported"
            )
        proj = visual.proj

        def project(x: torch.Tensor) -> torch.Tensor:
            return x @ proj if proj is not None else x

        n = len(visual.transformer.resblocks)
        return VisionTower(
            embed=visual._embeds,
            blocks=visual.transformer.resblocks,
            norm=visual.ln_post,
            project=project,
            projection_params={"visual.proj": proj} if proj is not None else {},
            attention_modules=[f"visual.transformer.resblocks.{i}.attn" for i in range(n)],
            num_prefix_tokens=1,
            grid=tuple(visual.grid_size),
            width=visual.transformer.width,
        )
    if isinstance(visual, TimmModel) and hasattr(visual.trunk, "blocks"):
        trunk = visual.trunk

        def embed(x: torch.Tensor) -> torch.Tensor:
            x = trunk.patch_embed(x)
            x = trunk._pos_embed(x)
            x = trunk.patch_drop(x)
            return trunk.norm_pre(x)

        head_params = {f"visual.head.{k}": p for k, p in visual.head.named_parameters()}
        n = len(trunk.blocks)
        grid = trunk.patch_embed.grid_size
        return VisionTower(
            embed=embed,
            blocks=trunk.blocks,
            norm=trunk.norm,
            project=visual.head,
            projection_params=head_params,
            attention_modules=[f"visual.trunk.blocks.{i}.attn" for i in range(n)],
            num_prefix_tokens=trunk.num_prefix_tokens,
            grid=(int(grid[0]), int(grid[1])),
            width=trunk.num_features,
        )
    raise SavltError(
        f"model.name: vision tower {type(visual).__name__} is not a ViT; SAVLT needs patch tokens "
        "(use savlt-tiny, ViT-B-16, ViT-L-14 or BiomedCLIP)"
    )
