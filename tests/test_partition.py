"""Which images each simulated hospital holds, and what every method is tested on."""

from __future__ import annotations

import pytest

from savlt_model.config import load_config
from savlt_model.data.folders import scan_center
from savlt_model.data.partition import build_partition
from savlt_model.data.protocol import paper_protocol
from savlt_model.errors import SavltError
from simulation.runner import leave_one_out_configs
from simulation.synth import add_held_out_centres, generate


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = tmp_path_factory.mktemp("protocols") / "data"
    generate(path, seed=1, scale=0.3, progress=False)
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


def test_held_out_scanner_centres_are_scored_everywhere_and_never_a_hospital(root):
    add_held_out_centres(root, seed=1, scale=0.3, names=("scanner_lc",), progress=False)
    every_image = {s.key for s in scan_center(root, "scanner_lc", _cfg(root).task.classes)}
    for extra in ([], ["fl.partition=centers"]):
        partition = build_partition(_cfg(root, "data.held_out_centers=[scanner_lc]", *extra), 5)
        assert "scanner_lc" not in {h.name for h in partition.hospitals}
        assert {s.key for s in partition.tests["scanner_lc"]} == every_image
    with pytest.raises(SavltError, match=r"data\.held_out_centers.*test-only"):
        _cfg(root, "data.held_out_centers=[huaxi]")
