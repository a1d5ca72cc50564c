"""minillm: MiniLLM knowledge distillation (Gu et al., ICLR 2024) on the Hugging Face stack."""

__version__ = "0.1.0"

from .config import EvalConfig, GenerateConfig, TrainConfig  # noqa: E402
from .errors import ConfigError, DataError, MiniLLMError, ModelError, TrainingError  # noqa: E402


def train(cfg: TrainConfig):
    """Train with `cfg.method` and return the folder of the selected model (see `minillm.api`)."""
    from .api import train as _train

    return _train(cfg)


__all__ = ["ConfigError", "DataError", "EvalConfig", "GenerateConfig", "MiniLLMError", "ModelError",
           "TrainConfig", "TrainingError", "train", "__version__"]
