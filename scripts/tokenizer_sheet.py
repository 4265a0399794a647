"""Draw validation images of every kind next to the first-generation (f8) tokenizer's reconstructions (docs/tokenizer_reconstructions.png).

The second-generation tokenizer's sheet: `python -m demo_core eval-tokenizer --sheet docs/tokenizer16_reconstructions.png`.
"""
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from demo_core.bundle import DEFAULT_BUNDLE, bundle_pixel_range, load_tokenizer_part
from demo_core.data import ImageSampler
from demo_core.images import float_to_pil
from demo_core.train.tokenizer_f8 import KINDS, make_view  # noqa: E402

tokenizer = load_tokenizer_part(DEFAULT_BUNDLE / "tokenizer", bundle_pixel_range(DEFAULT_BUNDLE))
columns, scale = 6, 2
side = tokenizer.image_size * scale
sheet = Image.new("RGB", (120 + 2 * columns * side, len(KINDS) * side), "white")
draw = ImageDraw.Draw(sheet)
for row, kind in enumerate(KINDS):
    sampler, rng = ImageSampler("val", tokenizer.image_size, 5), np.random.default_rng(3)
    images = np.stack([make_view(sampler.sample(), kind, rng) for _ in range(columns)]).astype(np.float32)
    recon = tokenizer.decode(tokenizer.encode(images))
    draw.text((4, row * side + side // 2 - 6), kind, fill="black")
    for col in range(columns):
        for offset, array in ((0, images[col]), (1, recon[col])):
            tile = float_to_pil(array).resize((side, side), Image.Resampling.NEAREST)
            sheet.paste(tile, (120 + (2 * col + offset) * side, row * side))
out = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/tokenizer_reconstructions.png")
sheet.save(out)
print(f"wrote {out}")
