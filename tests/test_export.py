"""Export, inference and report: the trained model used the way peft and clinicians expect."""

from __future__ import annotations

import csv
import json
import math
import shutil

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer

from reporting.report import write_report
from savlt_model.checkpoint import load_adapter, save_adapter
from savlt_model.config import config_from_dict
from savlt_model.data.folders import scan_center
from savlt_model.data.images import ImageSet
from savlt_model.errors import SavltError
from savlt_model.metrics import METRIC_KEYS
from savlt_model.model.adapters import frozen_lora_a, residual_targets, stable_name
from savlt_model.model.backbone import load_backbone
from savlt_model.model.build import build_model, cached_backbone
from tools.cli import main
from tools.export import HEAD_JSON, export_model, load_exported
from tools.site_check import wilson

# One worker runs this module, and its trained run is built once (session scope: a module
# fixture is rebuilt whenever the worker runs another module's test in between).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("export")]

ADAPTER = "central_seed42"


def _savlt(command: str, out, root, *overrides: str) -> None:
    """``savlt <command>`` on configs/smoke.yaml with the test data, batch 8, into ``out``."""
    sets = [f"data.root={root}", "data.synthetic.enabled=false", "train.batch_size=8"]
    args = [command, "--config", "configs/smoke.yaml", "--out", str(out)]
    assert main(args + [a for o in (*sets, *overrides) for a in ("--set", o)]) == 0


@pytest.fixture(scope="session")
def run(tmp_path_factory, fed_data_root):
    """A tiny finished `savlt train` run: (data root, run dir, exported model dir)."""
    base = tmp_path_factory.mktemp("export")
    root = fed_data_root
    run_dir = base / "run"
    _savlt("train", run_dir, root, "data.external_centers=[huaxi]", "train.iterations_per_shot=1")
    model_dir = export_model(run_dir, base / "model")
    return root, run_dir, model_dir


def _run_model(run_dir, state=None, name=ADAPTER):
    """The model exactly as the run scores it: config + adapter (+ FedEx residuals)."""
    adapter, meta = load_adapter(run_dir / "adapters" / f"{name}.safetensors")
    model = build_model(config_from_dict(meta["config"]), meta["seed"])
    model.load_global_state(adapter if state is None else state)
    return model.eval(), adapter, meta


def _images(root, n: int = 4) -> torch.Tensor:
    samples = scan_center(root, "huaxi", config_from_dict({}).task.classes)[:: 38 // n][:n]
    bb = cached_backbone("savlt-tiny", None)
    images = ImageSet(samples, bb.image_size, bb.mean, bb.std, train=False)
    return torch.stack([images[i][0] for i in range(len(images))])


def test_export_is_a_plain_peft_adapter(run):
    """peft alone, on an unmodified open_clip model, gives the run's image features."""
    root, run_dir, model_dir = run
    trained, adapter, _ = _run_model(run_dir)
    clip = PeftModel.from_pretrained(load_backbone("savlt-tiny").model, str(model_dir))
    # the plain model's MultiheadAttention modules are the targets (not the run's Linears)
    targets = {n for n, m in clip.named_modules() if isinstance(m, LoraLayer)}
    assert {n.split(".attn")[1] for n in targets} == {"", ".base_layer.out_proj"}
    params = {stable_name(f"clip.{n}"): p for n, p in clip.named_parameters()}
    with torch.no_grad():  # + the head's visual projection
        params["clip.visual.proj"].copy_(adapter["clip.visual.proj"])
        x = _images(root)
        want = trained.clip.encode_image(x)
        torch.testing.assert_close(clip.encode_image(x), want, atol=1e-5, rtol=1e-4)
        with clip.disable_adapter():  # and the LoRA part of it matters
            assert not torch.allclose(clip.encode_image(x), want, atol=1e-3)
    info = json.loads((model_dir / HEAD_JSON).read_text())
    assert info["classes"][0] == "cancer" and len(info["descriptions"]) == 5
    assert info["positive"] == ["cancer", "high-grade_squamous_intraepithelial_lesion"]
    assert info["image_size"] == 128 and not info["lora"]["fedex_residuals_folded"]
    assert info["lora"]["max_abs_error"] < 1e-6


def test_load_exported_reproduces_the_run(run):
    root, run_dir, model_dir = run
    trained, _, _ = _run_model(run_dir)
    exported = load_exported(model_dir)
    x = _images(root)
    with torch.no_grad():
        torch.testing.assert_close(exported(x).logits, trained(x).logits, atol=1e-4, rtol=0)


def test_fedex_residuals_are_folded_into_lora(run, tmp_path):
    root, run_dir, _ = run
    _, adapter, meta = _run_model(run_dir)
    probe = build_model(config_from_dict(meta["config"]), 42)
    gen = torch.Generator().manual_seed(0)
    state = dict(adapter)
    for key, (weight, _) in residual_targets(probe).items():  # dense, full-rank residuals
        state[key] = 0.02 * torch.randn(weight.shape, generator=gen)
    fake = tmp_path / "run"
    fake.mkdir()
    shutil.copy(run_dir / "config.yaml", fake / "config.yaml")
    save_adapter(
        fake / "adapters" / "fedavg_seed42.safetensors", state, {**meta, "method": "fedavg"}
    )
    model_dir = export_model(fake, tmp_path / "model")
    fold = json.loads((model_dir / HEAD_JSON).read_text())["lora"]
    assert fold["fedex_residuals_folded"] and fold["max_abs_error"] < 1e-6
    assert max(fold["ranks"].values()) > 4
    trained, _, _ = _run_model(run_dir, state)
    x = _images(root)
    with torch.no_grad():
        want, got = trained(x).logits, load_exported(model_dir)(x).logits
    assert torch.allclose(got, want, atol=1e-4, rtol=0)
    # the residuals matter: the plain adapter gives other logits
    probe.eval().load_global_state(adapter)
    with torch.no_grad():
        assert not torch.allclose(probe(x).logits, want, atol=1e-2)


@pytest.mark.usefixtures("in_process")
def test_an_ffa_run_exports_and_the_export_reproduces_its_predictions(fed_data_root, tmp_path):
    """FFA-LoRA's adapter holds only B (A is frozen from the seed at every hospital): the
    export rebuilds A from the run's config and seed, and gives the run's logits."""
    out = tmp_path / "ffa"
    ffa = ("fl.methods=[fedavg]", "fl.lora_aggregation=ffa", "fl.rounds=1", "fl.local_steps=2")
    _savlt("simulate", out, fed_data_root, *ffa)
    trained, adapter, _ = _run_model(out, name="fedavg_seed42")
    frozen_a = frozen_lora_a(trained)
    assert frozen_a and not set(frozen_a) & set(adapter)  # A is not in the adapter
    model_dir = export_model(out, tmp_path / "model")
    assert json.loads((model_dir / HEAD_JSON).read_text())["lora"]["max_abs_error"] < 1e-6
    x = _images(fed_data_root)
    with torch.no_grad():
        want, got = trained(x).logits, load_exported(model_dir)(x).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert got.argmax(-1).tolist() == want.argmax(-1).tolist()


def test_predict_prints_and_writes_csv(run, tmp_path, capsys):
    root, _, model_dir = run
    images = sorted((root / "huaxi" / "images" / "cancer").iterdir())[:2]
    out_csv = tmp_path / "pred.csv"
    argv = ["predict", "--model", str(model_dir), *map(str, images), "--csv", str(out_csv)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "high_risk" in printed and images[0].name in printed
    rows = list(csv.DictReader(out_csv.open()))
    assert [r["file"] for r in rows] == [str(p) for p in images]
    for r in rows:
        high = float(r["p_cancer"]) + float(r["p_high-grade_squamous_intraepithelial_lesion"])
        assert abs(high - float(r["high_risk"])) < 1e-4
    # the decision column: the class, or "refer" below the model's referral threshold
    threshold = json.loads((model_dir / HEAD_JSON).read_text())["calibration"]["refer_below"]
    assert 0 < threshold < 1
    for r in rows:
        accept = math.floor(float(r["probability"]) * 100) >= round(threshold * 100)
        assert r["decision"] == (r["class"] if accept else "refer")


def test_evaluate_matches_the_run_and_writes_report(run, tmp_path, capsys):
    root, run_dir, model_dir = run
    out = tmp_path / "eval"
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(model_dir),
                "--data",
                str(root / "huaxi"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert all(k in printed for k in METRIC_KEYS)
    (got,) = json.loads((out / "results.json").read_text())
    run_records = json.loads((run_dir / "results.json").read_text())
    (want,) = [r for r in run_records if r["center"] == "huaxi" and r["method"] == "central"]
    assert {k: got[k] for k in METRIC_KEYS} == {k: want[k] for k in METRIC_KEYS}
    assert got["ece"] == pytest.approx(want["ece"], abs=1e-3)  # the run's temperature
    assert got["referral_rate"] == pytest.approx(want["referral_rate"])  # the run's threshold
    assert 0 <= got["referral_rate"] <= 100
    report = (out / "report.md").read_text()
    assert "SYNTHETIC DATA" in report and "| huaxi |" in report
    assert "## Referral (selective prediction)" in report
    for name in (
        f"confusion_{ADAPTER}_huaxi.png",
        f"roc_{ADAPTER}.png",
        f"reliability_{ADAPTER}.png",
        f"risk_coverage_{ADAPTER}.png",
    ):
        assert (out / "figures" / name).is_file() and f"(figures/{name})" in report


def test_evaluate_bad_files_and_a_centre_without_high_risk_cases(run, tmp_path, capsys):
    """evaluate takes --on-bad-file like training takes data.on_bad_file; a centre whose
    classes are partly missing reports what exists and null (n/a) for the rest."""
    root, _, model_dir = run
    site = tmp_path / "DATA" / "site"
    shutil.copytree(root / "huaxi", site)
    for cls in ("cancer", "high-grade_squamous_intraepithelial_lesion"):
        shutil.rmtree(site / "images" / cls)  # no high-risk case at this hospital
    n = sum(1 for p in (site / "images").glob("*/*") if not p.name.startswith("."))
    (site / "images" / "cyst" / "zz_broken.png").write_bytes(b"not a png")
    argv = [
        "evaluate",
        "--model",
        str(model_dir),
        "--data",
        str(site),
        "--out",
        str(tmp_path / "e"),
    ]
    _one_line_error(capsys, argv, "zz_broken.png — replace or delete it, or use --on-bad-file skip")
    assert main([*argv, "--on-bad-file", "skip"]) == 0
    printed = capsys.readouterr().out
    assert f"({n} images)" in printed
    assert "auc_binary   n/a" in printed and "sensitivity  n/a" in printed
    (got,) = json.loads((tmp_path / "e" / "results.json").read_text())
    assert got["n"] == n and got["auc_binary"] is None and got["sensitivity"] is None
    assert got["specificity"] is not None and got["acc_multiclass"] is not None
    assert "| site |" in (tmp_path / "e" / "report.md").read_text()


def test_calibrate_to_a_new_site_and_evaluate_recentred(run, tmp_path, capsys):
    root, run_dir, model_dir = run
    site = tmp_path / "site"  # a hospital's unlabelled export: any layout, one hidden file
    shutil.copytree(root / "huaxi" / "images", site / "scans")
    (site / ".DS_Store").write_bytes(b"junk")
    out = tmp_path / "calibrated"
    argv = ["calibrate", "--model", str(model_dir), "--data", str(site), "--out", str(out)]
    assert main(argv) == 0
    said = capsys.readouterr().out
    info = json.loads((out / HEAD_JSON).read_text())
    n_huaxi = len(scan_center(root, "huaxi", info["classes"]))
    assert info["calibrated_on"]["scans"] == n_huaxi
    # this small model reads huaxi in distribution (shift 0.44 < 0.5): the guard adapts
    # nothing, so the stored calibration is the model's own, at its own threshold
    # (savlt_model.adaptation.site_calibration; the maps it stores: tests/test_adaptation.py)
    chosen = info["calibrated_on"]
    assert (chosen["guard_choice"], chosen["guard_reason"]) == (
        "none",
        "in distribution: nothing to adapt",
    )
    assert "the label-free guard took 'none' (in distribution: nothing to adapt)" in said
    trained = json.loads((model_dir / HEAD_JSON).read_text())["calibration"]
    assert info["calibration"] == trained and trained["center_mean"] is None

    # the calibrated model scores huaxi as the run's transductive "+cal" record did
    run_records = json.loads((run_dir / "results.json").read_text())
    (want,) = [r for r in run_records if r["center"] == "huaxi" and r["method"] == "central+cal"]
    assert want["calibration"] == "label-free, transductive"
    ev = tmp_path / "eval"
    evaluate = ["evaluate", "--model", str(model_dir), "--data", str(root / "huaxi")]
    assert main([*evaluate, "--out", str(ev), "--recentre"]) == 0
    got = {r["method"]: r for r in json.loads((ev / "results.json").read_text())}
    assert set(got) == {"central", "central+cal"}
    for key in ("acc_multiclass", "sensitivity", "specificity"):
        assert got["central+cal"][key] == pytest.approx(want[key], abs=1e-6), key
    assert "label-free, transductive" in (ev / "report.md").read_text()
    images = sorted((root / "huaxi" / "images" / "cyst").iterdir())[:3]
    assert main(["predict", "--model", str(out), *map(str, images)]) == 0

    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_error(capsys, [*argv[:3], "--data", str(empty), "--out", str(out)], "no images")
    missing = tmp_path / "missing"
    _one_line_error(
        capsys, [*argv[:3], "--data", str(missing), "--out", str(out)], "is not a folder"
    )


def test_train_report_has_table_and_relative_image_links(run):
    _, run_dir, _ = run
    report = (run_dir / "report.md").read_text()
    assert report.startswith("# Centralised SAVLT") and "SYNTHETIC DATA" in report
    assert "| method | center | K | seeds | acc_multiclass |" in report
    assert "No federated rounds" in report
    links = [
        line.split("](")[1].rstrip(")") for line in report.splitlines() if line.startswith("![")
    ]
    assert links and all((run_dir / link).is_file() for link in links)


def test_simulate_report_has_rounds_bytes_and_events(run, tmp_path):
    _, run_dir, _ = run
    sim = tmp_path / "sim"
    shutil.copytree(run_dir, sim)
    history = [
        {
            "round": r,
            "hospitals": 3,
            "train-loss": 1.5 - r / 10,
            "upload-bytes": 2048,
            "download-bytes": 4096,
        }
        for r in (1, 2)
    ]
    curves = [
        {"method": "fedavg", "center": "huaxi", "round": r, "acc_multiclass": 20.0 * r}
        for r in (0, 1, 2)
    ]
    event = {
        "round": 2,
        "node": "7",
        "event": "rejected",
        "reason": "update norm 9 exceeds the bound 1",
    }
    job = {
        "method": "fedavg",
        "seed": 42,
        "records": [],
        "history": history,
        "curves": curves,
        "events": [event],
    }
    (sim / "jobs").mkdir()
    (sim / "jobs" / "fedavg_seed42.json").write_text(json.dumps(job))
    (sim / "curves.json").write_text(json.dumps(curves))
    report = write_report(sim).read_text()
    assert "(figures/accuracy_per_round.png)" in report and "(figures/loss_per_round.png)" in report
    assert (sim / "figures" / "loss_per_round.png").is_file()
    assert "| fedavg | 42 | 2 | 3 | 1.3000 | 2.0 KiB | 4.0 KiB |" in report
    assert "| fedavg | 42 | 2 | 7 | rejected | update norm 9 exceeds the bound 1 |" in report


def _one_line_error(capsys, argv: list[str], needle: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # log lines may come first
    assert err.startswith("savlt: error:") and needle in err, err


def test_bad_inputs_are_one_line_errors(run, tmp_path, capsys):
    _, run_dir, model_dir = run
    _one_line_error(
        capsys,
        ["export", "--run", str(tmp_path / "nope"), "--out", str(tmp_path / "m")],
        "does not exist",
    )
    two = tmp_path / "two"
    shutil.copytree(run_dir, two)
    state, meta = load_adapter(two / "adapters" / f"{ADAPTER}.safetensors")
    save_adapter(
        two / "adapters" / "fedavg_seed42.safetensors", state, {**meta, "method": "fedavg"}
    )
    _one_line_error(
        capsys,
        ["export", "--run", str(two), "--out", str(tmp_path / "m")],
        "central_seed42, fedavg_seed42",
    )
    _one_line_error(
        capsys,
        ["export", "--run", str(two), "--out", str(tmp_path / "m"), "--method", "fedprox"],
        "no adapter matches",
    )
    _one_line_error(
        capsys, ["predict", "--model", str(model_dir), str(tmp_path / "missing.png")], "missing.png"
    )
    _one_line_error(capsys, ["report", "--run", str(tmp_path / "nope")], "does not exist")
    bad = tmp_path / "bad_model"
    shutil.copytree(model_dir, bad)
    info = json.loads((bad / HEAD_JSON).read_text())
    (bad / HEAD_JSON).write_text(json.dumps({**info, "backbone_fingerprint": "0" * 16}))
    with pytest.raises(SavltError, match="backbone fingerprint mismatch"):
        load_exported(bad)
    image = next((run[0] / "huaxi" / "images" / "cyst").iterdir())
    _one_line_error(capsys, ["predict", "--model", str(bad), str(image)], "fingerprint mismatch")
    _one_line_error(capsys, ["predict", "--model", str(run_dir), str(image)], "not a savlt export")


def test_site_check_reports_the_guard_referral_and_a_spot_check(run, tmp_path, capsys):
    root, _, model_dir = run
    out = tmp_path / "site.json"
    images = root / "huaxi" / "images"  # unlabelled scans; its class folders are the spot check
    argv = ["site-check", str(images), "--model", str(model_dir), "--labels", str(images)]
    assert main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    got = json.loads(out.read_text())
    assert got["scans"] == sum(1 for p in images.rglob("*") if p.is_file())
    assert (
        got["adaptation"] in got["candidates"]
        and not got["candidates"][got["adaptation"]]["refused"]
    )
    assert set(got["candidates"]) == {"none", "recentre", "restandardise", "t3a", "tent"}
    assert all(0 <= c["instability"] <= 1 for c in got["candidates"].values())
    assert got["candidates"]["none"]["expected_auc_cost"] == 0.0
    assert all(0 <= c["expected_auc_cost"] <= 1 for c in got["candidates"].values())
    assert "change class under randomisation" in printed and "expected AUC cost" in printed
    assert sum(got["before"].values()) == pytest.approx(1.0)
    assert sum(got["after"].values()) == pytest.approx(1.0)
    assert 0.0 <= got["expected_referral_rate"] <= 1.0
    assert got["verdict"].split(":")[0] in ("go", "go with referral", "no-go")
    checks = got["spot_check"]["candidates"]
    assert got["adaptation"] in checks
    for c in checks.values():  # this 4-step model may refer every scan: then no interval
        assert 0 <= c["accepted"] <= c["labelled"]
        for v in (c["sensitivity"], c["specificity"]):
            want = [100 * b for b in wilson(v["k"], v["n"])] if v["n"] else None
            assert v["wilson95"] == (pytest.approx(want) if want else None)
    assert got["spot_check"]["interval"] == "Wilson score, 95 %"
    assert f"verdict: {got['verdict']}" in printed and "shift score" in printed
