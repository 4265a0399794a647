"""Training and validation images: offline photo sources, procedural images, random crops.

Owns where pixels come from. Every image is a 64x64 (configurable) RGB float32 array in [0, 1].
Sources are images that packages ship (scikit-image's `data`, matplotlib's sample data) and
procedural images (dead leaves, gradients, shapes). The train/validation split is by source
image, so validation never sees a crop of a training photo.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from PIL import Image

# scikit-image photos and greyscale images that ship inside the wheel (no download).
SKIMAGE_SOURCES = (
    "astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins", "colorwheel",
    "grass", "gravel", "hubble_deep_field", "immunohistochemistry", "logo", "microaneurysms",
    "moon", "page", "retina", "rocket", "stereo_motorcycle", "text",
)
MATPLOTLIB_SOURCES = ("grace_hopper",)
# Held-out source images: validation, examples and every reported figure use only these.
VALIDATION_SOURCES = ("coffee", "chelsea", "grass")
PROCEDURAL_KINDS = ("dead_leaves", "gradient", "shapes")
PROCEDURAL_SHARE = 0.3          # share of procedural images in a batch
POOLS = ("builtin", "debian")
STAMP_SHARE = 0.25              # debian pool: share of crops with a photo cut-out pasted on them
MIN_CROP, MAX_CROP = 0.2, 1.0   # crop side as a share of the source's shorter side


@functools.lru_cache(maxsize=None)
def load_source(name: str) -> np.ndarray:
    """One source image as float32 HxWx3 in [0, 1] (greyscale sources are replicated to RGB)."""
    if name.startswith("deb:"):
        from .photos import load_image

        return load_image(name[4:])
    if name in MATPLOTLIB_SOURCES:
        import matplotlib.cbook

        with matplotlib.cbook.get_sample_data(f"{name}.jpg") as handle:
            array = np.asarray(Image.open(handle).convert("RGB"))
    else:
        import skimage.data

        array = getattr(skimage.data, name)()
        if isinstance(array, tuple):  # stereo_motorcycle -> (left, right, disparity)
            array = array[0]
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    array = array[..., :3]
    if array.dtype != np.uint8:
        array = array.astype(np.float64)
        array = (array - array.min()) / max(array.max() - array.min(), 1e-8) * 255.0
    return (np.asarray(array, dtype=np.float32) / 255.0).copy()


def source_names(split: str, pool: str = "builtin") -> tuple[str, ...]:
    """Photo sources of a split: 'train' or 'val'.

    pool 'builtin': the images scikit-image and matplotlib ship (the first-generation data);
    'debian': those plus the photos and wallpapers of `python -m demo_core data fetch`
    (named 'deb:<file in the cache>'; held out by a stable hash of the name, see photos.split_of).
    """
    if pool not in POOLS:
        raise ValueError(f"unknown image pool {pool!r}; choose from {', '.join(POOLS)}")
    if pool == "debian":
        from .photos import require_manifest

        if split not in ("train", "val"):
            raise ValueError(f"unknown split {split!r}; use 'train' or 'val'")
        rows = [row for row in require_manifest() if row["kind"] != "stamp" and row["split"] == split]
        return source_names(split) + tuple(f"deb:{row['file']}" for row in rows)
    every = SKIMAGE_SOURCES + MATPLOTLIB_SOURCES
    if split == "val":
        return VALIDATION_SOURCES
    if split == "train":
        return tuple(name for name in every if name not in VALIDATION_SOURCES)
    raise ValueError(f"unknown split {split!r}; use 'train' or 'val'")


def random_crop(source: np.ndarray, size: int, rng: np.random.Generator, log_scale: bool = False) -> np.ndarray:
    """A random square crop at a random scale, resized to size x size, randomly flipped.

    `source` is float32 in [0, 1] or uint8. The crop side is uniform in [MIN_CROP, MAX_CROP] of the
    shorter side, or with `log_scale` log-uniform between `size` pixels and the shorter side (large
    photos: every scale from native pixels to the whole picture is as likely).
    """
    height, width = source.shape[:2]
    short = min(height, width)
    if log_scale:
        side = int(round(np.exp(rng.uniform(np.log(min(size, short)), np.log(short)))))
    else:
        side = int(round(short * rng.uniform(MIN_CROP, MAX_CROP)))
    side = max(min(side, short), min(short, size))
    top = int(rng.integers(0, height - side + 1))
    left = int(rng.integers(0, width - side + 1))
    crop = source[top:top + side, left:left + side, :3]
    if crop.dtype != np.uint8:
        crop = (crop * 255).round().astype(np.uint8)
    image = Image.fromarray(crop)
    if side != size:
        image = image.resize((size, size), Image.Resampling.LANCZOS if side > size else Image.Resampling.BICUBIC)
    array = np.asarray(image, dtype=np.float32) / 255.0
    if rng.random() < 0.5:
        array = array[:, ::-1]
    return np.ascontiguousarray(array)


def paste_stamp(image: np.ndarray, stamp: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Alpha-composite an RGBA uint8 cut-out onto `image` (HxWx3 float) at a random size and place."""
    size = image.shape[0]
    side = int(rng.uniform(0.35, 0.9) * size)
    height, width = stamp.shape[:2]
    scale = side / max(height, width)
    new_h, new_w = max(1, int(height * scale)), max(1, int(width * scale))
    resized = np.asarray(Image.fromarray(stamp).resize((new_w, new_h), Image.Resampling.LANCZOS), np.float32) / 255.0
    top, left = int(rng.integers(0, size - new_h + 1)), int(rng.integers(0, size - new_w + 1))
    alpha = resized[..., 3:4]
    out = image.copy()
    region = out[top:top + new_h, left:left + new_w]
    out[top:top + new_h, left:left + new_w] = region * (1 - alpha) + resized[..., :3] * alpha
    return out


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0.0, 1.0, size=3).astype(np.float32)


def dead_leaves(size: int, rng: np.random.Generator) -> np.ndarray:
    """Occluding discs with power-law radii: the classic natural-image statistics stand-in."""
    image = np.tile(_random_colour(rng), (size, size, 1))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for _ in range(int(rng.integers(20, 60))):
        radius = size * 0.5 * (rng.uniform(0.02, 1.0) ** 2.0) + 1.5
        cy, cx = rng.uniform(0, size, size=2)
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2
        image[mask] = _random_colour(rng)
    return image


def gradient(size: int, rng: np.random.Generator) -> np.ndarray:
    """A linear colour gradient in a random direction, sometimes with a second one on top."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    angle = rng.uniform(0, 2 * np.pi)
    t = np.clip((np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5)) + 0.5, 0, 1)[..., None]
    image = (1 - t) * _random_colour(rng) + t * _random_colour(rng)
    if rng.random() < 0.5:
        radial = np.sqrt((xx - rng.random()) ** 2 + (yy - rng.random()) ** 2)[..., None]
        radial = np.clip(radial / radial.max(), 0, 1)
        image = 0.6 * image + 0.4 * ((1 - radial) * _random_colour(rng) + radial * _random_colour(rng))
    return image.astype(np.float32)


def shapes(size: int, rng: np.random.Generator) -> np.ndarray:
    """Flat rectangles, discs and triangles on a gradient background."""
    image = gradient(size, rng)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for _ in range(int(rng.integers(2, 7))):
        kind = rng.integers(0, 3)
        cy, cx = rng.uniform(0, size, size=2)
        extent = rng.uniform(size * 0.08, size * 0.35)
        if kind == 0:
            mask = (np.abs(yy - cy) <= extent) & (np.abs(xx - cx) <= extent * rng.uniform(0.4, 1.6))
        elif kind == 1:
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= extent ** 2
        else:
            mask = (yy - cy >= -extent) & (np.abs(xx - cx) <= (yy - cy + extent) * 0.6) & (yy - cy <= extent)
        image[mask] = _random_colour(rng)
    return image


PROCEDURAL = {"dead_leaves": dead_leaves, "gradient": gradient, "shapes": shapes}


@dataclass
class ImageSampler:
    """Draws random images of one split. Deterministic for a seed.

    The validation split uses the held-out photos and a separate procedural seed stream.
    """

    split: str = "train"          # 'train' or 'val'
    size: int = 64                # output side in pixels
    seed: int = 0                 # numpy seed; validation adds a fixed offset so streams never meet
    procedural_share: float = PROCEDURAL_SHARE
    pool: str = "builtin"         # 'builtin' (packaged images) or 'debian' (+ `data fetch` photos and cut-outs)

    def __post_init__(self):
        self.sources = source_names(self.split, self.pool)
        self.stamps: tuple[str, ...] = ()
        if self.pool == "debian":
            from .photos import require_manifest

            self.stamps = tuple(row["file"] for row in require_manifest() if row["kind"] == "stamp" and row["split"] == self.split)
        offset = 1_000_003 if self.split == "val" else 0
        self.rng = np.random.default_rng(self.seed + offset)

    def sample(self) -> np.ndarray:
        """One HxWx3 float32 image in [0, 1]."""
        if self.rng.random() < self.procedural_share:
            kind = PROCEDURAL_KINDS[int(self.rng.integers(0, len(PROCEDURAL_KINDS)))]
            image = PROCEDURAL[kind](self.size, self.rng)
        else:
            name = self.sources[int(self.rng.integers(0, len(self.sources)))]
            image = random_crop(load_source(name), self.size, self.rng, log_scale=name.startswith("deb:"))
        if self.stamps and self.rng.random() < STAMP_SHARE:
            from .photos import load_image

            image = paste_stamp(image, load_image(self.stamps[int(self.rng.integers(0, len(self.stamps)))]), self.rng)
        return image

    def batch(self, count: int) -> np.ndarray:
        """count x H x W x 3."""
        return np.stack([self.sample() for _ in range(count)])
