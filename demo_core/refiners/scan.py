"""SCAN refinement (Self-Calibrated Autoregression, paper Eqs. 2-6) on the KV-cached backbone.

Paper: "SCAN: Self-Calibrated Autoregression for High-Quality Visual Generation" (Feng et al.; arXiv id not
in the copy at ../shared/papers/scan-self-calibrated-autoregression.txt).

Each iteration t picks the c lowest-quality cells (Eq. 2), regenerates them at their
position-instruction tokens given the whole current image (Eq. 3), scores the new tokens
(Eq. 4) and keeps a new token only if its score beats the old one (Eqs. 5-6). The score is
`backbone.token_score`: by default p(<good>) x p(y'_n | image at <at_n>), the probe's own
probability of the code it drew; `ScanConfig.score = "head"` is the paper's p(<good>) alone.

Pipelined as the paper's next-set prediction: one forward per iteration carries the previous
iteration's new codes y'_n (to be scored) and this iteration's probes <at_m> (to be generated);
a probe's <at_m> stays in the KV cache between the two forwards. A 4-D attention mask lets every
new token see the committed cache and its own pair only, so one forward holds all c cells and
rejected tokens never influence anything: after the forward, the KV entries of accepted pairs are
committed, the new probes stay in flight, and everything else is dropped.
Selection skips cells still in flight and cells already rejected `max_tries` times.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from ..backbone import SamplingConfig, check_quality_score, quality_from_logits, sample_from_logits, token_score
from ..drafts.scan_form import DraftState
from ..events import ScanStep, as_grid
from ..fast_llama import fast_runner
from ..sequence import Vocab


@dataclass
class ScanConfig:
    iterations: int = 30          # T (paper default 30)
    cells_per_iteration: int = 4  # c (paper default 4)
    max_tries: int = 3            # a cell rejected this many times is left alone
    patience: int = 8             # stop after this many iterations in a row accept nothing
    score: str = "combined"       # backbone.token_score: "combined" (p(<good>) x p(code)) or "head" (the paper's)


def select_cache_positions(cache, keep: torch.Tensor) -> None:
    """Keep only the sequence positions `keep` (1-D long, sorted) of every layer of the cache, in place."""
    cache.keep(keep)


def select_cache_batch(cache, index: int) -> None:
    """Keep one batch row (the chosen candidate) of every layer, in place."""
    cache.select_batch(index)


def cache_length(cache) -> int:
    return int(cache.get_seq_length())


def lowest_cells(scores, count: int, excluded: set[int]) -> list[int]:
    """Eq. 2: the `count` cells with the lowest scores (a tensor or a list; ties by cell index), skipping `excluded`."""
    values = scores.float().cpu().tolist() if torch.is_tensor(scores) else scores
    ranked = sorted(range(len(values)), key=values.__getitem__)
    return [cell for cell in ranked if cell not in excluded][:count]


def pipeline_mask(committed: int, pending: int, probes: int, device) -> torch.Tensor:
    """The 4-D mask of one SCAN forward (True = may attend).

    The cache holds `committed` entries, then the `pending` <at_n> probes of the previous forward (in flight);
    this forward carries the pending codes y'_n, then the new probes <at_m>. Each y'_n sees the committed
    cache, its own <at_n> and itself; each new probe sees the committed cache and itself."""
    past = committed + pending
    new = pending + probes
    mask = np.zeros((1, 1, new, past + new), dtype=bool)      # numpy: a handful of ~1 us ops, not torch's ~10 us each
    mask[..., :committed] = True
    rows = np.arange(new)
    mask[0, 0, rows, past + rows] = True
    mask[0, 0, rows[:pending], committed + rows[:pending]] = True
    mask = torch.from_numpy(mask)
    return mask if torch.device(device).type == "cpu" else mask.to(device)


@torch.no_grad()
def scan_refine(model, vocab: Vocab, state: DraftState, config: ScanConfig, sampling: SamplingConfig,
                generator: torch.Generator | None = None) -> Iterator[ScanStep]:
    """Refine `state` (batch of one) in place; yields one ScanStep per finished iteration.

    Each forward carries the previous iteration's codes y'_n (to be scored; their <at_n> were fed, and
    cached, with the forward before) and this iteration's probes <at_m>: 2c tokens, not 3c. Afterwards
    the cache keeps the committed entries, the accepted pairs, and the new probes (in flight, visible to
    nothing but their own code next time); rejected pairs are dropped.
    """
    check_quality_score(config.score)
    device = next(model.parameters()).device
    runner = fast_runner(model)       # the same runner that built the draft's cache
    cache = state.cache
    codes, scores = state.codes[0].tolist(), state.scores[0].float().tolist()   # Python lists: the bookkeeping is per cell
    context_length = state.context_length
    committed = cache_length(cache)
    tries = [0] * vocab.cells
    pending: list[tuple[int, int]] = []       # (cell, new code) awaiting their score; their <at_n> is in the cache
    pending_probability: list[float] = []     # p(new code) under the probe's distribution
    idle, iteration = 0, 0
    for step in range(config.iterations + 1):
        probes: list[int] = []
        if step < config.iterations and idle < config.patience:
            excluded = {cell for cell, _ in pending} | {c for c in range(vocab.cells) if tries[c] >= config.max_tries}
            probes = lowest_cells(scores, config.cells_per_iteration, excluded)
        if not probes and not pending:
            break
        tokens = [code for _, code in pending] + [vocab.at(cell) for cell in probes]
        positions = [context_length + cell for cell, _ in pending] + [context_length + cell for cell in probes]
        mask = pipeline_mask(committed, len(pending), len(probes), device)
        past = committed + len(pending)
        out = runner(input_ids=torch.tensor([tokens], device=device), position_ids=torch.tensor([positions], device=device),
                     past_key_values=cache, use_cache=True, attention_mask=mask)
        logits = out.logits[0]
        cache = out.past_key_values

        accepted_entries: list[int] = []              # cache positions of accepted pairs: their <at_n> (in flight) and code
        if pending:
            record = ScanStep(iteration, [], [], [], [], [], [])
            new_scores = [token_score(quality, probability, config.score) for quality, probability
                          in zip(quality_from_logits(logits[: len(pending)], vocab).tolist(), pending_probability)]
            for j, (cell, code) in enumerate(pending):
                new_score, old_score = new_scores[j], scores[cell]
                accepted = new_score > old_score          # Eq. 5: keep only if the score improves
                record.cells.append(cell)
                record.old_codes.append(codes[cell])
                record.new_codes.append(code)
                record.old_scores.append(old_score)
                record.new_scores.append(new_score)
                record.accepted.append(accepted)
                if accepted:
                    codes[cell] = code
                    scores[cell] = new_score              # Eq. 6
                    accepted_entries += [committed + j, past + j]
                else:
                    tries[cell] += 1
            idle = 0 if any(record.accepted) else idle + 1
            record.codes, record.quality = as_grid(torch.tensor(codes)), as_grid(torch.tensor(scores))
            iteration += 1
            yield record
        if pending:       # commit the accepted pairs (sorted) before the new probes, which stay in flight; drop the rest
            tail = sorted(accepted_entries) + list(range(past + len(pending), past + len(pending) + len(probes)))
            select_cache_positions(cache, torch.cat([torch.arange(committed, device=device),
                                                     torch.tensor(tail, dtype=torch.long, device=device)]))
        committed += len(accepted_entries)
        if probes:
            gen_logits = logits[len(pending):, : vocab.codebook_size]
            sampled, probability = sample_from_logits(gen_logits, sampling, generator, with_probability=True)
            pending = list(zip(probes, sampled.tolist()))
            pending_probability = probability.tolist()
        else:
            pending, pending_probability = [], []
    state.cache = cache
    state.codes = torch.tensor(codes, device=state.codes.device)[None]
    state.scores = torch.tensor(scores, dtype=state.scores.dtype, device=state.scores.device)[None]
