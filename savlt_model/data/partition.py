"""Hospital partitions: which images each simulated hospital holds, and what is tested.

The ClientApp (which hospital am I?) and the server (what do I score?) both read it.

- ``paper``: the original protocol. The mixed centre's K-shot train (and val) set is split by
  sub-site into hospitals; tests are the mixed test split plus every external centre, i.e.
  exactly the test data of the centralised run.
- ``centers``: every centre (mixed and the externals) is a hospital with its own
  train/val/test split; each centre's test split is scored. With ``fl.held_out`` set, that
  centre holds no hospital and only its test split is scored (leave-one-centre-out).
"""

from __future__ import annotations

from dataclasses import dataclass

from savlt_model.config import Config
from savlt_model.data.folders import Sample
from savlt_model.data.protocol import data_root, external_test, paper_protocol, prepare_center
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

    @property
    def pooled_train(self) -> list[Sample]:
        """What centralised training sees: every hospital's images together."""
        return [s for h in self.hospitals for s in h.train]


def _by_site(
    samples: list[Sample], sites: dict[str, str], groups: list[list[str]]
) -> list[list[Sample]]:
    return [[s for s in samples if sites[s.key] in group] for group in groups]


def build_partition(cfg: Config, seed: int) -> Partition:
    """The hospitals and test sets of ``cfg.fl.partition`` for one seed."""
    n = cfg.fl.hospitals
    if cfg.fl.partition == "paper":
        center, tests = paper_protocol(cfg, seed, with_sites=True)
        assert center.sites is not None
        site_names = sorted(set(center.sites.values()))
        if not 1 <= n <= len(site_names):
            raise SavltError(
                f"fl.hospitals={n}: the paper partition splits {cfg.data.train_center} by sub-site "
                f"and it has {len(site_names)} sites ({', '.join(site_names)}); "
                f"use 1..{len(site_names)}"
            )
        groups = [site_names[i::n] for i in range(n)]  # round-robin when sites outnumber hospitals
        trains = _by_site(center.train, center.sites, groups)
        vals = _by_site(center.val, center.sites, groups)
        hospitals = [
            Hospital("+".join(g), t, v) for g, t, v in zip(groups, trains, vals, strict=True)
        ]
        empty = [h.name for h in hospitals if not h.train]
        if empty:
            raise SavltError(f"hospitals {empty} hold no K-shot training images; raise data.shots")
        return Partition(hospitals, tests)
    root = data_root(cfg)
    centers = [cfg.data.train_center, *cfg.data.external_centers]
    parts = [prepare_center(cfg, root, c, seed) for c in centers]
    held_out = cfg.fl.held_out
    hospitals = [Hospital(p.name, p.train, p.val) for p in parts if p.name != held_out]
    if n != len(hospitals):
        raise SavltError(
            f"fl.hospitals={n}: the centers partition has one hospital per centre "
            f"({', '.join(h.name for h in hospitals)})"
        )
    tests = {p.name: p.test for p in parts if held_out in (None, p.name)}
    for center in cfg.data.held_out_centers:  # test-only scanner styles: every image
        tests[center] = external_test(cfg, root, center)
    return Partition(hospitals, tests)
