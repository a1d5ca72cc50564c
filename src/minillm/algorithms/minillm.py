"""MiniLLM: sequence-level reverse-KL distillation by policy gradient (Gu et al., ICLR 2024, Algorithm 1).

    repeat
        sample a round of prompts x and responses y ~ p~ = a*p + (1-a)*q_old      (teacher-mixed, Eq. 4)
        r_t  = log p(y_t) - log q_old(y_t)                                         (per-token reward)
        A_t  = whiten( length-normalised return of r )                            (Eq. 6)
        w_t  = q_old(y_t) / p~(y_t)                                                (Eq. 5)
        for ppo_epochs passes over the round, in shuffled mini-batches:
            L_long   = PPO-clip( rho_t = q_theta(y_t) / p~(y_t),  A_t )            (Alg. 1, "(grad L)_Long")
            L_single = mean_t KL( q_theta(.|y_<t, x) || p(.|y_<t, x) )            (single-step term, Eq. 7)
            L_PT     = (1 - kd_ratio) CE + kd_ratio KD  on pretraining text        (L_PT, as released)
            theta <- theta - lr * grad( L_long + L_single + lm_coef * L_PT )

Where this departs from the textbook algorithm (all as in the released code, microsoft/LMOps `minillm/`):
- the return includes r_t and is discounted with gamma = 0.95 (`advantage=lmops`); `advantage=paper`
  uses R_{t+1} undiscounted;
- the single-step term is unweighted (LMOps #255); `single_step_weighted=true` gives the paper's w_t;
- L_PT mixes word-level KD into the language-modelling loss (kd_ratio = 0.5);
- advantages are whitened over the valid tokens of the round (LMOps includes the padding).
The teacher's hidden states recorded while decoding are reused for the single-step term, so the teacher
runs once per token per round (no second teacher forward over the rollouts).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.nn.functional import pad

from ..data import PackedCorpus, PromptDataset
from ..errors import ConfigError, TrainingError
from ..losses import (
    advantages,
    chunk_share,
    per_token_rewards,
    ppo_clipped_loss,
    prefix_importance_weights,
    pt_loss,
    single_step_loss,
    token_loss,
    whiten,
)
from ..sampling import SpeculativeStats
from .base import Algorithm, LossOutput, TrainingContext
from .buffer import MiniBatch, RolloutBuffer
from .common import EpochBatches, generation_validation, require_examples, sample_responses


# ------------------------------------------------------------------ the three terms of the loss (Eq. 7, L_PT)
def long_term_loss(logprobs: Tensor, old_logprobs: Tensor, adv: Tensor, weights: Tensor, clip_eps: float):
    """(grad L)_Long of Eq. 7 with Algorithm 1's clipping: PPO-clip on rho_t = q_theta(y_t) / p~(y_t).

    rho_t = exp(log q_theta - log q_old) * w_t (w_t = q_old / p~, Eq. 5); a token mean. Returns (loss, stats).
    """
    return ppo_clipped_loss(
        logprobs, old_logprobs, adv, weights, torch.ones_like(logprobs), clip_eps=clip_eps or None
    )


def single_step_term(divergence: Tensor, weights: Tensor | None) -> Tensor:
    """(grad L)_Single of Eq. 7: the exact token-level KL(q_theta || p) over the vocabulary at each visited
    prefix, a token mean (weighted by `weights` when given: the paper's w_t; the released code uses none)."""
    return single_step_loss(divergence, torch.ones_like(divergence), weights=weights)


def pretraining_term(logprobs: Tensor, kd_divergence: Tensor | None, kd_ratio: float) -> Tensor:
    """L_PT (paper §2.3: -log q_theta(d) on pretraining text d), as released: (1 - kd_ratio) CE + kd_ratio KD
    against the teacher on the same text."""
    return pt_loss(-logprobs, kd_divergence, torch.ones_like(logprobs), kd_ratio)


# ------------------------------------------------------------------ a round: sample, then score
def sample_round(
    ctx: TrainingContext, cfg, prompts: PromptDataset, indices: list[int], generator: torch.Generator,
    stats: SpeculativeStats | None = None,
) -> RolloutBuffer:
    """Responses from p~ = a*p + (1-a)*q_old for the given prompts (Eq. 4), on the CPU (speculative
    sampling, `sampling.draft_length` > 0, adds its counts to `stats`)."""
    step = cfg.rollout_batch_size
    parts = [sample_responses(ctx, cfg.sampling, [prompts[i] for i in indices[start:start + step]], generator,
                              teacher_mix_alpha=cfg.teacher_mix_alpha, return_teacher_hidden=cfg.single_step,
                              stats=stats,
                              # q_old under the update's numerics (bf16 body, fp32 head), and a faster decode
                              student_autocast=torch.bfloat16 if cfg.precision == "bf16" else None)
             for start in range(0, len(indices), step)]
    return RolloutBuffer.concat(parts, ctx.tokenizer.pad_token_id)


def score_round(r: RolloutBuffer, cfg, reduce_sum=None) -> tuple[RolloutBuffer, Tensor]:
    """Rewards r_t, advantages A_t (Eq. 6) and importance weights (Eq. 5) of a sampled round."""
    mask = r.response_mask
    rewards = per_token_rewards(
        r.teacher_logprobs,
        r.old_logprobs,
        mask,
        reward_scaling=cfg.reward_scaling,
        reward_clip=cfg.reward_clip or None,
    )
    gamma = 1.0 if cfg.advantage == "paper" else cfg.gamma
    if cfg.importance_weight == "prefix":
        # Unbiased off-policy correction (tests/test_minillm_gradient.py): W_t = prod_{j<=t} q/p~ in rho,
        # per-decision weights on the future rewards of the return, and W_{t-1} on the single-step term
        # (it depends on y_<t only).
        weights = prefix_importance_weights(r.old_logprobs, r.mix_logprobs, mask)
        single_step_weights = prefix_importance_weights(
            r.old_logprobs, r.mix_logprobs, mask, include_current=False
        )
        adv = advantages(
            rewards,
            mask,
            gamma=gamma,
            length_norm=cfg.length_norm,
            variant=cfg.advantage,
            per_decision_weights=r.importance_weights * mask,
        )
    else:  # the paper's single-token approximation w_t = q_old(y_t) / p~(y_t) (Eq. 5)
        weights = r.importance_weights * mask
        single_step_weights = weights
        adv = advantages(rewards, mask, gamma=gamma, length_norm=cfg.length_norm, variant=cfg.advantage)
    if cfg.whiten_advantages:
        adv = whiten(adv, mask, all_reduce=reduce_sum)
    r.advantages, r.weights, r.single_step_weights = adv, weights, single_step_weights
    return r, rewards


def round_metrics(r: RolloutBuffer, rewards: Tensor, seconds: float, round_index: int) -> dict[str, float]:
    mask = r.response_mask
    n_tok = mask.sum().clamp(min=1)
    valid_w = r.weights[mask.bool()]
    return {
        "rollout/round": round_index,
        "rollout/seconds": seconds,
        "rollout/tokens_per_second": float(n_tok) / max(seconds, 1e-9),
        "rollout/reward": float((rewards * mask).sum() / n_tok),
        "rollout/reverse_kl_per_token_mixed": float(
            ((r.old_logprobs - r.teacher_logprobs) * mask).sum() / n_tok
        ),
        "rollout/mixed_length": float(r.lengths.float().mean()),
        "rollout/weight_mean": float(valid_w.mean()),
        "rollout/weight_min": float(valid_w.min()),
        "rollout/weight_max": float(valid_w.max()),
    }


@dataclass
class RoundCursor:
    """Where the PPO passes over the current round stand: epoch, this epoch's shuffled order, next row."""

    epoch: int = 0
    order: list[int] = field(default_factory=list)
    position: int = 0


class MiniLLM(Algorithm):
    """Algorithm 1 of the paper (dropout off during updates: `train_mode = False`)."""

    train_mode = False
    selection_metric = "valid_rougeL"

    # ------------------------------------------------------------------ set-up
    def setup(self, ctx: TrainingContext) -> None:
        super().setup(ctx)
        cfg, world, rank = self.cfg, ctx.num_processes, ctx.process_index
        if cfg.num_rollouts % world:
            raise ConfigError(
                f"num_rollouts ({cfg.num_rollouts}) must be divisible by the number of processes ({world})."
            )
        self.rollouts_per_process = cfg.num_rollouts // world
        if self.rollouts_per_process % cfg.batch_size:
            raise ConfigError(
                f"num_rollouts per process ({self.rollouts_per_process}) must be a multiple of "
                f"batch_size ({cfg.batch_size})."
            )
        micro_per_round = cfg.ppo_epochs * self.rollouts_per_process // cfg.batch_size
        if micro_per_round % cfg.gradient_accumulation_steps:
            raise ConfigError(
                f"ppo_epochs x num_rollouts / (processes x batch_size) = {micro_per_round} "
                f"micro-batches per round is not a multiple of gradient_accumulation_steps "
                f"({cfg.gradient_accumulation_steps})."
            )
        self.steps_per_round = micro_per_round // cfg.gradient_accumulation_steps
        kw = dict(template=cfg.template, max_prompt_length=cfg.max_prompt_length)
        self.prompts = PromptDataset(self.train_examples, ctx.tokenizer, **kw)
        require_examples(self.prompts, "training prompts", cfg)
        self.valid_prompts = (
            PromptDataset(self.valid_examples, ctx.tokenizer, **kw) if self.valid_examples else None
        )
        self.prompt_order = EpochBatches(len(self.prompts), self.rollouts_per_process, cfg.seed, rank, world)
        self.pt = PackedCorpus(cfg.pt_data, ctx.tokenizer, seq_len=cfg.pt_seq_len) if cfg.pt_data else None
        self.pt_order = (
            EpochBatches(len(self.pt), cfg.batch_size, cfg.seed + 1, rank, world) if self.pt else None
        )
        self.sample_gen = torch.Generator().manual_seed(cfg.seed * 7919 + rank)
        self.shuffle_gen = torch.Generator().manual_seed(cfg.seed * 104729 + rank)
        self.round: RolloutBuffer | None = None
        self.cursor = RoundCursor()
        self.rounds_done = 0

    def total_steps(self) -> int:
        if self.cfg.max_steps:
            return self.cfg.max_steps
        return max(1, int(self.cfg.epochs * self.prompt_order.batches_per_epoch())) * self.steps_per_round

    # ------------------------------------------------------------------ the outer loop of Algorithm 1
    def micro_batches(self) -> Iterator[MiniBatch]:
        """Collect a round, then `ppo_epochs` passes over it in shuffled mini-batches; resumable mid-round."""
        while True:
            if self.round is None:
                self.round = self.collect_round()
                self.cursor = RoundCursor(0, self.shuffled(), 0)
            for epoch in range(self.cursor.epoch, self.cfg.ppo_epochs):
                if epoch > self.cursor.epoch:
                    self.cursor = RoundCursor(epoch, self.shuffled(), 0)
                while self.cursor.position < len(self.cursor.order):
                    rows = self.cursor.order[
                        self.cursor.position : self.cursor.position + self.cfg.batch_size
                    ]
                    self.cursor.position += self.cfg.batch_size
                    yield self.mini_batch(rows)
            self.round = None

    @torch.no_grad()
    def collect_round(self) -> RolloutBuffer:
        t0 = time.perf_counter()
        stats = SpeculativeStats()
        with self.ctx.sampling_scope():  # FSDP: the student gathered once for the whole round
            r = sample_round(self.ctx, self.cfg, self.prompts, self.prompt_order.next(), self.sample_gen,
                             stats)
        seconds = time.perf_counter() - t0
        r, rewards = score_round(r, self.cfg, self.ctx.reduce_sum)
        for name, value in (
            ("reward", rewards),
            ("importance weight", r.weights),
            ("advantage", r.advantages),
        ):
            if not torch.isfinite(value).all():
                raise TrainingError(
                    f"step {self.ctx.step}: non-finite {name} in rollout round {self.rounds_done + 1} "
                    f"(check the teacher/student dtype and that sampling is not truncated)."
                )
        self.rounds_done += 1
        metrics = round_metrics(r, rewards, seconds, self.rounds_done)
        if stats.rounds:  # the speculative sampler ran: how much of each draft the teacher kept
            metrics["rollout/acceptance_rate"] = stats.acceptance_rate
            metrics["rollout/tokens_per_teacher_forward"] = stats.tokens_per_teacher_forward
            metrics["rollout/draft_length"] = sum(stats.draft_lengths) / len(stats.draft_lengths)
        self.ctx.log(metrics)
        return r

    def shuffled(self) -> list[int]:
        return torch.randperm(len(self.round), generator=self.shuffle_gen).tolist()

    def mini_batch(self, rows: list[int]) -> MiniBatch:
        pt_ids = None
        if self.pt is not None:
            pt_ids = torch.stack([self.pt[i]["input_ids"] for i in self.pt_order.next()])
        return MiniBatch(self.round.select(rows), pt_ids).to(self.ctx.device)

    # ------------------------------------------------------------------ the loss of one mini-batch
    def loss(self, batch: MiniBatch) -> LossOutput:
        """L_long + L_single (one fused pass over the rollout tokens) + lm_coef * L_PT."""
        cfg, ctx, r = self.cfg, self.ctx, batch.rollouts
        hidden = self.student_hidden(batch)
        B, P, T = len(r), r.prompt_len, r.response_ids.shape[1]
        valid = r.response_mask.bool()
        f = token_loss(
            hidden[:B, P - 1 : P - 1 + T][valid],
            ctx.student_head,
            self.rollout_loss_fn(r, valid),
            targets=r.response_ids[valid],
            divergence="rkl" if cfg.single_step else None,
            teacher_hidden=r.teacher_hidden[valid] if cfg.single_step else None,
            teacher_head=ctx.teacher_head if cfg.single_step else None,
            vocab_size=ctx.shared_vocab_size,
            temperature=cfg.sampling.temperature,
            chunk_size=cfg.chunk_size,
            fused=self.fused,
        )
        # statistics that are not sums over chunks (ratio max, clip fraction) from the detached log-probs
        _, stats = long_term_loss(
            f.logprobs, r.old_logprobs[valid], r.advantages[valid], r.weights[valid], cfg.clip_eps
        )
        loss, terms = f.loss, dict(f.terms)
        if batch.pt_ids is not None:
            pt = cfg.lm_coef * self.pt_loss(hidden[B:, : batch.pt_ids.shape[1]], batch.pt_ids)
            loss, terms["pt"] = loss + pt, pt.detach()
        metrics = {
            "tokens": int(valid.sum()),
            "entropy": float(f.entropy.mean()),
            "rollout_loss": f.loss.detach(),
            **{f"ppo/{k}": v for k, v in stats.items()},
        }
        return LossOutput(loss, terms, metrics)

    def student_hidden(self, batch: MiniBatch) -> Tensor:
        """One student forward over the rollouts and the L_PT text (padded to one width), as released."""
        ids, attn = batch.rollouts.input_ids, batch.rollouts.attention_mask
        if batch.pt_ids is None:
            return self.ctx.student_hidden(ids, attn)
        L, pad_id = max(ids.shape[1], batch.pt_ids.shape[1]), self.ctx.tokenizer.pad_token_id

        def right(x: Tensor, value: int) -> Tensor:
            return pad(x, (0, L - x.shape[1]), value=value)

        return self.ctx.student_hidden(
            torch.cat([right(ids, pad_id), right(batch.pt_ids, pad_id)]),
            torch.cat([right(attn, 0), right(torch.ones_like(batch.pt_ids), 0)]),
        )

    def rollout_loss_fn(self, r: RolloutBuffer, valid: Tensor):
        """The chunk-additive token loss of the rollout tokens: L_long and L_single, token means over the
        mini-batch (LMOps' reduction): each chunk's mean is rescaled by its share of the tokens."""
        cfg, n = self.cfg, int(valid.sum())
        old, adv, w = r.old_logprobs[valid], r.advantages[valid], r.weights[valid]
        ss_w = r.single_step_weights[valid] if cfg.single_step and cfg.single_step_weighted else None

        def loss_fn(logprobs, divergence, start, stop):
            share = chunk_share(start, stop, n)
            out = {
                "pg": long_term_loss(logprobs, old[start:stop], adv[start:stop], w[start:stop], cfg.clip_eps)[
                    0
                ]
                * share
            }
            if cfg.single_step:
                out["single_step"] = (
                    single_step_term(divergence, None if ss_w is None else ss_w[start:stop]) * share
                )
            return out

        return loss_fn

    def pt_loss(self, hidden: Tensor, pt_ids: Tensor) -> Tensor:
        """L_PT on packed pretraining chunks; the teacher's KD part needs one teacher forward over them."""
        ctx, cfg = self.ctx, self.cfg
        h, targets = hidden[:, :-1].reshape(-1, hidden.shape[-1]), pt_ids[:, 1:].reshape(-1)
        teacher_h = None
        if cfg.kd_ratio > 0:
            th = ctx.teacher_hidden(pt_ids, torch.ones_like(pt_ids))[:, :-1]
            teacher_h = th.reshape(-1, th.shape[-1])
        n = targets.numel()

        def loss_fn(logprobs, divergence, start, stop):  # chunk means rescaled to sum to the full means
            return {"pt": pretraining_term(logprobs, divergence, cfg.kd_ratio) * chunk_share(start, stop, n)}

        return token_loss(
            h,
            ctx.student_head,
            loss_fn,
            targets=targets,
            teacher_hidden=teacher_h,
            teacher_head=ctx.teacher_head if teacher_h is not None else None,
            divergence="fkl" if cfg.kd_ratio > 0 else None,
            vocab_size=ctx.shared_vocab_size,
            chunk_size=cfg.chunk_size,
            fused=self.fused,
        ).loss

    # ------------------------------------------------------------------ validation, state
    def evaluate(self) -> dict[str, float]:
        if not self.valid_prompts:
            return {}
        return generation_validation(
            self.ctx, self.cfg, self.valid_prompts, num_prompts=self.cfg.eval_num_prompts
        )

    def state_dict(self) -> dict:
        return {
            "prompt_order": self.prompt_order.state_dict(),
            "pt_order": self.pt_order.state_dict() if self.pt_order else None,
            "sample_gen": self.sample_gen.get_state(),
            "shuffle_gen": self.shuffle_gen.get_state(),
            "round": None if self.round is None else self.round.state_dict(),
            "cursor": vars(self.cursor).copy(),
            "rounds_done": self.rounds_done,
        }

    def load_state_dict(self, state: dict) -> None:
        self.prompt_order.load_state_dict(state["prompt_order"])
        if self.pt_order and state["pt_order"]:
            self.pt_order.load_state_dict(state["pt_order"])
        self.sample_gen.set_state(state["sample_gen"])
        self.shuffle_gen.set_state(state["shuffle_gen"])
        self.round = RolloutBuffer.from_state_dict(state["round"])
        self.cursor, self.rounds_done = RoundCursor(**state["cursor"]), state["rounds_done"]
