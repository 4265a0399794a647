"""How well a tokenizer can serve the tasks: round trips, edge maps, codebook use, code stability,
and the two references every answer is read against.

    python -m demo_core eval-tokenizer [--tokenizer FOLDER] [--per-kind 64] [--sheet sheet.png]

Measured on the validation split of the Debian photo pool (held-out photos, never trained on):
- photo: PSNR / SSIM / LPIPS (AlexNet) of the round trip;
- every training task kind's x and y: round-trip PSNR (y is what the backbone must write);
- Canny edge maps: F1 of the round trip against the map itself (1-px tolerance), polarity undone;
- codes used: the share of the codebook that the validation images use;
- code stability: for inpainting, the share of cells outside the edit's reach (the box's cells
  plus a one-cell margin) whose code is the same in the query and the answer;
- identity (the query handed back as the answer) and ceiling (the right answer through the
  tokenizer) for colorization and inpainting: no token sequence can beat the ceiling.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from .metrics import psnr_batch
from .task_family import KINDS, TRAIN_KINDS, inpaint_mask, make_pair
from .token_metrics import edit_reach

FILLS_FOR_STABILITY = ("grey", "black")


def _round_trip(tokenizer, images: np.ndarray, batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    codes, recon = [], []
    for start in range(0, len(images), batch):
        c = tokenizer.encode(images[start:start + batch])
        codes.append(c.numpy())
        recon.append(tokenizer.decode(c))
    return np.concatenate(codes), np.concatenate(recon)


def photo_sampler(split: str, seed: int):
    from .data import ImageSampler

    sampler = ImageSampler(split, 64, seed, procedural_share=0.0, pool="debian")
    sampler.stamps = ()
    return sampler


def stability(tokenizer, photos: np.ndarray, rng: np.random.Generator, fill: str) -> float:
    """Share of cells outside box cells + 1-cell margin whose code is the same in query and answer."""
    from .task_family import FILLS

    queries, keep = [], []
    for photo in photos:
        mask = inpaint_mask(photo.shape[0], "box", rng)
        query = photo.copy()
        query[mask] = FILLS[fill]
        queries.append(query)
        keep.append(~edit_reach(mask, tokenizer.grid))
    codes_q, _ = _round_trip(tokenizer, np.stack(queries))
    codes_a, _ = _round_trip(tokenizer, photos)
    keep = np.stack(keep)
    return float((codes_q == codes_a)[keep].mean())


def draw_pairs(photos: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[list, np.ndarray, np.ndarray]:
    """One (x, y) pair of `kind` per photo, each with its own parameters drawn from every value ('any'):
    (params, xs, ys)."""
    params, pairs = [], []
    for photo in photos:
        p = KINDS[kind].draw(rng, "any")
        params.append(p)
        pairs.append(make_pair(photo, kind, p, rng))
    xs, ys = (np.stack(side) for side in zip(*pairs))
    return params, xs, ys


def tokenizer_report(tokenizer, per_kind: int = 64, seed: int = 0, split: str = "val") -> dict:
    """The figures above as a dict; `summary` holds the ones the acceptance reads."""
    from .metrics import edge_precision_recall, lpips_batch, ssim

    rng = np.random.default_rng(seed + 101)
    sampler = photo_sampler(split, seed)
    photos = np.stack([sampler.sample() for _ in range(per_kind)]).astype(np.float32)
    codes, recon = _round_trip(tokenizer, photos)
    used = set(np.unique(codes).tolist())
    report: dict = {"photo": {"psnr": float(psnr_batch(photos, recon).mean()),
                              "ssim": float(np.mean([ssim(a, b) for a, b in zip(photos, recon)])),
                              "lpips": float(np.mean(lpips_batch(list(photos), list(recon))))}}
    references = {}
    for kind in TRAIN_KINDS:
        params, xs, ys = draw_pairs(photos, kind, rng)
        codes_x, recon_x = _round_trip(tokenizer, xs)
        codes_y, recon_y = _round_trip(tokenizer, ys)
        used |= set(np.unique(codes_x).tolist()) | set(np.unique(codes_y).tolist())
        row = {"x_psnr": float(psnr_batch(xs, recon_x).mean()), "y_psnr": float(psnr_batch(ys, recon_y).mean())}
        if kind == "edges_canny":
            f1 = []
            for y, r, p in zip(ys, recon_y, params):
                truth, guess = (y, r) if p["polarity"] == "white" else (1 - y, 1 - r)
                f1.append(edge_precision_recall(guess, truth, threshold=0.5)[2])
            row["f1"] = float(np.mean(f1))
        if kind in ("colorize", "inpaint"):
            row["identity_psnr"] = float(psnr_batch(xs, ys).mean())
            row["ceiling_psnr"] = row["y_psnr"]
            references[kind] = row["ceiling_psnr"] - row["identity_psnr"]
        report[kind] = row
    report["codes_used"] = len(used) / tokenizer.codebook_size
    report["stability"] = {fill: stability(tokenizer, photos, rng, fill) for fill in FILLS_FOR_STABILITY}
    targets = [report[kind]["y_psnr"] for kind in TRAIN_KINDS]
    report["summary"] = {
        "photo_psnr": round(report["photo"]["psnr"], 2), "photo_lpips": round(report["photo"]["lpips"], 4),
        "min_target_psnr": round(min(targets), 2),
        "min_target_kind": TRAIN_KINDS[int(np.argmin(targets))],
        "canny_f1": round(report["edges_canny"]["f1"], 3), "codes_used": round(report["codes_used"], 3),
        "stability": round(min(report["stability"].values()), 4),
        "ceiling_minus_identity": {k: round(v, 2) for k, v in references.items()},
        "per_kind": per_kind,
    }
    return report


def reconstruction_sheet(tokenizer, path: Path, seed: int = 0, columns: int = 8) -> Path:
    """Rows of (original, round trip) for photos and each task kind's answer, as one PNG."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed + 7)
    sampler = photo_sampler("val", seed + 3)
    rows = [("photo", np.stack([sampler.sample() for _ in range(columns)]))]
    for kind in TRAIN_KINDS:
        params = KINDS[kind].draw(rng, "any")
        rows.append((kind, np.stack([make_pair(sampler.sample(), kind, params, rng)[1] for _ in range(columns)])))
    size, label = tokenizer.image_size, 96
    sheet = Image.new("RGB", (label + columns * size, len(rows) * 2 * size), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (name, images) in enumerate(rows):
        _, recon = _round_trip(tokenizer, images.astype(np.float32))
        psnr = float(psnr_batch(images, recon).mean())
        draw.text((4, r * 2 * size + 4), f"{name}\n{psnr:.1f} dB", fill="black")
        for c in range(columns):
            for k, image in enumerate((images[c], recon[c])):
                tile = Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8))
                sheet.paste(tile, (label + c * size, (2 * r + k) * size))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def main(argv=None) -> int:
    from .bundle import load_tokenizer_part
    from .photos import FetchError

    parser = argparse.ArgumentParser(prog="python -m demo_core eval-tokenizer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", type=Path, default=Path("checkpoints/retouch16/tokenizer"), help="a tokenizer folder")
    parser.add_argument("--per-kind", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sheet", type=Path, default=None, help="also write a reconstruction sheet (PNG)")
    parser.add_argument("--json", type=Path, default=None, help="write the whole report here")
    args = parser.parse_args(argv)
    try:
        tokenizer = load_tokenizer_part(args.tokenizer)
        report = tokenizer_report(tokenizer, args.per_kind, args.seed)
    except (FetchError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for key, value in report.items():
        if key != "summary":
            print(f"{key:14s} {json.dumps(value)}")
    print("summary", json.dumps(report["summary"]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    if args.sheet:
        print(f"wrote {reconstruction_sheet(tokenizer, args.sheet, args.seed)}")
    return 0
