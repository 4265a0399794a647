"""TensorAR (next-tensor prediction) on the default backbone: the adapter, the wrapper and the sliding draft.

Paper: "From Prediction to Perfection: Introducing Refinement to Autoregressive Image Generation" (TensorAR,
ICLR 2026, arXiv:2505.16324; summary in ../shared/papers/tensorar-summary.txt). Instead of one token per
step the model predicts an overlapping window ("tensor") of k tokens; adjacent windows share
k-1 tokens, so every position is predicted up to k times and refined as the window slides,
while attention stays causal and the KV cache stays usable. k = 1 is plain AR.

Sequence (LVM raster format, not the backbone's SCAN answer form):
    context [x1, y1, ..., xK, yK, xq]    L codes at positions 0..L-1, plain token embeddings
    answer  y_0 .. y_{N-1}              raster order, positions L..L+N-1
The input at answer index a (position L+a) is the window [y_a, ..., y_{a+k-1}] compressed into
one hidden state; its output is the window [y_{a+1}, ..., y_{a+k}] (k logits). The last context
token (position L-1) outputs the first window [y_0 .. y_{k-1}]. Window slots past the answer's
end are padding: masked in the encoder, ignored by the loss, never sampled.

Sliding draft, step s = 0..N-1 (one forward per step, the prefill being step 0):
    the model outputs the window over cells s .. s+k-1 (clipped at N);
    cell s is at the window's front: the code predicted for it now is FINAL (next step's
    window starts at s+1, so this is the prediction made as the cell leaves the front);
    cells s+1 .. are drafts, re-predicted at the next steps (cell p is predicted min(p+1, k) times);
    step s+1 feeds back the window [final y_s, latest drafts of y_{s+1} .. y_{s+k-1}].

The modules (`tensor_adapter.py`; paper Sec. "Residual Lightweight Encoding/Decoding"), all zero-initialised on their
residual branch so an untrained wrapper is exactly the backbone:
    input encoder   a 1-layer query transformer: one learned query attends over the k token
                    embeddings of the window (+ slot embeddings); h = embed(y_a) + out(...)
    output decoder  hidden state h -> k slot states h_j = h + down(gelu(up(norm(h)) + slot_j));
                    logits_j = lm_head(h_j), the backbone's own head
    LoRA            low-rank adapters on the attention projections (q, k, v, o), added by
                    forward hooks that act only inside the wrapper's forward (and only in the
                    calling thread): the shared backbone keeps serving SCAN and VSR unchanged.
The backbone is frozen and not saved with the adapter: `tensor/` in a bundle holds only
TensorAdapter (PyTorchModelHubMixin: config.json + model.safetensors). The paper's equal-steps
control is the same class with k = 1 (LoRA only, no encoder/decoder) trained on the raster answer.

Training noise. The paper's discrete tensor noise: input slot j is replaced by a uniform random
code with probability beta(j) (`noise_schedule`), beta(0) = 0 (the front of an input window is
always a final token), rising to beta(k-1) = 1 (the back was only predicted once). Measured on
the default backbone this teaches copying: slot 1 of input window a is output slot 0's target, and
it is the ground truth 91 % of the time in training but a 4-10 %-accurate draft at inference.
`self_draft_windows` is the alternative the trainer uses by default: the model's own drafts in
slots >= 1 (one extra no-grad pass), so training inputs are wrong as often as inference inputs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from ..backbone import SamplingConfig, sample_from_logits
from .tensor_adapter import (LORA_TARGETS, SCHEDULES, LoRA, TensorAdapter, TensorAR, attach,  # noqa: F401 (TensorAR's
                             noise_schedule)                                                 # public face)


def add_tensor_noise(windows: torch.Tensor, valid: torch.Tensor, beta: torch.Tensor, codebook_size: int,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Discrete tensor noise: q(x*_j | x_j) = Cat((1 - beta(j)) x_j + beta(j) / C) on every valid slot.

    windows (..., k) codes, valid (..., k) bool, beta (k,) -> noisy windows (..., k). Each slot is
    replaced with probability beta(j) by a code drawn uniformly from 0..C-1 (possibly itself).
    """
    noise = torch.rand(windows.shape, generator=generator, device=windows.device) < beta.to(windows.device, torch.float32)
    random_codes = torch.randint(0, codebook_size, windows.shape, generator=generator, device=windows.device)
    return torch.where(noise & valid, random_codes, windows)


@torch.no_grad()
def self_draft_windows(model: "TensorAR", context: torch.Tensor, windows: torch.Tensor, valid: torch.Tensor,
                       sampling: SamplingConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Self-generated tensor noise: slots j >= 1 of every input window replaced by the model's own drafts.

    At inference, input window a is [final y_a, drafts of y_{a+1} .. y_{a+k-1}], each draft sampled
    at the previous step from output row a, slot j. This reproduces that: one no-grad pass whose
    windows keep only their front token (slots >= 1 masked out of the encoder), then slot j of
    window a := a sample from row a, slot j (the prediction of cell a+j). Unlike uniform noise,
    the drafts are plausible and wrong exactly as often as the model is, so the adapter learns how
    far to trust them instead of learning to copy slot 1 (which is the ground truth 1 - beta(1)
    of the time under the paper's noise). windows (B, W, k), valid (B, W, k) -> (B, W, k).
    """
    k = windows.shape[-1]
    if k == 1 or windows.shape[1] == 0:
        return windows
    front_only = valid & (torch.arange(k, device=windows.device) == 0)
    logits = teacher_forced_logits(model, context, windows, front_only)[:, : windows.shape[1], 1:, : model.codebook_size]
    batch, rows, slots, codes = logits.shape
    drafts = sample_from_logits(logits.reshape(-1, codes), sampling, generator).view(batch, rows, slots)
    noisy = windows.clone()
    noisy[..., 1:] = torch.where(valid[..., 1:], drafts, windows[..., 1:])
    return noisy


def answer_windows(answer: torch.Tensor, k: int, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """answer (B, N) -> windows (B, N, k) with windows[:, a] = [y_a .. y_{a+k-1}] and valid (B, N, k) (False past the end)."""
    batch, cells = answer.shape
    padded = torch.cat([answer, answer.new_full((batch, k - 1), pad_id)], 1)
    windows = padded.unfold(1, k, 1)                                                     # (B, N, k)
    valid = (torch.arange(cells, device=answer.device)[:, None] + torch.arange(k, device=answer.device)) < cells
    return windows.contiguous(), valid[None].expand(batch, -1, -1)


# -- decoding ----------------------------------------------------------------------------------------

@dataclass
class WindowStep:
    """One slide of the draft: the window's cells and what was predicted for them at this step."""

    step: int                       # s: 0 .. N-1
    cells: list[int]                # window cells s .. s+k-1 (clipped at N), front first
    codes: torch.Tensor             # (B, len(cells)) codes predicted now; codes[:, 0] is FINAL for cell s
    probs: torch.Tensor             # (B, len(cells)) the model's probability of each predicted code
    previous: torch.Tensor          # (B, len(cells)) each cell's prediction before this step (-1: first time)
    current: torch.Tensor           # (B, N) latest prediction of every cell (-1: not yet predicted)
    revisions: torch.Tensor         # (N,) how many times each cell has been predicted so far

    @property
    def final_cell(self) -> int:
        return self.cells[0]

    def changed(self, row: int = 0) -> list[int]:
        """Cells whose code this step changed (re-predicted differently), for candidate `row`."""
        differs = (self.previous[row] >= 0) & (self.previous[row] != self.codes[row])
        return [cell for cell, hit in zip(self.cells, differs.tolist()) if hit]


@dataclass
class TensorDraft:
    """What a draft leaves behind: final codes, first (coarse) predictions, refinement counts, the cache."""

    codes: torch.Tensor             # (B, N) final codes
    probs: torch.Tensor             # (B, N) probability of each final code
    first: torch.Tensor             # (B, N) each cell's first prediction (the coarse draft)
    revisions: torch.Tensor         # (N,) times each cell was predicted: min(n+1, k)
    changes: torch.Tensor           # (B, N) times each cell's code changed while in the window
    windows: torch.Tensor           # (B, N-1, k) the input windows fed at steps 1..N-1 (for replay/tests)
    cache: object                   # KV cache over the context and the fed windows
    context_length: int
    step_logits: list = field(default_factory=list)   # per step (B, span, V) logits when keep_logits


def _batched_context(context: torch.Tensor, sampling: SamplingConfig, device) -> torch.Tensor:
    """(L,) -> (candidates, L); (B, L) rows are B different examples (candidates ignored)."""
    context = context.to(device).long()
    if context.dim() == 1:
        return context[None].repeat(max(1, sampling.candidates), 1)
    if context.dim() != 2:
        raise ValueError(f"context must be (L,) or (B, L), got {tuple(context.shape)}")
    return context


def _pick(logits: torch.Tensor, codebook_size: int, sampling: SamplingConfig, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, S, V) slot logits -> (B, S) sampled codes and their probabilities (codes only, never special ids)."""
    batch, span, _ = logits.shape
    flat = logits[..., :codebook_size].reshape(batch * span, codebook_size)
    codes = sample_from_logits(flat, sampling, generator)
    probs = torch.softmax(flat.float(), -1).gather(1, codes[:, None])[:, 0]
    return codes.view(batch, span), probs.view(batch, span)


@torch.no_grad()
def draft_tensor(model: TensorAR, context: torch.Tensor, cells: int, sampling: SamplingConfig,
                 generator: torch.Generator | None = None, state_out: list | None = None,
                 keep_logits: bool = False) -> Iterator[WindowStep]:
    """TensorAR sliding decoding with a KV cache: N steps, one forward each; yields every window.

    Step 0 is the prefill of the context (its last position outputs the first window); step s >= 1
    feeds the window [final y_{s-1}, drafts of y_s .. y_{s+k-2}] at position L+s-1 and gets the
    window over cells s .. s+k-1. Cell s's code at step s is final. With k = 1 and an untrained adapter
    this is the backbone's own raster draft.
    """
    device = model.device
    k, codebook = model.k, model.codebook_size
    context = _batched_context(context, sampling, device)
    batch, length = context.shape
    current = torch.full((batch, cells), -1, dtype=torch.long, device=device)
    final_probs = torch.zeros(batch, cells, device=device)
    first = torch.full_like(current, -1)
    revisions = torch.zeros(cells, dtype=torch.long)
    changes = torch.zeros(batch, cells, dtype=torch.long, device=device)
    fed = torch.zeros(batch, max(0, cells - 1), k, dtype=torch.long, device=device)
    slot = torch.arange(k, device=device)
    step_logits = []

    out = model(input_ids=context, position_ids=torch.arange(length, device=device)[None].repeat(batch, 1),
                use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    for step in range(cells):
        if step > 0:
            window = current[:, step - 1: step - 1 + k]                                    # (B, <=k)
            window = torch.cat([window, window.new_zeros(batch, k - window.shape[1])], 1)  # pad past the end
            valid = (step - 1 + slot < cells)[None, None].expand(batch, 1, k)
            fed[:, step - 1] = window
            out = model(windows=window[:, None], window_valid=valid,
                        position_ids=torch.full((batch, 1), length + step - 1, device=device),
                        past_key_values=cache, use_cache=True)
            cache = out.past_key_values
        span = min(k, cells - step)
        logits = out.logits[:, -1, :span]                                                   # (B, span, V)
        if keep_logits:
            step_logits.append(logits.float().cpu())
        codes, probs = _pick(logits, codebook, sampling, generator)
        window_cells = list(range(step, step + span))
        previous = current[:, step: step + span].clone()
        changes[:, step: step + span] += ((previous >= 0) & (previous != codes)).long()
        current[:, step: step + span] = codes
        first_time = first[:, step: step + span] < 0
        first[:, step: step + span] = torch.where(first_time, codes, first[:, step: step + span])
        revisions[step: step + span] += 1
        final_probs[:, step] = probs[:, 0]
        yield WindowStep(step, window_cells, codes.clone(), probs.clone(), previous, current.clone(), revisions.clone())
    if state_out is not None:
        state_out.append(TensorDraft(current, final_probs, first, revisions, changes, fed, cache, length, step_logits))


def teacher_forced_logits(model: TensorAR, context: torch.Tensor, windows: torch.Tensor, valid: torch.Tensor | None = None
                          ) -> torch.Tensor:
    """Uncached pass: context (B, L) + windows (B, W, k) fed at positions L..L+W-1 -> (B, W+1, k, V) logits.

    Row 0 is the last context position (the first window's prediction), row w the output of window w-1.
    Training uses it with ground-truth (noised) windows; tests compare it with the cached draft.
    """
    batch, length = context.shape
    total = length + windows.shape[1]
    positions = torch.arange(total, device=context.device)[None].repeat(batch, 1)
    return model(input_ids=context, windows=windows, window_valid=valid, position_ids=positions,
                 logits_to_keep=windows.shape[1] + 1).logits


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
