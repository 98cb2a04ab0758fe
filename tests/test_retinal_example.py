"""The second task, end to end: configs/retinal_oct.yaml on a tiny 4-class folder written here.

Three sources, several B-scans per patient (Kermany-style names, so the config's patient
pattern applies), one source without any DRUSEN case: `savlt simulate` with central and
FedAvg through Flower, and records that carry the task-generic metric names.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from savlt_model.metrics import METRIC_KEYS
from tools.cli import main

pytestmark = pytest.mark.slow

CLASSES = ["CNV", "DME", "DRUSEN", "NORMAL"]
SOURCES = ("site_a", "site_b", "site_c")


def write_retina(root: Path, patients: int = 4, scans: int = 2) -> Path:
    """Grey 64x48 B-scans: a bright band whose depth depends on the class, plus noise."""
    rng = np.random.default_rng(0)
    pid = 1000
    for source in SOURCES:
        for label, cls in enumerate(CLASSES):
            if source == "site_c" and cls == "DRUSEN":
                continue  # this hospital had no DRUSEN case
            folder = root / source / "images" / cls
            folder.mkdir(parents=True)
            for _ in range(patients):
                pid += 1
                for j in range(scans):
                    img = rng.normal(40, 10, (48, 64))
                    img[8 + 8 * label : 14 + 8 * label] += 150
                    pixels = np.clip(img, 0, 255).astype(np.uint8)
                    Image.fromarray(pixels).save(folder / f"{cls}-{pid}-{j}.png")
    return root


@pytest.mark.usefixtures("in_process")
def test_retinal_config_runs_end_to_end(tmp_path: Path) -> None:
    root = write_retina(tmp_path / "RETINA")
    out = tmp_path / "run"
    args = ["simulate", "--config", "configs/retinal_oct.yaml", "--out", str(out)]
    for o in (
        f"data.root={root}",
        f"data.work_dir={tmp_path / 'work'}",
        "seeds=[42]",
        "data.shots=2",
        "train.iterations_per_shot=1",
        "train.batch_size=4",
        "model.lora={r: 2, alpha: 2, dropout: 0.0, last_n_blocks: 1}",
        "fl.rounds=1",
        "fl.methods=[central,fedavg]",
    ):
        args += ["--set", o]
    assert main(args) == 0
    records = json.loads((out / "results.json").read_text())
    assert {(r["method"], r["center"]) for r in records} >= {
        (m, c) for m in ("central", "fedavg") for c in SOURCES
    }
    for r in records:
        assert set(METRIC_KEYS) <= set(r) and "acc_5class" not in r
        assert len(r["confusion"]) == 4 and all(len(row) == 4 for row in r["confusion"])
    site_c = next(r for r in records if r["method"] == "fedavg" and r["center"] == "site_c")
    assert sum(site_c["confusion"][2]) == 0  # no true DRUSEN case at site_c
    assert sum(map(sum, site_c["confusion"])) == site_c["n"]
    log = (out / "savlt.log").read_text()  # the run log
    assert "centre site_c, class 'DRUSEN' has 0 images" in log
    assert "centre site_a: split by patient (16 patients)" in log
    (split_file,) = (tmp_path / "work").glob("RETINA-*/site_a/split.json")  # not in DATA
    split = json.loads(split_file.read_text())
    patient_parts: dict[str, set[str]] = {}
    for part, keys in split.items():
        for key in keys:
            patient_parts.setdefault(key.split("-")[1], set()).add(part)
    assert len(patient_parts) == 16 and all(len(p) == 1 for p in patient_parts.values())
    report = (out / "report.md").read_text()
    assert "acc_multiclass" in report and "SYNTHETIC" not in report
    assert (out / "figures" / "methods_acc_multiclass.png").is_file()
