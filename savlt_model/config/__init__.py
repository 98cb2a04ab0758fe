"""Typed run configuration: YAML in, validated dataclasses out.

Split by job: :mod:`~savlt_model.config.schema` (the sections and their defaults),
:mod:`~savlt_model.config.loading` (YAML, ``--set``, moved keys, types) and
:mod:`~savlt_model.config.validation` (cross-field checks). Import from here.
"""

from savlt_model.config.loading import (
    config_from_dict,
    dump_config,
    get_key,
    load_config,
    with_key,
)
from savlt_model.config.paths import PROJECT_ROOT, resolve_path
from savlt_model.config.schema import (
    CERVICAL_CLASSES,
    CERVICAL_POSITIVE,
    HOSPITAL_LOCAL_KEYS,
    BadHospitalConfig,
    CalibrationConfig,
    Config,
    DataConfig,
    FederatedConfig,
    LoraConfig,
    MethodsConfig,
    ModelConfig,
    PrivacyConfig,
    RoiConfig,
    SimulationConfig,
    SynthConfig,
    TaskConfig,
    TrackingConfig,
    TrainConfig,
)
from savlt_model.config.validation import check_privacy, validate, validate_local

__all__ = [
    "CERVICAL_CLASSES",
    "CERVICAL_POSITIVE",
    "HOSPITAL_LOCAL_KEYS",
    "PROJECT_ROOT",
    "BadHospitalConfig",
    "CalibrationConfig",
    "Config",
    "DataConfig",
    "FederatedConfig",
    "LoraConfig",
    "MethodsConfig",
    "ModelConfig",
    "PrivacyConfig",
    "RoiConfig",
    "SimulationConfig",
    "SynthConfig",
    "TaskConfig",
    "TrackingConfig",
    "TrainConfig",
    "check_privacy",
    "config_from_dict",
    "dump_config",
    "get_key",
    "load_config",
    "resolve_path",
    "validate",
    "validate_local",
    "with_key",
]
