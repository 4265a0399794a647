"""The SCAN-form sequence: its KV-cached draft loop, its teacher-forced scorer, and the format object the engine
plugs in.

Paper: "SCAN: Self-Calibrated Autoregression for High-Quality Visual Generation" (Feng et al.; arXiv id not
in the copy at ../shared/papers/scan-self-calibrated-autoregression.txt). The
context is LVM's `[x1, y1, ..., xK, yK, xq]`; the answer is `[<at_a>, y_a, <at_b>, y_b, ...]` (`sequence.py`):
the logits at `<at_n>` give cell n's code (SCAN Eq. 3, generation at a position-instruction token), the
logits at `y_n` restricted to `<good>`/`<bad>` its quality (Eq. 4, `backbone.token_score`).
The draft can also be TensorAR's sliding windows (`drafts/tensor.py`), scored afterwards in this form.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from ..backbone import SamplingConfig, code_probability, quality_from_logits, sample_from_logits, token_score
from ..fast_llama import fast_runner
from ..sequence import Vocab, answer_positions, interleave_answer


@dataclass
class DraftStep:
    """One written token: its cell, the code per candidate, its quality score per candidate."""

    index: int                  # 0-based count of tokens written
    cell: int
    codes: torch.Tensor         # (B,)
    scores: torch.Tensor        # (B,)


@dataclass
class DraftState:
    """What the draft leaves behind for the refiners: the KV cache and the answer so far."""

    cache: object               # KV cache over [context, answer pairs]: a fast_llama.FastCache (or TransformersCache)
    context_length: int
    codes: torch.Tensor         # (B, N) long
    scores: torch.Tensor        # (B, N) float
    order: torch.Tensor         # (N,) generation order of the cells


def _forward(model, input_ids, position_ids, cache, attention_mask=None, logits_to_keep: int = 0):
    """One cached forward through the model's runner (`fast_llama.fast_runner`)."""
    out = fast_runner(model)(input_ids=input_ids, position_ids=position_ids, past_key_values=cache,
                             attention_mask=attention_mask, logits_to_keep=logits_to_keep)
    return out.logits, out.past_key_values


@torch.no_grad()
def draft_scan(model, vocab: Vocab, context: torch.Tensor, sampling: SamplingConfig,
               generator: torch.Generator | None = None, order: torch.Tensor | None = None,
               state_out: list | None = None, score: str = "combined") -> Iterator[DraftStep]:
    """Write the answer in SCAN form with a KV cache, one forward per token.

    `context` is one context (L,) drafted `sampling.candidates` times, or a batch of contexts (B, L).

    The context is prefilled once (with the first <at_n>); then each forward takes
    [y_prev, <at_next>]: the logits at y_prev score it (quality), those at <at_next> give the
    next code. Yields a DraftStep per token once its score is known (`token_score(.., score)`); the final
    state (cache, codes, scores) is appended to `state_out` when given.
    """
    device = next(model.parameters()).device
    cells = vocab.cells
    context = context.to(device)
    if context.dim() == 1:        # one context, `sampling.candidates` drafts of it
        context = context[None].repeat(max(1, sampling.candidates), 1)
    batch, context_length = context.shape     # (B, L): one draft per row (all rows the same length)
    order = torch.arange(cells) if order is None else order.cpu()
    codes = torch.zeros(batch, cells, dtype=torch.long, device=device)
    scores = torch.zeros(batch, cells, dtype=torch.float32, device=device)

    first = int(order[0])
    input_ids = torch.cat([context, torch.full((batch, 1), vocab.at(first), device=device)], 1)
    positions = torch.cat([torch.arange(context_length), torch.tensor([context_length + first])]).to(device)[None].repeat(batch, 1)
    logits, cache = _forward(model, input_ids, positions, None, logits_to_keep=1)
    gen_logits = logits[:, -1, : vocab.codebook_size]
    for index in range(cells):
        cell = int(order[index])
        new_codes, probability = sample_from_logits(gen_logits, sampling, generator, with_probability=True)
        codes[:, cell] = new_codes
        if index + 1 < cells:
            nxt = int(order[index + 1])
            step_ids = torch.stack([new_codes, torch.full_like(new_codes, vocab.at(nxt))], dim=1)
            step_pos = torch.tensor([context_length + cell, context_length + nxt], device=device)[None].repeat(batch, 1)
        else:
            step_ids = new_codes[:, None]
            step_pos = torch.tensor([[context_length + cell]], device=device).repeat(batch, 1)
        logits, cache = _forward(model, step_ids, step_pos, cache)
        scores[:, cell] = token_score(quality_from_logits(logits[:, 0], vocab), probability, score)
        gen_logits = logits[:, -1, : vocab.codebook_size]
        yield DraftStep(index, cell, new_codes.clone(), scores[:, cell].clone())
    if state_out is not None:
        state_out.append(DraftState(cache, context_length, codes, scores, order))


@torch.no_grad()
def score_answer(model, vocab: Vocab, context: torch.Tensor, codes: torch.Tensor, order: torch.Tensor | None = None,
                 score: str = "combined"):
    """Teacher-forced pass over a full answer: returns (gen_logits (B, N, C) per cell, scores (B, N), cache); the
    scores are `token_score(.., score)`, as the draft loop would have given these codes.

    Used to (re)score an answer that did not come from the draft loop (e.g. after VSR) and by tests
    as the uncached reference.
    """
    device = next(model.parameters()).device
    codes = codes.to(device)
    batch, cells = codes.shape
    order = torch.arange(cells, device=device) if order is None else order.to(device)
    context_length = int(context.numel())
    answer = interleave_answer(vocab, order[None].repeat(batch, 1), codes[:, order])
    input_ids = torch.cat([context.to(device)[None].repeat(batch, 1), answer], dim=1)
    positions = torch.cat([torch.arange(context_length, device=device)[None].repeat(batch, 1),
                           answer_positions(context_length, order[None].repeat(batch, 1))], dim=1)
    logits, cache = _forward(model, input_ids, positions, None)
    at_logits = logits[:, context_length::2, : vocab.codebook_size]     # (B, N, C) in `order`
    quality = token_score(quality_from_logits(logits[:, context_length + 1::2], vocab),
                          code_probability(at_logits, codes[:, order]), score)
    gen = torch.empty_like(at_logits)
    gen[:, order] = at_logits
    scores = torch.empty_like(quality)
    scores[:, order] = quality
    return gen, scores, cache
