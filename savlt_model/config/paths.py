"""Where a config's relative paths point: the project root, like the shipped configs."""

from __future__ import annotations

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent.parent


def resolve_path(path: str | Path, base: Path = PROJECT_ROOT) -> Path:
    """Relative paths in a config are relative to the project root, like the shipped configs."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else (base / p)
