"""Typed events of `Engine.stream()` and the `Result` of `Engine.run()`: the contract the UI,
the CLI, tests and benchmarks share."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image


def as_grid(values) -> np.ndarray:
    """(N,) codes or scores (a tensor, an array or a list) -> a (grid, grid) numpy array, grid = sqrt(N)."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().clone()          # a copy: the caller may go on editing its tensor
        values = (values.float() if values.is_floating_point() else values).numpy()
    values = np.asarray(values)
    grid = int(round(values.size ** 0.5))
    return values.reshape(grid, grid)


@dataclass
class GenerationStarted:
    total_tokens: int               # tokens the draft will write
    grid: int                       # answer grid side (cells = grid * grid)
    pairs: int                      # K demonstration pairs used (0 for a frame sequence)
    context_tokens: int             # prompt length
    stages: list[str]               # e.g. ["draft", "scan", "vsr"]
    sequence_format: str            # "scan" (default bundle) or "lvm" (Hub LVM, training-free SCAN fallback)
    draft_mode: str = "ar"          # "ar" (one token per step) or "tensor" (TensorAR sliding windows)
    frames: int = 0                 # context frames of a sequential prompt (0 for pairs + query)


@dataclass
class TokensWritten:
    index: int                      # tokens written so far - 1
    cell: int                       # grid cell of this token (row * grid + col)
    code: int                       # the code written (chosen candidate 0)
    quality: float                  # its quality score in [0, 1]
    written: np.ndarray             # (grid, grid) bool, cells written so far
    canvas: Image.Image | None = None   # decoded image of the written cells (when requested this step)

    @property
    def token(self) -> int:
        """Deprecated name of `code`."""
        return self.code


@dataclass
class WindowSlid:
    """TensorAR draft (draft_mode="tensor"): the k-cell window slid one cell and its cells were (re)predicted."""

    step: int                       # 0 .. N-1
    cells: list[int]                # the window's cells, front first; cells[0] is final from this step on
    tokens: list[int]               # the codes predicted for them at this step (candidate 0)
    changed: list[int]              # window cells whose code differs from their previous prediction
    codes: np.ndarray               # (grid, grid) latest code of every cell (-1: not predicted yet)
    final: np.ndarray               # (grid, grid) bool, cells whose code is final
    revisions: np.ndarray           # (grid, grid) int, times each cell has been predicted so far (<= k)
    canvas: Image.Image | None = None   # decoded latest predictions, unpredicted cells show the query (when requested)


@dataclass
class DraftDone:
    image: Image.Image
    codes: np.ndarray               # (grid, grid)
    quality: np.ndarray             # (grid, grid) scores in [0, 1]
    candidates: list[Image.Image]   # every drafted candidate; `image` is the best by mean quality
    candidate_scores: list[float]
    chosen: int


@dataclass
class ScanStep:
    """One SCAN iteration (refiners/scan.py, or the training-free fallback in refiners/scan_fallback.py): per
    regenerated cell its old and new code and score, and whether the new one was kept. The refiners build it; the
    engine adds the decoded `image` when asked."""

    iteration: int
    cells: list[int]
    old_codes: list[int]
    new_codes: list[int]
    old_scores: list[float]
    new_scores: list[float]
    accepted: list[bool]
    codes: np.ndarray | None = None     # (grid, grid) after this iteration
    quality: np.ndarray | None = None   # (grid, grid) after this iteration
    image: Image.Image | None = None    # image after this iteration (decoded when requested)

    @property
    def old_tokens(self) -> list[int]:
        """Deprecated name of `old_codes`."""
        return self.old_codes

    @property
    def new_tokens(self) -> list[int]:
        """Deprecated name of `new_codes`."""
        return self.new_codes


@dataclass
class StageDone:
    """A refinement stage finished (scan or self)."""

    stage: str
    image: Image.Image
    codes: np.ndarray
    quality: np.ndarray | None
    changed_cells: list[int]


@dataclass
class Result:
    draft: Image.Image
    final: Image.Image
    stages: dict[str, Image.Image]                 # "draft", then each refiner in the order applied
    codes: dict[str, np.ndarray]                   # stage -> (grid, grid) codes
    quality: dict[str, np.ndarray]                 # stage -> (grid, grid) scores (missing where not scored)
    history: list[ScanStep]                        # every SCAN iteration
    changed: dict[str, list[int]]                  # stage -> cells it changed
    timings: dict[str, float]                      # seconds per stage (+ "total")
    candidates: list[Image.Image] = field(default_factory=list)
    query: Image.Image | None = None               # the query (a frame sequence: its last frame)
    slides: list[WindowSlid] = field(default_factory=list)   # TensorAR draft: every window (empty for "ar")
    frames: int = 0                                # context frames of a sequential prompt (0 for pairs + query)
    kept: np.ndarray | None = None                 # (grid, grid) bool: final cells that keep the query's code
    pasted: bool = False                           # whether those cells show the query's own pixels (render.py)
    luma_carried: bool = False                     # whether the images take the query's luminance (render.py)


    @property
    def tokens(self) -> dict[str, np.ndarray]:
        """Deprecated name of `codes`."""
        return self.codes


@dataclass
class Finished:
    result: Result


Event = GenerationStarted | TokensWritten | WindowSlid | DraftDone | ScanStep | StageDone | Finished
