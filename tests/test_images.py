import io

import numpy as np
import pytest
from PIL import Image

from demo_core.images import ImageInputError, load_square, open_image


def png_bytes(image, **kw):
    buffer = io.BytesIO()
    image.save(buffer, format=kw.pop("format", "PNG"), **kw)
    return buffer.getvalue()


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "L", "1", "CMYK", "I;16", "I", "F"])
def test_odd_modes_become_rgb(tmp_path, mode):
    base = Image.fromarray((np.random.default_rng(0).random((20, 30, 3)) * 255).astype(np.uint8))
    if mode in ("I;16", "I", "F"):
        array = (np.random.default_rng(0).random((20, 30)) * 60000).astype(np.uint16 if mode == "I;16" else np.int32 if mode == "I" else np.float32)
        image = Image.fromarray(array, mode) if mode == "I;16" else Image.fromarray(array)
    else:
        image = base.convert(mode)
    path = tmp_path / f"x.{'tif' if mode in ('CMYK', 'I', 'F', 'I;16') else 'png'}"
    image.save(path)
    out = load_square(path, 16)
    assert out.mode == "RGB" and out.size == (16, 16)


def test_alpha_is_composited_on_white():
    image = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert open_image(image).getpixel((0, 0)) == (255, 255, 255)


def test_exif_rotation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90
    path = tmp_path / "rot.jpg"
    image.save(path, exif=exif)
    assert open_image(path).size == (20, 40)


def test_missing_corrupt_empty_not_image(tmp_path):
    with pytest.raises(ImageInputError, match="not found"):
        open_image(tmp_path / "nope.png")
    (tmp_path / "text.png").write_text("hello")
    with pytest.raises(ImageInputError, match="not an image"):
        open_image(tmp_path / "text.png")
    good = png_bytes(Image.new("RGB", (64, 64), (1, 2, 3)))
    (tmp_path / "cut.png").write_bytes(good[: len(good) // 2])
    with pytest.raises(ImageInputError, match="corrupt|truncated|not an image"):
        open_image(tmp_path / "cut.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageInputError, match="empty"):
        open_image(tmp_path / "empty.png")
    with pytest.raises(ImageInputError, match="folder"):
        open_image(tmp_path)
    with pytest.raises(ImageInputError, match="no image"):
        open_image(None)


def test_huge_image_header_is_refused_before_decoding(tmp_path):
    # a real 20000x20000 PNG header (1-bit, tiny file): refused from its size alone
    image = Image.new("1", (20000, 20000))
    path = tmp_path / "huge.png"
    image.save(path, optimize=True)
    with pytest.raises(ImageInputError, match="megapixels|too large"):
        open_image(path)


def test_arrays_and_square_crop():
    array = np.zeros((30, 60, 3), np.float32)
    array[:, 15:45] = 1.0                                  # the centre square is white
    out = load_square(array, 10)
    assert out.size == (10, 10) and np.asarray(out).min() > 250
    with pytest.raises(ImageInputError, match="shape"):
        open_image(np.zeros((3, 3, 7)))
