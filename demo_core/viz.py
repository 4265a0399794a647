"""Pictures of a run: the live canvas, quality heatmaps, SCAN patch boxes, stage grids and plots.

Owns every image and figure the studio (and the CLI) shows about a run; pure functions of PIL
images and numpy arrays, no gradio and no model. Token-grid images are upscaled with NEAREST so
that each token stays a crisp square (64 px with 8x8 tokens is tiny on a screen); overlays and
boxes are drawn at the upscaled size so that lines stay one display pixel thin. Figures are
`matplotlib.figure.Figure` objects built without pyplot, so nothing global is left open.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image, ImageDraw, ImageFont

DISPLAY_SIDE = 384                   # upscale token images to at least this many pixels a side
UNWRITTEN_DIM = 0.68                 # how far not-yet-written cells fade towards UNWRITTEN_TINT
UNWRITTEN_TINT = (24, 28, 38)
PROVISIONAL_DIM = 0.38               # TensorAR: predicted but not yet final cells fade this far (less than unwritten)
HATCH_COLOUR = (148, 163, 184)
HATCH_SPACING = 7                    # display pixels between hatch lines
ACCEPTED = "#22c55e"                 # SCAN kept the regenerated token (its score improved, Eq. 6)
REJECTED = "#ef4444"                 # SCAN regenerated the token but kept the old one
VSR_CHANGED = "#3b82f6"              # VSR's nearest-code decode chose another code
CURRENT = "#facc15"                  # the cell written last on the live canvas
WINDOW = "#06b6d4"                   # TensorAR: cells of the sliding window, still being revised
QUALITY_COLORMAP = "RdYlGn"          # low quality red, high green
# (label, colour) of the four quality bands, best first; each band is a quarter of a score range
QUALITY_BANDS = (
    ("high", "#16a34a"),
    ("mid-high", "#a3e635"),
    ("mid-low", "#f97316"),
    ("low", "#dc2626"),
)
STAGE_TITLES = {"draft": "draft", "scan": "SCAN", "vsr": "VSR", "vsr-continuous": "VSR (continuous)", "self": "VSR", "ground truth": "ground truth", "query": "query"}


# ---------------------------------------------------------------------------------------------
# geometry


def display_scale(side: int, target: int = DISPLAY_SIDE) -> int:
    """Integer upscale factor that brings `side` pixels to at least `target` (1 if already large)."""
    return max(1, math.ceil(target / max(1, side)))


def upscale(image: Image.Image, scale: int | None = None, resample=Image.Resampling.NEAREST) -> Image.Image:
    """RGB image enlarged by an integer factor (NEAREST keeps token squares crisp)."""
    image = image.convert("RGB")
    scale = display_scale(image.width) if scale is None else scale
    if scale == 1:
        return image.copy()
    return image.resize((image.width * scale, image.height * scale), resample)


def cell_box(cell: int, grid: int, side: int) -> tuple[int, int, int, int]:
    """Pixel box (x0, y0, x1, y1), x1/y1 exclusive, of raster cell `cell` in a `side`-pixel image."""
    row, col = divmod(int(cell), grid)

    def start(index):       # first pixel p with p * grid // side == index, as in nearest_grid
        return -(-index * side // grid)

    return start(col), start(row), start(col + 1), start(row + 1)


def cell_mask(cells: Sequence[int] | np.ndarray, grid: int, side: int) -> np.ndarray:
    """(side, side) bool mask of the given cells (a list of cell ids or a (grid, grid) bool array)."""
    if isinstance(cells, np.ndarray) and cells.dtype == bool:
        grid_mask = cells.reshape(grid, grid)
    else:
        grid_mask = np.zeros((grid, grid), dtype=bool)
        grid_mask.flat[list(int(c) for c in cells)] = True
    return nearest_grid(grid_mask, side)


def nearest_grid(values: np.ndarray, side: int) -> np.ndarray:
    """(grid, grid) array -> (side, side), each cell a block (NEAREST), also when side % grid != 0."""
    values = np.asarray(values)
    grid = values.shape[0]
    index = np.minimum((np.arange(side) * grid) // side, grid - 1)
    return values[index][:, index]


def _rgb(colour: str) -> tuple[int, int, int]:
    colour = colour.lstrip("#")
    return tuple(int(colour[i:i + 2], 16) for i in (0, 2, 4))


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


# ---------------------------------------------------------------------------------------------
# live canvas


def hatch_pattern(side: int, spacing: int = HATCH_SPACING) -> np.ndarray:
    """(side, side) bool: thin diagonal lines, the "not written yet" texture."""
    yy, xx = np.mgrid[0:side, 0:side]
    return (xx + yy) % spacing == 0


def canvas_view(canvas: Image.Image, written: np.ndarray, scale: int | None = None,
                current_cell: int | None = None, window_cells: Sequence[int] = (),
                final: np.ndarray | None = None, revisions: np.ndarray | None = None) -> Image.Image:
    """The live canvas: written cells in full colour, the others dimmed and hatched.

    `canvas` is the decoded image (unwritten cells show whatever the engine put there, e.g. the
    query's codes); `written` is the (grid, grid) bool mask of cells written so far. TensorAR's
    `window_cells` (still being revised) are boxed in WINDOW, `current_cell` in CURRENT on top;
    with `final` (grid, grid) bool, written cells that are not final yet are faded, and with
    `revisions` (grid, grid) int each of them shows how many times it has been predicted.
    """
    written = np.asarray(written, dtype=bool)
    grid = written.shape[0]
    image = upscale(canvas, scale)
    side = image.width
    pixels = np.asarray(image, dtype=np.float32)
    pending = ~nearest_grid(written, side)                                   # (side, side)
    dimmed = pixels * (1 - UNWRITTEN_DIM) + np.asarray(UNWRITTEN_TINT, np.float32) * UNWRITTEN_DIM
    dimmed[hatch_pattern(side)] = HATCH_COLOUR
    provisional_cells = written & ~np.asarray(final, dtype=bool) if final is not None else np.zeros_like(written)
    if provisional_cells.any():
        faded = pixels * (1 - PROVISIONAL_DIM) + np.asarray(UNWRITTEN_TINT, np.float32) * PROVISIONAL_DIM
        pixels = np.where(nearest_grid(provisional_cells, side)[..., None], faded, pixels)
    pixels = np.where(pending[..., None], dimmed, pixels)
    view = Image.fromarray(pixels.round().astype(np.uint8), "RGB")
    if revisions is not None and provisional_cells.any():
        draw = ImageDraw.Draw(view)
        font = _font(max(8, side // grid // 3))
        for cell in np.flatnonzero(provisional_cells):
            x0, y0, _, _ = cell_box(int(cell), grid, side)
            draw.text((x0 + 2, y0 + 1), str(int(np.asarray(revisions).flat[cell])), fill="white", font=font,
                      stroke_width=1, stroke_fill="black")
    if len(window_cells):
        _draw_cell_boxes(view, list(window_cells), [WINDOW] * len(window_cells), grid)
    if current_cell is not None and 0 <= int(current_cell) < grid * grid:
        x0, y0, x1, y1 = cell_box(current_cell, grid, side)
        ImageDraw.Draw(view).rectangle((x0, y0, x1 - 1, y1 - 1), outline=CURRENT, width=max(1, side // 160))
    return view


# ---------------------------------------------------------------------------------------------
# quality


def quality_colours(quality_grid: np.ndarray) -> np.ndarray:
    """(grid, grid) scores in [0, 1] -> (grid, grid, 3) uint8 colours of QUALITY_COLORMAP."""
    import matplotlib

    scores = np.clip(np.nan_to_num(np.asarray(quality_grid, dtype=np.float64), nan=0.0), 0.0, 1.0)
    return (matplotlib.colormaps[QUALITY_COLORMAP](scores)[..., :3] * 255).round().astype(np.uint8)


def quality_overlay(image: Image.Image, quality_grid: np.ndarray, alpha: float = 0.5, scale: int | None = None) -> Image.Image:
    """The image (upscaled) with the per-token quality colour map blended over it, one block per token."""
    base = upscale(image, scale)
    colours = nearest_grid(quality_colours(quality_grid), base.width)            # (side, side, 3)
    blended = np.asarray(base, np.float32) * (1 - alpha) + colours.astype(np.float32) * alpha
    return Image.fromarray(blended.round().astype(np.uint8), "RGB")


def quality_range(*quality_grids: np.ndarray, min_span: float = 0.1) -> tuple[float, float]:
    """A score range (low, high) in [0, 1] covering all the grids, at least `min_span` wide.

    Shared by the maps being compared, so that a colour means the same score in each; narrow when
    the model's scores are (as with an untrained or a probability-based quality signal).
    """
    values = np.concatenate([np.asarray(q, dtype=np.float64).reshape(-1) for q in quality_grids])
    values = np.clip(np.nan_to_num(values, nan=0.0), 0.0, 1.0)
    low, high = float(values.min()), float(values.max())
    if high - low < min_span:
        middle = (low + high) / 2
        low, high = middle - min_span / 2, middle + min_span / 2
        if low < 0.0:
            low, high = 0.0, min_span
        if high > 1.0:
            low, high = 1.0 - min_span, 1.0
    return low, high


def quality_bands(quality_grid: np.ndarray, side: int, low: float = 0.0, high: float = 1.0,
                  opacity: float = 0.55) -> list[tuple[np.ndarray, str]]:
    """AnnotatedImage annotations: the range [low, high] cut in four equal bands (QUALITY_BANDS, best
    first), one (mask, label) per band that has tokens.

    Masks are float (side, side) arrays, `opacity` inside the band's tokens (the frontend uses the
    mask value as alpha), so the image stays visible under the colour. Scores outside the range
    count in the nearest end band.
    """
    scores = np.nan_to_num(np.asarray(quality_grid, dtype=np.float64), nan=0.0)
    # 0 = lowest band ... 3 = highest
    band = np.clip(np.floor((scores - low) / max(high - low, 1e-12) * 4), 0, 3).astype(int)
    annotations = []
    for rank, (label, _) in enumerate(QUALITY_BANDS):
        in_band = band == 3 - rank
        if in_band.any():
            annotations.append((nearest_grid(in_band, side).astype(np.float32) * opacity, label))
    return annotations


def quality_band_colours() -> dict[str, str]:
    """label -> hex colour, for AnnotatedImage(color_map=...)."""
    return dict(QUALITY_BANDS)


def quality_band_edges(low: float, high: float) -> list[float]:
    """The five edges of the four bands of [low, high]."""
    return [float(edge) for edge in np.linspace(low, high, 5)]


# ---------------------------------------------------------------------------------------------
# refinement


def _draw_cell_boxes(view: Image.Image, cells: Sequence[int], colours: Sequence[str], grid: int) -> Image.Image:
    draw = ImageDraw.Draw(view)
    width = max(2, view.width // 110)
    for cell, colour in zip(cells, colours):
        x0, y0, x1, y1 = cell_box(cell, grid, view.width)
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=colour, width=width)
    return view


def patch_boxes(image: Image.Image, cells: Sequence[int], accepted: Sequence[bool], grid: int,
                scale: int | None = None) -> Image.Image:
    """One SCAN iteration: the image with each regenerated cell boxed, ACCEPTED or REJECTED colour."""
    view = upscale(image, scale)
    return _draw_cell_boxes(view, cells, [ACCEPTED if keep else REJECTED for keep in accepted], grid)


def changed_cells_view(image: Image.Image, cells: Sequence[int], grid: int, scale: int | None = None,
                       colour: str = VSR_CHANGED) -> Image.Image:
    """The image with the cells a stage changed (e.g. VSR) boxed."""
    view = upscale(image, scale)
    return _draw_cell_boxes(view, cells, [colour] * len(cells), grid)


# ---------------------------------------------------------------------------------------------
# grids of stages


def stage_title(name: str) -> str:
    """'scan' -> 'SCAN', 'self' -> 'VSR', 'scan#2' -> 'SCAN (2)'."""
    base, _, repeat = name.partition("#")
    title = STAGE_TITLES.get(base, base)
    return f"{title} ({repeat})" if repeat else title


def stage_grid(images: Mapping[str, Image.Image], captions: Mapping[str, str] | None = None,
               tile: int = 192, gap: int = 10, background=(255, 255, 255)) -> Image.Image:
    """Images side by side (NEAREST-upscaled to `tile` px), each with its stage title and an optional caption."""
    names = list(images)
    if not names:
        raise ValueError("stage_grid needs at least one image")
    captions = captions or {}
    title_font, caption_font = _font(max(11, tile // 12)), _font(max(9, tile // 16))
    has_caption = any(captions.get(name) for name in names)
    label_height = tile // 8 + (tile // 11 if has_caption else 0) + 6
    width = len(names) * tile + (len(names) + 1) * gap
    sheet = Image.new("RGB", (width, tile + label_height + 2 * gap), background)
    draw = ImageDraw.Draw(sheet)
    for i, name in enumerate(names):
        x = gap + i * (tile + gap)
        image = images[name].convert("RGB")
        resample = Image.Resampling.NEAREST if image.width <= tile else Image.Resampling.LANCZOS
        sheet.paste(image.resize((tile, tile), resample), (x, gap))
        centre = x + tile / 2
        draw.text((centre, gap + tile + 4), stage_title(name), fill=(17, 24, 39), font=title_font, anchor="ma")
        if captions.get(name):
            draw.text((centre, gap + tile + 6 + tile // 8), captions[name], fill=(75, 85, 99), font=caption_font, anchor="ma")
    return sheet


def strip(images: Sequence[Image.Image], tile: int = 96, gap: int = 6, arrows: Sequence[int] = (),
          background=(255, 255, 255)) -> Image.Image:
    """A row of images; an arrow is drawn after each index in `arrows` (x -> y pairs in example previews)."""
    arrow_width = tile // 4
    width = len(images) * tile + (len(images) + 1) * gap + len(arrows) * arrow_width
    sheet = Image.new("RGB", (width, tile + 2 * gap), background)
    draw = ImageDraw.Draw(sheet)
    x = gap
    for index, image in enumerate(images):
        sheet.paste(image.convert("RGB").resize((tile, tile), Image.Resampling.LANCZOS), (x, gap))
        x += tile + gap
        if index in arrows:
            mid_y = gap + tile // 2
            draw.line((x, mid_y, x + arrow_width - gap, mid_y), fill=(100, 116, 139), width=2)
            draw.polygon([(x + arrow_width - gap, mid_y - 4), (x + arrow_width - gap, mid_y + 4),
                          (x + arrow_width - gap + 5, mid_y)], fill=(100, 116, 139))
            x += arrow_width
    return sheet


# ---------------------------------------------------------------------------------------------
# plots


def _figure(width: float = 6.4, height: float = 3.2) -> tuple[Figure, object]:
    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    axes.grid(alpha=0.3)
    for side in ("top", "right"):
        axes.spines[side].set_visible(False)
    return figure, axes


def running_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average, shrinking the window at the ends (no dip towards zero there)."""
    values = np.asarray(values, dtype=np.float64)
    kernel = np.ones(window)
    return np.convolve(values, kernel, mode="same") / np.convolve(np.ones_like(values), kernel, mode="same")


def cosine_distance_figure(curves: Mapping[str, np.ndarray], title: str = "Per-token cosine distance to the ground truth") -> Figure:
    """VSR paper Fig. 2: for each stage, the cosine distance between each answer token's embedding and
    the ground truth's, by token position (raster order). Lower is closer."""
    figure, axes = _figure()
    for name, curve in curves.items():
        curve = np.asarray(curve, dtype=np.float64).reshape(-1)
        positions = np.arange(len(curve))
        line, = axes.plot(positions, curve, linewidth=0.8, alpha=0.35)
        smooth = running_mean(curve, max(1, len(curve) // 8))   # the trend along the sequence
        axes.plot(positions, smooth, color=line.get_color(), linewidth=2,
                  label=f"{stage_title(name)} (mean {curve.mean():.3f})")
    axes.set_xlabel("token position (raster order)")
    axes.set_ylabel("cosine distance")
    axes.set_title(title, fontsize=10)
    axes.set_ylim(bottom=0)
    if curves:
        figure.legend(fontsize=8, frameon=False, loc="outside lower center", ncols=min(4, len(curves)))
    return figure


def quality_figure(iterations: Sequence[int], mean_quality: Sequence[float], accepted: Sequence[int],
                   rejected: Sequence[int], draft_quality: float | None = None) -> Figure:
    """SCAN progress: mean token quality after each iteration (line) and accepted/rejected regenerations (bars)."""
    figure, axes = _figure()
    iterations = np.asarray(iterations)
    bars = axes.twinx()
    bars.bar(iterations, accepted, color=ACCEPTED, alpha=0.35, width=0.8, label="accepted")
    bars.bar(iterations, rejected, bottom=accepted, color=REJECTED, alpha=0.3, width=0.8, label="rejected")
    bars.set_ylabel("regenerated tokens")
    bars.yaxis.set_major_locator(MaxNLocator(integer=True))
    bars.set_ylim(0, max(1, max((a + r for a, r in zip(accepted, rejected)), default=1)) * 1.15)
    bars.spines["top"].set_visible(False)
    axes.set_zorder(bars.get_zorder() + 1)
    axes.patch.set_visible(False)
    if draft_quality is not None:
        axes.axhline(draft_quality, color="#64748b", linestyle="--", linewidth=1, label="draft")
    axes.plot(iterations, mean_quality, color="#0f172a", marker="o", markersize=3, linewidth=1.8, label="mean quality")
    axes.set_xlabel("SCAN iteration")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel("mean quality score")
    axes.set_title("Quality during SCAN refinement", fontsize=10)
    handles = axes.get_legend_handles_labels()
    extra = bars.get_legend_handles_labels()
    figure.legend(handles[0] + extra[0], handles[1] + extra[1], fontsize=8, frameon=False, loc="outside lower center",
                  ncols=4)
    return figure


def revisions_figure(changed_per_slide: Sequence[int], window: int) -> Figure:
    """TensorAR: how many cells of the window changed their code at each slide (the draft revising itself)."""
    figure, axes = _figure(height=2.8)
    steps = np.arange(1, len(changed_per_slide) + 1)
    axes.bar(steps, changed_per_slide, color=WINDOW, alpha=0.8, width=0.85)
    axes.set_xlabel("slide (step of the TensorAR draft)")
    axes.set_ylabel("codes changed")
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylim(0, max(1, window - 1) + 0.5)
    total = int(np.sum(changed_per_slide))
    axes.set_title(f"TensorAR draft: {total} code changes in not-yet-final cells over {len(changed_per_slide)} slides "
                   f"(window k = {window})", fontsize=10)
    return figure
