"""Shared fixtures: one small synthetic DATA folder and the config of the Flower tests."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from pathlib import Path

# Under pytest-xdist every worker's torch would start one thread per core, so -n 2 on two
# cores ran four busy threads (and the SuperNode subprocesses more): measured on 2 cores,
# the suite took 553 s with 13 min of CPU, and 356 s with 7 min at one thread per worker.
# Each worker gets its share of the cores; subprocesses inherit it through the environment.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    from savlt_model.cores import usable_cores

    _THREADS = max(1, usable_cores() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(_THREADS)
    import torch

    torch.set_num_threads(_THREADS)

import pytest

from savlt_model.config import Config, load_config
from synthetic.write import generate


@pytest.fixture(scope="session")
def fed_data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("federated") / "data"
    generate(root, seed=3, scale=0.25, progress=False)
    return root


@pytest.fixture(scope="session")
def fed_config(fed_data_root, tmp_path_factory) -> Callable[..., Config]:
    """The smallest real federation: 3 centres as hospitals, 2 rounds of 1 step, batch 8."""
    work = tmp_path_factory.mktemp("work")  # splits and few-shot draws: never in the data

    def make(*extra: str) -> Config:
        return load_config(
            "configs/smoke.yaml",
            [
                f"data.root={fed_data_root}",
                f"data.work_dir={work}",
                "data.synthetic.enabled=false",
                "fl.partition=centers",  # every hospital holds every class
                "fl.rounds=2",
                "fl.local_steps=1",
                "train.batch_size=8",
                "fl.server_eval=false",
                *extra,
            ],
        )

    return make


@pytest.fixture
def train_replies(monkeypatch) -> list:
    """Every training reply the ServerApp receives (a spy on the real strategy, no mock)."""
    from server import strategy as strategy_module

    seen: list = []
    original = strategy_module.SavltStrategy.aggregate_train

    def spy(self, server_round, replies):
        replies = list(replies)
        seen.extend(replies)
        return original(self, server_round, replies)

    monkeypatch.setattr(strategy_module.SavltStrategy, "aggregate_train", spy)
    return seen


def check_declared_replies(replies: list, payload: set[str], n: int) -> None:
    """What crossed the network: the payload tensors and declared metric names, numbers only."""
    from savlt_model.messages import TRAIN_METRIC_KEYS

    assert len(replies) == n
    for msg in replies:
        assert not msg.has_error()
        assert set(msg.content.array_records) == {"arrays"}
        assert set(msg.content.array_records["arrays"]) == payload
        assert not msg.content.config_records  # nothing free-form travels back
        metrics = msg.content.metric_records["metrics"]
        assert set(metrics) <= TRAIN_METRIC_KEYS
        for value in metrics.values():  # numbers only: no path, name or identifier
            items = value if isinstance(value, list) else [value]
            assert all(isinstance(v, (int, float)) for v in items)


def tree_hashes(root: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root``, by relative path: a data folder's fingerprint."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def in_process(monkeypatch) -> None:
    """Flower's simulation without Ray for this test (tests/inprocess.py)."""
    import flwr.simulation

    from tests.inprocess import run_in_process

    monkeypatch.setattr(flwr.simulation, "run_simulation", run_in_process)


# Tests that start Ray (marker ``ray``) run in one pytest-xdist group: one Ray runtime at a
# time on a 2-core machine; the deployment tests (real SuperLink/SuperNode processes) in
# another; everything else is spread over both workers.
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        for marker in ("ray", "deploy"):
            if item.get_closest_marker(marker):
                item.add_marker(pytest.mark.xdist_group(marker))


_FILE_LIKE = re.compile(r"[\w.-]+\.(jpe?g|png|tiff?|bmp|ya?ml|json|pt|pth|safetensors|txt|csv)\b")


def assert_no_local_text(texts: list[str], local: list[str | Path] = ()) -> None:
    """No reply or event text names a path or file: no separator-joined path, no file name
    with an image/config/weights extension, none of the ``local`` paths."""
    for text in texts:
        text = str(text)
        assert not re.search(r"(^|[\s'\"(])(/|~/|\.{1,2}/|[A-Za-z]:\\)", text), text
        assert not _FILE_LIKE.search(text), text
        for path in local:
            assert str(path) not in text, (path, text)
