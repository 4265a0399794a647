"""What limits a tokenizer's round trip of the binary and few-level targets (issue 16: Canny maps,
posterize and Sobel below 25 dB): the decoder's softness, or the code's bit budget?

    python -m scripts.roundtrip_probe [--tokenizer checkpoints/retouch16/tokenizer] [--n 256] [--sheet worst.png]
        [--out docs/results/roundtrip_probe16.json]

On validation photos (the eval-tokenizer's sampler and parameter draws) per target kind:
- the round trip's PSNR (mean of examples, median, share of examples >= 25 dB);
- the encoder's latents decoded without quantization: if that is no better, the loss is in the
  autoencoder (the frozen local encoder's 8-dim cell latent and the decoder), not the codebook;
- the same after snapping the decode to the values the target can take (0/1 for Canny, the
  posterize levels): if the decoder were only soft, snapping would recover most of the gap;
- the empirical entropy of the target's 4x4 cell patterns, in bits, against the code's
  log2(codebook) bits: a plug-in estimate over n x 256 cells (biased low, capped at log2 of the
  cell count), so a value near the code's budget means many cells carry more than a code can say.
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np

KINDS = ("edges_canny", "posterize", "edges_sobel")


def entropy_bits(patterns: np.ndarray) -> float:
    counts = np.array(list(Counter(map(bytes, patterns)).values()), np.float64)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def cell_patterns(images: np.ndarray, levels: int, cell: int = 4) -> np.ndarray:
    """(N, H, W, 3) in [0, 1] -> one uint8 row per cell: its pixels quantized to `levels` values."""
    n, h, w, c = images.shape
    q = np.round(images * (levels - 1)).astype(np.uint8)
    q = q.reshape(n, h // cell, cell, w // cell, cell, c).transpose(0, 1, 3, 2, 4, 5)
    return q.reshape(-1, cell * cell * c)


def snap(recon: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Each decoded pixel to the nearest colour the target itself uses."""
    values = np.unique(target.reshape(-1, 3), axis=0)
    d = ((recon.reshape(-1, 1, 3) - values[None]) ** 2).sum(-1)
    return values[d.argmin(1)].reshape(target.shape)


def decodes(tokenizer, images: np.ndarray, batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """From one encode: the round trip through the codes (as eval-tokenizer's) and the encoder's latents
    decoded without snapping to codes (what the autoencoder alone can carry)."""
    recon, unquantized = [], []
    for start in range(0, len(images), batch):
        latents = tokenizer.encode_latents(tokenizer.to_tensor(images[start:start + batch]))   # (B, D, g, g)
        recon.append(tokenizer.decode(tokenizer.nearest_codes(latents)))
        unquantized.append(tokenizer.decode_latents(latents.permute(0, 2, 3, 1)))
    return np.concatenate(recon), np.concatenate(unquantized)


def main(argv=None) -> int:
    from demo_core.bundle import load_tokenizer_part
    from demo_core.eval_tokenizer import draw_pairs, photo_sampler
    from demo_core.metrics import psnr_batch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", type=Path, default=Path("checkpoints/retouch16/tokenizer"))
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sheet", type=Path, default=None, help="PNG of the six worst examples per kind")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    tokenizer = load_tokenizer_part(args.tokenizer)
    budget = float(np.log2(tokenizer.codebook_size))
    sampler = photo_sampler("val", args.seed)
    photos = np.stack([sampler.sample() for _ in range(args.n)]).astype(np.float32)
    rng = np.random.default_rng(args.seed + 101)
    report = {"tokenizer": str(args.tokenizer), "n": args.n, "code_bits": budget, "kinds": {}}
    rows = []
    for kind in KINDS:
        params, inputs, targets = draw_pairs(photos, kind, rng)
        recon, unquantized = decodes(tokenizer, targets)
        psnr = psnr_batch(targets, recon)
        continuous = psnr_batch(targets, unquantized)
        row = {"psnr_mean": float(psnr.mean()), "psnr_median": float(np.median(psnr)),
               "share_ge_25": float((psnr >= 25).mean()),
               "unquantized_psnr_mean": float(continuous.mean()), "unquantized_psnr_median": float(np.median(continuous))}
        if kind in ("edges_canny", "posterize"):
            snapped = np.stack([snap(r, t) for r, t in zip(recon, targets)])
            row["snapped_psnr_mean"] = float(psnr_batch(targets, snapped).mean())
            if kind == "edges_canny":
                row["pattern_bits"] = entropy_bits(cell_patterns(targets[..., :1], 2))
            else:
                row["pattern_bits_by_levels"] = {}
                for levels in sorted({p["levels"] for p in params}):
                    chosen = np.array([p["levels"] == levels for p in params])
                    row["pattern_bits_by_levels"][str(levels)] = entropy_bits(cell_patterns(targets[chosen], levels))
        report["kinds"][kind] = row
        print(kind, json.dumps(row))
        order = np.argsort(psnr)[:6]
        rows.append(np.concatenate([np.concatenate([inputs[i], targets[i], recon[i]], 0) for i in order], 1))
    report["cells_sampled"] = args.n * tokenizer.grid ** 2
    report["entropy_cap_bits"] = float(np.log2(report["cells_sampled"]))
    if args.sheet:
        from PIL import Image

        sheet = (np.clip(np.concatenate(rows, 0), 0, 1) * 255).astype(np.uint8)
        Image.fromarray(sheet).resize((sheet.shape[1] * 2, sheet.shape[0] * 2), Image.Resampling.NEAREST).save(args.sheet)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
