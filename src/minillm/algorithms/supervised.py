"""Supervised recipes on fixed responses: SFT, word-level KD and the token-level divergence menu.

    sft              L = CE(y | x)                                    (no teacher)
    kd               L = (1 - kd_ratio) CE + kd_ratio KL(p || q)      (word-level KD, spec §3.2)
    rkl/jsd/tvd/...  L = (1 - kd_ratio) CE + kd_ratio D(p, q)         (same menu, other divergences)
    seqkd            SFT on the teacher's own samples (Kim & Rush 2016; spec §3.3) - see seqkd.py

All terms are token means over the response tokens (prompt masked, EOS included) of a micro-batch.
The released KD code uses the soft cross-entropy -sum_v p log q; KL(p || q) differs from it only by
the teacher entropy, a constant in theta, so gradients are identical and the logged value is a KL.
"""

from __future__ import annotations

import torch

from ..losses import chunked_token_terms
from ..trainer import Algorithm
from .common import EpochBatches, generation_validation, require_examples, steps_for, to_device


class Supervised(Algorithm):
    """Teacher-forced training on (prompt, response) pairs, optionally distilling a divergence."""

    selection_metric = "valid_loss"

    def __init__(self, train_examples, valid_examples, *, divergence: str | None = None):
        self.train_examples = train_examples
        self.valid_examples = valid_examples
        self.divergence = divergence

    def setup(self, trainer) -> None:
        from ..data import PromptDataset, SFTDataset

        super().setup(trainer)
        cfg, tok = trainer.cfg, trainer.tokenizer
        kw = dict(template=cfg.template, max_prompt_length=cfg.max_prompt_length, max_length=cfg.max_length)
        self.train_set = SFTDataset(self.train_examples, tok, **kw)
        self.valid_set = SFTDataset(self.valid_examples, tok, **kw) if self.valid_examples else None
        self.valid_prompts = (PromptDataset(self.valid_examples, tok, template=cfg.template,
                                            max_prompt_length=cfg.max_prompt_length)
                              if self.valid_examples else None)
        require_examples(self.train_set, "training examples", cfg)
        acc = trainer.accelerator
        self.order = EpochBatches(len(self.train_set), cfg.batch_size, cfg.seed, acc.process_index,
                                  acc.num_processes)

    def total_steps(self) -> int:
        return steps_for(self.order.batches_per_epoch(), self.trainer.cfg)

    def micro_batches(self):
        from ..data import collate_sft

        pad = self.trainer.tokenizer.pad_token_id
        while True:
            idx = self.order.next()
            yield to_device(collate_sft([self.train_set[i] for i in idx], pad), self.trainer.device)

    def _terms(self, batch, hidden_fn) -> tuple[dict[str, torch.Tensor], int]:
        tr, cfg = self.trainer, self.trainer.cfg
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        targets = labels[:, 1:]
        valid = targets != -100
        hidden = hidden_fn(ids, mask)[:, :-1][valid]
        teacher_hidden = None
        if self.divergence is not None:
            teacher_hidden = tr.teacher_hidden(ids, mask)[:, :-1][valid]
        t = chunked_token_terms(hidden, tr.student_head, targets=targets[valid], teacher_hidden=teacher_hidden,
                                teacher_head=tr.teacher_head if teacher_hidden is not None else None, divergence=self.divergence,
                                vocab_size=tr.shared_vocab_size, chunk_size=cfg.chunk_size,
                                beta=cfg.jsd_beta, skew_alpha=cfg.skew_alpha)
        ce = -t.logprobs.mean()
        if self.divergence is None:
            return {"ce": ce}, int(valid.sum())
        r = cfg.kd_ratio
        return {"ce": (1 - r) * ce, self.divergence: r * t.divergence.mean()}, int(valid.sum())

    def loss_terms(self, batch):
        terms, n = self._terms(batch, self.trainer.hidden)
        return terms, {"tokens": n}

    def state_dict(self) -> dict:
        return {"order": self.order.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state["order"])

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss = token-mean CE of the references (+ the divergence, for KD methods)."""
        from ..data import collate_sft
        from ..models import final_hidden

        if not self.valid_set or len(self.valid_set) == 0:
            return {}
        tr = self.trainer
        pad = tr.tokenizer.pad_token_id
        student = tr.student
        totals: dict[str, float] = {}
        count = 0
        bs = tr.cfg.batch_size
        for start in range(0, len(self.valid_set), bs):
            items = [self.valid_set[i] for i in range(start, min(len(self.valid_set), start + bs))]
            batch = to_device(collate_sft(items, pad), tr.device)
            terms, n = self._terms(batch, lambda i, m: final_hidden(student, i, m))
            for k, v in terms.items():
                totals[k] = totals.get(k, 0.0) + float(v) * n
            count += n
        out = {k: v / count for k, v in totals.items()}
        r = tr.cfg.kd_ratio if self.divergence is not None else 0.0
        out["ce"] = out["ce"] / (1 - r) if r < 1 else float("nan")
        out["loss"] = out["ce"]  # selection by the reference CE, as the paper selects SFT inits
        if self.divergence is not None and r > 0:
            out[self.divergence] = out[self.divergence] / r
        if tr.selection_metric() == "valid_rougeL" and self.valid_prompts:
            out.update(generation_validation(tr, self.valid_prompts, num_prompts=tr.cfg.eval_num_prompts))
        return out
