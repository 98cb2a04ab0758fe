"""A hospital's run policy: what it agrees to run next to its patient data.

The node config's ``policy`` names a YAML file the hospital keeps (``savlt policy`` writes one
from a study's config file, so approving a study is reviewing one file). Every message the
server sends is checked against it before the hospital loads data or builds a model; a run
outside it is refused; the reason stays in the hospital's log and the server is told only
the code ``policy`` (client/guard.py)::

    methods: [fedavg, fedprox]          # federated methods the hospital runs
    backbone_fingerprint: 3f2a...       # the frozen backbone (model.name + weights)
    anchor_fingerprint: 9c1e...         # the text anchors (class list + descriptions)
    max_rounds: 2                       # fl.rounds and every round number at most this
    max_local_steps: 80                 # local steps per round at most this
    require_dp: false                   # true: only runs with central DP ...
    min_noise_multiplier: 0.0           # ... whose privacy.noise_multiplier is at least this
    run_config_sha256: null             # optional: the exact approved run config
    classes: [normal, cancer]           # optional: task.classes exactly this list
    seeds: [42]                         # optional: the plan's seed one of these
    max_prox_mu: 0.01                   # optional: FedProx's mu at most this
    max_anchor_weight: 0.1              # optional: the anchoring loss weight at most this
    allow_hub: false                    # a model.name from a hub (hf-hub:) may be fetched

``savlt policy`` writes every optional bound as the approved config has it; a key left out
bounds nothing (``allow_hub`` left out is false: a hub is never contacted).

The fingerprints are the ones the server announces in every round; the hospital's own
model must also match them (:func:`client.app.check_fingerprints`). Central DP is applied
by the server: the policy checks what the server's run config declares.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from client.guard import Refused
from savlt_model.atomic import write_text
from savlt_model.budget import local_steps
from savlt_model.config import Config
from savlt_model.errors import SavltError
from savlt_model.messages import Reason, RoundPlan, run_config_hash
from savlt_model.methods import METHODS, federated_methods
from savlt_model.model.build import build_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Policy:
    methods: list[str]
    backbone_fingerprint: str
    anchor_fingerprint: str
    max_rounds: int
    max_local_steps: int
    require_dp: bool = False
    min_noise_multiplier: float = 0.0
    run_config_sha256: str | None = None
    classes: list[str] | None = None
    seeds: list[int] | None = None
    max_prox_mu: float | None = None
    max_anchor_weight: float | None = None
    allow_hub: bool = False


REQUIRED = [f.name for f in dataclasses.fields(Policy) if f.default is dataclasses.MISSING]
KEYS = [f.name for f in dataclasses.fields(Policy)]


def _checked(path: Path, key: str, value: Any) -> Any:
    """One key's value, or a one-line error naming the file and the key."""

    def bad(expected: str) -> SavltError:
        return SavltError(f"policy file {path}: key '{key}' must be {expected}, got {value!r}")

    if key == "methods":
        if not isinstance(value, list) or not value or not all(isinstance(m, str) for m in value):
            raise bad("a non-empty list of method names")
        unknown = [m for m in value if m not in METHODS or not METHODS[m].federated]
        if unknown:
            raise bad(f"federated methods ({', '.join(federated_methods())})")
        return list(value)
    if key in ("backbone_fingerprint", "anchor_fingerprint"):
        if not isinstance(value, str) or not value:
            raise bad("the fingerprint string `savlt policy` writes")
        return value
    if key in ("max_rounds", "max_local_steps"):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise bad("an integer >= 1")
        return value
    if key == "classes":
        ok = isinstance(value, list) and all(isinstance(c, str) and c for c in value)
        if value is not None and not ok:
            raise bad("null or a list of class names")
        return value
    if key == "seeds":
        ok = isinstance(value, list) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        )
        if value is not None and not (ok and value):
            raise bad("null or a non-empty list of integer seeds")
        return value
    if key in ("max_prox_mu", "max_anchor_weight"):
        if value is None:
            return None
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok or not math.isfinite(value) or value < 0:
            raise bad("null or a number >= 0")
        return float(value)
    if key in ("require_dp", "allow_hub"):
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if key == "min_noise_multiplier":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok or not math.isfinite(value) or value < 0:
            raise bad("a number >= 0")
        return float(value)
    if value is not None and (not isinstance(value, str) or len(value) != 64):
        raise bad("null or the 64 hex digits of a run config's SHA-256")
    return value


def load_policy(path: str | Path) -> Policy:
    """Read and check a policy file; a bad one stops with one line naming the file and key."""
    path = Path(path)
    if not path.is_file():
        raise SavltError(f"policy file {path} does not exist (node config key 'policy')")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        first = str(exc).splitlines()[0]
        raise SavltError(f"policy file {path} is not valid YAML: {first}") from exc
    if not isinstance(raw, dict):
        raise SavltError(f"policy file {path} must hold a mapping of {', '.join(KEYS)}")
    for key in raw:
        if key not in KEYS:
            raise SavltError(
                f"policy file {path}: key '{key}' is unknown; allowed: {', '.join(KEYS)}"
            )
    for key in REQUIRED:
        if key not in raw:
            raise SavltError(f"policy file {path}: key '{key}' is missing")
    return Policy(**{k: _checked(path, k, v) for k, v in raw.items()})


def refusal(policy: Policy, plan: RoundPlan) -> str | None:
    """Why ``plan`` is outside ``policy``, or None when the hospital approves it."""
    cfg = plan.config
    if plan.method not in policy.methods:
        return f"method '{plan.method}' is not approved (approved: {', '.join(policy.methods)})"
    if plan.backbone_fingerprint != policy.backbone_fingerprint:
        return (
            f"backbone fingerprint {plan.backbone_fingerprint} is not the approved "
            f"{policy.backbone_fingerprint} (model {cfg.model.name})"
        )
    if plan.anchor_fingerprint != policy.anchor_fingerprint:
        return (
            f"text-anchor fingerprint {plan.anchor_fingerprint} is not the approved "
            f"{policy.anchor_fingerprint} (classes or descriptions differ)"
        )
    rounds = max(cfg.fl.rounds, plan.round)
    if rounds > policy.max_rounds:
        return f"{rounds} rounds exceed the approved max_rounds {policy.max_rounds}"
    if plan.local_steps > policy.max_local_steps:
        return (
            f"{plan.local_steps} local steps per round exceed the approved max_local_steps "
            f"{policy.max_local_steps}"
        )
    if policy.classes is not None and list(cfg.task.classes) != policy.classes:
        return f"task.classes {list(cfg.task.classes)} are not the approved {policy.classes}"
    if policy.seeds is not None and plan.seed not in policy.seeds:
        return f"seed {plan.seed} is not approved (approved: {policy.seeds})"
    for name, value, bound in (
        ("prox-mu", plan.loss_terms.prox_mu, policy.max_prox_mu),
        ("anchor weight", plan.loss_terms.anchor_weight, policy.max_anchor_weight),
    ):
        if bound is not None and not value <= bound:  # also refuses NaN
            return f"{name} {value:g} exceeds the approved maximum {bound:g}"
    if policy.require_dp:
        if cfg.privacy.mode == "none":
            return "the policy requires central DP and privacy.mode is none"
        if cfg.privacy.noise_multiplier < policy.min_noise_multiplier:
            return (
                f"privacy.noise_multiplier {cfg.privacy.noise_multiplier:g} is below the "
                f"approved minimum {policy.min_noise_multiplier:g}"
            )
    if policy.run_config_sha256 is not None:
        digest = run_config_hash(cfg)
        if digest != policy.run_config_sha256:
            return (
                f"the run config (SHA-256 {digest[:12]}...) is not the approved one "
                f"({policy.run_config_sha256[:12]}...)"
            )
    return None


def check_policy(path: str | Path, plan: RoundPlan, hospital: str) -> Policy:
    """Refuse ``plan`` (before any data is read) unless the policy file at ``path`` allows it;
    the policy, for the checks that follow (model source, recomputed fingerprints)."""
    policy = load_policy(path)
    reason = refusal(policy, plan)
    if reason:
        raise Refused(
            Reason.POLICY, f"hospital {hospital} refuses the run: {reason} (policy {path})"
        )
    return policy


def policy_for(
    cfg: Config,
    methods: list[str] | None = None,
    pin_config: bool = False,
    fingerprints: tuple[str, str] | None = None,
) -> Policy:
    """The policy that approves ``cfg`` as it is: its federated methods (or ``methods``),
    its backbone and text anchors, its rounds and local steps, its DP setting and, with
    ``pin_config``, exactly it. The fingerprints are those of the model ``cfg`` builds
    (with its own ``model.pretrained`` and ``task.prompts``) unless given."""
    if fingerprints is None:
        model = build_model(cfg, cfg.seeds[0])  # frozen parts only: no seed dependence
        fingerprints = (model.backbone_fingerprint, model.anchor_fingerprint)
    backbone_fingerprint, anchor_fingerprint = fingerprints
    chosen = methods or [m for m in cfg.fl.methods if m in METHODS and METHODS[m].federated]
    if not chosen:
        raise SavltError(
            "config key 'fl.methods' names no federated method; give one with --method"
        )
    dp = cfg.privacy.mode != "none"
    terms = [METHODS[m].losses(cfg.methods) for m in chosen]
    policy = Policy(
        methods=chosen,
        backbone_fingerprint=backbone_fingerprint,
        anchor_fingerprint=anchor_fingerprint,
        max_rounds=cfg.fl.rounds,
        max_local_steps=local_steps(cfg),
        require_dp=dp,
        min_noise_multiplier=cfg.privacy.noise_multiplier if dp else 0.0,
        run_config_sha256=run_config_hash(cfg) if pin_config else None,
        classes=list(cfg.task.classes),
        seeds=list(cfg.seeds),
        max_prox_mu=max(t.prox_mu for t in terms),
        max_anchor_weight=max(t.anchor_weight for t in terms),
        allow_hub=cfg.model.name.startswith("hf-hub:"),
    )
    for key, value in dataclasses.asdict(policy).items():  # the same checks as a loaded file
        _checked(Path("<new policy>"), key, value)
    return policy


def write_policy(path: str | Path, policy: Policy, source: str = "") -> Path:
    """Write ``policy`` as the YAML file a hospital reviews and names in its node config."""
    header = (
        "# savlt-fl run policy: what this hospital agrees to run (client/policy.py).\n"
        + (f"# Written by `savlt policy` from {source}.\n" if source else "")
        + "# Name it in the SuperNode's node config: --node-config '... policy=\"THIS FILE\"'\n"
    )
    body = yaml.safe_dump(dataclasses.asdict(policy), sort_keys=False)
    return write_text(path, header + body)
