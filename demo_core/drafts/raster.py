"""The LVM raster sequence: its KV-cached draft loop, its teacher-forced scorer, and the format object the engine
plugs in for bundles with sequence_format "lvm".

Paper: "Sequential Modeling Enables Scalable Learning for Large Vision Models" (LVM, Bai et al., CVPR 2024,
arXiv:2312.00785); DESIGN.md "Reference facts about LVM". Each image is tokenized alone, 256 raster codes, and
the images are concatenated with no BOS and no separators, `[x1, y1, ..., xK, yK, xq]`; then the answer's codes
are sampled one forward per token with a KV cache. Ids >= the codebook (LVM's 100 special tokens) are never
sampled: only the code logits are read. The checkpoint's `eos_token_id` is 2, also a VQ code, so nothing here
ever stops early on it.

Forwards go through the model's runner (`fast_llama.fast_runner`: the plain-torch path where it applies,
transformers' forward otherwise, e.g. LVM-7B on a GPU), the same interface the SCAN form uses. Quality: a token's score is the model's
own probability of it, p(y_n | context, y_<n) (no quality token); SCAN becomes the training-free fallback of
`refiners/scan_fallback.py`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from ..backbone import SamplingConfig, sample_from_logits
from ..fast_llama import fast_runner


@dataclass
class AnswerScore:
    """A full answer scored under the model, given the context."""

    log_likelihood: float          # sum_n log p(y_n | context, y_<n), codes only
    log_probs: torch.Tensor        # (N, C) float32 log p(. | context, y_<n) per cell: the proposals
    token_probs: torch.Tensor      # (N,) p(y_n | context, y_<n): the fallback quality score


@dataclass
class RasterDraft:
    """What the draft leaves for the refiners: the context's KV cache and the answer (every candidate, until the
    engine keeps one)."""

    context_cache: object          # the runner's KV cache of the context alone (batch 1, L positions)
    first_log_probs: torch.Tensor  # (C,) log p(y_0 | context)
    codes: torch.Tensor            # (B, N)
    token_probs: torch.Tensor      # (B, N)
    answer: AnswerScore | None = None   # the kept answer scored teacher-forced (set by the refiners' stages)

    @property
    def scores(self) -> torch.Tensor:
        """(B, N) the quality score: each token's probability."""
        return self.token_probs


def _code_log_probs(logits: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """(..., V) logits -> (..., C) float32 log-probabilities over the codes only (special ids masked out)."""
    return torch.log_softmax(logits[..., :codebook_size].float(), dim=-1)


@torch.no_grad()
def draft_raster(model, context: torch.Tensor, cells: int, codebook_size: int, sampling: SamplingConfig,
                 generator: torch.Generator | None, state_out: list) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Sample `cells` codes after `context` in raster order; yields (index, codes (B,), probs (B,)).

    Prefill once (only the last position's logits are computed), then one forward per token.
    There is no stop condition: exactly `cells` tokens are written whatever they are (id 2, the
    checkpoint's EOS, included). The RasterDraft is appended to `state_out` at the end.
    """
    device = next(model.parameters()).device
    batch = max(1, sampling.candidates)
    length = int(context.numel())
    runner = fast_runner(model)
    out = runner(context.to(device)[None], torch.arange(length, device=device)[None], logits_to_keep=1)
    logits, context_cache = out.logits, out.past_key_values
    log_probs = _code_log_probs(logits[:, -1], codebook_size)                    # (1, C)
    first_log_probs = log_probs[0].clone()
    # candidates draft on a copy of the context cache, one row each; a single draft grows the context cache itself
    # and is cut back to the context afterwards
    cache = context_cache.repeated(batch) if batch > 1 else context_cache
    if batch > 1:
        log_probs = log_probs.expand(batch, -1)
    codes = torch.zeros(batch, cells, dtype=torch.long, device=device)
    probs = torch.zeros(batch, cells, dtype=torch.float32, device=device)
    for index in range(cells):
        # sampling reads code logits only: ids >= codebook_size cannot be drawn
        new_codes = sample_from_logits(log_probs, sampling, generator)             # (B,)
        codes[:, index] = new_codes
        probs[:, index] = log_probs.gather(1, new_codes[:, None])[:, 0].exp()
        yield index, new_codes.clone(), probs[:, index].clone()
        if index + 1 < cells:
            out = runner(new_codes[:, None], torch.full((batch, 1), length + index, device=device), cache)
            logits, cache = out.logits, out.past_key_values
            log_probs = _code_log_probs(logits[:, -1], codebook_size)
    context_cache.truncate(length)
    state_out.append(RasterDraft(context_cache, first_log_probs, codes, probs))


@torch.no_grad()
def score_answers(model, draft: RasterDraft, answers: torch.Tensor, codebook_size: int) -> list[AnswerScore]:
    """Teacher-forced log-likelihood of B full answers (B, N) in ONE forward after the context cache.

    The B answers sit side by side in one sequence; a block-diagonal causal mask lets each answer
    see the context and its own earlier tokens only, and every block reuses the answer positions
    L..L+N-2, so each row is scored exactly as if it were alone.
    """
    device = next(model.parameters()).device
    answers = answers.to(device)
    batch, cells = answers.shape
    length = draft.context_cache.get_seq_length()
    first = draft.first_log_probs.to(device)[None].expand(batch, -1)              # (B, C)
    if cells > 1:
        inputs = answers[:, :-1].reshape(1, -1)                                   # (1, B*(N-1))
        span = cells - 1
        positions = (length + torch.arange(span, device=device)).repeat(batch)[None]
        causal = torch.ones(span, span, dtype=torch.bool, device=device).tril()
        block = torch.block_diag(*[causal] * batch)                               # (B*(N-1), B*(N-1))
        mask = torch.cat([torch.ones(batch * span, length, dtype=torch.bool, device=device), block], dim=1)[None, None]
        logits = fast_runner(model)(inputs, positions, draft.context_cache, attention_mask=mask).logits
        draft.context_cache.truncate(length)                                      # back to the context alone
        rest = _code_log_probs(logits[0].view(batch, span, -1), codebook_size)    # (B, N-1, C)
        log_probs = torch.cat([first[:, None], rest], dim=1)                      # (B, N, C)
    else:
        log_probs = first[:, None]
    token_log_probs = log_probs.gather(2, answers[..., None])[..., 0]            # (B, N)
    return [AnswerScore(float(token_log_probs[b].double().sum()), log_probs[b], token_log_probs[b].exp())
            for b in range(batch)]
