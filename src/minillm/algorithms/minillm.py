"""MiniLLM: sequence-level reverse-KL distillation by policy gradient (Gu et al., ICLR 2024, Alg. 1).

    repeat
        sample a round of prompts x and responses y ~ p~ = a*p + (1-a)*q_old      (teacher-mixed, Eq. 4)
        r_t  = log p(y_t) - log q_old(y_t)                                         (per-token reward)
        A_t  = whiten( length-normalised return of r )                            (Eq. 6)
        w_t  = q_old(y_t) / p~(y_t)                                                (Eq. 5)
        for ppo_epochs passes over the round, in mini-batches:
            L_long   = PPO-clip( rho_t = q_theta(y_t) / p~(y_t),  A_t )            (Alg. 1, "(grad L)_Long")
            L_single = mean_t KL( q_theta(.|y_<t, x) || p(.|y_<t, x) )            (single-step term, Eq. 7)
            L_PT     = (1 - kd_ratio) CE + kd_ratio KD  on pretraining text        (L_PT, as released)
            theta <- theta - lr * grad( L_long + L_single + lm_coef * L_PT )

Defaults follow the released code (spec §1.2): the return includes r_t and is discounted with
gamma = 0.95 (`advantage=lmops`); `advantage=paper` uses R_{t+1} undiscounted. The teacher's hidden
states recorded while decoding are reused for the single-step term, so the teacher runs once per
token per round (no second teacher forward over the rollouts).
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from ..errors import ConfigError, TrainingError
from ..losses import (
    advantages,
    chunked_token_terms,
    fused_token_loss,
    per_token_rewards,
    ppo_clipped_loss,
    prefix_importance_weights,
    single_step_loss,
    whiten,
)
from ..losses import pt_loss as pt_objective
from ..trainer import Algorithm
from .common import EpochBatches, generation_validation, require_examples, to_device

ROLLOUT_KEYS = ("input_ids", "attention_mask", "response_ids", "response_mask", "old_logprobs",
                "weights", "single_step_weights", "advantages", "teacher_hidden")


def teacher_mixed_rollouts(trainer, prompts, indices, generator) -> dict[str, Tensor]:
    """Sample responses from p~ = a*p + (1-a)*q_old for the given prompts (Eq. 4), on the CPU buffer."""
    from ..data import collate_prompts
    from ..sampling import SamplingConfig, generate_rollouts

    cfg, tok = trainer.cfg, trainer.tokenizer
    scfg = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                          top_p=cfg.top_p)
    parts = []
    for start in range(0, len(indices), cfg.rollout_batch_size):
        chunk = indices[start:start + cfg.rollout_batch_size]
        batch = collate_prompts([prompts[i] for i in chunk], tok.pad_token_id)
        r = generate_rollouts(trainer.student, batch["input_ids"].to(trainer.device),
                              batch["attention_mask"].to(trainer.device), config=scfg,
                              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                              teacher=trainer.teacher, teacher_mix_alpha=cfg.teacher_mix_alpha,
                              shared_vocab_size=trainer.shared_vocab_size, generator=generator,
                              return_teacher_hidden=cfg.single_step,
                              # q_old under the update's numerics (bf16 body, fp32 head), and a faster decode
                              student_autocast=torch.bfloat16 if cfg.precision == "bf16" else None)
        parts.append(r)
    return _merge_rollouts(parts, tok.pad_token_id)


def _merge_rollouts(parts, pad_id: int) -> dict[str, Tensor]:
    """Concatenate rollouts of different prompt/response lengths: prompts left-, responses right-padded."""
    P = max(r.prompt_ids.shape[1] for r in parts)
    T = max(r.response_ids.shape[1] for r in parts)

    def left(x, fill):
        return torch.nn.functional.pad(x, (P - x.shape[1], 0), value=fill)

    def right(x, fill):
        pad = (0, T - x.shape[1]) if x.dim() == 2 else (0, 0, 0, T - x.shape[1])
        return torch.nn.functional.pad(x, pad, value=fill)

    out: dict[str, list] = {k: [] for k in ("prompt_ids", "prompt_mask", "response_ids", "response_mask",
                                            "student_logprobs", "teacher_logprobs", "mix_logprobs",
                                            "importance_weights", "teacher_hidden", "lengths")}
    for r in parts:
        out["prompt_ids"].append(left(r.prompt_ids.cpu(), pad_id))
        out["prompt_mask"].append(left(r.prompt_mask.cpu(), 0))
        out["response_ids"].append(right(r.response_ids.cpu(), pad_id))
        out["response_mask"].append(right(r.response_mask.float().cpu(), 0.0))
        for k in ("student_logprobs", "teacher_logprobs", "mix_logprobs", "importance_weights"):
            v = getattr(r, k)
            out[k].append(right(v.float().cpu(), 0.0) if v is not None else None)
        th = r.teacher_hidden
        out["teacher_hidden"].append(right(th.float().cpu(), 0.0) if th is not None else None)
        out["lengths"].append(r.lengths.cpu())
    return {k: (torch.cat(v) if v and v[0] is not None else None) for k, v in out.items()}


class MiniLLM(Algorithm):
    """Algorithm 1 of the paper on top of the shared trainer (dropout off: `train_mode = False`)."""

    train_mode = False
    selection_metric = "valid_rougeL"

    def __init__(self, train_examples, valid_examples):
        self.train_examples = train_examples
        self.valid_examples = valid_examples

    # ------------------------------------------------------------------ set-up
    def setup(self, trainer) -> None:
        from ..data import PackedCorpus, PromptDataset

        super().setup(trainer)
        cfg, tok, acc = trainer.cfg, trainer.tokenizer, trainer.accelerator
        world, rank = acc.num_processes, acc.process_index
        if cfg.num_rollouts % world:
            raise ConfigError(f"num_rollouts ({cfg.num_rollouts}) must be divisible by the number of "
                              f"processes ({world}).")
        self.rollouts_per_process = cfg.num_rollouts // world
        if self.rollouts_per_process % cfg.batch_size:
            raise ConfigError(f"num_rollouts per process ({self.rollouts_per_process}) must be a multiple of "
                              f"batch_size ({cfg.batch_size}).")
        micro_per_round = cfg.ppo_epochs * self.rollouts_per_process // cfg.batch_size
        if micro_per_round % cfg.gradient_accumulation_steps:
            raise ConfigError(f"ppo_epochs x num_rollouts / (processes x batch_size) = {micro_per_round} "
                              f"micro-batches per round is not a multiple of gradient_accumulation_steps "
                              f"({cfg.gradient_accumulation_steps}).")
        self.steps_per_round = micro_per_round // cfg.gradient_accumulation_steps
        kw = dict(template=cfg.template, max_prompt_length=cfg.max_prompt_length)
        self.prompts = PromptDataset(self.train_examples, tok, **kw)
        require_examples(self.prompts, "training prompts", cfg)
        self.valid_prompts = PromptDataset(self.valid_examples, tok, **kw) if self.valid_examples else None
        self.prompt_order = EpochBatches(len(self.prompts), self.rollouts_per_process, cfg.seed, rank, world)
        self.pt = PackedCorpus(cfg.pt_data, tok, seq_len=cfg.pt_seq_len) if cfg.pt_data else None
        self.pt_order = (EpochBatches(len(self.pt), cfg.batch_size, cfg.seed + 1, rank, world)
                         if self.pt is not None else None)
        self.sample_gen = torch.Generator().manual_seed(cfg.seed * 7919 + rank)
        self.shuffle_gen = torch.Generator().manual_seed(cfg.seed * 104729 + rank)
        self.buffer: dict[str, Tensor] | None = None
        self.ppo_epoch, self.order, self.position, self.round = 0, [], 0, 0

    def total_steps(self) -> int:
        cfg = self.trainer.cfg
        if cfg.max_steps:
            return cfg.max_steps
        rounds = max(1, int(cfg.epochs * self.prompt_order.batches_per_epoch()))
        return rounds * self.steps_per_round

    # ------------------------------------------------------------------ rollouts (one round)
    @torch.no_grad()
    def collect_round(self) -> dict[str, Tensor]:
        tr, cfg = self.trainer, self.trainer.cfg
        t0 = time.perf_counter()
        r = teacher_mixed_rollouts(tr, self.prompts, self.prompt_order.next(), self.sample_gen)
        t_rollout = time.perf_counter() - t0
        mask = r["response_mask"]
        rewards = per_token_rewards(r["teacher_logprobs"], r["student_logprobs"], mask,
                                    reward_scaling=cfg.reward_scaling, reward_clip=cfg.reward_clip or None)
        gamma = 1.0 if cfg.advantage == "paper" else cfg.gamma
        if cfg.importance_weight == "prefix":
            # Unbiased off-policy correction (tests/test_minillm_gradient.py): W_t = prod_{j<=t} q/p~ in
            # rho, per-decision weights on the future rewards of the return, and W_{t-1} on the
            # single-step term (it depends on y_<t only).
            weights = prefix_importance_weights(r["student_logprobs"], r["mix_logprobs"], mask)
            single_step_weights = prefix_importance_weights(r["student_logprobs"], r["mix_logprobs"], mask,
                                                            include_current=False)
            adv = advantages(rewards, mask, gamma=gamma, length_norm=cfg.length_norm, variant=cfg.advantage,
                             per_decision_weights=r["importance_weights"] * mask)
        else:  # the paper's single-token approximation w_t = q_old(y_t) / p~(y_t) (Eq. 5)
            weights = r["importance_weights"] * mask
            single_step_weights = weights
            adv = advantages(rewards, mask, gamma=gamma, length_norm=cfg.length_norm, variant=cfg.advantage)
        if cfg.whiten_advantages:
            all_reduce = (lambda t: tr.accelerator.reduce(t, reduction="sum")) \
                if tr.accelerator.num_processes > 1 else None
            adv = whiten(adv, mask, all_reduce=all_reduce)
        for name, value in (("reward", rewards), ("importance weight", weights), ("advantage", adv)):
            if not torch.isfinite(value).all():
                raise TrainingError(f"step {tr.step}: non-finite {name} in rollout round {self.round + 1} "
                                    f"(check the teacher/student dtype and that sampling is not truncated).")
        self.round += 1
        n_tok = mask.sum().clamp(min=1)
        tok_rkl = ((r["student_logprobs"] - r["teacher_logprobs"]) * mask).sum() / n_tok
        valid_w = weights[mask.bool()]
        tr.log({"rollout/round": self.round, "rollout/seconds": t_rollout,
                "rollout/tokens_per_second": float(n_tok) / max(t_rollout, 1e-9),
                "rollout/reward": float((rewards * mask).sum() / n_tok),
                "rollout/reverse_kl_per_token_mixed": float(tok_rkl),
                "rollout/mixed_length": float(r["lengths"].float().mean()),
                "rollout/weight_mean": float(valid_w.mean()), "rollout/weight_min": float(valid_w.min()),
                "rollout/weight_max": float(valid_w.max())})
        return {
            "input_ids": torch.cat([r["prompt_ids"], r["response_ids"]], 1),
            "attention_mask": torch.cat([r["prompt_mask"], mask.long()], 1),
            "response_ids": r["response_ids"], "response_mask": mask, "old_logprobs": r["student_logprobs"],
            "weights": weights, "single_step_weights": single_step_weights, "advantages": adv,
            "teacher_hidden": r["teacher_hidden"],
            "prompt_len": torch.tensor(r["prompt_ids"].shape[1]),
        }

    # ------------------------------------------------------------------ mini-batches over the buffer
    def _reshuffle(self) -> None:
        n = self.buffer["input_ids"].shape[0]
        self.order = torch.randperm(n, generator=self.shuffle_gen).tolist()
        self.position = 0

    def _next_batch(self) -> dict:
        cfg = self.trainer.cfg
        if self.buffer is None or (self.position >= len(self.order) and self.ppo_epoch + 1 >= cfg.ppo_epochs):
            self.buffer = self.collect_round()
            self.ppo_epoch = 0
            self._reshuffle()
        elif self.position >= len(self.order):
            self.ppo_epoch += 1
            self._reshuffle()
        idx = self.order[self.position:self.position + cfg.batch_size]
        self.position += cfg.batch_size
        P = int(self.buffer["prompt_len"])
        T = max(1, int(self.buffer["response_mask"][idx].sum(1).max()))
        batch = {}
        for k in ROLLOUT_KEYS:
            v = self.buffer[k]
            if v is None:
                continue
            v = v[idx]
            batch[k] = v[:, :P + T] if k in ("input_ids", "attention_mask") else v[:, :T]
        batch["prompt_len"] = P
        if self.pt is not None:
            pt_idx = self.pt_order.next()
            batch["pt_ids"] = torch.stack([self.pt[i]["input_ids"] for i in pt_idx])
        return to_device(batch, self.trainer.device)

    def micro_batches(self):
        while True:
            yield self._next_batch()

    # ------------------------------------------------------------------ the loss of one micro-batch
    #: Compute the full-vocabulary terms with `fused_token_loss` (gradients formed chunk by chunk in the
    #: forward pass: no LM-head recompute in backward, no per-chunk [V, H] head-gradient sums). False
    #: uses the checkpointed `chunked_token_terms` path instead (same values and gradients up to float
    #: rounding; tests/test_fused_loss.py compares the two).
    fused: bool = True

    def _fused(self) -> bool:
        # lm_head_fn heads expose their trainable parameters; a head that does not cannot be fused safely
        return self.fused and getattr(self.trainer.student_head, "trainable_parameters", None) is not None

    def loss_terms(self, batch):
        """One differentiable term `rollout_loss` = pg + single_step (+ `pt` = lm_coef * L_PT).

        pg and single_step come out of one fused pass over the rollout tokens, so they are a single
        term for the trainer (which sums and backpropagates the terms); their values are logged as the
        `pg` and `single_step` metrics through the extra dict (not part of the summed loss).
        """
        tr, cfg = self.trainer, self.trainer.cfg
        ids, attn = batch["input_ids"], batch["attention_mask"]
        B, P = ids.shape[0], batch["prompt_len"]
        T = batch["response_ids"].shape[1]
        pt_ids = batch.get("pt_ids")
        if pt_ids is not None:  # one shared forward for rollouts and L_PT text, as the released code
            L = max(ids.shape[1], pt_ids.shape[1])
            pad = tr.tokenizer.pad_token_id
            joint_ids = torch.cat([_pad_right(ids, L, pad), _pad_right(pt_ids, L, pad)])
            joint_mask = torch.cat([_pad_right(attn, L, 0), _pad_right(torch.ones_like(pt_ids), L, 0)])
            hidden = tr.hidden(joint_ids, joint_mask)
        else:
            hidden = tr.hidden(ids, attn)
        valid = batch["response_mask"].bool()
        h = hidden[:B, P - 1:P - 1 + T][valid]  # position t-1 predicts response token t
        teacher_h = batch["teacher_hidden"][valid] if cfg.single_step else None
        old, adv, w = batch["old_logprobs"][valid], batch["advantages"][valid], batch["weights"][valid]
        ss_w = batch["single_step_weights"][valid] if cfg.single_step and cfg.single_step_weighted else None
        token_kw = dict(targets=batch["response_ids"][valid], teacher_hidden=teacher_h,
                        teacher_head=tr.teacher_head if teacher_h is not None else None,
                        divergence="rkl" if cfg.single_step else None, vocab_size=tr.shared_vocab_size,
                        temperature=cfg.temperature, chunk_size=cfg.chunk_size)
        if self._fused():
            denom = max(int(valid.sum()), 1)

            def token_loss(lp, div, start, stop):
                # token means over the chunk rescaled to the micro-batch's token count: sums over chunks
                # give the token means over the micro-batch (LMOps' reduction)
                ones, share = torch.ones_like(lp), (stop - start) / denom
                out = {"pg": self.long_term_loss(lp, old[start:stop], adv[start:stop], w[start:stop], ones)[0]
                       * share}
                if cfg.single_step:
                    out["single_step"] = single_step_loss(
                        div, ones, weights=None if ss_w is None else ss_w[start:stop]) * share
                return out

            f = fused_token_loss(h, tr.student_head, token_loss, **token_kw)
            rollout_loss, values, logprobs, entropy = f.loss, f.terms, f.logprobs, f.entropy
            # statistics that are not sums over chunks (ratio max, clip fraction) from the detached log-probs
            _, stats = self.long_term_loss(logprobs, old, adv, w, torch.ones_like(logprobs))
        else:
            t = chunked_token_terms(h, tr.student_head, **token_kw)
            ones = torch.ones_like(t.logprobs)
            pg, stats = self.long_term_loss(t.logprobs, old, adv, w, ones)
            values = {"pg": pg}
            if cfg.single_step:
                values["single_step"] = single_step_loss(t.divergence, ones, weights=ss_w)
            rollout_loss, entropy = sum(values.values()), t.entropy
        terms = {"rollout_loss": rollout_loss}
        if pt_ids is not None:
            terms["pt"] = cfg.lm_coef * self.pt_loss(hidden[B:, :pt_ids.shape[1]], pt_ids)
        extra = {"tokens": int(valid.sum()), "entropy": float(entropy.mean()),
                 **{k: v.detach() for k, v in values.items()},
                 **{f"ppo/{k}": v for k, v in stats.items()}}
        return terms, extra

    def long_term_loss(self, logprobs, old_logprobs, adv, weights, mask):
        """(grad L)_Long of Eq. 7 with PPO clipping on rho = q_theta / p~ (Alg. 1); a token mean over `mask`."""
        clip = self.trainer.cfg.clip_eps or None
        return ppo_clipped_loss(logprobs, old_logprobs, adv, weights, mask, clip_eps=clip)

    def pt_loss(self, hidden: Tensor, pt_ids: Tensor) -> Tensor:
        """L_PT as released: (1 - kd_ratio) CE + kd_ratio * teacher KD on packed pretraining chunks."""
        tr, cfg = self.trainer, self.trainer.cfg
        h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        targets = pt_ids[:, 1:].reshape(-1)
        teacher_h = None
        if cfg.kd_ratio > 0:
            th = tr.teacher_hidden(pt_ids, torch.ones_like(pt_ids))[:, :-1]
            teacher_h = th.reshape(-1, th.shape[-1])
        token_kw = dict(targets=targets, teacher_hidden=teacher_h,
                        teacher_head=tr.teacher_head if teacher_h is not None else None,
                        divergence="fkl" if cfg.kd_ratio > 0 else None, vocab_size=tr.shared_vocab_size,
                        chunk_size=cfg.chunk_size)
        kd = cfg.kd_ratio
        if self._fused():
            n = max(targets.numel(), 1)

            def token_loss(lp, div, start, stop):  # the chunk's token means, rescaled to sum to the full means
                return {"pt": pt_objective(-lp, div, torch.ones_like(lp), kd) * ((stop - start) / n)}

            return fused_token_loss(h, tr.student_head, token_loss, **token_kw).loss
        t = chunked_token_terms(h, tr.student_head, **token_kw)
        return pt_objective(-t.logprobs, t.divergence, torch.ones_like(t.logprobs), kd)

    # ------------------------------------------------------------------ validation, state
    def evaluate(self) -> dict[str, float]:
        if not self.valid_prompts:
            return {}
        return generation_validation(self.trainer, self.valid_prompts, num_prompts=self.trainer.cfg.eval_num_prompts)

    def state_dict(self) -> dict:
        return {"prompt_order": self.prompt_order.state_dict(),
                "pt_order": self.pt_order.state_dict() if self.pt_order else None,
                "sample_gen": self.sample_gen.get_state(), "shuffle_gen": self.shuffle_gen.get_state(),
                "buffer": self.buffer, "ppo_epoch": self.ppo_epoch, "order": self.order,
                "position": self.position, "round": self.round}

    def load_state_dict(self, state: dict) -> None:
        self.prompt_order.load_state_dict(state["prompt_order"])
        if self.pt_order and state["pt_order"]:
            self.pt_order.load_state_dict(state["pt_order"])
        self.sample_gen.set_state(state["sample_gen"])
        self.shuffle_gen.set_state(state["shuffle_gen"])
        self.buffer, self.ppo_epoch = state["buffer"], state["ppo_epoch"]
        self.order, self.position, self.round = state["order"], state["position"], state["round"]


def _pad_right(x: Tensor, length: int, value: int) -> Tensor:
    return torch.nn.functional.pad(x, (0, length - x.shape[1]), value=value)
