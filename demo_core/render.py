"""What the user sees of an answer's codes: the tokenizer's decode, and the query's own pixels where the answer
keeps the query's codes ("paste", on by default for tokenizers with local codes).

Why paste. With local codes (`local_vq.py`: a cell's code depends on its 4x4 patch and a 4-pixel margin only) a
cell whose answer code equals the query's code is a cell the model chose to copy: it says "this part of the query
stays". The decoder hands a copied cell back only as well as the tokenizer's round trip goes (about 28 dB on a
photo, 3 dB under the query itself on the eval's harder photos), so a model that copies perfectly and edits
nothing would lose to doing nothing. Pasting the query's pixels into the copied cells makes a copy exact: the
answer equals the query wherever the model kept it and is the model's own drawing wherever it wrote a new code.
Every inpainting pipeline composites the kept region this way; here the model decides the region, cell by cell,
through the codes it writes, so nothing task-specific is assumed.

Without local codes (retouch-tiny's VQModel, LVM's VQGAN: their encoders mix the whole image, so an equal code
says little about the pixels) paste is off by default; a bundle may set "paste_query" in bundle.json either way.

Luminance carry, the same idea for brightness. When the demonstrations show that an answer's luminance is a
function of its input's luminance at the same pixel (colorization, inversion, gamma and contrast, false colour: the
fit `luminance_map` makes on the pairs leaves an RMS residual under `LUMA_TOLERANCE`), the answer a user sees takes
its luminance from the query through that fitted curve and keeps the model's own chroma (`carry_luminance`).
The model then decides the colours and the query gives the detail the tokenizer's round trip blurs. Nothing
task-specific is assumed: the pairs decide, per prompt, and where they show no such relation (inpainting, edges,
deblurring, denoising) nothing changes. Off unless a bundle says "luma_carry" (measured per bundle).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .images import pil_to_float


def kept_cells(codes, query_codes) -> np.ndarray:
    """(N,) codes, (N,) query codes -> (N,) bool: the cells where the answer keeps the query's code."""
    codes = torch.as_tensor(codes).detach().cpu().reshape(-1)
    query_codes = torch.as_tensor(query_codes).detach().cpu().reshape(-1)
    if codes.shape != query_codes.shape:
        raise ValueError(f"an answer of {codes.numel()} codes cannot be compared with a query of {query_codes.numel()}")
    return (codes == query_codes).numpy()


def paste_query(image: Image.Image, query: Image.Image, kept: np.ndarray, grid: int) -> Image.Image:
    """`image` with `query`'s pixels in the `kept` cells ((N,) bool over a grid x grid raster). Both images are the
    model's square (the engine's prepared query and a decode); a cell is image_size / grid pixels on a side."""
    if image.size != query.size:
        raise ValueError(f"cannot paste a {query.size[0]}x{query.size[1]} query into a {image.size[0]}x{image.size[1]} answer")
    kept = np.asarray(kept, dtype=bool).reshape(grid, grid)
    if not kept.any():
        return image
    side = image.size[0] // grid
    mask = kept.repeat(side, 0).repeat(side, 1)[..., None]                     # (H, W, 1) at pixel level
    pasted = np.where(mask, np.asarray(query.convert("RGB")), np.asarray(image.convert("RGB")))
    return Image.fromarray(pasted.astype(np.uint8))


# full-range BT.601 YCbCr: Y is the Rec. 601 luminance the task family uses (task_family.luminance)
_TO_YCC = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]], np.float32)
_FROM_YCC = np.linalg.inv(_TO_YCC).astype(np.float32)
LUMA_BINS = 32              # the fitted curve's knots over [0, 1]
LUMA_TOLERANCE = 0.01       # RMS residual (of [0, 1] luminance) under which the pairs count as showing the relation


def _luminance(image) -> np.ndarray:
    """HxW luminance in [0, 1] of a PIL image or an HxWx3 array in [0, 1] or [0, 255]."""
    array = pil_to_float(image) if isinstance(image, Image.Image) else np.asarray(image, np.float32)
    if array.max() > 1.0:
        array = array / 255.0
    return array @ _TO_YCC[0]


@dataclass(frozen=True)
class LuminanceMap:
    """y-luminance as a piecewise-linear function of x-luminance, fitted on demonstration pairs."""

    knots: np.ndarray           # x-luminance of the populated bins' centres, increasing
    values: np.ndarray          # the mean y-luminance there
    residual: float             # RMS error of the fit on the pairs' own pixels

    def __call__(self, luminance: np.ndarray) -> np.ndarray:
        return np.interp(luminance, self.knots, self.values).astype(np.float32)


def luminance_map(pairs, bins: int = LUMA_BINS, tolerance: float = LUMA_TOLERANCE) -> LuminanceMap | None:
    """The demonstrations' (x, y) luminance relation when they show one (RMS residual <= `tolerance`), else None.
    `pairs`: (x, y) images of one size (PIL, or HxWx3 arrays in [0, 1] or [0, 255])."""
    if not pairs:
        return None
    xs = np.concatenate([_luminance(x).ravel() for x, _ in pairs])
    ys = np.concatenate([_luminance(y).ravel() for _, y in pairs])
    if xs.shape != ys.shape:
        return None
    index = np.clip((xs * bins).astype(int), 0, bins - 1)
    count = np.bincount(index, minlength=bins)
    total = np.bincount(index, ys, minlength=bins)
    have = count > 0
    knots, values = ((np.arange(bins) + 0.5) / bins)[have], total[have] / count[have]
    residual = float(np.sqrt(np.mean((np.interp(xs, knots, values) - ys) ** 2)))
    return LuminanceMap(knots, values, residual) if residual <= tolerance else None


def carry_luminance(image: Image.Image, query: Image.Image, luminance: LuminanceMap) -> Image.Image:
    """`image`'s chroma with the luminance `luminance` maps the `query`'s to (same size)."""
    if image.size != query.size:
        raise ValueError(f"cannot carry a {query.size[0]}x{query.size[1]} query's luminance into a "
                         f"{image.size[0]}x{image.size[1]} answer")
    ycc = pil_to_float(image) @ _TO_YCC.T
    ycc[..., 0] = luminance(_luminance(query))
    rgb = np.clip(ycc @ _FROM_YCC.T, 0.0, 1.0)
    return Image.fromarray(np.round(rgb * 255.0).astype(np.uint8))


def render(decoded: Image.Image, codes, query: Image.Image | None, query_codes, grid: int, paste: bool,
           luminance: LuminanceMap | None = None) -> Image.Image:
    """The image a user sees for `codes`: `decoded` (the tokenizer's decode of them), with the query's pixels pasted
    into the kept cells when `paste` (and a query is given), then the query's luminance carried through `luminance`
    (a `luminance_map` of the prompt's pairs) when one is given."""
    image = decoded
    if paste and query is not None and query_codes is not None:
        image = paste_query(decoded, query, kept_cells(codes, query_codes), grid)
    if luminance is not None and query is not None:
        image = carry_luminance(image, query, luminance)
    return image
