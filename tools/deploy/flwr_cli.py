"""The ``flwr`` CLI against a local SuperLink: its home folder, connection config and calls."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from savlt_model.atomic import write_text
from savlt_model.errors import SavltError

CONNECTION = "savlt-local"  # the SuperLink connection name in OUT/flwr/config.toml


def flwr_env(home: Path) -> dict[str, str]:
    """Environment for Flower's processes: this venv's tools first, state under ``home``."""
    bin_dir = str(Path(sys.executable).parent)
    env = dict(os.environ)
    env.update(
        {
            "PATH": bin_dir + os.pathsep + env.get("PATH", ""),
            "FLWR_HOME": str(home),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def write_flwr_config(home: Path, address: str, ca: Path) -> Path:
    """The flwr CLI's SuperLink connection, in FLWR_HOME so ~/.flwr stays untouched."""
    return write_text(
        home / "config.toml",
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "{address}"\nroot-certificates = "{ca}"\n',
    )


def flwr_cli(env: dict[str, str], *args: str, timeout: float = 60.0) -> str:
    """Run one ``flwr`` command; its stdout, or a SavltError with its output."""
    try:
        done = subprocess.run(
            ["flwr", *args], env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as exc:
        raise SavltError(f"flwr {' '.join(args[:2])} did not answer in {timeout:.0f} s") from exc
    failed = bool(done.returncode)
    if "json" in args and not failed:  # with --format json, flwr exits 0 and says success false
        reply = json.loads(done.stdout)
        failed = not reply.get("success", True)
        done.stdout = reply.get("error-message", done.stdout) if failed else done.stdout
    if failed:
        tail = [s.strip() for s in (done.stdout + done.stderr).strip().splitlines()[-3:]]
        raise SavltError(f"flwr {' '.join(args[:2])} failed: {' '.join(tail)}")
    return done.stdout


def supernode_list(env: dict[str, str]) -> list[dict]:
    """``flwr supernode list`` as records (node id, owner, status, ...)."""
    out = json.loads(flwr_cli(env, "supernode", "list", CONNECTION, "--format", "json"))
    return list(out.get("nodes", []))
