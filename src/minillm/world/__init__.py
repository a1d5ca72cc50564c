"""A controlled world for distillation experiments (issue 24): a known generative process over token
sequences with exact log-probabilities, its word-level tokenizer, and exact measures of a model against it.

`World(WorldSpec(...))` is the truth (see `minillm.world.process` for the process); `measure`,
`exact_kls`, `model_log_probs` and `sample_model` (`minillm.world.measures`) score a causal LM against it.
"""

from minillm.world.measures import TruthLM, exact_kls, measure, model_log_probs, sample_model
from minillm.world.process import ENUMERATE_LIMIT, World, WorldSpec

__all__ = ["ENUMERATE_LIMIT", "TruthLM", "World", "WorldSpec", "exact_kls", "measure", "model_log_probs",
           "sample_model"]
