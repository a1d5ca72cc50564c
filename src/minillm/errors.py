"""User-facing errors.

Every problem caused by the user's input (a config key, a data file, a model name, a mismatched
tokenizer) raises a subclass of :class:`MiniLLMError` whose message says *what* was wrong, *where*
(file:line, config key, model path) and *how to fix it*. The CLI prints these messages without a
traceback; anything else is a bug and keeps its traceback.
"""


class MiniLLMError(Exception):
    """Base class of errors caused by user input; the CLI prints only the message."""


class ConfigError(MiniLLMError, ValueError):
    """A configuration key or value is invalid (unknown key, out of range, impossible combination)."""


class DataError(MiniLLMError, ValueError):
    """An input data file is missing, empty or malformed."""


class ModelError(MiniLLMError):
    """A model or tokenizer cannot be loaded, or teacher and student are incompatible."""


class TrainingError(MiniLLMError, RuntimeError):
    """Training cannot continue (a NaN/inf in a loss term, a corrupt checkpoint, ...)."""


class EngineError(MiniLLMError, RuntimeError):
    """An external generation engine (vLLM) cannot start, or fails or dies while serving; the message quotes
    the engine's own error and the tail of its log."""


class TrainingInterrupted(Exception):
    """Raised after a SIGTERM / Ctrl-C once the checkpoint is safely on disk (resume with resume=true).

    Not a MiniLLMError: nothing was wrong with the input; the CLI exits with 130.
    """
