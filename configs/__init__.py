"""Typed experiment configuration (frozen dataclasses) and its YAML loader. Imports no torch."""

from configs.load import (
    ConfigError,
    apply_overrides,
    config_to_dict,
    config_to_yaml,
    load_config,
    load_config_dict,
)
from configs.schema import (
    AutoencoderConfig,
    DataConfig,
    DiffusionConfig,
    EvaluationConfig,
    ExperimentConfig,
    FederationConfig,
    ModelConfig,
    OutputConfig,
    PartitionConfig,
    PretrainingConfig,
    PrivacyConfig,
    SamplerConfig,
    SimulationConfig,
    TrainConfig,
)

__all__ = [
    "AutoencoderConfig",
    "ConfigError",
    "apply_overrides",
    "config_to_dict",
    "config_to_yaml",
    "load_config",
    "load_config_dict",
    "DataConfig",
    "DiffusionConfig",
    "EvaluationConfig",
    "ExperimentConfig",
    "FederationConfig",
    "ModelConfig",
    "OutputConfig",
    "PartitionConfig",
    "PretrainingConfig",
    "PrivacyConfig",
    "SamplerConfig",
    "SimulationConfig",
    "TrainConfig",
]
