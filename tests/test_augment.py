"""Scanner randomisation, its consistency term and TENT, on real open_clip + peft models:
the randomiser's draws are seeded, within its stated ranges and wider than the training
sites; the Jensen-Shannon term is zero only for agreeing views and trains; TENT changes
only LayerNorm affine parameters and always restores them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from savlt_model.calibration import Calibration
from savlt_model.config import load_config
from savlt_model.data.augment import EFFECTS, ScannerAugment
from savlt_model.model.adapters import trainable_state
from savlt_model.model.backbone import load_backbone
from savlt_model.model.consistency import jensen_shannon
from savlt_model.model.savlt import SavltModel
from savlt_model.tent import applied, layer_norm_params, tent_state
from savlt_model.train import train_steps
from synthetic.family import training_ranges


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("savlt-tiny")


def _cfg(*overrides: str):
    return load_config(None, ["model.lora.last_n_blocks=2", "model.lora.dropout=0.0", *overrides])


def _bscan(seed: int = 0) -> torch.Tensor:
    """A (3, 96, 128) grey B-scan: dark above a tilted surface, speckled tissue below."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.arange(96.0)[:, None]
    surface = 20 + 0.05 * torch.arange(128.0)[None, :]
    depth = (rows - surface).clamp_min(0) / 96
    img = torch.where(rows >= surface, 0.75 - 0.4 * depth, 0.04)
    img = (img + 0.05 * torch.randn(96, 128, generator=g)).clamp(0, 1)
    return img.expand(3, -1, -1).contiguous()


def test_scanner_draws_are_seeded_within_their_ranges_and_wider_than_the_training_sites():
    aug = ScannerAugment(p=1.0, intensity="percentile")
    torch.manual_seed(0)
    a = [aug.draw() for _ in range(200)]
    torch.manual_seed(0)
    assert [aug.draw() for _ in range(200)] == a
    ranges = aug.ranges()
    for d in a:  # p = 1: every effect fires, every value inside its stated range
        assert len(d) == sum(len(v) for v in EFFECTS.values()) + 1  # resample: y and x
        for key, value in d.items():
            lo, hi = ranges["resample" if key.startswith("resample_") else key]
            assert lo <= value <= hi, key
    # absolute axes: the randomiser spans every training site's value and beyond, both ways
    sites = training_ranges()
    for axis, mine in [
        ("range_db", "range_db"),
        ("noise_db", "noise_db"),
        ("gamma", "gamma"),
        ("layer_contrast", "layer_contrast"),
        ("speckle_looks", "speckle_looks"),
    ]:
        assert ranges[mine][0] < sites[axis][0] and ranges[mine][1] > sites[axis][1], axis
    # axes the training sites do not vary at all (0): the randomiser does
    for axis, mine in [
        ("speckle_grain", "speckle_grain"),
        ("shadow_count", "shadow_count"),
        ("specular", "saturation"),
    ]:
        assert sites[axis] == (0.0, 0.0) and ranges[mine][0] == 0.0 < ranges[mine][1], axis
    # relative axes (a shift or an extra amount on top of the scan's own): a wider spread
    for axis, mine in [("gain_db", "gain_db"), ("attenuation", "attenuation")]:
        spread = ranges[mine][1] - ranges[mine][0]
        assert ranges[mine][0] < 0 < ranges[mine][1] and spread > sites[axis][1] - sites[axis][0]


def test_a_random_scanner_is_seeded_and_stays_a_standardised_grey_bscan():
    image = _bscan()
    aug = ScannerAugment(p=0.5, intensity="percentile")
    torch.manual_seed(0)
    a = aug(image)
    torch.manual_seed(0)
    b = aug(image)
    torch.manual_seed(1)
    c = aug(image)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == image.shape and float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert torch.equal(a[0], a[1])  # still a grey B-scan
    assert torch.equal(aug.apply(image, {}), image)  # nothing fired: unchanged
    assert torch.equal(ScannerAugment(p=0.0)(image), image)


def test_the_consistency_term_is_zero_only_for_agreeing_views_and_has_a_gradient():
    logits = torch.randn(4, 1, 5).expand(4, 3, 5)
    assert float(jensen_shannon(logits)) == pytest.approx(0.0, abs=1e-6)
    moved = logits.detach().clone()
    moved[:, 2] += torch.randn(4, 5)
    moved.requires_grad_(True)
    js = jensen_shannon(moved)
    assert float(js.detach()) > 1e-3
    js.backward()
    assert moved.grad is not None and float(moved.grad.abs().sum()) > 0
    assert float(jensen_shannon(torch.tensor([[[9.0, 0.0], [0.0, 9.0]]]))) <= np.log(2) + 1e-6


def test_training_on_views_adds_the_jsd_to_the_clean_loss(tiny):
    """train_steps on (B, 3 views, 3, H, W) batches: identical views give exactly the plain
    loss of the clean view; differing views a larger loss; both train the model."""
    g = torch.Generator().manual_seed(0)
    clean = torch.rand(8, 3, 128, 128, generator=g)
    labels = torch.arange(8) % 5
    noisy = torch.stack(
        [clean, clean + 0.5 * torch.rand(clean.shape, generator=g), clean.flip(-1)], 1
    )
    same = clean[:, None].expand(-1, 3, -1, -1, -1).contiguous()
    cfg = _cfg("train.batch_size=8", "train.scanner_augment=0.5", "train.consistency_weight=12")
    losses = {}
    for name, data in {"plain": clean, "same": same, "noisy": noisy}.items():
        torch.manual_seed(0)
        model = SavltModel(cfg, tiny)
        before = trainable_state(model)
        losses[name] = train_steps(model, TensorDataset(data, labels), cfg, steps=1, seed=0).loss
        after = trainable_state(model)
        assert any(not torch.equal(before[k], after[k]) for k in before), name
    assert losses["same"] == pytest.approx(losses["plain"], rel=1e-5)
    assert losses["noisy"] > losses["plain"] + 1e-3


def test_tent_changes_only_layernorm_affine_parameters_and_restores_them(tiny):
    torch.manual_seed(0)
    model = SavltModel(_cfg(), tiny).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    site = TensorDataset(torch.rand(12, 3, 128, 128), torch.zeros(12, dtype=torch.long))
    reference = np.zeros(model.classifier().shape[1])
    state = tent_state(model, site, Calibration(reference, temperature=0.5), epochs=2, lr=1e-2)
    norms = layer_norm_params(model)
    assert set(state) == set(norms) and len(norms) == 2 * (2 * 6 + 1)  # ln_1, ln_2 x 6, ln_post
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)  # restored
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert any(not torch.equal(state[k], norms[k]) for k in state)  # TENT moved the norms
    ids = {id(p) for p in norms.values()}
    names = {n for n, p in model.named_parameters() if id(p) in ids}
    images = torch.rand(4, 3, 128, 128)
    plain = model(images).logits
    with applied(model, state):
        inside = model.state_dict()
        changed = {k for k in before if not torch.equal(inside[k], before[k])}
        assert changed and changed <= names  # only LayerNorm weights and biases
        assert not torch.allclose(model(images).logits, plain)
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)
    torch.testing.assert_close(model(images).logits, plain)
