"""A simulated hospital that labels differently (``fl.bad_hospital``), on its own labels.

The corruption happens where a real hospital's labels would come from: its own train and
val images, before anything trains on them. So the federation, the pooled ``central``
baseline and ``local`` all see the same labels (the pooled set is the hospitals' sets
together), and the test sets, which no hospital labels, are never touched.

- ``noise``: a share of the hospital's train and val labels (``round(share x n)`` of each,
  chosen at random) set to a uniformly drawn other class;
- ``swap``: every label of the two classes of ``pair`` exchanged, a systematic grading
  convention (the default pair has opposite binary risk).

The draw is seeded by the job seed and ``fl.bad_hospital.seed``, so a run is reproduced
from its config; what was done is recorded with every result (:func:`describe`).
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np

from savlt_model.config import Config
from savlt_model.data.folders import Sample

SALT = zlib.crc32(b"fl.bad_hospital")  # its own stream: no other seeded draw repeats it


def swap_pair(cfg: Config) -> tuple[int, int]:
    """The two class indices a ``swap`` exchanges: ``fl.bad_hospital.pair``, or by default
    the first high-risk class and the first class that is not (opposite binary risk)."""
    classes, positive = cfg.task.classes, cfg.task.positive
    pair = cfg.fl.bad_hospital.pair or [
        positive[0],
        next(c for c in classes if c not in positive),
    ]
    return classes.index(pair[0]), classes.index(pair[1])


def relabel(samples: list[Sample], cfg: Config, seed: int, part: int) -> tuple[list[Sample], int]:
    """(``samples`` with this hospital's labels, how many changed); ``part`` keeps the train
    (1) and val (2) draws apart."""
    bad = cfg.fl.bad_hospital
    labels = np.array([s.label for s in samples], dtype=int)
    new = labels.copy()
    if bad.kind == "swap":
        a, b = swap_pair(cfg)
        new[labels == a], new[labels == b] = b, a
    elif bad.kind == "noise":
        rng = np.random.default_rng([seed, bad.seed, SALT, part])
        n_classes = len(cfg.task.classes)
        chosen = rng.choice(len(samples), int(np.floor(bad.share * len(samples) + 0.5)), False)
        new[chosen] = (labels[chosen] + rng.integers(1, n_classes, len(chosen))) % n_classes
    out = [
        s if s.label == y else dataclasses.replace(s, label=int(y))
        for s, y in zip(samples, new, strict=True)
    ]
    return out, int((new != labels).sum())


def describe(cfg: Config, name: str, changed: dict[str, int], sizes: dict[str, int]) -> dict:
    """What a run's records say about its bad hospital (``fl.bad_hospital`` as applied)."""
    bad = cfg.fl.bad_hospital
    out = {"kind": bad.kind, "hospital": bad.hospital, "name": name, "seed": bad.seed}
    if bad.kind == "noise":
        out["share"] = bad.share
    else:
        out["pair"] = [cfg.task.classes[i] for i in swap_pair(cfg)]
    return {**out, "changed": changed, "of": sizes}
