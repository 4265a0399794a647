"""How much of an answer's code does the query's code at the same cell decide? A probe of the codes, not the model.

    python -m scripts.lookup_probe --bundle checkpoints/retouch16 --train 3000 --val 256 \
        --out docs/results/lookup_probe16.json

For a few kinds with fixed parameters, a lookup table (the query's code at a cell -> the answer code seen most often
there) is fitted on training crops and scored on held-out ones: its token accuracy, and the PSNR of its decoded
answers beside identity and the ceiling. For a per-pixel map (invert, channel swaps) the answer's pixels are a
function of the query's, yet the answer's *code* is not a function of the query's code (both are quantizations of
their own pixels), so the table's accuracy is roughly the codes' own noise floor for such kinds; and where the table
beats identity in PSNR at that accuracy, token accuracy is not what limits quality.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch

CASES = {"colorize": {"tint": "grey"}, "invert": {"part": "rgb"}, "channels": {"order": (1, 0, 2)},
         "posterize": {"levels": 3}, "edges_sobel": {"gain": 1.0, "polarity": "white"}}


def main(argv=None) -> int:
    from demo_core.bundle import bundle_pixel_range, load_tokenizer_part
    from demo_core.data import ImageSampler
    from demo_core.metrics import mean_psnr, psnr
    from demo_core.task_family import make_pair
    from demo_core.train.common import write_json

    parser = argparse.ArgumentParser(prog="python -m scripts.lookup_probe", description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", type=Path, default=Path("checkpoints/retouch16"))
    parser.add_argument("--train", type=int, default=3000, help="training crops the table is fitted on")
    parser.add_argument("--val", type=int, default=256, help="held-out crops it is scored on")
    parser.add_argument("--pool", default="debian")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    tokenizer = load_tokenizer_part(args.bundle / "tokenizer", bundle_pixel_range(args.bundle))
    grid = tokenizer.grid

    def crops(split: str, count: int, seed: int) -> list:
        sampler = ImageSampler(split, tokenizer.image_size, seed, pool=args.pool)
        return [sampler.sample() for _ in range(count)]

    def encode(images: list) -> torch.Tensor:
        return torch.cat([tokenizer.encode(images[i:i + 256]) for i in range(0, len(images), 256)]).reshape(len(images), -1)

    start = time.time()
    train_images, val_images = crops("train", args.train, 1), crops("val", args.val, 2)
    rng = np.random.default_rng(0)
    report = {"command": "python -m scripts.lookup_probe " + " ".join(argv or sys.argv[1:]), "kinds": {}}
    for kind, params in CASES.items():
        train = [make_pair(image, kind, params, rng) for image in train_images]
        val = [make_pair(image, kind, params, rng) for image in val_images]
        train_x, train_y = encode([x for x, _ in train]), encode([y for _, y in train])
        val_x, val_y = encode([x for x, _ in val]), encode([y for _, y in val])
        table: dict[int, Counter] = defaultdict(Counter)
        for a, b in zip(train_x.flatten().tolist(), train_y.flatten().tolist()):
            table[a][b] += 1
        fallback = Counter(train_y.flatten().tolist()).most_common(1)[0][0]
        predicted = torch.tensor([[table[a].most_common(1)[0][0] if a in table else fallback for a in row]
                                  for row in val_x.tolist()])
        targets = np.stack([y for _, y in val])
        score = lambda images: mean_psnr([psnr(a, b) for a, b in zip(images, targets)])   # noqa: E731
        report["kinds"][kind] = {
            "params": {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()},
            "lookup_token_accuracy": round(float((predicted == val_y).float().mean()), 3),
            "lookup_psnr": round(score(tokenizer.decode(predicted.reshape(-1, grid, grid))), 2),
            "identity_psnr": round(score(np.stack([x for x, _ in val])), 2),
            "ceiling_psnr": round(score(tokenizer.decode(val_y.reshape(-1, grid, grid))), 2)}
        print(kind, report["kinds"][kind], flush=True)
    report["seconds"] = round(time.time() - start, 1)
    if args.out:
        write_json(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
