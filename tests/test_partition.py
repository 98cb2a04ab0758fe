"""Which images each simulated hospital holds, and what every method is tested on."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from savlt_model.config import load_config
from savlt_model.data.folders import Sample, scan_center
from savlt_model.data.partition import build_partition, class_proportions, deal_dirichlet
from savlt_model.data.protocol import paper_protocol
from savlt_model.errors import SavltError
from simulation.runner import leave_one_out_configs
from synthetic.write import add_held_out_centres, generate


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = tmp_path_factory.mktemp("protocols") / "data"
    generate(path, seed=1, scale=0.3, progress=False)
    return path


@pytest.fixture(scope="module")
def large_root(tmp_path_factory):
    """Enough images for 50 hospitals at K = 12 (60 K-shot training images)."""
    path = tmp_path_factory.mktemp("many") / "data"
    generate(path, seed=2, scale=0.7, progress=False)
    return path


def _cfg(root, *extra):
    work = root.parent / "work"  # splits and few-shot draws: next to the data, not in it
    return load_config("configs/smoke.yaml", [f"data.root={root}", f"data.work_dir={work}", *extra])


def test_paper_protocol_splits_the_k_shot_set_by_site(root):
    cfg = _cfg(root)
    partition = build_partition(cfg, 42)
    center, tests = paper_protocol(cfg, 42, with_sites=True)
    assert len(partition.hospitals) == 3
    keys = [s.key for h in partition.hospitals for s in h.train]
    assert sorted(keys) == sorted(s.key for s in center.train)  # a partition: no overlap
    assert len(set(keys)) == len(keys)
    for hospital in partition.hospitals:  # each hospital holds exactly its own sites' images
        assert {center.sites[s.key] for s in hospital.train} == set(hospital.name.split("+"))
    # the same test data as the centralised run
    assert {c: [s.key for s in v] for c, v in partition.tests.items()} == {
        c: [s.key for s in v] for c, v in tests.items()
    }


def test_paper_protocol_refuses_more_hospitals_than_sites(root):
    with pytest.raises(SavltError, match="sub-site"):
        build_partition(_cfg(root, "fl.hospitals=4"), 42)


def test_centers_protocol_and_leave_one_out(root):
    cfg = _cfg(root, "fl.partition=centers", "fl.leave_one_out=true")
    partition = build_partition(cfg, 5)
    assert [h.name for h in partition.hospitals] == ["mixed", "xiangya", "huaxi"]
    assert set(partition.tests) == {"mixed", "xiangya", "huaxi"}
    for h in partition.hospitals:  # a hospital never trains on its test images
        assert not {s.key for s in h.train} & {s.key for s in partition.tests[h.name]}
    variants = leave_one_out_configs(cfg)
    assert [v.fl.held_out for v in variants] == ["mixed", "xiangya", "huaxi"]
    held = build_partition(variants[2], 5)
    assert [h.name for h in held.hospitals] == ["mixed", "xiangya"]
    assert list(held.tests) == ["huaxi"]
    assert [s.key for s in held.tests["huaxi"]] == [s.key for s in partition.tests["huaxi"]]


def test_held_out_needs_the_centers_protocol(root):
    with pytest.raises(SavltError, match=r"fl\.partition: centers"):
        _cfg(root, "fl.held_out=huaxi")


def test_held_out_scanner_centres_are_scored_in_every_partition_and_never_a_hospital(root):
    """... except by a leave-one-out refit, which scores only its held-out centre: its run
    scores the styles once, and three refits' scores would read as three seeds of a row."""
    add_held_out_centres(root, seed=1, scale=0.3, names=("scanner_lc",), progress=False)
    every_image = {s.key for s in scan_center(root, "scanner_lc", _cfg(root).task.classes)}
    for extra in ([], ["fl.partition=centers"]):
        partition = build_partition(_cfg(root, "data.held_out_centers=[scanner_lc]", *extra), 5)
        assert "scanner_lc" not in {h.name for h in partition.hospitals}
        assert {s.key for s in partition.tests["scanner_lc"]} == every_image
    loo = _cfg(
        root, "data.held_out_centers=[scanner_lc]", "fl.partition=centers", "fl.leave_one_out=true"
    )
    for refit in leave_one_out_configs(loo):
        assert list(build_partition(refit, 5).tests) == [refit.fl.held_out]
    with pytest.raises(SavltError, match=r"data\.held_out_centers.*test-only"):
        _cfg(root, "data.held_out_centers=[huaxi]")


def _class_skew(hospitals: list[list[Sample]], classes: int) -> float:
    """Mean total-variation distance between each hospital's class mix and the pooled one."""
    pooled = np.bincount([s.label for h in hospitals for s in h], minlength=classes)
    pooled = pooled / pooled.sum()
    tv = []
    for h in hospitals:
        mix = np.bincount([s.label for s in h], minlength=classes) / max(len(h), 1)
        tv.append(0.5 * np.abs(mix - pooled).sum())
    return float(np.mean(tv))


def test_dirichlet_deal_is_a_partition_and_skew_grows_as_alpha_falls():
    samples = [Sample(Path(f"{i}.png"), i % 5, f"c{i % 5}/{i}.png") for i in range(400)]
    skews = []
    for alpha in (0.1, 1.0, 100.0):
        per_seed = []
        for seed in range(5):
            props = class_proportions(5, 20, alpha, [seed])
            dealt = deal_dirichlet(samples, props, [seed, 1], at_least_one=True)
            keys = [s.key for h in dealt for s in h]
            assert sorted(keys) == sorted(s.key for s in samples)  # every image once
            assert min(len(h) for h in dealt) >= 1
            per_seed.append(_class_skew(dealt, 5))
        skews.append(float(np.mean(per_seed)))
    assert skews[0] > skews[1] > skews[2]
    assert skews[0] > 0.5 and skews[2] < 0.1  # strong skew at 0.1, near-iid at 100
    again = deal_dirichlet(samples, class_proportions(5, 20, 0.1, [3]), [3, 1], True)
    assert again == deal_dirichlet(samples, class_proportions(5, 20, 0.1, [3]), [3, 1], True)


@pytest.mark.parametrize("n", [20, 50])
def test_paper_partition_deals_the_k_shot_set_into_many_hospitals(large_root, n):
    cfg = _cfg(large_root, "fl.split=dirichlet", f"fl.hospitals={n}", "data.shots=12")
    partition = build_partition(cfg, 42)
    center, tests = paper_protocol(cfg, 42)
    assert len(partition.hospitals) == n
    assert len({h.name for h in partition.hospitals}) == n
    assert all(h.train for h in partition.hospitals)  # every hospital can train
    train = [s.key for h in partition.hospitals for s in h.train]
    assert sorted(train) == sorted(s.key for s in center.train)  # each image exactly once
    val = [s.key for h in partition.hospitals for s in h.val]
    assert sorted(val) == sorted(s.key for s in center.val)
    assert list(partition.tests) == list(tests)
    same = build_partition(cfg, 42)  # deterministic for a seed, different for another
    assert [[s.key for s in h.train] for h in same.hospitals] == [
        [s.key for s in h.train] for h in partition.hospitals
    ]
    other = build_partition(cfg, 5)
    assert [len(h.train) for h in other.hospitals] != [len(h.train) for h in partition.hospitals]


def test_too_many_hospitals_for_the_images_is_one_line_saying_what_to_change(root):
    with pytest.raises(SavltError, match=r"raise data\.shots or lower fl\.hospitals"):
        build_partition(_cfg(root, "fl.split=dirichlet", "fl.hospitals=50"), 42)  # K=4: 20
    with pytest.raises(SavltError, match=r"fl\.split: dirichlet"):
        build_partition(_cfg(root, "fl.hospitals=20"), 42)  # 3 sub-sites


def test_centers_partition_deals_every_centre_into_as_many_hospitals(root):
    cfg = _cfg(root, "fl.partition=centers", "fl.split=dirichlet", "fl.hospitals=6")
    partition = build_partition(cfg, 5)
    names = [h.name for h in partition.hospitals]
    assert names == [f"{c}-{i}" for c in ("mixed", "xiangya", "huaxi") for i in (0, 1)]
    one_each = build_partition(_cfg(root, "fl.partition=centers"), 5)
    for whole in one_each.hospitals:  # each centre's two hospitals hold exactly its images
        parts = [h for h in partition.hospitals if h.name.startswith(whole.name + "-")]
        assert sorted(s.key for h in parts for s in h.train) == sorted(s.key for s in whole.train)
    assert set(partition.tests) == {"mixed", "xiangya", "huaxi"}
    with pytest.raises(SavltError, match="multiple of 3"):
        build_partition(_cfg(root, "fl.partition=centers", "fl.hospitals=4"), 5)
    loo = _cfg(root, "fl.partition=centers", "fl.split=dirichlet", "fl.hospitals=6")
    held = build_partition(
        leave_one_out_configs(
            dataclasses.replace(loo, fl=dataclasses.replace(loo.fl, leave_one_out=True))
        )[0],
        5,
    )
    assert len(held.hospitals) == 4 and list(held.tests) == ["mixed"]
