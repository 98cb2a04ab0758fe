"""Cross-field checks of a :class:`Config` that a type annotation cannot express."""

from __future__ import annotations

import math
import re

from savlt_model.config.paths import resolve_path
from savlt_model.config.schema import Config, SimulationConfig
from savlt_model.errors import SavltError
from savlt_model.methods import METHODS


def validate(cfg: Config, local: bool = True) -> Config:
    """Cross-field checks that a type annotation cannot express; with ``local``, also that the
    hospital-local files it names exist (:func:`validate_local`)."""
    t = cfg.task
    if len(set(t.classes)) != len(t.classes) or len(t.classes) < 2:
        raise SavltError("config key 'task.classes' needs at least two distinct class names")
    for c in t.classes:  # a class name is a folder name under each centre: never a path
        if not c or c == "." or any(bad in c for bad in ("/", "\\", "..", "\0")):
            raise SavltError(
                f"config key 'task.classes': {c!r} is not a plain folder name (no '/', '\\' "
                "or '..'); name each class folder of the DATA tree"
            )
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
    if cfg.privacy.mode == "server-adaptive":  # Flower 1.42's wrapper fails at its first round
        raise SavltError(
            "config key 'privacy.mode': server-adaptive is not supported (Flower's adaptive "
            "clipping needs a clipped-count noise it cannot set here); use server-fixed or "
            "client-fixed"
        )
    if cfg.fl.held_out is not None and cfg.fl.held_out not in centers:
        raise SavltError(
            f"config key 'fl.held_out' must be one of {centers}, got {cfg.fl.held_out!r}"
        )
    if (cfg.fl.leave_one_out or cfg.fl.held_out) and cfg.fl.partition != "centers":
        raise SavltError(
            "config keys 'fl.leave_one_out' / 'fl.held_out' need fl.partition: centers"
        )
    if not 0.0 <= cfg.train.scanner_augment <= 1.0:
        raise SavltError("config key 'train.scanner_augment' must lie in [0, 1] (0: off)")
    if cfg.train.consistency_weight < 0 or (
        cfg.train.consistency_weight > 0 and cfg.train.scanner_augment == 0
    ):
        raise SavltError(
            "config key 'train.consistency_weight' must be >= 0 and needs randomised views: "
            "set train.scanner_augment > 0 (or consistency_weight: 0)"
        )
    if not cfg.train.prototype_lr_scale > 0:
        raise SavltError("config key 'train.prototype_lr_scale' must be > 0 (1: the shared lr)")
    if cfg.fl.eval_every < 0:
        raise SavltError(
            "config key 'fl.eval_every' must be >= 0 (N: every N rounds; 0: after the last only)"
        )
    anchored = cfg.methods.text_anchored
    if not anchored.max_weight_ratio >= 1.0:
        raise SavltError(
            "config key 'methods.text_anchored.max_weight_ratio' must be >= 1 "
            "(1: lambda = 0 weights; .inf: no cap)"
        )
    if not math.isfinite(anchored.anchor_lambda):
        raise SavltError("config key 'methods.text_anchored.anchor_lambda' must be finite")
    check_server_optimisers(cfg)
    if cfg.fl.dirichlet_alpha <= 0:
        raise SavltError("config key 'fl.dirichlet_alpha' must be > 0 (e.g. 0.5; 100: near-iid)")
    check_bad_hospital(cfg)
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


def check_server_optimisers(cfg: Config) -> None:
    """FedAvgM's and FedAdam's hyperparameters where their maths holds."""
    m, adam = cfg.methods.fedavgm, cfg.methods.fedadam
    if not (m.server_lr > 0 and 0 <= m.momentum < 1):
        raise SavltError(
            "config keys 'methods.fedavgm.server_lr' must be > 0 and 'methods.fedavgm.momentum' "
            "in [0, 1) (1 and 0: FedAvg)"
        )
    if not (adam.server_lr > 0 and 0 <= adam.beta1 < 1 and 0 <= adam.beta2 < 1 and adam.tau > 0):
        raise SavltError(
            "config keys 'methods.fedadam.server_lr' and '.tau' must be > 0, '.beta1' and "
            "'.beta2' in [0, 1)"
        )


def check_bad_hospital(cfg: Config) -> None:
    """``fl.bad_hospital`` names a hospital of the run, a share and two classes that exist."""
    bad, fl = cfg.fl.bad_hospital, cfg.fl
    if not 0 <= bad.hospital < fl.hospitals:
        raise SavltError(
            f"config key 'fl.bad_hospital.hospital' must be in 0..{fl.hospitals - 1} "
            f"(an index among fl.hospitals={fl.hospitals}), got {bad.hospital}"
        )
    if not 0 < bad.share <= 1:
        raise SavltError(
            f"config key 'fl.bad_hospital.share' must be in (0, 1] (e.g. 0.4), got {bad.share}"
        )
    unknown = [c for c in bad.pair if c not in cfg.task.classes]
    if bad.pair and (len(bad.pair) != 2 or len(set(bad.pair)) != 2 or unknown):
        raise SavltError(
            f"config key 'fl.bad_hospital.pair' must be two different classes of task.classes "
            f"(or [] for the default pair), got {bad.pair}"
        )
    if bad.kind != "none" and fl.leave_one_out:
        raise SavltError(
            "config key 'fl.bad_hospital': not with fl.leave_one_out (a held-out centre "
            "renumbers the hospitals); set fl.bad_hospital.kind: none or fl.leave_one_out: false"
        )


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
    controlled = [m for m in methods if m in METHODS and METHODS[m].controls]
    if controlled:
        raise SavltError(
            f"config key 'privacy.mode': {', '.join(controlled)} control variates follow each "
            "hospital's own unclipped, un-noised update, which central DP does not cover; use "
            "fl.methods without them"
        )
    stepped = [m for m in methods if m in METHODS and METHODS[m].server_step is not None]
    if stepped:
        raise SavltError(
            f"config key 'privacy.mode': {', '.join(stepped)} under central DP is not "
            "implemented (the DP wrapper noises the average after the server optimiser's "
            "step); use fl.methods without them"
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
