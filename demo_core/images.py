"""Image input: open any user image safely and bring it to the model's RGB square.

Owns the one place where files and arrays become `PIL.Image` RGB images, and the one
error type (`ImageInputError`) whose message says what is wrong and what to do.
"""
from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

MAX_PIXELS = 40_000_000      # refuse decompression bombs before decoding (a 20000x20000 PNG is 400M)
MAX_FILE_BYTES = 25 * 2**20  # 25 MB; the studio's upload limit is lower


class ImageInputError(ValueError):
    """A user-facing problem with an input image; the message is one line to show as is."""


def _to_rgb(image: Image.Image, name: str) -> Image.Image:
    """Any PIL mode -> RGB. Alpha is composited on white; 16-bit and float are rescaled."""
    try:
        image = ImageOps.exif_transpose(image)  # phone photos carry their rotation in EXIF
    except Exception:  # malformed EXIF: keep the pixels as stored
        pass
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        low, high = float(np.nanmin(array)), float(np.nanmax(array))
        scale = (high - low) or 1.0
        grey = np.nan_to_num((array - low) / scale * 255.0).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    try:
        return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV
    except Exception as error:  # pragma: no cover - exotic modes
        raise ImageInputError(f"{name}: cannot convert an image of mode {mode} to RGB ({error}).") from error


def open_image(source, name: str = "image") -> Image.Image:
    """Open a path, bytes, numpy array or PIL image as an RGB `PIL.Image`.

    Raises `ImageInputError` with a one-line message for missing, unreadable, corrupt,
    too large or otherwise unusable input.
    """
    if source is None:
        raise ImageInputError(f"{name}: no image given.")
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, np.ndarray):
        array = source
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
            raise ImageInputError(f"{name}: an array of shape {array.shape} is not an image (need HxW, HxWx3 or HxWx4).")
        if array.dtype != np.uint8:
            array = np.asarray(array, dtype=np.float64)
            if array.size and np.nanmax(array) > 1.0:
                array = array / 255.0
            array = (np.clip(np.nan_to_num(array), 0, 1) * 255).round().astype(np.uint8)
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[..., 0]
        image = Image.fromarray(array)
    else:
        path = Path(os.fspath(source)) if not isinstance(source, (bytes, bytearray)) else None
        if path is not None:
            if not path.exists():
                raise ImageInputError(f"{name}: file not found: {path}")
            if path.is_dir():
                raise ImageInputError(f"{name}: {path} is a folder, not an image file.")
            if path.stat().st_size > MAX_FILE_BYTES:
                raise ImageInputError(
                    f"{name}: {path.name} is {path.stat().st_size / 2**20:.0f} MB; use an image under {MAX_FILE_BYTES // 2**20} MB.")
            data = path.read_bytes()
            label = path.name
        else:
            data = bytes(source)
            label = name
        if not data:
            raise ImageInputError(f"{name}: {label} is empty.")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data))
                width, height = image.size
                if width * height > MAX_PIXELS:
                    raise ImageInputError(
                        f"{name}: {label} is {width}x{height} pixels; use an image under {MAX_PIXELS // 1_000_000} megapixels.")
                image.load()
        except ImageInputError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise ImageInputError(f"{name}: {label} is too large to decode safely; use a smaller image.") from error
        except Exception as error:
            kind = "not an image PIL can read" if "cannot identify" in str(error) else f"corrupt or truncated ({error})"
            raise ImageInputError(f"{name}: {label} is {kind}.") from error
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise ImageInputError(f"{name}: {width}x{height} pixels is too large; use an image under {MAX_PIXELS // 1_000_000} megapixels.")
    if width < 1 or height < 1:
        raise ImageInputError(f"{name}: the image is empty ({width}x{height}).")
    return _to_rgb(image, name)


def to_square(image: Image.Image, size: int) -> Image.Image:
    """Centre-crop to a square and resize to `size` (antialiased); the documented automatic fix for any shape."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    return image.resize((size, size), Image.Resampling.LANCZOS) if side != size else image


def load_square(source, size: int, name: str = "image") -> Image.Image:
    """`open_image` then `to_square`: what every model input goes through."""
    return to_square(open_image(source, name), size)


def pil_to_float(image: Image.Image) -> np.ndarray:
    """RGB PIL -> float32 HxWx3 array in [0, 1]."""
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def float_to_pil(array: np.ndarray) -> Image.Image:
    """float HxWx3 in [0, 1] -> RGB PIL."""
    return Image.fromarray((np.clip(array, 0.0, 1.0) * 255.0).round().astype(np.uint8), "RGB")
