"""Write the studio's one-click examples: assets/examples/<task>/{pair1_input,pair1_answer,pair2_…,query,truth}.png.

Every image is a crop of a held-out validation source (coffee, chelsea, grass — never seen in
training), turned into an (input, answer) pair by the task's own transform (demo_core.tasks).

    python -m scripts.make_examples [--size 64] [--out assets/examples]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from demo_core.data import VALIDATION_SOURCES, load_source
from demo_core.images import float_to_pil
from demo_core.tasks import TASKS, get_task

ROOT = Path(__file__).resolve().parents[1]
# named square crops (source, top, left, side in source pixels), chosen to hold something recognisable
CROPS = {
    "cat_face": ("chelsea", 30, 95, 265),
    "cat_eye": ("chelsea", 50, 100, 160),
    "cup": ("coffee", 5, 95, 390),
    "cup_top": ("coffee", 30, 170, 210),
    "spoon": ("coffee", 190, 270, 170),
    "grass_close": ("grass", 220, 180, 180),
}
# task -> (demonstration crops, query crop): the query is never one of its own pairs' images
EXAMPLES = {
    "colorization": (["cat_face", "spoon"], "cup"),
    "inpainting": (["cup", "cat_eye"], "cat_face"),
    "edges": (["cat_face", "spoon"], "cup"),
    "posterize": (["cup_top", "cat_eye"], "cat_face"),
    "invert": (["grass_close", "cat_face"], "cup"),
}


def crop(name: str, size: int) -> np.ndarray:
    source, top, left, side = CROPS[name]
    assert source in VALIDATION_SOURCES, f"{source} is not a held-out validation source"
    array = load_source(source)[top:top + side, left:left + side]
    image = Image.fromarray((array * 255).round().astype(np.uint8)).resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(image, dtype=np.float32) / 255.0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="side of every image in pixels (the default model's size)")
    parser.add_argument("--out", type=Path, default=ROOT / "assets" / "examples")
    args = parser.parse_args(argv)
    total = 0
    for task_name, (pair_crops, query_crop) in EXAMPLES.items():
        task = get_task(task_name)
        rng = np.random.default_rng(list(TASKS).index(task_name))
        folder = args.out / task_name
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("*.png"):
            stale.unlink()
        images = {}
        for number, name in enumerate(pair_crops, 1):
            x, y = task.transform(crop(name, args.size), rng)
            images[f"pair{number}_input"], images[f"pair{number}_answer"] = x, y
        images["query"], images["truth"] = task.transform(crop(query_crop, args.size), rng)
        for name, array in images.items():
            path = folder / f"{name}.png"
            float_to_pil(array).save(path, optimize=True)
            total += path.stat().st_size
        print(f"{task_name:13s} {len(pair_crops)} pairs + query, {folder}")
    print(f"{total / 1024:.0f} KB in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
