"""The compute benchmarks still run and report what their README table is built from.

Speed itself is not asserted here (that is what the benchmarks are for); this catches a
benchmark broken by a change in the code it measures.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def test_quick_compute_benchmarks_write_their_tables(tmp_path):
    only = "roi_pool,train_step,lora_attention"
    cmd = [sys.executable, "benchmarks/run_cpu.py", "--quick", "--only", only]
    done = subprocess.run(
        [*cmd, "--results", str(tmp_path)], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results = {p.stem: json.loads(p.read_text()) for p in tmp_path.glob("*.json")}
    assert set(results) == set(only.split(","))
    for name, result in results.items():
        assert result["quick"] and result["machine"]["torch_threads"] == 1, name
        assert result["rows"] and all(len(r) == len(result["columns"]) for r in result["rows"])

    speedup = results["roi_pool"]["columns"].index("speed-up")
    assert all(r[speedup] > 0 for r in results["roi_pool"]["rows"])
    step = results["train_step"]
    assert [r[0] for r in step["rows"]] == ["savlt-tiny"]
    assert 0 < step["rows"][0][step["columns"].index("ratio")] < 1  # a step costs > a forward
    phases = dict(zip(step["phases"]["columns"], step["phases"]["rows"][0], strict=True))
    assert phases["forward + loss ms"] > phases["ROI mask ms"] > 0 and phases["backward ms"] > 0
    variants = [r[2] for r in results["lora_attention"]["rows"]]
    assert variants == [
        "peft on MultiheadAttention",
        "LinearAttention",
        "LinearAttention, dropout 0",
    ]
