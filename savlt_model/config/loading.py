"""YAML in, a typed :class:`Config` out: ``--set`` merging, renamed keys and type checks.

An unknown key or a wrong type stops the run with one line naming the key and what is
expected. Keys that moved still load, with a one-line deprecation warning. A file may
extend another (``base: default.yaml``, relative to it) and state only what differs.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from savlt_model.config.schema import Config
from savlt_model.config.validation import validate
from savlt_model.errors import SavltError

log = logging.getLogger(__name__)

# Keys of older configs that no longer load: a clear pointer instead of "unknown key".
RENAMED = {"fl.protocol": "fl.partition"}
# Keys that moved and still load (with a warning): old dotted key -> new dotted key.
MOVED = {
    "fl.prox_mu": "methods.fedprox.mu",
    "fl.anchor_lambda": "methods.text_anchored.anchor_lambda",
    "fl.anchor_loss_weight": "methods.text_anchored.anchor_loss_weight",
    "fl.max_weight_ratio": "methods.text_anchored.max_weight_ratio",
}


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " or ".join(repr(v) for v in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except SavltError as exc:
                errors.append(str(exc))
        if len(errors) > 1:
            kinds = " or ".join(_type_name(a) for a in args if a is not type(None))
            raise SavltError(f"config key '{key}' must be {kinds}, got {value!r}")
        raise SavltError(errors[0] if errors else f"config key '{key}' has a bad value")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise SavltError(f"config key '{key}' must be one of {list(allowed)}, got {value!r}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise SavltError(
                f"config key '{key}' must be a list of {_type_name(item_tp)}, got {value!r}"
            )
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise SavltError(f"config key '{key}' must be true or false, got {value!r}")
    if tp in (int, float) and isinstance(value, bool):
        raise SavltError(f"config key '{key}' must be {tp.__name__}, got {value!r}")
    if not isinstance(value, tp):
        raise SavltError(
            f"config key '{key}' must be {_type_name(tp)}, got {type(value).__name__} {value!r}"
        )
    return value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SavltError(f"config key '{prefix}' must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else key
            if where in RENAMED:
                raise SavltError(f"config key '{where}' was renamed to '{RENAMED[where]}'")
            raise SavltError(f"config key '{where}' is unknown; allowed here: {', '.join(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in raw.items()}
    return cls(**kwargs)


def _apply_override(raw: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise SavltError(f"--set {item!r}: expected key=value, e.g. --set train.lr=0.0005")
    key, text = item.split("=", 1)
    try:
        value = yaml.safe_load(text) if text else None
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise SavltError(
            f"--set {key}: value {text!r} is {problem}; quote strings, e.g. --set 'x=[a, b]'"
        ) from None
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise SavltError(f"--set {key}: '{part}' is not a section")
    node[parts[-1]] = value


def _move_keys(raw: dict[str, Any]) -> None:
    """Move every :data:`MOVED` key of ``raw`` to its new place, warning once per key."""
    for old, new in MOVED.items():
        *head, last = old.split(".")
        node: Any = raw
        for part in head:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or last not in node:
            continue
        value = node.pop(last)
        log.warning("config key '%s' is deprecated: it is now '%s'", old, new)
        *new_head, new_last = new.split(".")
        target = raw
        for part in new_head:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise SavltError(f"config key '{part}' must be a mapping (moving '{old}')")
        if new_last in target and target[new_last] != value:
            raise SavltError(f"config keys '{old}' (deprecated) and '{new}' disagree; keep '{new}'")
        target[new_last] = value


def _config(raw: dict[str, Any], local: bool) -> Config:
    _move_keys(raw)
    return validate(_build(Config, raw, ""), local)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``: sections merge key by key, any other value replaces."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_yaml(p: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file's mapping, on top of the file its ``base`` key names (relative to it):
    a variant states only what differs from the config it extends."""
    if not p.is_file():
        raise SavltError(f"config file {p} does not exist; try configs/default.yaml")
    if p.resolve() in chain:
        raise SavltError(f"config file {p}: its 'base' chain comes back to itself; remove one")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise SavltError(f"config file {p} is not valid YAML: {exc}".splitlines()[0]) from exc
    if not isinstance(raw, dict):
        raise SavltError(f"config file {p} must hold a mapping at the top level")
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise SavltError(f"config file {p}: 'base' must be a file name, e.g. base: default.yaml")
    return _merge(_read_yaml(p.parent / base, (*chain, p.resolve())), raw)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the built-in defaults when ``path`` is None) and validate it."""
    raw: dict[str, Any] = {} if path is None else _read_yaml(Path(path))
    for item in overrides or []:
        _apply_override(raw, item)
    return _config(raw, local=True)


def config_from_dict(raw: dict[str, Any], local: bool = True) -> Config:
    """Rebuild a Config saved with a run (``config.yaml``) or sent in a Flower run config
    (``local=False``: its hospital-local keys are not this machine's to check)."""
    return _config(copy.deepcopy(raw), local)


def get_key(cfg: Any, key: str) -> Any:
    """The value of a dotted config key, e.g. ``get_key(cfg, "data.root")``."""
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def with_key(cfg: Any, key: str, value: Any) -> Any:
    """A copy of ``cfg`` with one dotted key replaced (the sections are copied, not shared)."""
    head, _, rest = key.partition(".")
    if not rest:
        return dataclasses.replace(cfg, **{head: value})
    return dataclasses.replace(cfg, **{head: with_key(getattr(cfg, head), rest, value)})


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
