"""The `savlt` command line: every subcommand's wiring, and bad input as one line + exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tools.cli import main


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one line, no traceback
    return err[0]


def test_synth_then_roi_train(tmp_path, capsys):
    data = tmp_path / "data"
    assert main(["synth", "--out", str(data), "--scale", "0.1", "--seed", "4"]) == 0
    assert "not clinical" in capsys.readouterr().out
    assert sorted(p.name for p in data.iterdir()) == ["huaxi", "mixed", "synth.json", "xiangya"]
    assert main(["synth", "--out", str(data)]) == 2  # refuses to overwrite a dataset
    assert str(data) in _error_line(capsys)
    unet = tmp_path / "unet.safetensors"
    args = [
        "roi",
        "train",
        "--data",
        str(data),
        "--out",
        str(unet),
        "--epochs",
        "1",
        "--size",
        "64",
    ]
    assert main(args) == 0
    assert unet.is_file() and "val_dice" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.lrr=0.1"], "config key 'train.lrr' is unknown"),
        (["train.lr=fast"], "config key 'train.lr' must be float"),
        (["fl.lora_aggregation=svd"], "must be one of ['naive', 'fedex', 'ffa']"),
        (["task.positive=[tumour]"], "task.positive"),
        (["data.root=/nonexistent/DATA", "data.synthetic.enabled=false"], "data.root"),
        (
            ["model.roi.source=unet", "model.roi.unet_checkpoint=/no/unet.safetensors"],
            "does not exist",
        ),
        (["oops"], "expected key=value"),
        (["fl.eval_every=-1"], "config key 'fl.eval_every' must be >= 0"),
        (["fl.rounds={3"], "--set fl.rounds"),
    ],
)
def test_bad_config_is_one_line_naming_the_key(tmp_path, capsys, overrides, message):
    args = ["train", "--config", "configs/smoke.yaml", "--out", str(tmp_path / "run")]
    assert main(args + [a for o in overrides for a in ("--set", o)]) == 2
    assert message in _error_line(capsys)


def test_missing_config_file(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "nope.yaml"), "--out", str(tmp_path)]) == 2
    assert "nope.yaml does not exist" in _error_line(capsys)


def test_a_config_extends_its_base_and_states_only_what_differs(tmp_path, capsys):
    from savlt_model.config import load_config

    variant = tmp_path / "variant.yaml"
    variant.write_text(f"base: {Path('configs/default.yaml').resolve()}\nfl: {{rounds: 3}}\n")
    cfg, default = load_config(variant).to_dict(), load_config("configs/default.yaml").to_dict()
    assert cfg["fl"].pop("rounds") == 3 and default["fl"].pop("rounds") == 2
    assert cfg == default  # sections merge key by key: every other fl key is the base's
    assert "text-anchored" in load_config("configs/full.yaml").fl.methods
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    assert main(["train", "--config", str(tmp_path / "a.yaml"), "--out", str(tmp_path)]) == 2
    assert "'base' chain comes back to itself" in _error_line(capsys)


@pytest.mark.ray
@pytest.mark.slow
def test_simulate_command_and_resume(fed_data_root, tmp_path, capsys):
    out = tmp_path / "sim"
    args = ["simulate", "--config", "configs/smoke.yaml", "--out", str(out)]
    for o in (
        f"data.root={fed_data_root}",
        "data.synthetic.enabled=false",
        "fl.rounds=1",
        "fl.methods=[central,fedavg]",
        "train.batch_size=8",
        "train.iterations_per_shot=1",
    ):
        args += ["--set", o]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "fedavg" in printed and "central" in printed and "SYNTHETIC DATA" in printed
    records = json.loads((out / "results.json").read_text())
    methods = ("central", "central+cal", "fedavg", "fedavg+cal")
    assert {(r["method"], r["center"]) for r in records} == {
        (m, c) for m in methods for c in ("mixed", "xiangya", "huaxi")
    }
    assert all(r["upload_bytes"] > 0 for r in records if r["method"].startswith("fedavg"))
    assert "central+cal" in printed and " ece" in printed
    for name in ("report.md", "config.yaml", "savlt.log", "figures/accuracy_per_round.png"):
        assert (out / name).is_file(), name
    # run tracking, read back with TensorBoard's own event reader
    job = EventAccumulator(str(out / "tensorboard" / "fedavg_seed42"))
    job.Reload()
    scalars = set(job.Tags()["scalars"])
    assert {"loss/train", "bytes/up", "bytes/down", "weight/hospital_0", "acc/mixed"} <= scalars
    assert [e.step for e in job.Scalars("loss/train")] == [1]
    assert [e.step for e in job.Scalars("acc/huaxi")] == [0, 1]  # before and after the round
    weights = [job.Scalars(f"weight/hospital_{k}")[0].value for k in range(3)]
    assert sum(weights) == pytest.approx(1.0, abs=1e-6)
    run = EventAccumulator(str(out / "tensorboard" / "run"))
    run.Reload()
    assert {"results/text_summary", "config/text_summary"} <= set(run.Tags()["tensors"])
    assert "fedavg" in run.Tensors("results/text_summary")[0].tensor_proto.string_val[0].decode()
    before = (out / "results.json").read_text()
    assert main([*args, "--resume"]) == 0  # every job finished: reused, same results
    assert (out / "results.json").read_text() == before


def test_predict_bad_file_points_at_its_own_option(tmp_path, capsys):
    """predict checks the images before it loads the model, and names --on-bad-file."""
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    assert main(["predict", "--model", str(tmp_path / "model"), str(broken)]) == 2
    line = _error_line(capsys)
    assert "broken.png — replace or delete it, or use --on-bad-file skip" in line
    assert "data.on_bad_file" not in line
    argv = ["predict", "--model", str(tmp_path / "m"), str(broken), "--on-bad-file", "skip"]
    assert main(argv) == 2
    warning, error = capsys.readouterr().err.strip().splitlines()
    assert "predict: skipped 1 unreadable image(s): " in warning and warning.endswith("broken.png")
    assert error == "savlt: error: none of the given images is readable"


def test_policy_command_writes_the_policy_a_hospital_loads(tmp_path, capsys):
    from client.policy import load_policy
    from savlt_model.config import load_config
    from savlt_model.messages import run_config_hash

    out = tmp_path / "policy.yaml"
    args = ["policy", "--config", "configs/smoke.yaml", "--out", str(out), "--pin-config"]
    assert main([*args, "--method", "fedavg"]) == 0
    assert "Policy written to" in capsys.readouterr().out
    policy = load_policy(out)
    assert policy.methods == ["fedavg"] and policy.max_rounds == 2 and not policy.require_dp
    assert policy.run_config_sha256 == run_config_hash(load_config("configs/smoke.yaml"))
    assert main([*args, "--set", "fl.rounds=zero"]) == 2
    assert "config key 'fl.rounds' must be int" in _error_line(capsys)
