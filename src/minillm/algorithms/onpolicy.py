"""On-policy token-level distillation (GKD, Agarwal et al. 2024; ImitKD/f-distill as special cases).

With probability `onpolicy_fraction` (GKD's lambda) a micro-batch is made of fresh student samples
y ~ q(.|x) (no gradient through the sampling), otherwise of the dataset's responses; either way the
loss is the token mean of the chosen divergence D(p, q) over the response tokens. Unlike MiniLLM there
is no policy-gradient term: the sequence-level credit assignment is what MiniLLM adds.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..data import PromptDataset, collate_sft
from ..losses import chunk_share, token_loss
from .base import LossOutput, TrainingContext
from .common import EpochBatches, sample_responses, to_device
from .supervised import Supervised, teacher_forced


class OnPolicy(Supervised):
    selection_metric = "valid_rougeL"

    def __init__(self, cfg, train_examples, valid_examples):
        super().__init__(cfg, train_examples, valid_examples, divergence=cfg.divergence)

    def setup(self, ctx: TrainingContext) -> None:
        super().setup(ctx)
        cfg = self.cfg
        self.prompts = PromptDataset(
            self.train_examples, ctx.tokenizer, template=cfg.template, max_prompt_length=cfg.max_prompt_length
        )
        self.prompt_order = EpochBatches(
            len(self.prompts), cfg.batch_size, cfg.seed + 2, ctx.process_index, ctx.num_processes
        )
        # the same coin on every process (seeded identically) so DDP ranks stay in step
        self.coin = torch.Generator().manual_seed(cfg.seed + 31337)
        self.sample_gen = torch.Generator().manual_seed(cfg.seed * 7919 + ctx.process_index)

    def micro_batches(self):
        ctx, cfg = self.ctx, self.cfg
        tok = ctx.tokenizer
        while True:
            if float(torch.rand((), generator=self.coin)) < cfg.onpolicy_fraction:
                yield self.student_batch([self.prompts[i] for i in self.prompt_order.next()])
            else:
                idx = self.order.next()
                yield {
                    "kind": "data",
                    **to_device(collate_sft([self.train_set[i] for i in idx], tok.pad_token_id), ctx.device),
                }

    @torch.no_grad()
    def student_batch(self, items: list) -> dict:
        """Fresh samples y ~ q(.|x) with the teacher's hidden states at each position (one decode)."""
        ctx = self.ctx
        r = sample_responses(ctx, self.cfg.sampling, items, self.sample_gen, return_teacher_hidden=True)
        return to_device(
            {
                "kind": "student",
                "input_ids": torch.cat([r.prompt_ids, r.response_ids], 1),
                "attention_mask": torch.cat([r.prompt_mask, r.response_mask.long()], 1),
                "prompt_len": r.prompt_ids.shape[1],
                "response_ids": r.response_ids,
                "response_mask": r.response_mask,
                "teacher_hidden": r.teacher_hidden,
            },
            ctx.device,
        )

    def loss(self, batch) -> LossOutput:
        ctx, cfg = self.ctx, self.cfg
        if batch["kind"] == "data":
            hidden, teacher_h, targets = teacher_forced(batch, ctx.student_hidden, ctx.teacher_hidden)
        else:
            P, T = batch["prompt_len"], batch["response_ids"].shape[1]
            valid = batch["response_mask"].bool()
            hidden = ctx.student_hidden(batch["input_ids"], batch["attention_mask"])[:, P - 1 : P - 1 + T][
                valid
            ]
            teacher_h = batch["teacher_hidden"][valid]
            targets = batch["response_ids"][valid]
        n = targets.numel()

        def loss_fn(logprobs: Tensor, div: Tensor, start: int, stop: int) -> dict[str, Tensor]:
            return {self.divergence: div.mean() * chunk_share(start, stop, n)}

        f = token_loss(
            hidden,
            ctx.student_head,
            loss_fn,
            targets=targets,
            teacher_hidden=teacher_h,
            teacher_head=ctx.teacher_head,
            divergence=self.divergence,
            vocab_size=ctx.shared_vocab_size,
            temperature=cfg.sampling.temperature,
            chunk_size=cfg.chunk_size,
            beta=cfg.jsd_beta,
            skew_alpha=cfg.skew_alpha,
            fused=self.fused,
        )
        return LossOutput(
            f.loss,
            dict(f.terms),
            {"tokens": n, "onpolicy_batch": float(batch["kind"] == "student")},
        )

    def state_dict(self) -> dict:
        return {
            "order": self.order.state_dict(),
            "prompt_order": self.prompt_order.state_dict(),
            "coin": self.coin.get_state(),
            "sample_gen": self.sample_gen.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state["order"])
        self.prompt_order.load_state_dict(state["prompt_order"])
        self.coin.set_state(state["coin"])
        self.sample_gen.set_state(state["sample_gen"])
