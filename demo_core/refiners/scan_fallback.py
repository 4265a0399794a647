"""SCAN's training-free fallback for backbones without a quality token (LVM-7B): quality = the model's own
probability of each token; a resampled cell is kept only if the answer's log-likelihood improves.

Paper: "SCAN: Self-Calibrated Autoregression for High-Quality Visual Generation" (Feng et al.; arXiv id not
in the copy at ../shared/papers/scan-self-calibrated-autoregression.txt). Eqs.
2 and 5 with the token probability as the score and the sequence likelihood as the acceptance test (DESIGN.md,
"training-free fallback"). What a causal LM allows, honestly: the proposal for cell n sees only the context and
the cells before n (raster order), but the acceptance test scores every later cell too, so a change is kept only
if the whole image, after it included, becomes more likely. Candidates are scored in one teacher-forced forward
(`drafts/raster.score_answers`: a block-diagonal attention mask puts them side by side after the context cache).
"""
from __future__ import annotations

from typing import Iterator

import torch

from ..backbone import SamplingConfig, sample_from_logits
from ..drafts.raster import AnswerScore, RasterDraft, score_answers
from ..events import ScanStep, as_grid
from .scan import ScanConfig, lowest_cells


@torch.no_grad()
def scan_fallback(model, draft: RasterDraft, codes: torch.Tensor, current: AnswerScore, config: ScanConfig,
                  sampling: SamplingConfig, generator: torch.Generator | None,
                  codebook_size: int, result_out: list) -> Iterator[ScanStep]:
    """The training-free SCAN fallback: resample the least likely cells, keep what raises log p(answer).

    Per iteration: the c cells with the lowest token probability (SCAN Eq. 2, with probability as
    the score) get a new code each, drawn from p(. | context, y_<n) with the current code excluded
    (the prefix is all a causal LM conditions a position on). The c single-change answers are
    scored in one forward; the changes that raise the answer's log-likelihood are kept — all of
    them together if that combination beats the best single one (one more forward), else only
    the best (the accept-if-improved rule of SCAN Eq. 5, on the sequence likelihood). Every
    accepted step strictly increases log p(answer | context). The final (codes, score) is
    appended to `result_out`.
    """
    codes = codes.clone()
    cells = codes.numel()
    tries = torch.zeros(cells, dtype=torch.long)
    idle = 0
    for iteration in range(config.iterations):
        if idle >= config.patience:
            break
        excluded = {cell for cell in range(cells) if tries[cell] >= config.max_tries}
        chosen = lowest_cells(current.token_probs, config.cells_per_iteration, excluded)
        if not chosen:
            break
        index = torch.tensor(chosen, device=codes.device)
        proposal = current.log_probs[index].clone()                               # (c, C)
        proposal[torch.arange(len(chosen)), codes[index]] = float("-inf")         # a *different* code
        new_codes = sample_from_logits(proposal, sampling, generator)
        singles = codes[None].repeat(len(chosen), 1)
        singles[torch.arange(len(chosen)), index] = new_codes
        scores = score_answers(model, draft, singles, codebook_size)
        improving = [i for i, score in enumerate(scores) if score.log_likelihood > current.log_likelihood]
        accepted_rows: list[int] = []
        following = current
        if improving:
            best = max(improving, key=lambda i: scores[i].log_likelihood)
            accepted_rows, following = [best], scores[best]
            if len(improving) > 1:
                combined = codes.clone()
                combined[index[improving]] = new_codes[improving]
                together = score_answers(model, draft, combined[None], codebook_size)[0]
                if together.log_likelihood > scores[best].log_likelihood:
                    accepted_rows, following = improving, together
        record = ScanStep(iteration, list(chosen), [int(codes[c]) for c in chosen], new_codes.tolist(),
                               [float(current.token_probs[c]) for c in chosen],
                               # a single change leaves the prefix of its cell as it was: its new probability is exact here
                               [float(current.log_probs[c, int(n)].exp()) for c, n in zip(chosen, new_codes.tolist())],
                               [i in accepted_rows for i in range(len(chosen))])
        for i, cell in enumerate(chosen):
            if i in accepted_rows:
                codes[cell] = new_codes[i]
            else:
                tries[cell] += 1
        current = following
        idle = 0 if accepted_rows else idle + 1
        record.codes, record.quality = as_grid(codes), as_grid(current.token_probs)
        yield record
    result_out.append((codes, current))
