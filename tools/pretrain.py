"""Contrastive pretraining of the offline ``savlt-tiny`` backbone on synthetic image-text pairs.

Randomly initialised, ``savlt-tiny``'s text anchors carry no meaning, so the text branch of
SAVLT starts from noise. This module gives it a CLIP-like starting point without any
download: every weight of ``savlt-tiny`` is trained contrastively on B-scans paired with the
class descriptions of ``configs/prompts/cervical_oct.yaml``.

No leakage into the evaluation: the corpus is rendered in memory with a fresh, randomised
scanner profile per image, drawn from ranges wider than every site of
:mod:`synthetic.corpus` (a "many scanners" corpus, like the web data real CLIP saw), from a
seed stream that :func:`synthetic.write.generate` never uses. No image of the evaluation
centres, and none of their fixed scanner profiles, is ever seen. The tissue signatures are
the generator's own, so the descriptions do describe the pictures; that is what makes the
anchors meaningful, and also why zero-shot accuracy must be measured before this is trusted.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torchvision.transforms import InterpolationMode, v2
from tqdm.auto import tqdm

from savlt_model.atomic import atomic_write, write_json
from savlt_model.config import CERVICAL_CLASSES, resolve_path
from savlt_model.data.tissue import SurfaceDetector
from savlt_model.model.backbone import (
    DEFAULT_MODEL,
    fingerprint_tensors,
    load_backbone,
    vision_tower,
)
from savlt_model.model.roi import patch_keep_mask, roi_top
from savlt_model.model.text import load_descriptions

PROMPTS = "configs/prompts/cervical_oct.yaml"


class Corpus(Protocol):
    """Class-labelled grey B-scans, e.g. :func:`synthetic.corpus.make_corpus`'s."""

    images: torch.Tensor  # (N, 1, size, size) uint8
    labels: torch.Tensor  # (N,) class index into CERVICAL_CLASSES
    info: dict[str, Any]  # how it was drawn, kept in the summary


# (number of images, image size, seed, progress, description) -> the corpus
MakeCorpus = Callable[..., Corpus]


def caption_sets(prompts: Path) -> dict[str, list[str]]:
    """Every prompt set of the file, each one description per class in CERVICAL_CLASSES order."""
    sets = yaml.safe_load(Path(prompts).read_text(encoding="utf-8"))
    return {name: load_descriptions(prompts, name, list(CERVICAL_CLASSES)) for name in sets}


def multi_positive_clip_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    image_labels: torch.Tensor,
    text_labels: torch.Tensor,
    scale: torch.Tensor,
) -> torch.Tensor:
    """Symmetric CLIP loss where every image-caption pair of the same class is a positive.

    With five classes a batch holds many images of one class; plain CLIP loss would push
    them away from their own description as false negatives.
    """
    logits = scale * image @ text.t()
    pos = (image_labels[:, None] == text_labels[None, :]).float()
    to_text = -(F.log_softmax(logits, dim=1) * pos / pos.sum(1, keepdim=True)).sum(1).mean()
    # a caption whose class is absent from the batch has no target: clamp, then leave it out
    per_image = pos.t() / pos.t().sum(1, keepdim=True).clamp_min(1)
    to_image = -(F.log_softmax(logits.t(), dim=1) * per_image).sum(1)[pos.sum(0) > 0].mean()
    return 0.5 * (to_text + to_image)


class _Augment:
    """Fine-tuning's augmentation (random resized crop, flip), then the backbone's normalisation."""

    def __init__(self, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.crop = v2.Compose(
            [
                v2.RandomResizedCrop(
                    size, scale=(0.75, 1.0), interpolation=InterpolationMode.BICUBIC, antialias=True
                ),
                v2.RandomHorizontalFlip(),
            ]
        )
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    def __call__(self, grey: torch.Tensor, train: bool) -> torch.Tensor:
        if train:
            grey = torch.stack([self.crop(g) for g in grey])
        return (grey.expand(-1, 3, -1, -1).float() / 255.0 - self.mean) / self.std


def _image_embeddings(
    model: torch.nn.Module, detector: SurfaceDetector, images: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised (CLS, ROI-mean) embeddings from one pass through the vision tower.

    CLS is CLIP's own image embedding; the ROI mean (patch tokens inside the tissue box,
    averaged, projected) is exactly what SAVLT's attention pool computes at initialisation,
    so training it makes the anchors meaningful for the feature SAVLT actually uses.
    """
    tower = vision_tower(model)
    keep = patch_keep_mask(roi_top(detector(images)), tower.grid[0])
    x = tower.embed(images)
    for block in tower.blocks:
        x = block(x)
    x = tower.norm(x)
    w = keep.unsqueeze(-1).to(x.dtype)
    roi = (x[:, tower.num_prefix_tokens :] * w).sum(1) / w.sum(1)
    return F.normalize(tower.project(x[:, 0]), dim=-1), F.normalize(tower.project(roi), dim=-1)


@torch.no_grad()
def _zero_shot(
    model: torch.nn.Module,
    detector: SurfaceDetector,
    augment: _Augment,
    corpus: Corpus,
    text: torch.Tensor,
    text_labels: torch.Tensor,
) -> dict[str, float]:
    """Held-out accuracy of the nearest class description (mean cosine over the prompt sets)."""
    model.eval()
    cls, roi = _image_embeddings(model, detector, augment(corpus.images, train=False))
    onehot = F.one_hot(text_labels, len(CERVICAL_CLASSES)).float()
    return {
        name: round(
            100.0 * float(((f @ text.t() @ onehot).argmax(1) == corpus.labels).float().mean()), 2
        )
        for name, f in (("cls", cls), ("roi_mean", roi))
    }


def pretrain(
    out: Path,
    make_corpus: MakeCorpus,
    seed: int = 0,
    images: int = 1200,
    epochs: int = 5,
    progress: bool = True,
    batch_size: int = 50,
    lr: float = 5e-4,
    prompts: str | Path = PROMPTS,
    heldout: int = 250,
) -> dict:
    """Train every ``savlt-tiny`` weight contrastively; write OUT and OUT.json; return the summary.

    Starts from the seeded random init of ``load_backbone("savlt-tiny")``, so the result is
    a function of ``seed`` and the settings only. OUT is an open_clip state dict, loadable
    with ``load_backbone("savlt-tiny", str(OUT))`` (``model.pretrained: OUT``).
    """
    t0 = time.perf_counter()
    out = Path(out)
    backbone = load_backbone(DEFAULT_MODEL)
    model, size = backbone.model, backbone.image_size
    sets = caption_sets(resolve_path(prompts))
    captions = [c for descriptions in sets.values() for c in descriptions]
    tokens = backbone.tokenizer(captions)
    text_labels = torch.arange(len(CERVICAL_CLASSES)).repeat(len(sets))
    corpus = make_corpus(images + heldout, size, seed, progress, desc="pretrain corpus")
    train_images, train_labels = corpus.images[:images], corpus.labels[:images]
    test = dataclasses.replace(
        corpus,
        images=corpus.images[images:],
        labels=corpus.labels[images:],
        profiles=corpus.profiles[images:],
    )
    render_s = time.perf_counter() - t0

    detector = SurfaceDetector(backbone.mean, backbone.std)
    augment = _Augment(size, backbone.mean, backbone.std)
    per_epoch = images // batch_size
    steps = epochs * per_epoch
    warmup = max(1, steps // 10)
    model.requires_grad_(True).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.05)
    max_scale = math.log(100.0)  # CLIP's clamp on the learned temperature
    losses: list[float] = []
    t1 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        bar = tqdm(total=steps, desc="pretrain", unit="step", disable=not progress)
        for step in range(steps):
            if step % per_epoch == 0:
                order = torch.randperm(images)
            idx = order[(step % per_epoch) * batch_size : (step % per_epoch + 1) * batch_size]
            frac = (step - warmup) / max(1, steps - warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr * min((step + 1) / warmup, 0.5 * (1 + math.cos(math.pi * frac)))
            cls, roi = _image_embeddings(model, detector, augment(train_images[idx], train=True))
            text = F.normalize(model.encode_text(tokens), dim=-1)
            scale = model.logit_scale.exp()
            labels = train_labels[idx]
            loss = 0.5 * (
                multi_positive_clip_loss(cls, text, labels, text_labels, scale)
                + multi_positive_clip_loss(roi, text, labels, text_labels, scale)
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, max_scale)
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            bar.update()
        bar.close()
    train_s = time.perf_counter() - t1
    with torch.no_grad():
        text = F.normalize(model.encode_text(tokens), dim=-1)
    zero_shot = _zero_shot(model, detector, augment, test, text, text_labels)

    state = model.state_dict()
    atomic_write(out, lambda p: torch.save(state, p))
    summary = {
        "model": DEFAULT_MODEL,
        "weights": str(out),
        "fingerprint": fingerprint_tensors(state.items()),
        "init_fingerprint": backbone.fingerprint,
        "seed": seed,
        "images": images,
        "epochs": epochs,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "prompts": str(prompts),
        "prompt_sets": list(sets),
        **corpus.info,
        "loss_first": round(losses[0], 4) if losses else None,
        "loss_last": round(float(np.mean(losses[-per_epoch:])), 4) if losses else None,
        "logit_scale": round(float(model.logit_scale.detach().exp()), 3),
        "heldout_images": heldout,
        "heldout_zero_shot_acc": zero_shot,
        "timings_s": {
            "render": round(render_s, 1),
            "train": round(train_s, 1),
            "total": round(time.perf_counter() - t0, 1),
        },
        "torch_threads": torch.get_num_threads(),
    }
    write_json(out.with_name(out.name + ".json"), summary)
    return summary
