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
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image


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


def render(decoded: Image.Image, codes, query: Image.Image | None, query_codes, grid: int, paste: bool) -> Image.Image:
    """The image a user sees for `codes`: `decoded` (the tokenizer's decode of them), with the query's pixels pasted
    into the kept cells when `paste` (and a query is given)."""
    if not paste or query is None or query_codes is None:
        return decoded
    return paste_query(decoded, query, kept_cells(codes, query_codes), grid)
