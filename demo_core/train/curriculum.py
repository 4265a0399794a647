"""What the second-generation backbone trains and validates on: task-family pairs and frame sequences.

Training batches come from the pre-tokenized `EpisodePool` (episodes.py). Each batch holds one
prompt shape, so no padding: K = k demonstration pairs ([x1, y1, ..., xk, yk, xq] -> yq), or F
context frames ([f1, ..., fF] -> f(F+1)). The mix is set by three knobs:
- `k_weights`: how often K = 1, 2, 3 (K = 1 is the cheapest and the studio's most common prompt);
- `kind_weights`: how often each training kind of the task family;
- `sequence_share`: the share of batches that are frame sequences (2 to 4 context frames).

Validation holds out photos (every kind, training parameter values), parameter values
(`heldout` split) and one whole kind (`task_family.HELDOUT_KINDS`), plus sequences from validation
photos; each group is encoded once.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .episodes import FRAMES_PER_EPISODE, EpisodePool


def encode_examples(tokenizer, examples) -> tuple[torch.Tensor, torch.Tensor]:
    """Examples with equal K -> context codes (B, (2K+1)N) and answer codes (B, N)."""
    images = []
    for example in examples:
        for x, y in example.pairs:
            images += [x, y]
        images += [example.query, example.answer]
    codes = tokenizer.encode(np.stack(images)).view(len(examples), -1, tokenizer.grid ** 2)  # (B, 2K+2, N)
    return codes[:, :-1].reshape(len(examples), -1), codes[:, -1]


@dataclass
class Batch:
    context: torch.Tensor       # (B, T) codes
    answer: torch.Tensor        # (B, N) codes
    labels: list                # kind (pairs) or sequence kind per example
    shape: str                  # "k=2" or "frames=3": one prompt shape per batch


class FamilyCurriculum:
    def __init__(self, pool: EpisodePool, k_weights: np.ndarray, kind_weights: dict[str, float] | None = None,
                 sequence_share: float = 0.2):
        if not 0.0 <= sequence_share <= 1.0:
            raise ValueError(f"sequence_share must be in [0, 1], got {sequence_share}")
        self.pool, self.k_weights, self.sequence_share = pool, np.asarray(k_weights, dtype=np.float64), sequence_share
        unknown = set(kind_weights or {}) - set(pool.kind_names)
        if unknown:
            raise ValueError(f"unknown or held-out kinds {', '.join(sorted(unknown))}; training kinds: {', '.join(pool.kind_names)}")
        self.kind_weights = np.array([(kind_weights or {}).get(name, 1.0) for name in pool.kind_names])
        if len(pool.frames) == 0:
            self.sequence_share = 0.0

    def batch(self, count: int, rng: np.random.Generator) -> Batch:
        if rng.random() < self.sequence_share:
            frames = int(rng.integers(2, FRAMES_PER_EPISODE))
            context, answer, labels = self.pool.sequence_batch(count, frames, rng)
            return Batch(context, answer, labels, f"frames={frames}")
        k = int(rng.choice([1, 2, 3], p=self.k_weights / self.k_weights.sum()))
        context, answer, labels = self.pool.pair_batch(count, k, rng, weights=self.kind_weights)
        return Batch(context, answer, labels, f"k={k}")


@dataclass
class Group:
    name: str                   # e.g. "val k=2", "heldout-params k=1", "sequences frames=3"
    labels: list
    context: torch.Tensor
    answer: torch.Tensor
    draft: bool                 # also measured on free-running drafts (the costly part)


def validation_groups(tokenizer, per_kind: int = 2, core_per_kind: int = 4, sequences: int = 8, seed: int = 1234, pool: str = "debian",
                      draft_kinds=("colorize", "inpaint", "edges_canny")) -> list[Group]:
    """Fixed validation examples, encoded once: per kind and K (validation photos), held-out parameter values and
    kinds (K = 2; labelled 'kind@heldout-params' / 'kind@heldout-kind'), and sequences ('sequence:pan'...).
    Drafted: the core kinds at K = 2 and the sequences."""
    from ..sequences import SEQUENCE_KINDS, SequenceSampler
    from ..task_family import HELDOUT_KINDS, KINDS, TRAIN_KINDS, FamilySampler

    cells = tokenizer.grid ** 2

    def encode(images) -> torch.Tensor:
        return tokenizer.encode(np.stack(images).astype(np.float32)).view(len(images), cells)

    def pair_group(name, sampler, kinds, k, draft, suffix="", count=per_kind):
        examples = [sampler.sample(kind=kind, k=k) for kind in kinds for _ in range(count)]
        context, answer = encode_examples(tokenizer, examples)
        return Group(name, [e.kind + suffix for e in examples], context.long(), answer.long(), draft)

    groups = []
    val = FamilySampler("val", tokenizer.image_size, seed, pool=pool)
    for k in (1, 2, 3):
        groups.append(pair_group(f"val k={k}", val, TRAIN_KINDS, k, draft=False))
    core = FamilySampler("val", tokenizer.image_size, seed + 1, pool=pool)
    groups.append(pair_group("core k=2", core, draft_kinds, 2, draft=True, count=core_per_kind))
    heldout = FamilySampler("heldout", tokenizer.image_size, seed + 2, pool=pool)
    groups.append(pair_group("heldout-params k=2", heldout, [k for k in KINDS if k not in HELDOUT_KINDS], 2, draft=False,
                             suffix="@heldout-params"))
    groups.append(pair_group("heldout-kind k=2", heldout, list(HELDOUT_KINDS), 2, draft=False, suffix="@heldout-kind",
                             count=core_per_kind))
    sequencer = SequenceSampler("val", tokenizer.image_size, seed + 3, frames_range=(3, 3), pool=pool)
    labels, images = [], []
    for kind in SEQUENCE_KINDS:
        for _ in range(max(1, sequences // len(SEQUENCE_KINDS))):
            sequence = sequencer.sample(kind=kind)
            images += list(sequence.frames) + [sequence.next_frame]
            labels.append("sequence:" + kind)
    codes = encode(images).view(len(labels), -1, cells)
    groups.append(Group("sequences frames=3", labels, codes[:, :-1].reshape(len(labels), -1).long(), codes[:, -1].long(), True))
    return groups
