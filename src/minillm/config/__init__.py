"""Configuration: dataclasses with a help text per field, YAML files and `key=value` overrides.

Every command's options are one dataclass; a field's `metadata["help"]` is what `minillm <command> --help`
prints. Training configs are a base `TrainConfig` plus one class per method (`training.py`); one
`SamplingConfig` is the nested `sampling` group of training, generation and evaluation (`sampling.py`,
with the validators that tie sampling to a method); `options.py` resolves defaults < YAML file <
overrides, with "did you mean" hints, type conversion and range checks, and writes the resolved config
next to every output (`config.yaml`).
"""

from .commands import EvalConfig, GenerateConfig
from .options import (
    Options,
    build_config,
    config_to_dict,
    field_help,
    group,
    option,
    save_config,
    unknown_key_error,
)
from .sampling import (
    SamplingConfig,
    validate_plain_sampling,
    validate_teacher_mix_alpha,
    validate_untruncated_sampling,
)
from .training import (
    DIVERGENCES,
    METHOD_CONFIGS,
    METHODS,
    DistillConfig,
    DivergenceOptions,
    MiniLLMConfig,
    OnPolicyConfig,
    SeqKDConfig,
    TeacherConfig,
    TrainConfig,
    config_class,
)

__all__ = [
    "DIVERGENCES", "METHODS", "METHOD_CONFIGS", "DistillConfig", "DivergenceOptions", "EvalConfig",
    "GenerateConfig", "MiniLLMConfig", "OnPolicyConfig", "Options", "SamplingConfig", "SeqKDConfig",
    "TeacherConfig", "TrainConfig", "build_config", "config_class", "config_to_dict", "field_help", "group",
    "option", "save_config", "unknown_key_error", "validate_plain_sampling", "validate_teacher_mix_alpha",
    "validate_untruncated_sampling",
]
