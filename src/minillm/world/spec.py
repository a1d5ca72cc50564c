"""The parameters of a controlled world, and the small numeric helpers its modules share."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np

from minillm.errors import ConfigError

EOS, UNK = "</s>", "<unk>"
EOS_ID, UNK_ID, FIRST_CONTENT = 0, 1, 2
ENUMERATE_LIMIT = 1_000_000   # most responses `enumerate` lists
EXACT_ENTROPY_LIMIT = 200_000  # most responses `entropy` enumerates before it falls back to Monte Carlo


@dataclass(frozen=True)
class WorldSpec:
    """The parameters of a controlled world (see the module docstring for the process they define)."""

    vocab: int = 48            # content tokens "t0".."t{vocab-1}" (plus special and prompt tokens)
    prompts: int = 12          # number of prompts, each with its own response distribution
    modes: int = 3             # modes per prompt
    mode_mass: tuple[float, ...] = (0.55, 0.3, 0.15)  # mass of each mode (len == modes; () = uniform)
    length: int = 8            # mean response length in tokens below the cap (end token excluded)
    max_length: int = 0        # hard cap on content tokens (0 = 3 * length); the end token is forced there
    branching: int = 2         # successors per token inside a mode
    mode_tokens: int = 6       # tokens each mode's chain moves over
    noise: float = 0.0         # eps of the uniform mixed into every transition (full support when > 0)
    prompt_length: int = 4     # tokens per prompt
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode_mass", tuple(float(m) for m in self.mode_mass))
        ints = {"vocab": 1, "prompts": 1, "modes": 1, "length": 1, "max_length": 0, "branching": 1,
                "mode_tokens": 1, "prompt_length": 1, "seed": 0}
        for key, low in ints.items():
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ConfigError(f"world.{key} = {value!r} is invalid: it must be an integer >= {low}")
        if self.mode_tokens > self.vocab:
            raise ConfigError(f"world.mode_tokens = {self.mode_tokens} exceeds world.vocab = {self.vocab}: "
                              "a mode moves over mode_tokens distinct content tokens")
        if self.branching > self.mode_tokens:
            raise ConfigError(f"world.branching = {self.branching} exceeds world.mode_tokens = "
                              f"{self.mode_tokens}: successors are drawn from the mode's own tokens")
        noise_ok = isinstance(self.noise, (int, float)) and not isinstance(self.noise, bool)
        if not (noise_ok and 0 <= self.noise < 1):
            raise ConfigError(f"world.noise = {self.noise!r} is invalid: it must be in [0, 1)")
        mass = self.mode_mass
        if mass and (len(mass) != self.modes or min(mass) <= 0 or abs(sum(mass) - 1.0) > 1e-6):
            raise ConfigError(f"world.mode_mass = {list(mass)} is invalid: it needs world.modes = "
                              f"{self.modes} positive entries that sum to 1 (or be empty for equal masses)")

    @property
    def cap(self) -> int:
        """The most content tokens a response has (`max_length`, or 3 * `length` when it is 0)."""
        return self.max_length or 3 * self.length

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mode_mass"] = list(self.mode_mass)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> WorldSpec:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown world key(s) {unknown}; known keys: {sorted(known)}")
        d = dict(d)
        if "mode_mass" in d:
            d["mode_mass"] = tuple(d["mode_mass"])
        return cls(**d)


@dataclass(frozen=True)
class Chain:
    """Mode k of one prompt: its tokens, start distribution and sparse successors (tokenizer ids)."""

    tokens: np.ndarray        # [m] content ids
    start: np.ndarray         # [<=2] ids
    start_probs: np.ndarray   # [<=2]
    successors: np.ndarray    # [m, b] ids; row j belongs to tokens[j]
    successor_probs: np.ndarray  # [m, b]


def logsumexp(a: np.ndarray, axis: int) -> np.ndarray:
    """logsumexp that returns -inf (not nan) where every term is -inf."""
    m = np.max(a, axis=axis, keepdims=True)
    safe = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        out = np.log(np.sum(np.exp(a - safe), axis=axis, keepdims=True)) + safe
    return np.squeeze(out, axis=axis)


def log0(p: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.log(p)
