"""minillm: MiniLLM knowledge distillation (Gu et al., ICLR 2024) on the Hugging Face stack."""

__version__ = "0.1.0"

from .config import (  # noqa: E402
    DistillConfig,
    EvalConfig,
    GenerateConfig,
    MiniLLMConfig,
    OnPolicyConfig,
    SamplingConfig,
    SeqKDConfig,
    TeacherConfig,
    TrainConfig,
    build_config,
    config_class,
)
from .errors import ConfigError, DataError, EngineError, MiniLLMError, ModelError, TrainingError  # noqa: E402


def train(cfg: TrainConfig):
    """Train with `cfg.method` and return the folder of the selected model (see `minillm.api`)."""
    # Start-up: `import minillm` (configs, errors) takes 0.1 s; the training stack behind api takes ~4 s.
    from .api import train as _train

    return _train(cfg)


__all__ = ["ConfigError", "DataError", "DistillConfig", "EngineError", "EvalConfig", "GenerateConfig",
           "MiniLLMConfig", "MiniLLMError", "ModelError", "OnPolicyConfig", "SamplingConfig", "SeqKDConfig",
           "TeacherConfig", "TrainConfig", "TrainingError", "build_config", "config_class", "train",
           "__version__"]
