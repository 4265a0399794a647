"""In-context sequence layout: LVM-format context plus the answer in SCAN form.

Vocabulary (DESIGN.md, "In-context generation with self-calibration"):
    0 .. C-1            VQ codes
    C + n               <at_n>, the position instruction for grid cell n (n < N)
    C + N               <good>   quality token
    C + N + 1           <bad>    quality token

Context (LVM layout), one of LVM's two prompt kinds, N raster-ordered codes per image, positions 0..L-1:
    analogy prompt      [x1, y1, ..., xK, yK, xq]       K demonstration pairs and a query (`context_tokens`)
    sequential prompt   [f1, f2, ..., fF]               F consecutive frames; the answer is frame F+1
                                                        (`frames_context`; LVM's generate_videos.py uses F = 12)
Both are the images' codes concatenated, with no BOS and no separators, and the answer that follows is the same:
the format's own answer form (SCAN form below for the default backbone, raster codes for LVM, `formats.py`).
Answer (SCAN form):   [<at_a>, y_a, <at_b>, y_b, ...] in any cell order; the logits at <at_n> give
the code for cell n, the logits at y_n restricted to {<good>, <bad>} give its quality score s_n.

Position ids are cell-aligned: both tokens of cell n's pair sit at position L + n, whatever the
generation order and however many refinement pairs follow. The offset from answer cell n to
query cell n (in a sequence: the last frame's cell n) is then always N, as from y_i cell n to x_i cell n in the context (LVM's raster
layout), which a small model can learn to exploit; SCAN's position instructions carry the
same 2D meaning through RoPE.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Vocab:
    codebook_size: int          # C
    cells: int                  # N = grid * grid

    @property
    def at_base(self) -> int:
        return self.codebook_size

    def at(self, cell):
        """Id of <at_cell> (int or tensor)."""
        return self.codebook_size + cell

    @property
    def good(self) -> int:
        return self.codebook_size + self.cells

    @property
    def bad(self) -> int:
        return self.codebook_size + self.cells + 1

    @property
    def size(self) -> int:
        return self.codebook_size + self.cells + 2

    def special_ids(self) -> dict:
        return {"at_first": self.at_base, "at_last": self.at_base + self.cells - 1, "good": self.good, "bad": self.bad}

    def to_dict(self) -> dict:
        return asdict(self)


def context_tokens(pair_codes: list[tuple[torch.Tensor, torch.Tensor]], query_codes: torch.Tensor) -> torch.Tensor:
    """[x1, y1, ..., xK, yK, xq] as one 1-D long tensor (each image flattened in raster order)."""
    parts = []
    for x_codes, y_codes in pair_codes:
        parts += [x_codes.reshape(-1), y_codes.reshape(-1)]
    parts.append(query_codes.reshape(-1))
    return torch.cat(parts).long()


def frames_context(frame_codes) -> torch.Tensor:
    """[f1, f2, ..., fF] as one 1-D long tensor: each frame's codes in raster order, oldest frame first.

    `frame_codes` is a (F, N) tensor or a list of F code grids. The answer (frame F+1) then sits at L + n = F*N + n,
    N positions after the last frame's cell n, as a pair's answer sits N after its input.
    """
    return torch.cat([torch.as_tensor(codes).reshape(-1) for codes in frame_codes]).long()


def interleave_answer(vocab: Vocab, cells: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """cells (..., M), codes (..., M) -> (..., 2M) tokens [<at_c0>, code0, <at_c1>, code1, ...]."""
    pairs = torch.stack([vocab.at(cells), codes], dim=-1)
    return pairs.reshape(*cells.shape[:-1], -1)


def answer_positions(context_length: int, cells: torch.Tensor) -> torch.Tensor:
    """Cell-aligned position ids for interleaved pairs: (..., M) cells -> (..., 2M) positions."""
    positions = context_length + cells
    return torch.stack([positions, positions], dim=-1).reshape(*cells.shape[:-1], -1)


def max_pairs(max_positions: int, tokens_per_image: int) -> int:
    """How many demonstration pairs fit: (2K + 2) * N positions are used (the answer reuses cell positions)."""
    return max(0, (max_positions // tokens_per_image - 2) // 2)


def max_frames(max_positions: int, tokens_per_image: int, max_images: int | None = None) -> int:
    """How many context frames fit: (F + 1) * N positions are used (the answer reuses cell positions), and at most
    `max_images` images in all (context and answer) where the model has such a cap (LVM: 16, so 15 frames)."""
    images = max_positions // tokens_per_image
    if max_images:
        images = min(images, int(max_images))
    return max(0, images - 1)
