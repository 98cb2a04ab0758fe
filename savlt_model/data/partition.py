"""Hospital partitions: which images each simulated hospital holds, and what is tested.

The ClientApp (which hospital am I?) and the server (what do I score?) both read it.

- ``paper``: the original protocol. The mixed centre's K-shot train (and val) set is split
  into ``fl.hospitals`` hospitals; tests are the mixed test split plus every external
  centre, i.e. exactly the test data of the centralised run.
- ``centers``: every centre (mixed and the externals) has its own train/val/test split and
  is split into ``fl.hospitals / centres`` hospitals (one each by default); each centre's
  test split is scored. With ``fl.held_out`` set, that centre holds no hospital and only
  its test split is scored (leave-one-centre-out).

How a centre is split (``fl.split``): ``sites`` deals its sub-sites (``sites.json``)
round-robin into hospitals; ``dirichlet`` deals its images at random with a class skew:
class c goes to the hospitals in proportions drawn from Dirichlet(``fl.dirichlet_alpha``),
seeded by the job seed, so 20 or 50 virtual hospitals are possible. Either way every
hospital holds at least one training image, or the run stops saying what to change.

With ``fl.bad_hospital`` one hospital then labels its own train and val images differently
(:mod:`savlt_model.data.corruption`); what was changed is the partition's ``bad_hospital``.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from savlt_model.config import Config
from savlt_model.data.corruption import describe, relabel
from savlt_model.data.folders import Sample
from savlt_model.data.protocol import (
    CenterData,
    data_root,
    external_test,
    paper_protocol,
    prepare_center,
)
from savlt_model.errors import SavltError


@dataclass
class Hospital:
    name: str
    train: list[Sample]
    val: list[Sample]


@dataclass
class Partition:
    hospitals: list[Hospital]
    tests: dict[str, list[Sample]]
    bad_hospital: dict | None = None  # fl.bad_hospital as applied (corruption.describe)

    @property
    def pooled_train(self) -> list[Sample]:
        """What centralised training sees: every hospital's images together."""
        return [s for h in self.hospitals for s in h.train]

    @property
    def train_sizes(self) -> list[int]:
        """Each hospital's training images: what a results record's budget counts from."""
        return [len(h.train) for h in self.hospitals]


def _by_site(
    samples: list[Sample], sites: dict[str, str], groups: list[list[str]]
) -> list[list[Sample]]:
    return [[s for s in samples if sites[s.key] in group] for group in groups]


def class_proportions(classes: int, hospitals: int, alpha: float, seed: list[int]) -> np.ndarray:
    """(classes, hospitals): row c is the share of class c each hospital gets, ~ Dir(alpha)."""
    rng = np.random.default_rng(seed)
    return rng.dirichlet(np.full(hospitals, alpha), size=classes)


def deal_dirichlet(
    samples: list[Sample], proportions: np.ndarray, seed: list[int], at_least_one: bool
) -> list[list[Sample]]:
    """Deal ``samples`` into hospitals: class c by row c of ``proportions``.

    With ``at_least_one`` every hospital first gets one image of its most likely class
    that still has one (so no hospital is empty when there are enough images); the rest
    of each class is cut in the proportions (largest remainders), in a seeded order.
    """
    classes, n = proportions.shape
    rng = np.random.default_rng(seed)
    pools = [
        [samples[i] for i in rng.permutation(len(samples)) if samples[i].label == c]
        for c in range(classes)
    ]
    out: list[list[Sample]] = [[] for _ in range(n)]
    if at_least_one:
        for h in rng.permutation(n):
            left = [c for c in range(classes) if pools[c]]
            if not left:
                break
            best = max(left, key=lambda c: proportions[c, h])
            out[h].append(pools[best].pop())
    for c, pool in enumerate(pools):
        exact = proportions[c] * len(pool)
        counts = np.floor(exact).astype(int)
        extra = np.argsort(counts - exact, kind="stable")[: len(pool) - counts.sum()]
        counts[extra] += 1
        start = 0
        for h in range(n):
            out[h].extend(pool[start : start + counts[h]])
            start += counts[h]
    return out


def split_center(cfg: Config, center: CenterData, n: int, seed: int) -> list[Hospital]:
    """One centre's K-shot train and val sets dealt into ``n`` hospitals (``fl.split``)."""
    if cfg.fl.split == "sites":
        assert center.sites is not None  # loaded (or refused) by prepare_center
        names = sorted(set(center.sites.values()))
        if not 1 <= n <= len(names):
            raise SavltError(
                f"fl.hospitals={cfg.fl.hospitals}: fl.split=sites splits {center.name} by "
                f"sub-site and it has {len(names)} sites ({', '.join(names)}); use "
                f"1..{len(names)} hospitals per centre, or fl.split: dirichlet for more"
            )
        groups = [names[i::n] for i in range(n)]  # round-robin when sites outnumber hospitals
        trains = _by_site(center.train, center.sites, groups)
        vals = _by_site(center.val, center.sites, groups)
        hospitals = [
            Hospital("+".join(g), t, v) for g, t, v in zip(groups, trains, vals, strict=True)
        ]
    else:
        if len(center.train) < n:
            raise SavltError(
                f"fl.hospitals={cfg.fl.hospitals}: centre {center.name} has "
                f"{len(center.train)} K-shot training images for {n} hospitals; raise "
                "data.shots or lower fl.hospitals"
            )
        salt = zlib.crc32(center.name.encode())  # every centre draws its own skew
        alpha, classes = cfg.fl.dirichlet_alpha, len(cfg.task.classes)
        props = class_proportions(classes, n, alpha, [seed, salt])
        trains = deal_dirichlet(center.train, props, [seed, salt, 1], at_least_one=True)
        vals = deal_dirichlet(center.val, props, [seed, salt, 2], at_least_one=False)
        width = len(str(n - 1))
        hospitals = [
            Hospital(f"{center.name}-{i:0{width}d}", t, v)
            for i, (t, v) in enumerate(zip(trains, vals, strict=True))
        ]
    empty = [h.name for h in hospitals if not h.train]
    if empty:
        raise SavltError(
            f"hospitals {empty} hold no K-shot training images; raise data.shots or lower "
            "fl.hospitals"
        )
    return hospitals


def build_partition(cfg: Config, seed: int) -> Partition:
    """The hospitals and test sets of ``cfg.fl.partition`` for one seed, with
    ``fl.bad_hospital``'s labels."""
    partition = _partition(cfg, seed)
    if cfg.fl.bad_hospital.kind == "none":
        return partition
    i = cfg.fl.bad_hospital.hospital  # < fl.hospitals, the partition's size (validated)
    good = partition.hospitals[i]
    train, in_train = relabel(good.train, cfg, seed, part=1)
    val, in_val = relabel(good.val, cfg, seed, part=2)
    hospitals = list(partition.hospitals)
    hospitals[i] = Hospital(good.name, train, val)
    changed, sizes = {"train": in_train, "val": in_val}, {"train": len(train), "val": len(val)}
    return Partition(hospitals, partition.tests, describe(cfg, good.name, changed, sizes))


def _partition(cfg: Config, seed: int) -> Partition:
    n = cfg.fl.hospitals
    if cfg.fl.partition == "paper":
        center, tests = paper_protocol(cfg, seed, with_sites=cfg.fl.split == "sites")
        return Partition(split_center(cfg, center, n, seed), tests)
    root = data_root(cfg)
    centers = [cfg.data.train_center, *cfg.data.external_centers]
    held_out = cfg.fl.held_out
    training = [c for c in centers if c != held_out]
    if n < len(training) or n % len(training):
        raise SavltError(
            f"fl.hospitals={n}: the centers partition deals each of its {len(training)} "
            f"centres ({', '.join(training)}) into the same number of hospitals; use a "
            f"multiple of {len(training)}"
        )
    with_sites = cfg.fl.split == "sites" and n > len(training)
    parts = [prepare_center(cfg, root, c, seed, with_sites) for c in centers]
    if n == len(training):  # one hospital per centre, whatever fl.split says
        hospitals = [Hospital(p.name, p.train, p.val) for p in parts if p.name != held_out]
    else:
        hospitals = [
            h
            for p in parts
            if p.name != held_out
            for h in split_center(cfg, p, n // len(training), seed)
        ]
    tests = {p.name: p.test for p in parts if held_out in (None, p.name)}
    # test-only scanner styles, every image; a leave-one-out refit scores its held-out
    # centre only: its run scores the styles once, with every centre's hospitals
    styles = cfg.data.held_out_centers if held_out is None else []
    for center in styles:
        tests[center] = external_test(cfg, root, center)
    return Partition(hospitals, tests)
