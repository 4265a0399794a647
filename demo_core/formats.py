"""Sequence formats as small objects that plug into `Engine.stream`, the one run path.

A format owns how its backbone drafts, scores and SCAN-refines an answer; the engine owns everything
else (inputs, timing, the canvas, events, the stage loop, VSR). Both formats hand the engine a state
with `codes` (B, N) and `scores` (B, N) and keep whatever else they need on it.

A format sees only the context (a 1-D tensor of codes): an analogy prompt `[x1, y1, ..., xK, yK, xq]` or a
sequential prompt `[f1, ..., fF]` (`sequence.py`), so both prompt kinds draft, score and refine the same way;
the answer is always in the format's own form, at positions L + n.

    ScanForm    the default backbone: SCAN-form draft (drafts/scan_form.py) or TensorAR windows
                (drafts/tensor.py), quality from the <good>/<bad> head, SCAN Eqs. 2-6 (refiners/scan.py)
    LvmRaster   a Hub LVM backbone: raster draft (drafts/raster.py), quality = the code probability,
                SCAN's training-free fallback (refiners/scan_fallback.py)
"""
from __future__ import annotations

from typing import Iterator

import torch

from .backbone import QUALITY_SCORES, SamplingConfig
from .drafts.raster import draft_raster, score_answers
from .drafts.scan_form import DraftState, DraftStep, draft_scan, score_answer
from .events import ScanStep
from .refiners.scan import ScanConfig, scan_refine, select_cache_batch
from .refiners.scan_fallback import scan_fallback


class ScanForm:
    """The SCAN-form sequence of the default backbone (sequence_format "scan")."""

    name = "scan"
    quality_scores = QUALITY_SCORES

    def __init__(self, bundle):
        self.model, self.vocab, self.tensor = bundle.backbone, bundle.vocab, bundle.tensor

    def draft(self, context: torch.Tensor, settings, sampling: SamplingConfig, generator: torch.Generator,
              state_out: list) -> Iterator:
        """Yields a `DraftStep` per token ("ar") or a `drafts.tensor.WindowStep` per slide ("tensor"); the raw
        state goes to `state_out` (`finish` turns it into a scored DraftState)."""
        if settings.draft_mode == "tensor":
            from .drafts.tensor import draft_tensor

            yield from draft_tensor(self.tensor, context, self.vocab.cells, sampling, generator, state_out=state_out)
        else:
            yield from draft_scan(self.model, self.vocab, context, sampling, generator, state_out=state_out,
                                  score=settings.quality_score)

    def finish(self, raw, context: torch.Tensor, settings) -> DraftState:
        """The draft's DraftState: a TensorAR draft is scored afterwards in SCAN form (quality + the refiners' cache)."""
        if settings.draft_mode != "tensor":
            return raw
        _, scores, cache = score_answer(self.model, self.vocab, context, raw.codes, score=settings.quality_score)
        return DraftState(cache, int(context.numel()), raw.codes, scores, torch.arange(self.vocab.cells))

    def choose(self, state: DraftState, row: int) -> None:
        """Keep candidate `row` only (its codes, scores and KV cache row)."""
        if state.codes.shape[0] > 1:
            select_cache_batch(state.cache, row)
            state.codes, state.scores = state.codes[row:row + 1], state.scores[row:row + 1]

    def scan(self, state: DraftState, settings, sampling: SamplingConfig, generator) -> Iterator[ScanStep]:
        config = ScanConfig(iterations=settings.scan_iterations, cells_per_iteration=settings.scan_cells,
                            score=settings.quality_score)
        yield from scan_refine(self.model, self.vocab, state, config, sampling, generator)

    def rescore(self, state: DraftState, codes: torch.Tensor, context: torch.Tensor, settings) -> None:
        """Score new codes (1, N) (after VSR) teacher-forced, with a fresh cache for the stages after."""
        _, scores, cache = score_answer(self.model, self.vocab, context, codes, score=settings.quality_score)
        state.codes, state.scores, state.cache, state.order = codes, scores, cache, torch.arange(self.vocab.cells)


class LvmRaster:
    """LVM's raster sequence (sequence_format "lvm"): no quality token, so a token's score is its probability."""

    name = "lvm"
    quality_scores = ("combined",)      # with no quality head, "combined" is p(code) alone

    def __init__(self, bundle):
        self.model, self.vocab = bundle.backbone, bundle.vocab

    def draft(self, context, settings, sampling, generator, state_out: list) -> Iterator[DraftStep]:
        for index, codes, probs in draft_raster(self.model, context, self.vocab.cells, self.vocab.codebook_size,
                                                sampling, generator, state_out):
            yield DraftStep(index, index, codes, probs)     # raster order: the cell is the index

    def finish(self, raw, context, settings):
        return raw

    def choose(self, state, row: int) -> None:
        state.codes, state.token_probs = state.codes[row:row + 1], state.token_probs[row:row + 1]

    def _score(self, state, codes: torch.Tensor) -> None:
        state.answer = score_answers(self.model, state, codes, self.vocab.codebook_size)[0]
        state.codes, state.token_probs = codes, state.answer.token_probs[None]

    def scan(self, state, settings, sampling, generator) -> Iterator[ScanStep]:
        if state.answer is None:
            self._score(state, state.codes)
        config = ScanConfig(iterations=settings.scan_iterations, cells_per_iteration=settings.scan_cells)
        final: list = []
        yield from scan_fallback(self.model, state, state.codes[0], state.answer, config, sampling, generator,
                                 self.vocab.codebook_size, final)
        codes, state.answer = final[0]
        state.codes, state.token_probs = codes[None], state.answer.token_probs[None]

    def rescore(self, state, codes: torch.Tensor, context, settings) -> None:
        self._score(state, codes)


def sequence_format(bundle):
    """The format object for a bundle's sequence_format."""
    return LvmRaster(bundle) if bundle.sequence_format == "lvm" else ScanForm(bundle)
