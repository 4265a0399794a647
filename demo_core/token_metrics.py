"""Token metrics: accuracy, perplexity, AUROC of a quality score, and cosine distance between token embeddings.

Each is written once here (`metrics` re-exports them): the eval table, the studio, the trainers and VSR's loss
use these. Cosine distance is VSR's Eq. 4 summand and its Fig. 2 curve ("Visual Self-Refinement for
Autoregressive Models", ../shared/papers/visual-self-refinement.txt); AUROC ranks wrong draft tokens by the SCAN
quality score (SCAN's Eq. 4).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _as_numpy(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values)


def token_accuracy(pred_tokens, true_tokens) -> float:
    """Fraction of positions where the predicted token equals the ground truth (arrays or tensors)."""
    pred, true = _as_numpy(pred_tokens), _as_numpy(true_tokens)
    if pred.shape != true.shape:
        raise ValueError(f"token arrays differ in shape: {pred.shape} vs {true.shape}.")
    if pred.size == 0:
        raise ValueError("token accuracy of empty token arrays is undefined.")
    return float(np.mean(pred == true))


def perplexity(log_probs) -> float:
    """exp(mean negative log-probability) of the ground-truth tokens (natural log); 1 is perfect."""
    values = _as_numpy(log_probs).astype(np.float64)
    if values.size == 0:
        raise ValueError("perplexity of no tokens is undefined.")
    if np.any(values > 1e-6) or np.any(np.isnan(values)):
        raise ValueError("log_probs must be log-probabilities (<= 0) of the ground-truth tokens.")
    return float(np.exp(-values.mean()))


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of `scores` for `labels` (1 positive), by ranks (ties averaged); NaN for one class."""
    from scipy.stats import rankdata

    positives, negatives = labels == 1, labels == 0
    if positives.sum() == 0 or negatives.sum() == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[positives].sum() - positives.sum() * (positives.sum() + 1) / 2) / (positives.sum() * negatives.sum()))


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(..., D), (..., D) -> (...) 1 - cos(a, b) in float32: the summand of VSR's Eq. 4 (and its Fig. 2 curve)."""
    return 1.0 - F.cosine_similarity(a.float(), b.float(), dim=-1, eps=1e-8)


@torch.no_grad()
def token_cosine_distances(embeddings: torch.Tensor, tokens, truth_tokens) -> np.ndarray:
    """(N,) 1 - cos(e(token), e(truth token)) per position, `embeddings` (V, D) the backbone's input embedding table."""
    index = [torch.as_tensor(np.asarray(t).reshape(-1), device=embeddings.device).long() for t in (tokens, truth_tokens)]
    return cosine_distance(embeddings[index[0]], embeddings[index[1]]).cpu().numpy()


def edit_reach(changed: np.ndarray, grid: int) -> np.ndarray:
    """(H, W) bool of edited pixels -> (g, g) bool: the cells the edit touches plus a one-cell margin (8-neighbours)."""
    cell = changed.shape[0] // grid
    cells = np.pad(changed.reshape(grid, cell, grid, cell).any(axis=(1, 3)), 1)
    reach = np.zeros((grid, grid), bool)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            reach |= cells[dy:dy + grid, dx:dx + grid]
    return reach
