"""Tasks: x -> y transforms that turn any image into a demonstration pair, and the
in-context example sampler (K pairs of one task plus a query and its answer).

Three of the tasks (edges, posterize, invert) take an ordinary photo as input, so only the
demonstrations can tell the model which one is wanted.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from scipy import ndimage

from .data import ImageSampler

MASK_GREY = 0.5  # fill of the inpainting box


def luminance(image: np.ndarray) -> np.ndarray:
    """HxWx3 -> HxW, Rec. 601 weights."""
    return image[..., 0] * 0.299 + image[..., 1] * 0.587 + image[..., 2] * 0.114


def colorization(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """grey -> colour."""
    grey = luminance(image)
    return np.repeat(grey[..., None], 3, axis=-1).astype(np.float32), image


def inpainting(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """image with a grey box (a quarter to a half of the side) -> full image."""
    size = image.shape[0]
    box_h, box_w = (int(v) for v in rng.integers(size // 4, size // 2 + 1, size=2))
    top, left = int(rng.integers(0, size - box_h + 1)), int(rng.integers(0, size - box_w + 1))
    masked = image.copy()
    masked[top:top + box_h, left:left + box_w] = MASK_GREY
    return masked, image


def edges(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """photo -> soft edge map: Sobel gradient magnitude of the lightly smoothed luminance, white on black.

    A soft magnitude map rather than 1-px binary Canny lines: 8x8-token images cannot hold
    aliased hairlines, and the magnitude keeps the strength of each edge.
    """
    grey = ndimage.gaussian_filter(luminance(image).astype(np.float64), sigma=0.8)
    magnitude = np.hypot(ndimage.sobel(grey, axis=0), ndimage.sobel(grey, axis=1))
    edge_map = np.clip(magnitude / 1.2, 0.0, 1.0) ** 0.8
    return image, np.repeat(edge_map[..., None], 3, axis=-1).astype(np.float32)


def posterize(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """photo -> 4 levels per channel (flat colour regions)."""
    return image, (np.round(image * 3.0) / 3.0).astype(np.float32)


def invert(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """photo -> negative."""
    return image, (1.0 - image).astype(np.float32)


@dataclass(frozen=True)
class Task:
    name: str
    title: str                                     # shown in the UI's task hint
    transform: Callable[[np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]
    photo_input: bool                              # x is an unmodified photo: only the demonstrations decide


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("colorization", "grey → colour", colorization, False),
        Task("inpainting", "masked → filled", inpainting, False),
        Task("edges", "photo → edges", edges, True),
        Task("posterize", "photo → posterized", posterize, True),
        Task("invert", "photo → negative", invert, True),
    )
}
CORE_TASKS = ("colorization", "inpainting", "edges")
PHOTO_INPUT_TASKS = tuple(name for name, task in TASKS.items() if task.photo_input)


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    return TASKS[name]


@dataclass
class Example:
    """One in-context example: K demonstration pairs, a query and its answer (all HxWx3 in [0, 1])."""

    task: str
    pairs: list[tuple[np.ndarray, np.ndarray]]
    query: np.ndarray
    answer: np.ndarray
    query_source: np.ndarray = field(repr=False, default=None)  # the clean image behind the query


@dataclass
class ExampleSampler:
    """Builds in-context examples: a task, K in `pairs_range` pairs, a query. Deterministic for a seed."""

    split: str = "train"
    size: int = 64
    seed: int = 0
    tasks: tuple[str, ...] = tuple(TASKS)
    pairs_range: tuple[int, int] = (1, 3)   # inclusive K range
    pool: str = "builtin"                   # image pool (data.POOLS): packaged images, or + the Debian photos

    def __post_init__(self):
        self.images = ImageSampler(self.split, self.size, self.seed, pool=self.pool)
        self.rng = np.random.default_rng(self.seed + 7)
        for name in self.tasks:
            get_task(name)

    def sample(self, task: str | None = None, k: int | None = None, source: np.ndarray | None = None) -> Example:
        task = task or self.tasks[int(self.rng.integers(0, len(self.tasks)))]
        transform = get_task(task).transform
        k = k if k is not None else int(self.rng.integers(self.pairs_range[0], self.pairs_range[1] + 1))
        pairs = [transform(self.images.sample(), self.rng) for _ in range(k)]
        source = self.images.sample() if source is None else source
        query, answer = transform(source, self.rng)
        return Example(task, pairs, query, answer, source)
