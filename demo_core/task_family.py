"""The task family: x -> y kinds whose parameters only the demonstrations reveal.

A kind draws its parameters once per in-context example (`draw`), and those parameters are
shared by the K demonstration pairs and the query (`apply`); per-image randomness (where a box
falls) comes from a separate generator. So an edge map's convention (Sobel or Canny, thin or
thick, white on black or black on white), a posterize level count or a tint can only be read
off the demonstrations.

Validation holds out, for every kind, a band of parameter values that `draw(rng, "train")` never
returns (`draw(rng, "heldout")` returns only those), and one whole kind (`HELDOUT_KINDS`) that
training never sees.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy import ndimage

Params = dict
SPLITS = ("train", "heldout", "any")


def luminance(image: np.ndarray) -> np.ndarray:
    """HxWx3 -> HxW, Rec. 601 weights."""
    return image[..., 0] * 0.299 + image[..., 1] * 0.587 + image[..., 2] * 0.114


def _grey3(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=-1).astype(np.float32)


def _f32(image: np.ndarray) -> np.ndarray:
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def _choose(rng, split: str, train: list, heldout: list):
    """One value: from `train` in training, `heldout` in held-out validation, either for 'any'."""
    pool = {"train": train, "heldout": heldout or train, "any": train + heldout}[split]
    return pool[int(rng.integers(0, len(pool)))]


def _uniform(rng, split: str, low: float, high: float, hole: tuple[float, float] | None) -> float:
    """Uniform on [low, high] minus the held-out band `hole` in training; inside the band for 'heldout'."""
    if hole is None or split == "any":
        return float(rng.uniform(low, high))
    if split == "heldout":
        return float(rng.uniform(*hole))
    width_left, width_right = hole[0] - low, high - hole[1]
    value = float(rng.uniform(0.0, width_left + width_right))
    return low + value if value < width_left else hole[1] + (value - width_left)


# -- colorization: grey, sepia or a tint -> colour ---------------------------------------------
TINTS = {"grey": (1.0, 1.0, 1.0), "sepia": (1.07, 0.94, 0.76), "blue": (0.80, 0.92, 1.15), "green": (0.85, 1.1, 0.85)}


def colorize_draw(rng, split):
    return {"tint": _choose(rng, split, ["grey", "sepia", "blue"], ["green"])}


def colorize_apply(image, params, rng):
    grey = luminance(image)
    return _f32(grey[..., None] * np.asarray(TINTS[params["tint"]], np.float32)), image


# -- inpainting: grey/black/white/noise fill, one box, several boxes or brush strokes ------------
FILLS = {"grey": 0.5, "black": 0.0, "white": 1.0}


def inpaint_draw(rng, split):
    return {"fill": _choose(rng, split, ["grey", "black", "noise"], ["white"]),
            "shape": _choose(rng, split, ["box", "boxes"], ["strokes"])}


def inpaint_mask(size: int, shape: str, rng) -> np.ndarray:
    """HxW bool: where the query is covered."""
    mask = np.zeros((size, size), bool)
    if shape == "box":
        h, w = (int(v) for v in rng.integers(size // 4, size // 2 + 1, size=2))
        top, left = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
        mask[top:top + h, left:left + w] = True
    elif shape == "boxes":
        for _ in range(int(rng.integers(2, 4))):
            h, w = (int(v) for v in rng.integers(size // 8, size // 4 + 1, size=2))
            top, left = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
            mask[top:top + h, left:left + w] = True
    else:  # strokes: thick random polylines
        yy, xx = np.mgrid[0:size, 0:size]
        for _ in range(int(rng.integers(2, 4))):
            points = rng.uniform(0, size, size=(3, 2))
            radius = rng.uniform(size / 32, size / 14)
            for (y0, x0), (y1, x1) in zip(points[:-1], points[1:]):
                for t in np.linspace(0, 1, 24):
                    cy, cx = y0 + t * (y1 - y0), x0 + t * (x1 - x0)
                    mask |= (yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2
    return mask


def inpaint_apply(image, params, rng):
    mask = inpaint_mask(image.shape[0], params["shape"], rng)
    masked = image.copy()
    if params["fill"] == "noise":
        masked[mask] = rng.uniform(0.0, 1.0, size=(int(mask.sum()), 3))
    else:
        masked[mask] = FILLS[params["fill"]]
    return _f32(masked), image


# -- edges: Sobel magnitude or Canny lines, thin or thick, either polarity ------------------------
def sobel_draw(rng, split):
    return {"polarity": _choose(rng, split, ["white", "black"], []),
            "gain": _uniform(rng, split, 0.6, 1.6, (1.0, 1.2))}


def sobel_map(image: np.ndarray, gain: float = 1.0) -> np.ndarray:
    grey = ndimage.gaussian_filter(luminance(image).astype(np.float64), sigma=0.8)
    magnitude = np.hypot(ndimage.sobel(grey, axis=0), ndimage.sobel(grey, axis=1))
    return np.clip(magnitude * gain / 1.2, 0.0, 1.0) ** 0.8


def _polarity(edge_map: np.ndarray, polarity: str) -> np.ndarray:
    return _grey3(edge_map if polarity == "white" else 1.0 - edge_map)


def sobel_apply(image, params, rng):
    return image, _polarity(sobel_map(image, params["gain"]), params["polarity"])


def canny_draw(rng, split):
    return {"sigma": _uniform(rng, split, 1.0, 3.0, (1.8, 2.2)),
            "thick": _choose(rng, split, [False, True], []),
            "polarity": _choose(rng, split, ["white", "black"], [])}


def canny_map(image: np.ndarray, sigma: float, thick: bool = False) -> np.ndarray:
    """Binary Canny lines of the luminance (skimage's thresholds on the 0-1 image)."""
    from skimage.feature import canny

    lines = canny(luminance(image).astype(np.float64), sigma=sigma, low_threshold=0.05, high_threshold=0.12)
    if thick:
        lines = ndimage.binary_dilation(lines, structure=np.ones((2, 2), bool))
    return lines.astype(np.float32)


def canny_apply(image, params, rng):
    return image, _polarity(canny_map(image, params["sigma"], params["thick"]), params["polarity"])


# -- tone and colour ------------------------------------------------------------------------------
def posterize_draw(rng, split):
    return {"levels": _choose(rng, split, [2, 4, 5, 6], [3])}


def posterize_apply(image, params, rng):
    steps = params["levels"] - 1
    return image, _f32(np.round(image * steps) / steps)


def invert_draw(rng, split):
    return {"part": _choose(rng, split, ["rgb", "chroma"], ["luma"])}


def invert_apply(image, params, rng):
    if params["part"] == "rgb":
        return image, _f32(1.0 - image)
    grey = luminance(image)[..., None]
    if params["part"] == "chroma":
        return image, _f32(2.0 * grey - image)          # colours flipped about the grey, luminance kept
    return image, _f32(image + (1.0 - 2.0 * grey))      # luminance flipped, colours kept


PERMUTATIONS = ((1, 0, 2), (2, 1, 0), (0, 2, 1), (1, 2, 0), (2, 0, 1))


def channels_draw(rng, split):
    return {"order": _choose(rng, split, list(PERMUTATIONS[:4]), [PERMUTATIONS[4]])}


def channels_apply(image, params, rng):
    return image, _f32(image[..., list(params["order"])])


COLORMAPS_TRAIN, COLORMAPS_HELDOUT = ["viridis", "magma", "coolwarm", "hot"], ["cividis"]


def colormap_draw(rng, split):
    return {"cmap": _choose(rng, split, COLORMAPS_TRAIN, COLORMAPS_HELDOUT)}


def colormap_apply(image, params, rng):
    import matplotlib

    return image, _f32(matplotlib.colormaps[params["cmap"]](luminance(image))[..., :3])


def tone_draw(rng, split):
    return {"gamma": _uniform(rng, split, 0.45, 2.2, (0.9, 1.15)),
            "contrast": _uniform(rng, split, 0.6, 1.5, (0.95, 1.05))}


def tone_apply(image, params, rng):
    adjusted = np.clip(image, 0, 1) ** params["gamma"]
    return image, _f32((adjusted - 0.5) * params["contrast"] + 0.5)


# -- restoration: blurred or noisy -> clean ---------------------------------------------------------
def deblur_draw(rng, split):
    return {"sigma": _uniform(rng, split, 0.7, 2.5, (1.4, 1.7))}


def deblur_apply(image, params, rng):
    return _f32(ndimage.gaussian_filter(image, sigma=(params["sigma"], params["sigma"], 0))), image


def denoise_draw(rng, split):
    return {"sigma": _uniform(rng, split, 0.04, 0.2, (0.1, 0.12))}


def denoise_apply(image, params, rng):
    return _f32(image + rng.normal(0.0, params["sigma"], size=image.shape)), image


# -- the held-out kind: solarize (tones above a threshold inverted) ----------------------------------
def solarize_draw(rng, split):
    return {"threshold": _uniform(rng, split, 0.35, 0.75, None)}


def solarize_apply(image, params, rng):
    return image, _f32(np.where(image > params["threshold"], 1.0 - image, image))


@dataclass(frozen=True)
class Kind:
    name: str
    title: str                                       # shown in the UI's task hint
    draw: Callable[[np.random.Generator, str], Params]
    apply: Callable[[np.ndarray, Params, np.random.Generator], tuple[np.ndarray, np.ndarray]]
    photo_input: bool                                # x is an unmodified photo: only the demonstrations decide
    core: str | None = None                          # which core task it reports under


KINDS: dict[str, Kind] = {kind.name: kind for kind in (
    Kind("colorize", "grey / sepia / tint → colour", colorize_draw, colorize_apply, False, "colorization"),
    Kind("inpaint", "masked → filled", inpaint_draw, inpaint_apply, False, "inpainting"),
    Kind("edges_sobel", "photo → soft edges", sobel_draw, sobel_apply, True, "edges"),
    Kind("edges_canny", "photo → Canny lines", canny_draw, canny_apply, True, "edges"),
    Kind("posterize", "photo → posterized", posterize_draw, posterize_apply, True),
    Kind("invert", "photo → negative", invert_draw, invert_apply, True),
    Kind("channels", "photo → channels swapped", channels_draw, channels_apply, True),
    Kind("colormap", "photo → false colour", colormap_draw, colormap_apply, True),
    Kind("tone", "photo → gamma / contrast", tone_draw, tone_apply, True),
    Kind("deblur", "blurred → sharp", deblur_draw, deblur_apply, False),
    Kind("denoise", "noisy → clean", denoise_draw, denoise_apply, False),
    Kind("solarize", "photo → solarized", solarize_draw, solarize_apply, True),
)}
HELDOUT_KINDS = ("solarize",)
TRAIN_KINDS = tuple(name for name in KINDS if name not in HELDOUT_KINDS)


def parse_kind_weights(text: str, option: str) -> dict[str, float]:
    """'edges_canny=3,posterize=2' -> {'edges_canny': 3.0, 'posterize': 2.0} over the training kinds (kinds not
    named weigh 1). ValueError, naming `option`, for an unknown or held-out kind or a weight that is not a number."""
    weights = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        kind, _, value = item.partition("=")
        if kind not in TRAIN_KINDS:
            raise ValueError(f"{option}: unknown or held-out kind {kind!r}; training kinds are {', '.join(TRAIN_KINDS)}")
        try:
            weights[kind] = float(value)
        except ValueError:
            raise ValueError(f"{option}: {value.strip()!r} is not a number; e.g. 'edges_canny=2,inpaint=2'") from None
    return weights


def get_kind(name: str) -> Kind:
    if name not in KINDS:
        raise ValueError(f"unknown task kind {name!r}; choose from {', '.join(KINDS)}")
    return KINDS[name]


def make_pair(image: np.ndarray, kind: str, params: Params, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of `image` under one kind with fixed parameters."""
    x, y = get_kind(kind).apply(image, params, rng)
    return _f32(x), _f32(y)


@dataclass
class FamilyExample:
    """K demonstration pairs and a query of one kind with shared parameters (all HxWx3 float32 in [0, 1])."""

    kind: str
    params: Params
    pairs: list
    query: np.ndarray
    answer: np.ndarray
    query_source: np.ndarray = None     # the clean photo behind the query

    @property
    def task(self) -> str:              # the name eval and the studio report it under
        return self.kind


class FamilySampler:
    """In-context examples over the task family: a kind, its parameters, K pairs and a query.

    split 'train': training photos, training kinds and parameter values; 'val': held-out photos and
    training parameter values; 'heldout': held-out photos and held-out parameter values (and the
    held-out kinds become available). Deterministic for a seed.
    """

    def __init__(self, split: str = "train", size: int = 64, seed: int = 0, kinds=None, pairs_range=(1, 3),
                 pool: str = "debian"):
        from .data import ImageSampler

        if split not in ("train", "val", "heldout"):
            raise ValueError(f"unknown split {split!r}; use 'train', 'val' or 'heldout'")
        self.split, self.pairs_range = split, pairs_range
        self.kinds = tuple(kinds or (TRAIN_KINDS if split != "heldout" else tuple(KINDS)))
        for name in self.kinds:
            get_kind(name)
        if split == "train" and set(self.kinds) & set(HELDOUT_KINDS):
            raise ValueError(f"kinds {', '.join(sorted(set(self.kinds) & set(HELDOUT_KINDS)))} are held out of training")
        self.images = ImageSampler("train" if split == "train" else "val", size, seed, pool=pool)
        self.rng = np.random.default_rng(seed + 7)

    def sample(self, kind: str | None = None, k: int | None = None, params: Params | None = None,
               source: np.ndarray | None = None) -> FamilyExample:
        kind = kind or self.kinds[int(self.rng.integers(0, len(self.kinds)))]
        params = params if params is not None else get_kind(kind).draw(self.rng, "heldout" if self.split == "heldout" else "train")
        k = k if k is not None else int(self.rng.integers(self.pairs_range[0], self.pairs_range[1] + 1))
        pairs = [self._pair(kind, params)[1:] for _ in range(k)]
        source, query, answer = self._pair(kind, params, source)
        return FamilyExample(kind, params, pairs, query, answer, source)

    def _pair(self, kind: str, params: Params, source: np.ndarray | None = None, tries: int = 8):
        """(source, x, y) of a drawn photo (or `source`). A photo the kind leaves unchanged (colorizing a photo that
        is already grey) is drawn again: such a pair shows nothing, and as a query its identity PSNR is infinite."""
        for _ in range(tries):
            image = self.images.sample() if source is None else source
            x, y = make_pair(image, kind, params, self.rng)
            if source is not None or float(np.abs(x - y).max()) >= 1 / 255:
                break
        return image, x, y
