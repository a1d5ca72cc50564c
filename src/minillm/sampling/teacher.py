"""Teacher-forced scoring of sampled responses: one forward pass over each row's real tokens.

`teacher_forced_logprobs` is the one scorer of stored or freshly sampled responses: the rollout engine
uses it to fill a student-only rollout's teacher fields (`score_with_teacher`, alpha = 0), and
`minillm.evaluation.sequence_kl` to score samples under either model (sequence-level KL).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from minillm.sampling.adapter import CausalLMAdapter, EvalMode

__all__ = ["response_hidden", "score_with_teacher", "teacher_forced_logprobs"]


def response_hidden(model, prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor,
                    response_mask: Tensor) -> Tensor:
    """Post-norm hidden states [B, T, H] of `model` at the positions that predict each response token.

    Teacher-forced, by one forward pass without padding inside the sequences: each row's real tokens
    (the prompt without its left padding, then the response) are packed to start at position 0 and
    right-padded to the longest row, with attention mask 1 on real tokens and position ids 0..n-1. This
    gives what a forward over `cat(prompt_ids, response_ids)` (left-padded prompts, position ids from the
    mask) gives at positions P-1 ... P+T-2, up to float round-off, but processes only
    max_b(prompt_b + response_b) - 1 positions per row instead of P + T (a row's last response token
    predicts nothing and is not fed unless it lies within the longest row's span). As in a `Rollout`,
    prompts are left-padded and each response mask is 1 on a prefix of its row. Entries at t >= the
    row's response length are arbitrary (callers mask them). The output is on the model's device; no
    grad mode is set here (callers scoring without gradients wrap it in torch.no_grad()).
    """
    return _response_hidden(CausalLMAdapter(model), prompt_ids, prompt_mask, response_ids, response_mask)


def _response_hidden(adapter: CausalLMAdapter, prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor,
                     response_mask: Tensor) -> Tensor:
    device = adapter.device
    ids = torch.cat([prompt_ids, response_ids], dim=1).to(device)
    real = torch.cat([prompt_mask != 0, response_mask != 0], dim=1).to(device)
    P, T = prompt_ids.shape[1], response_ids.shape[1]
    counts = real.long().cumsum(dim=1)  # real tokens up to and including each position
    n_real = counts[:, -1]
    # The response token t (at P + t) is predicted at the packed position of the real token before it.
    predict = counts[:, P - 1:P - 1 + T] - 1
    width = max(1, int(n_real.max()) - 1)
    slot = torch.where(real, counts - 1, width).clamp(max=width)  # padding and tokens past the width: dropped
    packed = ids.new_zeros((ids.shape[0], width + 1)).scatter_(1, slot, ids)[:, :width]
    positions = torch.arange(width, device=device)
    packed_mask = (positions[None] < n_real[:, None]).long()
    hidden = adapter.hidden_states(packed, packed_mask, positions[None].expand(ids.shape[0], -1))
    index = predict.clamp(0, width - 1)[..., None].expand(-1, -1, hidden.shape[-1])
    return hidden.gather(1, index)


def _token_logprobs(logits: Tensor, targets: Tensor, vocab_size: int | None, temperature: float,
                    processors: list | None = None) -> Tensor:
    """log softmax(logits[:, :vocab_size] / temperature)[target] as fp32, computed in fp32 or wider; with
    `processors` (temperature / top-k / top-p warpers, `draw.build_processors`) they replace the division."""
    if vocab_size is not None:
        logits = logits[..., :vocab_size]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if processors:
        for processor in processors:  # the warpers act row by row and ignore the token history
            logits = processor(None, logits)
    elif temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None])[:, 0].float()


@torch.no_grad()
def teacher_forced_logprobs(model, rollout, *, vocab_size: int | None = None, temperature: float = 1.0,
                            chunk_size: int | None = None,
                            processors: list | None = None) -> tuple[Tensor, Tensor]:
    """(log model(y_t | y_<t, x) [B, T] fp32 on CPU, hidden states [B, T, H] on the model's device).

    `rollout` needs prompt_ids / prompt_mask (left padded) and response_ids / response_mask (a `Rollout`, or
    any object with those four tensors). One teacher-forced forward over each row's real tokens
    (`response_hidden`); log-probs are 0 where response_mask is 0, hidden states arbitrary there. Logits are
    sliced to `vocab_size` (default: the model's full width) and divided by `temperature`, then
    log-softmaxed in fp32; they are formed a few positions at a time, never [B, T, V]: one response row
    per head call (`chunk_size=None`, the rollout engine's grouping) or `chunk_size` positions of the
    flattened valid tokens per call (the evaluation's grouping). Both give the same numbers up to float
    round-off of the head matmul; each caller keeps the grouping its recorded numbers were made with.
    Runs without gradients; the caller sets the model's mode (see `score_with_teacher`). `processors`:
    logits warpers (temperature, top-k, top-p; `minillm.sampling.build_processors`) applied instead of the
    plain temperature, for log-probs under a truncated sampling distribution (the vLLM engine's re-scoring).
    """
    adapter = CausalLMAdapter(model)
    weight = adapter.head.weight
    if vocab_size is not None and weight is not None and vocab_size > weight.shape[0]:
        raise ValueError(f"vocab_size = {vocab_size} exceeds the model's logit width {weight.shape[0]}.")
    hidden = _response_hidden(adapter, rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids,
                              rollout.response_mask)
    keep = rollout.response_mask.bool()
    logprobs = torch.zeros(rollout.response_ids.shape, dtype=torch.float32)
    if chunk_size is None:
        for row in range(hidden.shape[0]):  # one row's real tokens at a time
            valid = keep[row]
            logits = adapter.head(hidden[row][valid.to(adapter.device)])
            targets = rollout.response_ids[row][valid].to(adapter.device)
            logprobs[row, valid] = _token_logprobs(logits, targets, vocab_size, temperature, processors).cpu()
        return logprobs, hidden
    valid = keep.to(adapter.device)
    flat, targets = hidden[valid], rollout.response_ids.to(adapter.device)[valid]
    pieces = [_token_logprobs(adapter.head(flat[start:start + chunk_size]), targets[start:start + chunk_size],
                              vocab_size, temperature, processors)
              for start in range(0, max(flat.shape[0], 1), chunk_size)]
    logprobs[valid.cpu()] = torch.cat(pieces).cpu()
    return logprobs, hidden


def score_with_teacher(rollout, student, teacher, *, temperature: float, shared_vocab_size: int | None,
                       return_teacher_hidden: bool):
    """Fill a student-only rollout's teacher fields (alpha = 0) from one teacher-forced forward pass.

    The forward runs over the rows' real tokens only (`response_hidden`: no left padding of the prompts,
    no right padding inside each row), which equals the decode-time teacher up to float round-off.
    """
    widths = [m.get_output_embeddings().weight.shape[0] for m in (student, teacher)]
    vocab = shared_vocab_size or min(widths)
    if vocab > min(widths):
        raise ValueError(f"shared_vocab_size = {vocab} exceeds the logit widths {widths}.")
    with EvalMode(teacher):
        logprobs, hidden = teacher_forced_logprobs(teacher, rollout, vocab_size=vocab,
                                                   temperature=temperature)
    hidden_out = None
    if return_teacher_hidden:
        keep = rollout.response_mask.bool()
        hidden_out = torch.where(keep[..., None], hidden.float().cpu(), torch.zeros(()))
    return dataclasses.replace(rollout, teacher_logprobs=logprobs,
                               mix_logprobs=rollout.student_logprobs.clone(), teacher_hidden=hidden_out)
