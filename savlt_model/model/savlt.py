"""The SAVLT model: frozen CLIP + LoRA + ROI attention pooling + dual alignment.

Image path: patch tokens of the (LoRA-adapted) vision tower -> tissue ROI from a mask ->
ROI attention pooling -> CLIP's visual projection -> L2 norm = f.
Class path: text anchors T (descriptions through the text tower) and learnable prototypes P.
Loss: ``(1 - a) CE(s f T^T, y) + a CE(s f P^T, y)``; inference fuses both branches.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from savlt_model.config import Config, resolve_path
from savlt_model.model.adapters import apply_global_state, inject_lora, snapshot_base_weights
from savlt_model.model.backbone import Backbone, vision_tower
from savlt_model.model.roi import (
    RoiAttentionPool,
    build_mask_source,
    mask_patch_tokens,
    patch_keep_mask,
    roi_top,
)
from savlt_model.model.text import TextEncoder, load_descriptions, sentence_anchors


@dataclass
class Batch:
    """What one forward pass produced, for losses, metrics and anchor agreement."""

    features: torch.Tensor  # (B, d) L2-normalised image features
    text_logits: torch.Tensor  # (B, C)
    proto_logits: torch.Tensor  # (B, C)
    logits: torch.Tensor  # (B, C) fused


class SavltModel(nn.Module):
    """Everything a hospital trains lives here; the backbone weights stay frozen."""

    def __init__(self, cfg: Config, backbone: Backbone) -> None:
        super().__init__()
        clip = copy.deepcopy(backbone.model)  # peft injects in place; keep the cached one pristine
        tower = vision_tower(clip)
        m = cfg.model
        self.classes = list(cfg.task.classes)
        self.positive = [self.classes.index(c) for c in cfg.task.positive]
        self.descriptions = load_descriptions(
            resolve_path(cfg.task.prompts), cfg.task.prompt_set, self.classes
        )
        self.backbone_id = backbone.model_id
        self.backbone_fingerprint = backbone.fingerprint
        self.align_weight = m.align_weight
        self.search_from = m.roi.search_from
        self.intermediate_masking = m.roi.intermediate_masking and m.roi.source != "none"
        self.grid = tower.grid
        self.num_prefix = tower.num_prefix_tokens

        tokens = backbone.tokenizer(self.descriptions)
        with torch.no_grad():  # before LoRA exists: T comes from a frozen text tower only
            if m.text_tower == "minilm":
                dim = tower.project(torch.zeros(1, tower.width)).shape[-1]
                anchors, text_id = sentence_anchors(self.descriptions, dim)
            else:
                anchors = F.normalize(clip.encode_text(tokens), dim=-1)
                text_id = tokens.numpy().tobytes()
        self.register_buffer("anchors", anchors)  # frozen T: the centre-invariant reference
        # T is a function of frozen weights and the descriptions: hash those (the text
        # tower's weights hash and the descriptions, or the backbone and the tokens: exact on
        # any hardware) rather than T's floats (which differ in the last bits).
        digest = hashlib.sha256(f"{backbone.fingerprint}|{'|'.join(self.classes)}|".encode())
        digest.update(text_id.encode() if isinstance(text_id, str) else text_id)
        self.anchor_fingerprint = digest.hexdigest()[:16]

        self.clip = inject_lora(clip, tower, m.lora)
        self.tower = tower  # a plain dataclass of references into self.clip (not registered)
        for p in tower.projection_params.values():
            p.requires_grad_(m.train_visual_proj)
        masker = build_mask_source(m.roi, backbone.mean, backbone.std)
        self.masker = masker.requires_grad_(False) if masker is not None else None
        self.roi_pool = RoiAttentionPool(tower.width, m.roi.heads)
        self.text = TextEncoder(clip, tokens, m.prompt_context)
        self.text_is_frozen = not (m.lora.text or m.prompt_context)
        self.prototypes = nn.Parameter(anchors.clone())  # model.prototype_init: anchors
        if m.prototype_init == "orthogonal":
            nn.init.orthogonal_(self.prototypes)
        self.register_buffer("logit_scale", clip.logit_scale.detach().exp().clone())
        self.base_weights = snapshot_base_weights(self)  # plain dict: not in the state_dict

    def load_global_state(self, state: dict[str, torch.Tensor]) -> None:
        """Take a server state (payload + FedEx residuals); exact for a model reused per round."""
        apply_global_state(self, state, self.base_weights)

    def roi_keep(self, images: torch.Tensor) -> torch.Tensor:
        """(B, N) bool: patch tokens lying fully inside the tissue ROI box."""
        n = self.grid[0] * self.grid[1]
        if self.masker is None:
            return torch.ones(images.shape[0], n, dtype=torch.bool, device=images.device)
        # float32 outside autocast: the mask thresholds (histograms, Otsu) need full precision
        with torch.no_grad(), torch.autocast(images.device.type, enabled=False):
            top = roi_top(self.masker(images.float()), self.search_from)
        return patch_keep_mask(top, self.grid[0]).to(images.device)

    def patch_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(normed patch tokens (B, N, width), ROI keep mask (B, N)) after the last block."""
        keep = self.roi_keep(images)
        t = self.tower
        x = t.embed(images)
        if self.intermediate_masking:
            for block in t.blocks:
                x = mask_patch_tokens(block(x), keep)
        else:
            for block in t.blocks:
                x = block(x)
        return t.norm(x)[:, self.num_prefix :], keep

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        tokens, keep = self.patch_tokens(images)
        return F.normalize(self.tower.project(self.roi_pool(tokens, keep)), dim=-1)

    def class_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, P): current text embeddings and normalised prototypes."""
        text = self.anchors if self.text_is_frozen else self.text(self.clip.base_model.model)
        return text, F.normalize(self.prototypes, dim=-1)

    @torch.no_grad()
    def classifier(self) -> torch.Tensor:
        """(C, d) W with fused logits = f W^T: s ((1 - a) T + a P). Post-hoc calibration
        works on (f, W), so every step is exact without another forward pass."""
        text, protos = self.class_embeddings()
        a = self.align_weight
        return (self.logit_scale * ((1 - a) * text + a * protos)).float()

    def forward(self, images: torch.Tensor, feature_shift: torch.Tensor | None = None) -> Batch:
        """``feature_shift`` (d,): added to f before it is normalised again, i.e. the
        re-centring f - mean_site + reference of :class:`savlt_model.calibration.Calibration`
        applied in training (``fl.feature_centring``)."""
        f = self.image_features(images)
        if feature_shift is not None:
            f = F.normalize(f + feature_shift, dim=-1)
        text, protos = self.class_embeddings()
        s, a = self.logit_scale, self.align_weight
        text_logits, proto_logits = s * f @ text.t(), s * f @ protos.t()
        fused = (1 - a) * text_logits + a * proto_logits
        return Batch(f, text_logits, proto_logits, fused)

    def loss(self, out: Batch, labels: torch.Tensor, anchor_weight: float = 0.0) -> torch.Tensor:
        """Dual alignment, plus (text-anchored training) prototypes pulled toward T."""
        a = self.align_weight
        loss = (1 - a) * F.cross_entropy(out.text_logits, labels) + a * F.cross_entropy(
            out.proto_logits, labels
        )
        if anchor_weight:
            protos = F.normalize(self.prototypes, dim=-1)
            target = torch.arange(len(self.classes), device=labels.device)
            loss = loss + anchor_weight * F.cross_entropy(
                self.logit_scale * protos @ self.anchors.t(), target
            )
        return loss
