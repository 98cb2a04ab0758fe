"""What users already have keeps working: a run folder, its config and an exported model,
all written by main before the packages were split by job (tests/fixtures/main-2026-12-02,
made with ``savlt simulate`` on configs/smoke.yaml, ``savlt export`` and ``savlt predict``)."""

from __future__ import annotations

import csv
import logging
import shutil
from pathlib import Path

import pytest
import yaml

from reporting.report import write_report
from savlt_model.config import config_from_dict, dump_config, load_config
from savlt_model.errors import SavltError
from tools.inference import predict_images

FIXTURES = Path(__file__).parent / "fixtures" / "main-2026-12-02"


def test_a_config_written_by_main_loads_with_moved_keys_warned(caplog) -> None:
    raw = yaml.safe_load((FIXTURES / "run" / "config.yaml").read_text())
    assert raw["fl"]["prox_mu"] == 0.02  # the run set it through the old key
    with caplog.at_level(logging.WARNING):
        cfg = config_from_dict(raw, local=False)
    assert cfg.methods.fedprox.mu == 0.02
    assert cfg.methods.text_anchored.anchor_lambda == raw["fl"]["anchor_lambda"]
    assert cfg.methods.text_anchored.max_weight_ratio == raw["fl"]["max_weight_ratio"]
    warned = [r.getMessage() for r in caplog.records]
    assert "config key 'fl.prox_mu' is deprecated: it is now 'methods.fedprox.mu'" in warned
    assert all(len(w.splitlines()) == 1 for w in warned)
    assert "prox_mu" not in dump_config(cfg)  # what a new run writes uses the new keys


def test_old_and_new_keys_that_disagree_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SavltError, match=r"'fl\.prox_mu' \(deprecated\) and 'methods\.fedprox"):
        load_config("configs/smoke.yaml", ["fl.prox_mu=0.5", "methods.fedprox.mu=0.1"])
    cfg = load_config("configs/smoke.yaml", ["fl.anchor_lambda=3"])
    assert cfg.methods.text_anchored.anchor_lambda == 3.0


def test_a_run_folder_written_by_main_is_reported_on(tmp_path: Path) -> None:
    run = shutil.copytree(FIXTURES / "run", tmp_path / "run")
    report = write_report(run).read_text()
    assert "fedavg" in report and "central" in report and "SYNTHETIC" in report.upper()


def test_a_model_exported_by_main_predicts_as_it_did() -> None:
    with (FIXTURES / "predictions.csv").open() as f:
        before = list(csv.DictReader(f))
    images = [FIXTURES / "images" / Path(row["file"]).name for row in before]
    after = predict_images(FIXTURES / "export", images)
    assert [Path(p["file"]).name for p in after] == [Path(r["file"]).name for r in before]
    for old, new in zip(before, after, strict=True):
        assert new["class"] == old["class"]
        for cls, p in new["probs"].items():
            assert p == pytest.approx(float(old[f"p_{cls}"]), abs=1e-5), cls
