"""Supervised recipes on fixed responses: SFT, word-level KD and the token-level divergence menu.

    sft              L = CE(y | x)                                    (no teacher)
    kd               L = (1 - kd_ratio) CE + kd_ratio KL(p || q)      (word-level KD)
    rkl/jsd/tvd/...  L = (1 - kd_ratio) CE + kd_ratio D(p, q)         (same menu, other divergences)
    seqkd            SFT on the teacher's own samples (Kim & Rush 2016; the samples are made in api.train)

All terms are token means over the response tokens (prompt masked, EOS included) of a micro-batch.
The released KD code uses the soft cross-entropy -sum_v p log q; KL(p || q) differs from it only by
the teacher entropy, a constant in theta, so gradients are identical and the logged value is a KL.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..data import PromptDataset, SFTDataset, collate_sft
from ..losses import FusedTerms, chunk_share, token_loss
from ..models import final_hidden
from .base import Algorithm, LossOutput, TrainingContext
from .common import EpochBatches, generation_validation, require_examples, steps_for, to_device


def supervised_loss_fn(divergence: str | None, weights: tuple[float, float], n: int):
    """The chunk-additive token loss: weights[0] * CE (+ weights[1] * divergence), token means over `n`
    positions (each chunk's mean rescaled by its share of the positions)."""

    def loss_fn(logprobs: Tensor, div: Tensor | None, start: int, stop: int) -> dict[str, Tensor]:
        share = chunk_share(start, stop, n)
        ce = -logprobs.mean() * share
        if divergence is None:
            return {"ce": ce}
        return {"ce": weights[0] * ce, divergence: weights[1] * div.mean() * share}

    return loss_fn


def teacher_forced(batch: dict, hidden_fn: Callable[[Tensor, Tensor], Tensor],
                   teacher_hidden_fn: Callable[[Tensor, Tensor], Tensor] | None = None):
    """(student hidden states, teacher hidden states or None, targets) at the positions of a collated SFT
    batch that predict a labelled token (position t-1 predicts token t), flattened to [N, H] / [N]."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    targets = batch["labels"][:, 1:]
    valid = targets != -100
    hidden = hidden_fn(ids, mask)[:, :-1][valid]
    teacher = teacher_hidden_fn(ids, mask)[:, :-1][valid] if teacher_hidden_fn is not None else None
    return hidden, teacher, targets[valid]


class Supervised(Algorithm):
    """Teacher-forced training on (prompt, response) pairs, optionally distilling a divergence."""

    selection_metric = "valid_loss"

    def __init__(self, cfg, train_examples, valid_examples, *, divergence: str | None = None):
        super().__init__(cfg, train_examples, valid_examples)
        self.divergence = divergence

    def setup(self, ctx: TrainingContext) -> None:
        super().setup(ctx)
        cfg, tok = self.cfg, ctx.tokenizer
        kw = dict(template=cfg.template, max_prompt_length=cfg.max_prompt_length, max_length=cfg.max_length)
        self.train_set = SFTDataset(self.train_examples, tok, **kw)
        self.valid_set = SFTDataset(self.valid_examples, tok, **kw) if self.valid_examples else None
        self.valid_prompts = (
            PromptDataset(
                self.valid_examples, tok, template=cfg.template, max_prompt_length=cfg.max_prompt_length
            )
            if self.valid_examples
            else None
        )
        require_examples(self.train_set, "training examples", cfg)
        self.order = EpochBatches(
            len(self.train_set), cfg.batch_size, cfg.seed, ctx.process_index, ctx.num_processes
        )

    def total_steps(self) -> int:
        return steps_for(self.order.batches_per_epoch(), self.cfg)

    def micro_batches(self):
        pad = self.ctx.tokenizer.pad_token_id
        while True:
            idx = self.order.next()
            yield to_device(collate_sft([self.train_set[i] for i in idx], pad), self.ctx.device)

    def token_terms(
        self, batch, hidden_fn: Callable[[Tensor, Tensor], Tensor], weights: tuple[float, float]
    ) -> tuple[FusedTerms, int]:
        """The loss of a teacher-forced batch through the one token-loss entry point; (terms, tokens)."""
        ctx = self.ctx
        hidden, teacher_hidden, targets = teacher_forced(
            batch, hidden_fn, ctx.teacher_hidden if self.divergence is not None else None)
        n = targets.numel()
        kw = {} if self.divergence is None else dict(beta=self.cfg.jsd_beta, skew_alpha=self.cfg.skew_alpha)
        f = token_loss(
            hidden,
            ctx.student_head,
            supervised_loss_fn(self.divergence, weights, n),
            targets=targets,
            teacher_hidden=teacher_hidden,
            teacher_head=ctx.teacher_head if teacher_hidden is not None else None,
            divergence=self.divergence,
            vocab_size=ctx.shared_vocab_size,
            chunk_size=self.cfg.chunk_size,
            fused=self.fused,
            **kw,
        )
        return f, n

    def loss_weights(self) -> tuple[float, float]:
        """(weight of CE, weight of the divergence) in the training loss."""
        return (1 - self.cfg.kd_ratio, self.cfg.kd_ratio) if self.divergence is not None else (1.0, 0.0)

    def loss(self, batch) -> LossOutput:
        f, n = self.token_terms(batch, self.ctx.student_hidden, self.loss_weights())
        return LossOutput(f.loss, dict(f.terms), {"tokens": n})

    def state_dict(self) -> dict:
        return {"order": self.order.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state["order"])

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss = token-mean CE of the references (+ the divergence, for KD methods)."""
        if not self.valid_set or len(self.valid_set) == 0:
            return {}
        ctx, cfg = self.ctx, self.cfg
        totals: dict[str, float] = {}
        count = 0
        for start in range(0, len(self.valid_set), cfg.batch_size):
            items = [
                self.valid_set[i] for i in range(start, min(len(self.valid_set), start + cfg.batch_size))
            ]
            batch = to_device(collate_sft(items, ctx.tokenizer.pad_token_id), ctx.device)
            # unweighted: the reference CE and the divergence, each a token mean
            f, n = self.token_terms(batch, lambda i, m: final_hidden(ctx.student, i, m), (1.0, 1.0))
            for k, v in f.terms.items():
                totals[k] = totals.get(k, 0.0) + float(v) * n
            count += n
        out = {k: v / count for k, v in totals.items()}
        out["loss"] = out["ce"]  # selection by the reference CE, as the paper selects SFT inits
        if self.selection_key() == "valid_rougeL" and self.valid_prompts:
            out.update(generation_validation(ctx, cfg, self.valid_prompts, num_prompts=cfg.eval_num_prompts))
        return out
