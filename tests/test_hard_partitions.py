"""Partitions where federation is hard: a hospital that labels differently
(``fl.bad_hospital``), the configs of configs/, and the worst hospital's own metric."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from reporting.report import write_report
from reporting.results import write_results
from savlt_model.atomic import write_text
from savlt_model.config import PROJECT_ROOT, dump_config, load_config
from savlt_model.data.partition import build_partition
from savlt_model.errors import SavltError
from savlt_model.methods import HospitalStats
from savlt_model.methods.text_anchored import text_anchored_weights
from synthetic.write import generate

HARD_CONFIGS = {  # file -> the keys it sets on top of configs/default.yaml
    "centers.yaml": {"fl": {"partition": "centers", "leave_one_out": True}},
    "dirichlet-0.1.yaml": {"fl": {"split": "dirichlet", "dirichlet_alpha": 0.1, "hospitals": 10}},
    "dirichlet-0.5.yaml": {"fl": {"split": "dirichlet", "dirichlet_alpha": 0.5, "hospitals": 10}},
    "noise.yaml": {"fl": {"bad_hospital": {"kind": "noise"}}},
    "swap.yaml": {"fl": {"bad_hospital": {"kind": "swap"}}},
}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = tmp_path_factory.mktemp("hard") / "data"
    generate(path, seed=1, scale=0.3, progress=False)
    return path


def _cfg(root, *extra):
    work = root.parent / "work"
    return load_config("configs/smoke.yaml", [f"data.root={root}", f"data.work_dir={work}", *extra])


def _labels(partition) -> list[tuple[list[int], list[int]]]:
    return [([s.label for s in h.train], [s.label for s in h.val]) for h in partition.hospitals]


def test_noise_changes_exactly_its_share_of_one_hospitals_train_and_val_labels(root):
    clean = build_partition(_cfg(root), 42)
    cfg_keys = ("fl.bad_hospital.kind=noise", "fl.bad_hospital.hospital=1")
    cfg = _cfg(root, *cfg_keys)
    noisy = build_partition(cfg, 42)
    for i, (h0, h1) in enumerate(zip(clean.hospitals, noisy.hospitals, strict=True)):
        assert [s.key for s in h0.train + h0.val] == [s.key for s in h1.train + h1.val]
        for before, after in ((h0.train, h1.train), (h0.val, h1.val)):
            changed = [a.label != b.label for a, b in zip(before, after, strict=True)]
            expected = int(np.floor(0.4 * len(before) + 0.5)) if i == 1 else 0
            assert sum(changed) == expected  # a changed label is always another class
    assert {c: [s.label for s in v] for c, v in noisy.tests.items()} == {
        c: [s.label for s in v] for c, v in clean.tests.items()
    }  # no test label is ever touched
    assert noisy.bad_hospital == {
        "kind": "noise",
        "hospital": 1,
        "name": noisy.hospitals[1].name,
        "seed": 0,
        "share": 0.4,
        "changed": {
            "train": int(np.floor(0.4 * len(noisy.hospitals[1].train) + 0.5)),
            "val": int(np.floor(0.4 * len(noisy.hospitals[1].val) + 0.5)),
        },
        "of": {"train": len(noisy.hospitals[1].train), "val": len(noisy.hospitals[1].val)},
    }
    assert _labels(build_partition(cfg, 42)) == _labels(noisy)  # reproducible from the seed
    reseeded = _cfg(root, *cfg_keys, "fl.bad_hospital.seed=1")
    assert _labels(build_partition(reseeded, 42)) != _labels(noisy)
    assert _labels(build_partition(cfg, 5))[1] != _labels(build_partition(_cfg(root), 5))[1]
    every = build_partition(_cfg(root, "fl.bad_hospital.kind=noise", "fl.bad_hospital.share=1"), 42)
    before, after = clean.hospitals[0].train, every.hospitals[0].train
    assert all(a.label != b.label for a, b in zip(before, after, strict=True))


def test_swap_exchanges_every_label_of_the_pair_at_that_hospital_only(root):
    cfg = _cfg(root, "fl.bad_hospital.kind=swap")
    classes, positive = cfg.task.classes, cfg.task.positive
    clean, swapped = build_partition(_cfg(root), 42), build_partition(cfg, 42)
    a, b = (classes.index(c) for c in swapped.bad_hospital["pair"])
    assert swapped.bad_hospital["pair"] == ["cancer", "cyst"]  # opposite binary risk
    assert (classes[a] in positive) != (classes[b] in positive)
    exchange = {a: b, b: a}
    for i, (h0, h1) in enumerate(zip(clean.hospitals, swapped.hospitals, strict=True)):
        for before, after in ((h0.train, h1.train), (h0.val, h1.val)):
            want = [exchange.get(s.label, s.label) if i == 0 else s.label for s in before]
            assert [s.label for s in after] == want
    held = swapped.hospitals[0]
    n_pair = sum(s.label in (a, b) for s in held.train + held.val)
    assert n_pair > 0 and sum(swapped.bad_hospital["changed"].values()) == n_pair
    # another pair and another hospital: the same rule
    other = build_partition(
        _cfg(
            root,
            "fl.bad_hospital.kind=swap",
            "fl.bad_hospital.hospital=2",
            "fl.bad_hospital.pair=[high-grade_squamous_intraepithelial_lesion, mild_inflammation]",
        ),
        42,
    )
    a, b = classes.index(positive[1]), classes.index("mild_inflammation")
    assert [s.label for s in other.hospitals[2].train] == [
        {a: b, b: a}.get(s.label, s.label) for s in clean.hospitals[2].train
    ]
    assert _labels(other)[:2] == _labels(clean)[:2]


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("fl.bad_hospital.kind=flip", r"'fl\.bad_hospital\.kind' must be one of"),
        ("fl.bad_hospital.hospital=3", r"'fl\.bad_hospital\.hospital' must be in 0\.\.2"),
        ("fl.bad_hospital.share=0", r"'fl\.bad_hospital\.share' must be in \(0, 1\]"),
        ("fl.bad_hospital.share=1.5", r"'fl\.bad_hospital\.share'"),
        ("fl.bad_hospital.pair=[cancer]", r"'fl\.bad_hospital\.pair' must be two different"),
        ("fl.bad_hospital.pair=[cancer, cancer]", r"'fl\.bad_hospital\.pair'"),
        ("fl.bad_hospital.pair=[cancer, polyp]", r"'fl\.bad_hospital\.pair'"),
        ("fl.bad_hospital.colour=red", r"'fl\.bad_hospital\.colour' is unknown"),
    ],
)
def test_bad_hospital_keys_are_refused_with_the_key_named(override, match):
    with pytest.raises(SavltError, match=match):
        load_config("configs/smoke.yaml", [override])


def test_bad_hospital_refuses_leave_one_out(root):
    with pytest.raises(SavltError, match=r"not with fl\.leave_one_out"):
        _cfg(root, "fl.partition=centers", "fl.leave_one_out=true", "fl.bad_hospital.kind=swap")


@pytest.mark.parametrize("name", sorted(HARD_CONFIGS))
def test_each_hard_partition_config_is_the_default_plus_its_keys(name):
    """configs/<name> extends configs/default.yaml with only its partition keys (so a
    comparison with the default run isolates the partition)."""
    path = PROJECT_ROOT / "configs" / name
    raw = yaml.safe_load(path.read_text())
    assert raw.pop("base") == "default.yaml" and raw == HARD_CONFIGS[name]
    sets = [f"fl.{key}={json.dumps(value)}" for key, value in HARD_CONFIGS[name]["fl"].items()]
    expected = load_config(PROJECT_ROOT / "configs" / "default.yaml", sets)
    assert load_config(path).to_dict() == expected.to_dict()


@pytest.mark.slow  # one in-process simulation: central, local and text-anchored
@pytest.mark.usefixtures("in_process")
def test_a_swap_run_records_the_bad_hospital_its_weights_and_the_worst_hospital(
    fed_config, tmp_path, monkeypatch, train_replies
):
    """Every method trains on the same swapped labels (central's pooled set is the
    hospitals' sets), every record says what the bad hospital did and carries each
    hospital's own validation accuracy and the worst; the federated job's rounds record
    its weights per class, which are what the weighting gives the recorded evidence."""
    from simulation import baselines
    from simulation.runner import run_simulate

    real = baselines.train_steps
    log = tmp_path / "trained.jsonl"  # the baselines train in forked processes

    def spy(model, train_set, *args, **kwargs):
        with log.open("a") as f:
            f.write(json.dumps([kwargs["desc"], list(train_set.labels)]) + "\n")
        return real(model, train_set, *args, **kwargs)

    monkeypatch.setattr(baselines, "train_steps", spy)
    cfg = fed_config(
        "fl.partition=paper",
        "fl.bad_hospital.kind=swap",
        "fl.server_eval=true",
        "fl.eval_every=0",
        "fl.methods=[central, local, text-anchored]",
        "methods.text_anchored.evidence=class-means",
        "tracking.tensorboard=false",
    )
    records = run_simulate(cfg, tmp_path)
    partition = build_partition(cfg, 42)
    trained = dict(json.loads(line) for line in log.read_text().splitlines())
    assert trained == {
        "central_seed42": [s.label for h in partition.hospitals for s in h.train],
        **{
            f"local_seed42_h{i}": [s.label for s in h.train]
            for i, h in enumerate(partition.hospitals)
        },
    }
    names = [h.name for h in partition.hospitals if h.val]
    for method in ("central", "local", "text-anchored", "central+cal", "text-anchored+cal"):
        mine = [r for r in records if r["method"] == method]
        assert mine, method
        for r in mine:
            assert r["bad_hospital"] == partition.bad_hospital
            accuracy = r["hospital_val_acc_multiclass"]
            assert list(accuracy) == names
            assert r["worst_hospital_val_acc_multiclass"] == min(accuracy.values())
            assert accuracy[r["worst_hospital"]] == min(accuracy.values())

    sent = [m.content.metric_records["metrics"] for m in train_replies]
    assert len(sent) == 3 * cfg.fl.rounds and all("class-feature-sums" in m for m in sent)
    job = json.loads((tmp_path / "jobs" / "text-anchored_seed42.json").read_text())
    rounds = job["bad_hospital_rounds"]
    assert [e["round"] for e in rounds] == [1, 2] and all(e["index"] is not None for e in rounds)
    for row, entry in zip(job["history"], rounds, strict=True):
        j = entry["index"]
        assert (
            row["class-counts"][j]
            == np.bincount([s.label for s in partition.hospitals[0].train], minlength=5).tolist()
        )
        agreement = np.array(
            [[np.nan if a is None else a for a in h] for h in row["class-agreement"]]
        )
        counts = np.array(row["class-counts"], dtype=float)
        n = np.array(row["fedavg-weights"]) * counts.sum()
        shared, proto = text_anchored_weights(
            HospitalStats(n, counts, np.array(row["agreement"]), agreement),
            cfg.methods.text_anchored,
        )
        np.testing.assert_allclose(row["weights"], shared, rtol=1e-9)
        np.testing.assert_allclose(row["prototype-weights"], proto, rtol=1e-9)
        assert entry["prototype_weights"] == row["prototype-weights"][j]
        assert entry["class_agreement"] == row["class-agreement"][j]

    # the report says it too: the worst hospital per method, the bad one and its weights
    write_results(tmp_path / "results.json", records)
    write_text(tmp_path / "config.yaml", dump_config(cfg))
    report = write_report(tmp_path).read_text()
    section = report[report.index("## Hospitals") : report.index("## Rounds")]
    bad = partition.bad_hospital
    assert f"Hospital 0 ({bad['name']}) labels differently: `swap`, pair cancer / cyst" in section
    for method in ("central", "local", "text-anchored+cal"):
        assert f"| {method} | 1 |" in section
    assert section.count("| text-anchored | 42 |") == cfg.fl.rounds
