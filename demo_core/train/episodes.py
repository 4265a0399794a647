"""Pre-tokenized training episodes for the in-context backbone: task-family pairs and frame sequences.

An *episode* is one task kind with one draw of its parameters applied to `PAIRS_PER_EPISODE` photos
(so any K <= 3 demonstrations and a query can be cut from it, in any order), or one frame sequence
of `FRAMES_PER_EPISODE` frames (any run of consecutive frames and the next one). Both are VQ-encoded
once and cached under runs/ by tokenizer fingerprint; batches are then drawn from the pool for free.
Building it is the cost (views + VQ encoding of every image), so the pool is built in chunks that
are saved as they finish: an interrupted build resumes.

Layouts (LVM's, no separators): pairs [x1, y1, ..., xK, yK, xq] -> yq; sequences [f1, ..., fF] -> f(F+1).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

PAIRS_PER_EPISODE = 4       # K <= 3 demonstrations + the query
FRAMES_PER_EPISODE = 5      # up to 4 context frames + the next one


class EpisodePool:
    """`pairs` (E, 4, 2, N) int16 codes with `kinds` (E,) indices into `kind_names`; `frames` (S, 5, N) int16 codes
    with `sequence_kinds` (S,) indices into `sequence_names`."""

    def __init__(self, tokenizer, episodes: int, sequences: int, seed: int, cache: Path | None = None, pool: str = "debian",
                 chunk: int = 256, logger=None):
        from ..sequences import SEQUENCE_KINDS, SequenceSampler
        from ..task_family import TRAIN_KINDS, FamilySampler

        self.kind_names, self.sequence_names = list(TRAIN_KINDS), list(SEQUENCE_KINDS)
        cells = tokenizer.grid ** 2
        parts = {"pairs": [], "kinds": [], "frames": [], "sequence_kinds": []}
        if cache is not None and cache.exists():
            parts = torch.load(cache, weights_only=True)
        have_pairs = sum(len(p) for p in parts["kinds"])
        have_frames = sum(len(p) for p in parts["sequence_kinds"])
        done = have_pairs + have_frames
        if have_pairs < episodes or have_frames < sequences:   # a complete cache needs no photos (a lent GPU has none)
            family = FamilySampler("train", tokenizer.image_size, seed + done, pool=pool)
            sequencer = SequenceSampler("train", tokenizer.image_size, seed + done,
                                        frames_range=(FRAMES_PER_EPISODE - 1,) * 2, pool=pool)
        bar = tqdm(total=episodes + sequences, initial=have_pairs + have_frames, desc="episode pool", dynamic_ncols=True)
        while have_pairs < episodes or have_frames < sequences:
            if have_pairs < episodes:
                count = min(chunk, episodes - have_pairs)
                images, kinds = [], []
                for _ in range(count):
                    example = family.sample(k=PAIRS_PER_EPISODE - 1)
                    for x, y in example.pairs + [(example.query, example.answer)]:
                        images += [x, y]
                    kinds.append(self.kind_names.index(example.kind))
                codes = _encode(tokenizer, images).view(count, PAIRS_PER_EPISODE, 2, cells)
                parts["pairs"].append(codes.to(torch.int16))
                parts["kinds"].append(torch.tensor(kinds, dtype=torch.int16))
                have_pairs += count
            else:
                count = min(chunk, sequences - have_frames)
                images, kinds = [], []
                for _ in range(count):
                    sequence = sequencer.sample()
                    images += sequence.frames + [sequence.next_frame]
                    kinds.append(self.sequence_names.index(sequence.kind))
                codes = _encode(tokenizer, images).view(count, FRAMES_PER_EPISODE, cells)
                parts["frames"].append(codes.to(torch.int16))
                parts["sequence_kinds"].append(torch.tensor(kinds, dtype=torch.int16))
                have_frames += count
            bar.update(count)
            if cache is not None:
                cache.parent.mkdir(parents=True, exist_ok=True)
                torch.save(parts, cache)
        bar.close()
        empty_pairs, empty_frames = torch.zeros(0, PAIRS_PER_EPISODE, 2, cells, dtype=torch.int16), torch.zeros(0, FRAMES_PER_EPISODE, cells, dtype=torch.int16)
        self.pairs = torch.cat(parts["pairs"]) if parts["pairs"] else empty_pairs
        self.kinds = torch.cat(parts["kinds"]) if parts["kinds"] else torch.zeros(0, dtype=torch.int16)
        self.frames = torch.cat(parts["frames"]) if parts["frames"] else empty_frames
        self.sequence_kinds = torch.cat(parts["sequence_kinds"]) if parts["sequence_kinds"] else torch.zeros(0, dtype=torch.int16)
        if logger:
            logger.info(f"episode pool: {len(self.pairs)} pair episodes, {len(self.frames)} sequences")

    def pair_batch(self, count: int, k: int, rng: np.random.Generator, weights: np.ndarray | None = None):
        """count examples with K = k: context (B, (2k+1)N), answer (B, N), kind names. `weights` over kind_names."""
        if not 1 <= k <= PAIRS_PER_EPISODE - 1:
            raise ValueError(f"k must be 1..{PAIRS_PER_EPISODE - 1}, got {k}")
        if weights is not None:
            per_episode = np.asarray(weights)[self.kinds.numpy()]
            rows = rng.choice(len(self.pairs), size=count, replace=False, p=per_episode / per_episode.sum())
        else:
            rows = rng.choice(len(self.pairs), size=count, replace=False)
        contexts, answers = [], []
        for row in rows:
            order = rng.permutation(PAIRS_PER_EPISODE)[: k + 1]
            episode = self.pairs[row]
            contexts.append(torch.cat([episode[i].flatten() for i in order[:-1]] + [episode[order[-1], 0]]))
            answers.append(episode[order[-1], 1])
        return torch.stack(contexts).long(), torch.stack(answers).long(), [self.kind_names[int(self.kinds[r])] for r in rows]

    def sequence_batch(self, count: int, frames: int, rng: np.random.Generator):
        """count sequences of `frames` context frames: context (B, frames*N), answer (B, N), kind names."""
        if not 2 <= frames <= FRAMES_PER_EPISODE - 1:
            raise ValueError(f"frames must be 2..{FRAMES_PER_EPISODE - 1}, got {frames}")
        rows = rng.choice(len(self.frames), size=count, replace=False)
        contexts, answers = [], []
        for row in rows:
            start = int(rng.integers(0, FRAMES_PER_EPISODE - frames))
            clip = self.frames[row, start:start + frames + 1]
            contexts.append(clip[:-1].flatten())
            answers.append(clip[-1])
        return torch.stack(contexts).long(), torch.stack(answers).long(), [self.sequence_names[int(self.sequence_kinds[r])] for r in rows]


def _encode(tokenizer, images: list, batch: int = 128) -> torch.Tensor:
    codes = [tokenizer.encode(np.stack(images[i:i + batch]).astype(np.float32)) for i in range(0, len(images), batch)]
    return torch.cat(codes).view(len(images), -1)
