"""The first-generation training data: five fixed tasks (colorization, inpainting, edges, posterize, invert)
on the packaged images, as the embedded default `retouch-tiny` (8x8 codes) was trained. Kept so that bundle
can be reproduced and resumed: `python -m demo_core.train backbone --data five --bundle assets/retouch-tiny`."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..tasks import TASKS, ExampleSampler
from .curriculum import Batch, Group, encode_examples


VIEWS = ("photo", "colorization:x", "inpainting:x", "edges:y", "posterize:y", "invert:y")
# (x view, y view) of each task in terms of VIEWS
TASK_VIEWS = {"colorization": ("colorization:x", "photo"), "inpainting": ("inpainting:x", "photo"),
              "edges": ("photo", "edges:y"), "posterize": ("photo", "posterize:y"), "invert": ("photo", "invert:y")}


class TokenPool:
    """Pre-tokenized training images: for each of `size` random crops, the codes of the photo and of
    every task's non-photo side. Examples are then drawn from the pool for free, instead of
    VQ-encoding ~100 images per step (a third of a step's time). Cached under runs/ by tokenizer."""

    def __init__(self, tokenizer, size: int, seed: int, cache: Path | None = None, logger=None):
        if cache is not None and cache.exists():
            self.codes = torch.load(cache, weights_only=True)
            return
        from ..data import ImageSampler

        images = ImageSampler("train", tokenizer.image_size, seed + 17)
        rng = np.random.default_rng(seed + 23)
        chunks, batch = [], 128
        for start in tqdm(range(0, size, batch), desc="token pool", dynamic_ncols=True):
            views = []
            for _ in range(min(batch, size - start)):
                photo = images.sample()
                views += [photo, TASKS["colorization"].transform(photo, rng)[0], TASKS["inpainting"].transform(photo, rng)[0],
                          TASKS["edges"].transform(photo, rng)[1], TASKS["posterize"].transform(photo, rng)[1],
                          TASKS["invert"].transform(photo, rng)[1]]
            chunks.append(tokenizer.encode(np.stack(views)).view(-1, len(VIEWS), tokenizer.grid ** 2).to(torch.int16))
        self.codes = torch.cat(chunks)                                   # (size, views, N)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save(self.codes, cache)
        if logger:
            logger.info(f"token pool: {len(self.codes)} crops x {len(VIEWS)} views")

    def batch(self, count: int, k: int, rng: np.random.Generator, tasks=tuple(TASKS),
              weights: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """count examples of K=k pairs (one random task per example, drawn with `weights`; images never
        repeated within one) -> context codes (B, (2k+1)N), answer codes (B, N)."""
        contexts, answers = [], []
        for _ in range(count):
            x_view, y_view = (VIEWS.index(v) for v in TASK_VIEWS[tasks[int(rng.choice(len(tasks), p=weights))]])
            rows = rng.choice(len(self.codes), size=k + 1, replace=False)
            parts = []
            for row in rows[:-1]:
                parts += [self.codes[row, x_view], self.codes[row, y_view]]
            parts.append(self.codes[rows[-1], x_view])
            contexts.append(torch.cat(parts))
            answers.append(self.codes[rows[-1], y_view])
        return torch.stack(contexts).long(), torch.stack(answers).long()


class FiveTaskCurriculum:
    """Batches of one K (drawn with `k_weights`), each example a task drawn with `task_weights`."""

    def __init__(self, pool: TokenPool | None, tokenizer, sampler: ExampleSampler, k_weights: np.ndarray,
                 task_weights: np.ndarray):
        self.pool, self.tokenizer, self.sampler = pool, tokenizer, sampler
        self.k_weights, self.task_weights = k_weights, task_weights

    def batch(self, count: int, rng: np.random.Generator) -> Batch:
        k = int(rng.choice([1, 2, 3], p=self.k_weights))
        if self.pool is not None:
            context, answer = self.pool.batch(count, k, rng, weights=self.task_weights)
            return Batch(context, answer, [], f"k={k}")
        tasks = rng.choice(list(TASKS), size=count, p=self.task_weights)
        context, answer = encode_examples(self.tokenizer, [self.sampler.sample(task=str(t), k=k) for t in tasks])
        return Batch(context, answer, [str(t) for t in tasks], f"k={k}")


def validation_groups(tokenizer, count: int = 96, seed: int = 1234) -> list[Group]:
    """Fixed held-out examples (validation source images) of every task at K = 1, 2, 3, all drafted."""
    sampler = ExampleSampler("val", tokenizer.image_size, seed)
    groups = []
    for k in (1, 2, 3):
        examples = [sampler.sample(task=list(TASKS)[i % len(TASKS)], k=k) for i in range(count // 3)]
        context, answer = encode_examples(tokenizer, examples)
        groups.append(Group(f"val k={k}", [e.task for e in examples], context, answer, draft=True))
    return groups
