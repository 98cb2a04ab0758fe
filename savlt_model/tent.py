"""TENT at a new site: entropy minimisation of the vision tower's LayerNorm affine parameters.

Why (issue #24, Wang et al. 2021): a scanner the model never saw moves the token
statistics every LayerNorm sees; re-fitting only the norms' scale and shift on the site's
unlabelled scans, by making the model's own calibrated predictions confident, is the
smallest change to the model that can follow. It is a candidate for the label-free guard
(:mod:`savlt_model.adaptation`), which checks it like the feature maps, so the change is
fixed and small: :data:`TENT_EPOCHS` passes over the site's scans with Adam at
:data:`TENT_LR`, and the model is always restored afterwards.

Measured on family seed 0 (docs/scanner-shift.md): at lr 1e-3 (TENT's CIFAR setting) it
collapsed every centre's predictions (85-100 % of scans in one class, binary AUC up to
17.6 lower); at 1e-4 it stays within 2.4 points of the unadapted model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from savlt_model.calibration import Calibration
from savlt_model.data.images import ImageSet, make_loader
from savlt_model.model.savlt import SavltModel

TENT_EPOCHS = 2  # passes over the site's unlabelled scans (fixed, not tuned)
TENT_LR = 1e-4  # Adam; measured on family seed 0 (below)
TENT_BATCH = 32
TENT_SEED = 0  # the order of the site's scans


def layer_norm_params(model: SavltModel) -> dict[str, nn.Parameter]:
    """The affine parameters of every LayerNorm in the vision tower (blocks and the final
    norm), by name: all TENT may change."""
    out: dict[str, nn.Parameter] = {}
    modules = [*model.tower.blocks.named_modules(prefix="blocks"), ("norm", model.tower.norm)]
    for name, module in modules:
        if isinstance(module, nn.LayerNorm) and module.elementwise_affine:
            out[f"{name}.weight"] = module.weight
            if module.bias is not None:
                out[f"{name}.bias"] = module.bias
    return out


@contextmanager
def applied(model: SavltModel, state: dict[str, torch.Tensor]) -> Iterator[SavltModel]:
    """The model with these LayerNorm values (:func:`tent_state`) inside the block, and
    exactly as before after it."""
    params = layer_norm_params(model)
    saved = {k: p.detach().clone() for k, p in params.items()}
    try:
        with torch.no_grad():
            for k, v in state.items():
                params[k].copy_(v)
        yield model
    finally:
        with torch.no_grad():
            for k, v in saved.items():
                params[k].copy_(v)


def tent_state(
    model: SavltModel,
    site: ImageSet,
    inductive: Calibration,
    epochs: int = TENT_EPOCHS,
    lr: float = TENT_LR,
) -> dict[str, torch.Tensor]:
    """TENT on the site's unlabelled scans: the adapted LayerNorm values, with the model
    itself left unchanged. The entropy is that of the model's calibrated probabilities
    (temperature and class bias of ``inductive``), the ones the guard judges."""
    params = layer_norm_params(model)
    flags = {p: p.requires_grad for p in model.parameters()}
    device = next(model.parameters()).device
    w = model.classifier().to(device)
    bias = (
        torch.zeros(w.shape[0])
        if inductive.log_bias is None
        else torch.as_tensor(np.asarray(inductive.log_bias))
    )
    bias = bias.float().to(device)
    loader = make_loader(site, min(TENT_BATCH, len(site)), shuffle=True, seed=TENT_SEED)
    state: dict[str, torch.Tensor] = {}
    with applied(model, {}):  # restores the norms whatever happens
        try:
            for p in model.parameters():
                p.requires_grad_(False)
            for p in params.values():
                p.requires_grad_(True)
            optimiser = torch.optim.Adam(params.values(), lr=lr)
            model.eval()  # no dropout: only the norms change
            with torch.enable_grad():
                for _ in range(epochs):
                    for images, _ in loader:
                        f = model.image_features(images.to(device))
                        logp = torch.log_softmax(f @ w.t() / inductive.temperature + bias, -1)
                        entropy = -(logp.exp() * logp).sum(-1).mean()
                        optimiser.zero_grad(set_to_none=True)
                        entropy.backward()
                        optimiser.step()
            state = {k: p.detach().clone() for k, p in params.items()}
        finally:
            for p, flag in flags.items():
                p.requires_grad_(flag)
                p.grad = None
    return state
