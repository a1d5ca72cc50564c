"""On-policy token-level distillation (GKD, Agarwal et al. 2024; ImitKD/f-distill as special cases).

With probability `onpolicy_fraction` (GKD's lambda) a micro-batch is made of fresh student samples
y ~ q(.|x) (no gradient through the sampling), otherwise of the dataset's responses; either way the
loss is the token mean of the chosen divergence D(p, q) over the response tokens. Unlike MiniLLM there
is no policy-gradient term: the sequence-level credit assignment is what MiniLLM adds.
"""

from __future__ import annotations

import torch

from ..losses import chunked_token_terms
from .common import EpochBatches, to_device
from .supervised import Supervised


class OnPolicy(Supervised):
    selection_metric = "valid_rougeL"

    def __init__(self, train_examples, valid_examples, *, divergence: str):
        super().__init__(train_examples, valid_examples, divergence=divergence)

    def setup(self, trainer) -> None:
        from ..data import PromptDataset

        super().setup(trainer)
        cfg, acc = trainer.cfg, trainer.accelerator
        self.prompts = PromptDataset(self.train_examples, trainer.tokenizer, template=cfg.template,
                                     max_prompt_length=cfg.max_prompt_length)
        self.prompt_order = EpochBatches(len(self.prompts), cfg.batch_size, cfg.seed + 2, acc.process_index,
                                         acc.num_processes)
        # the same coin on every process (seeded identically) so DDP ranks stay in step
        self.coin = torch.Generator().manual_seed(cfg.seed + 31337)
        self.sample_gen = torch.Generator().manual_seed(cfg.seed * 7919 + acc.process_index)

    def micro_batches(self):
        from ..data import collate_prompts, collate_sft
        from ..sampling import SamplingConfig, generate_rollouts

        tr, cfg = self.trainer, self.trainer.cfg
        tok = tr.tokenizer
        scfg = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                              top_p=cfg.top_p)
        while True:
            if float(torch.rand((), generator=self.coin)) < cfg.onpolicy_fraction:
                items = [self.prompts[i] for i in self.prompt_order.next()]
                batch = collate_prompts(items, tok.pad_token_id)
                with torch.no_grad():
                    r = generate_rollouts(tr.student, batch["input_ids"].to(tr.device),
                                          batch["attention_mask"].to(tr.device), config=scfg,
                                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                          teacher=tr.teacher, shared_vocab_size=tr.shared_vocab_size,
                                          generator=self.sample_gen, return_teacher_hidden=True)
                yield to_device({"kind": "student", "input_ids": torch.cat([r.prompt_ids, r.response_ids], 1),
                                 "attention_mask": torch.cat([r.prompt_mask, r.response_mask.long()], 1),
                                 "prompt_len": r.prompt_ids.shape[1], "response_ids": r.response_ids,
                                 "response_mask": r.response_mask, "teacher_hidden": r.teacher_hidden}, tr.device)
            else:
                idx = self.order.next()
                yield {"kind": "data", **to_device(collate_sft([self.train_set[i] for i in idx], tok.pad_token_id),
                                                   tr.device)}

    def loss_terms(self, batch):
        tr, cfg = self.trainer, self.trainer.cfg
        if batch["kind"] == "data":
            ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
            targets = labels[:, 1:]
            valid = targets != -100
            hidden = tr.hidden(ids, mask)[:, :-1][valid]
            teacher_h = tr.teacher_hidden(ids, mask)[:, :-1][valid]
            targets = targets[valid]
        else:
            P, T = batch["prompt_len"], batch["response_ids"].shape[1]
            valid = batch["response_mask"].bool()
            hidden = tr.hidden(batch["input_ids"], batch["attention_mask"])[:, P - 1:P - 1 + T][valid]
            teacher_h = batch["teacher_hidden"][valid]
            targets = batch["response_ids"][valid]
        t = chunked_token_terms(hidden, tr.student_head, targets=targets, teacher_hidden=teacher_h,
                                teacher_head=tr.teacher_head if teacher_h is not None else None, divergence=self.divergence,
                                vocab_size=tr.shared_vocab_size, temperature=cfg.temperature,
                                chunk_size=cfg.chunk_size, beta=cfg.jsd_beta, skew_alpha=cfg.skew_alpha)
        return {self.divergence: t.divergence.mean()}, {"tokens": int(valid.sum()),
                                                         "onpolicy_batch": float(batch["kind"] == "student")}

    def state_dict(self) -> dict:
        return {"order": self.order.state_dict(), "prompt_order": self.prompt_order.state_dict(),
                "coin": self.coin.get_state(), "sample_gen": self.sample_gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state["order"])
        self.prompt_order.load_state_dict(state["prompt_order"])
        self.coin.set_state(state["coin"])
        self.sample_gen.set_state(state["sample_gen"])
