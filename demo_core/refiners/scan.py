"""SCAN refinement (Self-Calibrated Autoregression, paper Eqs. 2-6) on the KV-cached backbone.

Each iteration t picks the c lowest-quality cells (Eq. 2), regenerates them at their
position-instruction tokens given the whole current image (Eq. 3), scores the new tokens
(Eq. 4) and keeps a new token only if its score beats the old one (Eqs. 5-6).

Pipelined as the paper's next-set prediction: one forward per iteration carries the previous
iteration's new pairs [<at_n>, y'_n] (to be scored) and this iteration's probes <at_m> (to be
generated). A 4-D attention mask lets every new token see the committed cache and its own pair
only, so one forward holds all c cells and rejected tokens never influence anything: after the
forward, the KV entries of accepted pairs are kept and everything else is dropped.
Selection skips cells still in flight and cells already rejected `max_tries` times.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch

from ..backbone import DraftState, SamplingConfig, quality_from_logits, sample_from_logits
from ..fast_llama import fast_runner
from ..sequence import Vocab


@dataclass
class ScanConfig:
    iterations: int = 30          # T (paper default 30)
    cells_per_iteration: int = 4  # c (paper default 4)
    max_tries: int = 3            # a cell rejected this many times is left alone
    patience: int = 8             # stop after this many iterations in a row accept nothing


@dataclass
class ScanIteration:
    """The outcome of one refinement iteration: per regenerated cell, old/new token and score."""

    iteration: int
    cells: list[int]
    old_tokens: list[int]
    new_tokens: list[int]
    old_scores: list[float]
    new_scores: list[float]
    accepted: list[bool]
    codes: torch.Tensor = field(repr=False, default=None)    # (N,) image after this iteration
    scores: torch.Tensor = field(repr=False, default=None)   # (N,) quality after this iteration


def select_cache_positions(cache, keep: torch.Tensor) -> None:
    """Keep only the sequence positions `keep` (1-D long) of every layer of a DynamicCache, in place."""
    for layer in cache.layers:
        if hasattr(layer, "keep"):
            layer.keep(keep)
        else:
            layer.keys = layer.keys.index_select(-2, keep)
            layer.values = layer.values.index_select(-2, keep)


def select_cache_batch(cache, index: int) -> None:
    """Keep one batch row (the chosen candidate) of every layer, in place."""
    for layer in cache.layers:
        if hasattr(layer, "select_batch"):
            layer.select_batch(index)
        else:
            layer.keys = layer.keys[index:index + 1].contiguous()
            layer.values = layer.values[index:index + 1].contiguous()


def cache_length(cache) -> int:
    return int(cache.layers[0].get_seq_length())


def lowest_cells(scores: torch.Tensor, count: int, excluded: set[int]) -> list[int]:
    """Eq. 2: the `count` cells with the lowest scores, skipping `excluded`."""
    ranked = torch.argsort(scores.float().cpu(), stable=True).tolist()
    return [cell for cell in ranked if cell not in excluded][:count]


@torch.no_grad()
def scan_refine(model, vocab: Vocab, state: DraftState, config: ScanConfig, sampling: SamplingConfig,
                generator: torch.Generator | None = None) -> Iterator[ScanIteration]:
    """Refine `state` (batch of one) in place; yields one ScanIteration per finished iteration."""
    device = next(model.parameters()).device
    runner = fast_runner(model)       # the same runner that built the draft's cache
    cache = state.cache
    codes, scores = state.codes[0].clone(), state.scores[0].clone()
    context_length = state.context_length
    tries = torch.zeros(vocab.cells, dtype=torch.long)
    pending: list[tuple[int, int]] = []       # (cell, new code) awaiting their score
    idle, iteration = 0, 0
    for step in range(config.iterations + 1):
        probes: list[int] = []
        if step < config.iterations and idle < config.patience:
            excluded = {cell for cell, _ in pending} | {c for c in range(vocab.cells) if tries[c] >= config.max_tries}
            probes = lowest_cells(scores, config.cells_per_iteration, excluded)
        if not probes and not pending:
            break
        tokens, positions = [], []
        for cell, code in pending:
            tokens += [vocab.at(cell), code]
            positions += [context_length + cell] * 2
        for cell in probes:
            tokens.append(vocab.at(cell))
            positions.append(context_length + cell)
        past = cache_length(cache)
        new = len(tokens)
        mask = torch.zeros(1, 1, new, past + new, dtype=torch.bool, device=device)
        mask[..., :past] = True
        diagonal = torch.arange(new, device=device)
        mask[0, 0, diagonal, past + diagonal] = True                       # each new token sees itself
        pairs = torch.arange(len(pending), device=device)
        mask[0, 0, 2 * pairs + 1, past + 2 * pairs] = True                 # y'_n also sees its own <at_n>
        out = runner(input_ids=torch.tensor([tokens], device=device), position_ids=torch.tensor([positions], device=device),
                    past_key_values=cache, use_cache=True, attention_mask=mask)
        logits = out.logits[0]
        cache = out.past_key_values

        keep: list[int] = []                          # new positions to keep after the committed `past`
        if pending:
            record = ScanIteration(iteration, [], [], [], [], [], [])
            new_scores = quality_from_logits(logits[1: 2 * len(pending): 2], vocab).tolist()
            for j, (cell, code) in enumerate(pending):
                new_score = new_scores[j]
                old_score = float(scores[cell])
                accepted = new_score > old_score          # Eq. 5: keep only if the score improves
                record.cells.append(cell)
                record.old_tokens.append(int(codes[cell]))
                record.new_tokens.append(code)
                record.old_scores.append(old_score)
                record.new_scores.append(new_score)
                record.accepted.append(accepted)
                if accepted:
                    codes[cell] = code
                    scores[cell] = new_score              # Eq. 6
                    keep += [past + 2 * j, past + 2 * j + 1]
                else:
                    tries[cell] += 1
            idle = 0 if any(record.accepted) else idle + 1
            record.codes, record.scores = codes.clone(), scores.clone()
            iteration += 1
            yield record
        if len(keep) < new:
            select_cache_positions(cache, torch.cat([torch.arange(past, device=device), torch.tensor(keep, dtype=torch.long, device=device)]))
        if probes:
            gen_logits = logits[2 * len(pending):, : vocab.codebook_size]
            sampled = sample_from_logits(gen_logits, sampling, generator)
            pending = list(zip(probes, sampled.tolist()))
        else:
            pending = []
    state.cache = cache
    state.codes = codes[None]
    state.scores = scores[None]
