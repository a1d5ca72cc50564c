"""The rollout buffer of one MiniLLM round: what was sampled, and what the update needs of it.

One typed object from sampling to the loss: `RolloutBuffer.concat` joins the sampler's `Rollout`
batches (prompts left-padded, responses right-padded to the round's widths), `score_round` in
algorithms/minillm.py fills the advantages and weights, and `select` cuts a mini-batch (its rows,
trimmed to their longest response). Everything lives on the CPU between decoding and the update.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.functional import pad

__all__ = ["MiniBatch", "RolloutBuffer"]


@dataclass
class RolloutBuffer:
    """Per-token tensors are [N, T] (teacher_hidden [N, T, Ht]); 0 after each response's first EOS.

    old_logprobs        log q_old(y_t), the student that sampled the round
    teacher_logprobs    log p(y_t)
    mix_logprobs        log p~(y_t), the distribution y_t was drawn from (Eq. 4)
    importance_weights  w_t = q_old(y_t) / p~(y_t) (Eq. 5)
    teacher_hidden      the teacher's hidden states predicting y_t (for the single-step term), or None
    advantages, weights, single_step_weights   filled by the round's scoring (None until then)
    """

    prompt_ids: Tensor
    prompt_mask: Tensor
    response_ids: Tensor
    response_mask: Tensor
    lengths: Tensor
    old_logprobs: Tensor
    teacher_logprobs: Tensor
    mix_logprobs: Tensor
    importance_weights: Tensor
    teacher_hidden: Tensor | None = None
    advantages: Tensor | None = None
    weights: Tensor | None = None
    single_step_weights: Tensor | None = None

    @classmethod
    def concat(cls, rollouts: list, pad_id: int) -> RolloutBuffer:
        """Join `minillm.sampling.Rollout`s of different prompt / response widths into one buffer (on CPU)."""
        P = max(r.prompt_ids.shape[1] for r in rollouts)
        T = max(r.response_ids.shape[1] for r in rollouts)

        def left(x: Tensor, fill) -> Tensor:
            return pad(x.cpu(), (P - x.shape[1], 0), value=fill)

        def right(x: Tensor | None, fill=0.0) -> Tensor | None:  # float tensors unless a fill id is given
            if x is None:
                return None
            x = x.float() if isinstance(fill, float) else x
            return pad(
                x.cpu(), (0, T - x.shape[1]) if x.dim() == 2 else (0, 0, 0, T - x.shape[1]), value=fill
            )

        def cat(parts: list) -> Tensor | None:
            return None if parts[0] is None else torch.cat(parts)

        return cls(
            prompt_ids=cat([left(r.prompt_ids, pad_id) for r in rollouts]),
            prompt_mask=cat([left(r.prompt_mask, 0) for r in rollouts]),
            response_ids=cat([right(r.response_ids, pad_id) for r in rollouts]),
            response_mask=cat([right(r.response_mask) for r in rollouts]),
            lengths=cat([r.lengths.cpu() for r in rollouts]),
            old_logprobs=cat([right(r.student_logprobs) for r in rollouts]),
            teacher_logprobs=cat([right(r.teacher_logprobs) for r in rollouts]),
            mix_logprobs=cat([right(r.mix_logprobs) for r in rollouts]),
            importance_weights=cat([right(r.importance_weights) for r in rollouts]),
            teacher_hidden=cat([right(r.teacher_hidden) for r in rollouts]),
        )

    def __len__(self) -> int:
        return self.response_ids.shape[0]

    @property
    def prompt_len(self) -> int:
        return self.prompt_ids.shape[1]

    @property
    def input_ids(self) -> Tensor:
        """Prompt + response ids; response token t sits at index prompt_len + t."""
        return torch.cat([self.prompt_ids, self.response_ids], 1)

    @property
    def attention_mask(self) -> Tensor:
        return torch.cat([self.prompt_mask, self.response_mask.long()], 1)

    def select(self, rows: list[int]) -> RolloutBuffer:
        """These rows, with the response dimension trimmed to their longest response (at least 1)."""
        T = max(1, int(self.response_mask[rows].sum(1).max()))
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is None or f.name in ("prompt_ids", "prompt_mask", "lengths"):
                out[f.name] = None if v is None else v[rows]
            else:
                out[f.name] = v[rows][:, :T]
        return RolloutBuffer(**out)

    def to(self, device) -> RolloutBuffer:
        return RolloutBuffer(
            **{
                f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                for f in dataclasses.fields(self)
            }
        )

    def state_dict(self) -> dict[str, Tensor | None]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_state_dict(cls, state: dict | None) -> RolloutBuffer | None:
        return None if state is None else cls(**state)


@dataclass
class MiniBatch:
    """One MiniLLM micro-batch: rollouts of the current round and (with L_PT) packed pretraining text."""

    rollouts: RolloutBuffer
    pt_ids: Tensor | None = None

    def to(self, device) -> MiniBatch:
        return MiniBatch(self.rollouts.to(device), None if self.pt_ids is None else self.pt_ids.to(device))
