"""The consistency term of scanner randomisation (AugMix, Hendrycks et al. 2020).

Why (issue #24): randomised scanners alone teach the classes under many scanners; asking
the prediction itself not to move when only the scanner changes teaches the model to
ignore the scanner. Per scan: cross-entropy on the clean view, plus ``weight`` times the
Jensen-Shannon divergence of the class probabilities of the clean view and two views
re-imaged by random scanners (``train.consistency_weight``).
"""

from __future__ import annotations

from dataclasses import fields

import torch
import torch.nn.functional as F

from savlt_model.model.savlt import Batch, SavltModel

CONSISTENCY_VIEWS = 3  # the clean view and two randomised ones, as AugMix


def jensen_shannon(logits: torch.Tensor) -> torch.Tensor:
    """Mean over scans of the Jensen-Shannon divergence of V views' class probabilities;
    ``logits`` is (B, V, C). 0 when every view predicts the same."""
    p = F.softmax(logits.float(), dim=-1)
    log_mixture = p.mean(dim=1, keepdim=True).clamp(1e-7, 1.0).log()
    kl = (p * (p.clamp_min(1e-12).log() - log_mixture)).sum(dim=-1)  # (B, V)
    return kl.mean(dim=1).mean()


def consistency_loss(
    model: SavltModel,
    views: torch.Tensor,
    labels: torch.Tensor,
    feature_shift: torch.Tensor | None,
    anchor_weight: float,
    weight: float,
) -> torch.Tensor:
    """The model's loss on the clean views plus ``weight`` x JSD over all views, for a
    (B, V, 3, H, W) batch whose view 0 is clean; one forward pass over every view."""
    b, v = views.shape[:2]
    out = model(views.flatten(0, 1), feature_shift)
    clean = Batch(**{f.name: getattr(out, f.name).unflatten(0, (b, v))[:, 0] for f in fields(out)})
    js = jensen_shannon(out.logits.unflatten(0, (b, v)))
    return model.loss(clean, labels, anchor_weight) + weight * js
