"""results.json records, the seed summary, the console table and the PNG figures."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest

from reporting.plots import (
    plot_confusion,
    plot_method_bars,
    plot_roc,
    plot_round_curves,
    short_name,
)
from reporting.results import (
    SYNTHETIC_LABEL,
    format_table,
    make_record,
    read_results,
    summarize,
    write_results,
    write_summary,
)
from savlt_model.errors import SavltError
from savlt_model.metrics import METRIC_KEYS, compute_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _metrics(acc: float, auc: float | None = 80.0) -> dict:
    m = dict.fromkeys(METRIC_KEYS, 50.0)
    m["acc_multiclass"] = acc
    m["auc_binary"] = auc
    return m


def _records() -> list[dict]:
    return [
        make_record("fedavg", "mixed", 5, 16, _metrics(60.0, 70.0), upload_bytes=np.int64(10)),
        make_record("fedavg", "mixed", 42, 16, _metrics(70.0, None)),
        make_record("savlt", "mixed", 5, 16, _metrics(80.0)),
        make_record("fedavg", "mixed", 123, 16, _metrics(80.0, 90.0)),
        make_record("fedavg", "huaxi", 5, 16, _metrics(55.5)),
    ]


def _no_tmp(folder: Path) -> None:
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_summarize_by_hand() -> None:
    rows = summarize(_records())
    assert [(r["method"], r["center"]) for r in rows] == [
        ("fedavg", "mixed"),
        ("savlt", "mixed"),
        ("fedavg", "huaxi"),
    ]
    fed = rows[0]
    assert fed["n_seeds"] == 3 and fed["seeds"] == [5, 42, 123]
    # acc 60, 70, 80: mean 70, population std sqrt(200/3)
    assert fed["acc_multiclass_mean"] == pytest.approx(70.0)
    assert fed["acc_multiclass_std"] == pytest.approx(8.1650, abs=1e-4)
    # auc 70, None, 90: the None is skipped -> mean 80, std 10, n 2
    assert fed["auc_binary_mean"] == pytest.approx(80.0)
    assert fed["auc_binary_std"] == pytest.approx(10.0)
    assert fed["auc_binary_n"] == 2
    assert rows[1]["acc_multiclass_std"] == 0.0 and rows[1]["n_seeds"] == 1


def test_summarize_keeps_shots_apart_and_rejects_repeated_seed() -> None:
    recs = [
        make_record("m", "c", 5, 16, _metrics(60.0)),
        make_record("m", "c", 5, 32, _metrics(80)),
    ]
    assert [r["shots"] for r in summarize(recs)] == [16, 32]
    with pytest.raises(SavltError, match="seed appears twice"):
        summarize([*recs, make_record("m", "c", 5, 16, _metrics(1.0))])


def test_all_none_metric() -> None:
    row = summarize([make_record("m", "c", 1, 16, _metrics(10.0, None))])[0]
    assert row["auc_binary_mean"] is None and row["auc_binary_n"] == 0
    assert "n/a" in format_table([make_record("m", "c", 1, 16, _metrics(10.0, None))])


def test_make_record_keeps_extras_and_checks_keys() -> None:
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    rec = make_record(
        "savlt", "xiangya", 42, 32, compute_metrics(probs, np.array([0, 2]), [0]), protocol="fl"
    )
    assert rec["confusion"] == [[1, 0, 0], [0, 0, 0], [0, 0, 1]]
    assert rec["protocol"] == "fl" and rec["n"] == 2 and rec["seed"] == 42
    with pytest.raises(SavltError, match="lack keys"):
        make_record("m", "c", 1, 16, {"acc_multiclass": 1.0})
    with pytest.raises(SavltError, match="clash"):
        make_record("m", "c", 1, 16, {**_metrics(1.0), "seed": 3})


def test_format_table() -> None:
    text = format_table(_records(), title="Few-shot K=16")
    assert text.splitlines()[0] == "Few-shot K=16"
    assert "70.00 ± 8.16" in text and "80.00 ± 10.00" in text and "55.50 ± 0.00" in text
    assert SYNTHETIC_LABEL not in text
    synth = format_table(_records(), title="Few-shot K=16", synthetic=True)
    assert synth.splitlines()[0] == f"Few-shot K=16 — {SYNTHETIC_LABEL}"
    assert format_table(_records(), synthetic=True).splitlines()[0] == SYNTHETIC_LABEL
    with pytest.raises(SavltError, match="unknown metric"):
        format_table(_records(), metrics=("f1",))


def test_write_read_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    recs = _records()
    write_results(path, recs)
    assert isinstance(json.loads(path.read_text()), list)
    back = read_results(path)
    assert back == recs and back[0]["upload_bytes"] == 10
    write_summary(tmp_path / "summary.json", recs, {"synthetic": True})
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["meta"] == {"synthetic": True} and len(summary["summary"]) == 3
    _no_tmp(tmp_path)


def test_write_refuses_nan(tmp_path: Path) -> None:
    with pytest.raises(SavltError, match="None for undefined"):
        write_results(tmp_path / "r.json", [make_record("m", "c", 1, 16, _metrics(float("nan")))])
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{not json", "not valid JSON"),
        ('{"records": []}', "JSON list"),
        ('[{"method": "m"}]', "lacks keys"),
        ('[{"method": "m", "center": "c", "seed": 1, "shots": 16, "acc_multiclass": NaN}]', "NaN"),
    ],
)
def test_read_results_errors(tmp_path: Path, text: str, match: str) -> None:
    bad = tmp_path / "results.json"
    bad.write_text(text)
    with pytest.raises(SavltError, match=match):
        read_results(bad)


def test_results_json_from_before_the_rename_still_reports(tmp_path: Path) -> None:
    """A 5-class run's results.json and curves.json written with ``acc_5class`` load,
    summarise and report as ``acc_multiclass``."""
    from reporting.report import write_report

    old = [
        {("acc_5class" if k == "acc_multiclass" else k): v for k, v in r.items()}
        for r in _records()
    ]
    (tmp_path / "results.json").write_text(json.dumps(old))
    curves = [
        {"method": "fedavg", "center": "mixed", "round": r, "acc_5class": 50.0 + r} for r in (1, 2)
    ]
    (tmp_path / "curves.json").write_text(json.dumps(curves))
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "fedavg_seed5.json").write_text(
        json.dumps({"method": "fedavg", "seed": 5, "history": [{"round": 1}], "curves": curves})
    )
    records = read_results(tmp_path / "results.json")
    assert all("acc_5class" not in r for r in records)
    assert summarize(records)[0]["acc_multiclass_mean"] == pytest.approx(70.0)
    report = write_report(tmp_path).read_text()
    assert "| fedavg | mixed | 16 | 3 | 70.00 ± 8.16 |" in report
    assert "| fedavg | huaxi | 16 | 1 | 55.50 ± 0.00 | 50.00 ± 0.00 | 80.00 ± 0.00 |" in report
    assert (tmp_path / "figures" / "accuracy_per_round.png").read_bytes()[:8] == PNG_MAGIC


def test_report_states_the_epsilon_of_each_dp_job(tmp_path: Path) -> None:
    from reporting.report import write_report
    from savlt_model.config import PrivacyConfig
    from server.accounting import privacy_spent

    (tmp_path / "results.json").write_text(json.dumps(_records()))
    (tmp_path / "jobs").mkdir()
    spent = privacy_spent(PrivacyConfig("server-fixed", noise_multiplier=1.0), 5)
    for seed, privacy in ((5, spent), (6, None)):
        job = {"method": "fedavg", "seed": seed, "history": [{"round": 1}], "privacy": privacy}
        (tmp_path / "jobs" / f"fedavg_seed{seed}.json").write_text(json.dumps(job))
    report = write_report(tmp_path).read_text()
    assert "## Differential privacy" in report and "opacus RDP" in report
    assert (
        "| fedavg | 5 | server-fixed | 1 | 5 | 12.3 add/remove-one, 30.1 replace-one | 1e-05 |"
        in report
    )
    assert "| fedavg | 6 |" not in report.split("## Differential privacy")[1]


def test_read_results_missing(tmp_path: Path) -> None:
    with pytest.raises(SavltError, match="not found"):
        read_results(tmp_path / "missing.json")


def test_short_name() -> None:
    assert short_name("high-grade_squamous_intraepithelial_lesion") == "HSIL"
    assert short_name("cancer") == "cancer"
    assert short_name("mild_inflammation") == "mild inflam."


def _check_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC
    img = plt.imread(path)
    assert img.shape[0] > 100 and img.shape[1] > 100
    _no_tmp(path.parent)


def test_plots_write_png(tmp_path: Path) -> None:
    """Banner on the first plots; the last two calls cover the plain path."""
    rng = np.random.default_rng(0)
    classes = [
        "cancer",
        "cyst",
        "ectropion",
        "high-grade_squamous_intraepithelial_lesion",
        "mild_inflammation",
    ]
    cm = rng.integers(0, 20, size=(5, 5))
    cm[1] = 0  # a class with no test case must not break the percentages
    _check_png(plot_confusion(cm, classes, tmp_path / "cm.png", "Confusion", synthetic=True))

    y = rng.integers(0, 2, size=50)
    curves = {"mixed": (y, y + rng.normal(size=50)), "one-class": (np.zeros(5), rng.random(5))}
    _check_png(plot_roc(curves, tmp_path / "roc.png", "ROC", synthetic=True))

    history = [
        {"method": m, "center": c, "round": r, "acc_multiclass": 40 + r + i, "loss": 1 / (r + 1)}
        for i, m in enumerate(["fedavg", "savlt"])
        for c in ["mixed", "xiangya"]
        for r in range(1, 6)
    ]
    _check_png(plot_round_curves(history, tmp_path / "rounds.png", "Rounds", synthetic=True))
    no_loss = [{**h, "loss": None} for h in history if h["center"] == "mixed"]
    _check_png(plot_round_curves(no_loss, tmp_path / "rounds1.png", "Rounds"))

    rows = summarize(_records())
    _check_png(plot_method_bars(rows, tmp_path / "bars.png", "Bars", synthetic=True))
    _check_png(plot_method_bars(rows, tmp_path / "auc.png", "AUC", metric="auc_binary"))
    assert plt.get_fignums() == []  # nothing left open in pyplot


def test_plot_input_errors(tmp_path: Path) -> None:
    with pytest.raises(SavltError):
        plot_confusion(np.zeros((2, 2)), ["a", "b", "c"], tmp_path / "x.png", "t")
    with pytest.raises(SavltError):
        plot_roc({"a": (np.zeros(3), np.zeros(4))}, tmp_path / "x.png", "t")
    with pytest.raises(SavltError):
        plot_round_curves([{"method": "m", "center": "c", "round": 1}], tmp_path / "x.png", "t")
    with pytest.raises(SavltError):
        plot_method_bars([], tmp_path / "x.png", "t")
    assert not list(tmp_path.iterdir())
