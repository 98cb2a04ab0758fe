"""Shared fixtures: one small synthetic DATA folder and the config of the Flower tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from savlt_model.config import Config, load_config
from savlt_model.synth import generate


@pytest.fixture(scope="session")
def fed_data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("federated") / "data"
    generate(root, seed=3, scale=0.25, progress=False)
    return root


@pytest.fixture(scope="session")
def fed_config(fed_data_root) -> Callable[..., Config]:
    """The smallest real federation: 3 centres as hospitals, 2 rounds of 1 step, batch 8."""

    def make(*extra: str) -> Config:
        return load_config(
            "configs/smoke.yaml",
            [
                f"data.root={fed_data_root}",
                "data.synthetic.enabled=false",
                "fl.protocol=centers",  # every hospital holds every class
                "fl.rounds=2",
                "fl.local_steps=1",
                "train.batch_size=8",
                "fl.server_eval=false",
                *extra,
            ],
        )

    return make
