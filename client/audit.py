"""A hospital's append-only audit log: what left it with each reply.

One JSON line per reply, in ``<work dir>/audit/<hospital>.jsonl``: the run, message type
and round, the tensor names, shapes and bytes, the metric names and values, or the reason
code of a refusal. Written by :func:`client.guard.guard_mod`, which sees the reply as it
leaves; ``savlt audit FILE`` prints :func:`summarise`.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path

from flwr.app import Message

from savlt_model.errors import SavltError
from savlt_model.messages import Reason


def audit_file(node_config: dict) -> Path:
    """This hospital's audit log: in its own work directory, one file per hospital."""
    home = os.environ.get("FLWR_HOME") or Path.home() / ".flwr"
    work = Path(str(node_config.get("work-dir") or Path(home) / "savlt-work"))
    name = str(node_config.get("center") or f"partition-{node_config.get('partition-id', 0)}")
    return work / "audit" / f"{name}.jsonl"


def _numbers(value):
    return list(value) if isinstance(value, list) else value


def audit_entry(msg: Message, reply: Message, reason: Reason | None, run_id: int) -> dict:
    """What ``reply`` (the answer to ``msg``) carries off the site, as one audit record."""
    entry: dict = {
        "time": round(time.time(), 3),
        "run": run_id,
        "message": msg.metadata.message_type,
        "round": None,
        "reason": None if reason is None else reason.value,
        "tensors": [],
        "metrics": {},
    }
    config = msg.content.config_records.get("config") if msg.has_content() else None
    if config is not None and "global-round" in config:
        entry["round"] = int(config["global-round"])
    if reply.has_content():
        for record in reply.content.array_records.values():
            for name, array in record.items():
                entry["tensors"].append(
                    {"name": name, "shape": list(array.shape), "bytes": len(array.data)}
                )
        for record in reply.content.metric_records.values():
            entry["metrics"].update({k: _numbers(v) for k, v in record.items()})
    return entry


def append(path: Path, entry: dict) -> None:
    """Append-only: one line per reply, never rewritten."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry, sort_keys=True) + "\n")


def summarise(path: str | Path) -> str:
    """A few lines: replies and refusals per message type, bytes sent, names that left."""
    path = Path(path)
    if not path.is_file():
        raise SavltError(f"audit log {path} does not exist (a hospital's <work dir>/audit/*.jsonl)")
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise SavltError(f"audit log {path}, line {number}: not JSON ({exc.msg})") from exc
    sent = Counter(e["message"] for e in entries if e["reason"] is None)
    refused = Counter(e["reason"] for e in entries if e["reason"] is not None)
    tensors = sorted({t["name"] for e in entries for t in e["tensors"]})
    metrics = sorted({m for e in entries for m in e["metrics"]})
    total = sum(t["bytes"] for e in entries for t in e["tensors"])
    runs = sorted({e["run"] for e in entries})
    lines = [
        f"{path}: {len(entries)} replies in {len(runs)} run(s) {runs}",
        "sent: " + (", ".join(f"{k} x{v}" for k, v in sorted(sent.items())) or "none"),
        "refused: " + (", ".join(f"{k} x{v}" for k, v in sorted(refused.items())) or "none"),
        f"tensor bytes sent: {total} ({len(tensors)} names: {', '.join(tensors) or 'none'})",
        f"metric names sent: {', '.join(metrics) or 'none'}",
    ]
    return "\n".join(lines)
