"""Contrastive pretraining of savlt-tiny: the corpus it learns from and the file it writes.

The corpus must be reproducible (a pretrained checkpoint is named by its seed) and must
vary its scanners (the point is to see many of them, never the evaluation centres'
fixed profiles); the checkpoint must load through the same path as any ``model.pretrained``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from savlt_model.config import CERVICAL_CLASSES
from savlt_model.model.backbone import load_backbone
from synthetic import centres
from synthetic.corpus import PROFILE_RANGES, make_corpus
from tools.pretrain import multi_positive_clip_loss, pretrain


def test_corpus_is_deterministic_per_seed_and_varies_its_scanners() -> None:
    a, b, other = (make_corpus(10, 64, seed=s) for s in (1, 1, 2))
    assert torch.equal(a.images, b.images) and a.profiles == b.profiles
    assert not torch.equal(a.images, other.images)
    assert a.images.shape == (10, 1, 64, 64) and a.images.dtype == torch.uint8
    assert a.labels.tolist() == [i % len(CERVICAL_CLASSES) for i in range(10)]
    for field in ("width", "speckle_looks", "gain_db", "attenuation", "blur_x"):
        values = [getattr(p, field) for p in a.profiles]
        assert len(set(values)) > 1, field
        lo, hi = PROFILE_RANGES[field]
        assert all(lo <= v <= hi for v in values), field
    assert not set(a.profiles) & set(centres.PROFILES.values())


def test_profile_ranges_cover_every_site_profile() -> None:
    """Wider than all sites, so the corpus singles out no centre (evaluation ones included)."""
    for prof in centres.PROFILES.values():
        for f in dataclasses.fields(prof):
            lo, hi = PROFILE_RANGES[f.name]
            assert lo <= getattr(prof, f.name) <= hi, f.name


def test_multi_positive_loss_rewards_class_alignment() -> None:
    text = torch.nn.functional.normalize(torch.randn(10, 16), dim=-1)
    text_labels = torch.arange(5).repeat(2)
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 1])
    aligned = torch.nn.functional.normalize(text[labels] + text[labels + 5], dim=-1)
    shuffled = aligned[torch.tensor([1, 2, 3, 4, 0, 1, 2])]
    scale = torch.tensor(20.0)
    good = multi_positive_clip_loss(aligned, text, labels, text_labels, scale)
    bad = multi_positive_clip_loss(shuffled, text, labels, text_labels, scale)
    assert torch.isfinite(good) and good < bad
    absent = aligned[:3].clone().requires_grad_(True)  # classes 3 and 4 are not in the batch
    loss = multi_positive_clip_loss(absent, text, labels[:3], text_labels, scale)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(absent.grad).all()


def test_pretrain_writes_weights_that_load_backbone_accepts(tmp_path: Path) -> None:
    out = tmp_path / "tiny.pt"
    summary = pretrain(
        out, make_corpus, seed=3, images=8, epochs=1, batch_size=4, heldout=5, progress=False
    )
    loaded, init = load_backbone("savlt-tiny", str(out)), load_backbone("savlt-tiny")
    assert loaded.fingerprint == summary["fingerprint"] != init.fingerprint
    assert summary["init_fingerprint"] == init.fingerprint
    assert all(torch.isfinite(p).all() for p in loaded.model.parameters())
    assert summary["steps"] == 2
    sidecar = json.loads((tmp_path / "tiny.pt.json").read_text())
    assert sidecar == json.loads(json.dumps(summary))
    assert set(sidecar["timings_s"]) == {"render", "train", "total"}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
