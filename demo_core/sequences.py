"""Frame sequences made from still photos, for sequential prompting (LVM's second prompt kind).

A sequence is `frames` consecutive 64x64 frames and the true next frame. Kinds:
- pan: a camera window sliding across a photo at a constant velocity (1-5 output pixels a frame);
- zoom: the window shrinking or growing by a constant factor a frame about a fixed point;
- cutout: a photo cut-out (tuxpaint stamps; a procedural disc without the Debian pool) moving over
  a photo background at a constant or accelerating velocity;
- brightness: the frame getting brighter or darker by a constant step.
Held out by source image: validation sequences come from validation photos only.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .data import ImageSampler, load_source

SEQUENCE_KINDS = ("pan", "zoom", "cutout", "brightness")


@dataclass
class Sequence:
    kind: str
    params: dict
    frames: list            # HxWx3 float32 in [0, 1], oldest first
    next_frame: np.ndarray  # the truth the model should write


def _render(source: np.ndarray, top: float, left: float, side: float, size: int) -> np.ndarray:
    """A square window of `side` source pixels at (top, left), resized to size x size (float32 in [0, 1])."""
    box = (left, top, left + side, top + side)
    array = source if source.dtype == np.uint8 else (np.clip(source, 0, 1) * 255).round().astype(np.uint8)
    image = Image.fromarray(array[..., :3]).resize((size, size), Image.Resampling.BICUBIC, box=box)
    return np.asarray(image, np.float32) / 255.0


def _disc_stamp(rng: np.random.Generator, side: int = 48) -> np.ndarray:
    yy, xx = np.mgrid[0:side, 0:side]
    alpha = ((yy - side / 2) ** 2 + (xx - side / 2) ** 2 <= (side / 2 - 1) ** 2) * 255
    colour = rng.integers(0, 256, size=3)
    rgb = np.broadcast_to(colour, (side, side, 3)) * (0.6 + 0.4 * (xx / side))[..., None]
    return np.dstack([rgb, alpha]).astype(np.uint8)


class SequenceSampler:
    """Random sequences of one split; deterministic for a seed."""

    def __init__(self, split: str = "train", size: int = 64, seed: int = 0, frames_range=(2, 4), pool: str = "builtin"):
        self.images = ImageSampler(split, size, seed, procedural_share=0.0, pool=pool)
        self.size, self.frames_range = size, frames_range
        self.rng = np.random.default_rng(seed + 23)

    def _source(self) -> np.ndarray:
        name = self.images.sources[int(self.rng.integers(0, len(self.images.sources)))]
        return load_source(name)

    def sample(self, kind: str | None = None, frames: int | None = None) -> Sequence:
        rng = self.rng
        kind = kind or SEQUENCE_KINDS[int(rng.integers(0, len(SEQUENCE_KINDS)))]
        if kind not in SEQUENCE_KINDS:
            raise ValueError(f"unknown sequence kind {kind!r}; choose from {', '.join(SEQUENCE_KINDS)}")
        count = frames if frames is not None else int(rng.integers(self.frames_range[0], self.frames_range[1] + 1))
        source = self._source()
        height, width = source.shape[:2]
        short = min(height, width)
        size, steps = self.size, count + 1
        if kind == "pan":
            side = float(rng.uniform(min(short, size), short * 0.6))
            speed = rng.uniform(1.0, 5.0) * side / size                   # source pixels a frame
            angle = rng.uniform(0, 2 * np.pi)
            vy, vx = speed * np.sin(angle), speed * np.cos(angle)
            span_y, span_x = abs(vy) * (steps - 1), abs(vx) * (steps - 1)
            top0 = rng.uniform(0, max(height - side - span_y, 0)) + (span_y if vy < 0 else 0)
            left0 = rng.uniform(0, max(width - side - span_x, 0)) + (span_x if vx < 0 else 0)
            params = {"velocity": [round(vy * size / side, 2), round(vx * size / side, 2)]}
            views = [_render(source, top0 + t * vy, left0 + t * vx, side, size) for t in range(steps)]
        elif kind == "zoom":
            factor = float(rng.choice([-1, 1]) * rng.uniform(0.03, 0.1))  # side shrinks (zoom in) or grows
            biggest = short * 0.9
            side0 = biggest if factor < 0 else biggest * (1 + factor) ** -(steps - 1) * 0.999
            sides = [side0 * (1 + factor) ** t for t in range(steps)]
            cy, cx = height / 2 + rng.uniform(-0.05, 0.05) * height, width / 2 + rng.uniform(-0.05, 0.05) * width
            params = {"factor": round(factor, 3)}
            views = [_render(source, np.clip(cy - s / 2, 0, height - s), np.clip(cx - s / 2, 0, width - s), s, size)
                     for s in sides]
        elif kind == "cutout":
            side = float(rng.uniform(min(short, size), short))
            background = _render(source, rng.uniform(0, height - side), rng.uniform(0, width - side), side, size)
            if self.images.stamps:
                from .photos import load_image

                stamp = load_image(self.images.stamps[int(rng.integers(0, len(self.images.stamps)))])
            else:
                stamp = _disc_stamp(rng)
            extent = int(rng.uniform(0.3, 0.5) * size)
            scale = extent / max(stamp.shape[:2])
            stamp = np.asarray(Image.fromarray(stamp).resize((max(1, int(stamp.shape[1] * scale)), max(1, int(stamp.shape[0] * scale))),
                                                             Image.Resampling.LANCZOS), np.float32) / 255.0
            velocity = rng.uniform(-5, 5, size=2)
            accel = rng.uniform(-0.6, 0.6, size=2) if rng.random() < 0.5 else np.zeros(2)
            start = rng.uniform(0.2, 0.8, size=2) * size - np.array(stamp.shape[:2]) / 2
            params = {"velocity": velocity.round(2).tolist(), "acceleration": accel.round(2).tolist()}
            views = []
            for t in range(steps):
                y, x = (start + velocity * t + 0.5 * accel * t * t).round().astype(int)
                views.append(_paste(background, stamp, y, x))
        else:  # brightness
            frame = _render(source, rng.uniform(0, height - short * 0.6), rng.uniform(0, width - short * 0.6), short * 0.6, size)
            step = float(rng.choice([-1, 1]) * rng.uniform(0.03, 0.08))
            params = {"step": round(step, 3)}
            # offsets centred on the photo's own brightness: -step*(steps-1)/2 ... +step*(steps-1)/2
            views = [np.clip(frame + step * (t - (steps - 1) / 2), 0, 1).astype(np.float32) for t in range(steps)]
        return Sequence(kind, params, views[:-1], views[-1])


def _paste(background: np.ndarray, stamp: np.ndarray, top: int, left: int) -> np.ndarray:
    """RGBA float stamp over an RGB float background, clipped at the borders."""
    out = background.copy()
    size = background.shape[0]
    h, w = stamp.shape[:2]
    y0, x0, y1, x1 = max(top, 0), max(left, 0), min(top + h, size), min(left + w, size)
    if y0 >= y1 or x0 >= x1:
        return out
    piece = stamp[y0 - top:y1 - top, x0 - left:x1 - left]
    alpha = piece[..., 3:4]
    out[y0:y1, x0:x1] = out[y0:y1, x0:x1] * (1 - alpha) + piece[..., :3] * alpha
    return out
