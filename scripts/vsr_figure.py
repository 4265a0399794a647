"""VSR Fig. 2 for every variant: per-token cosine distance to the right answer along the raster order.

    python -m scripts.vsr_figure runs/eval-vsr16-seed0 [more eval-vsr folders] --out docs/results/vsr16/fig2.png

Reads each folder's results.json (`python -m demo_core eval-vsr`), averages the curves over folders (seeds) and
tasks, and draws one line per row: the draft, +SCAN, each g_phi's snapped decode (gated and continuous rows
have the snapped codes' curve or none, so only the plain rows are drawn). Smoothed over 16 tokens (one grid row).
"""
import argparse
import json
from pathlib import Path

import numpy as np


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    curves: dict[str, list] = {}
    for folder in args.folders:
        report = json.loads((folder / "results.json").read_text())
        for rows in report["table"].values():
            for label, row in rows.items():
                if row.get("curve") and not label.startswith("*") and "gate" not in label and "continuous" not in label:
                    curves.setdefault(label, []).append(row["curve"])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.2))
    kernel = np.ones(16) / 16
    for label, rows in curves.items():
        mean = np.mean(rows, 0)
        ax.plot(np.convolve(mean, kernel, mode="valid"), label=f"{label} (mean {mean.mean():.3f})",
                linestyle="--" if label.startswith("+SCAN") else "-")
    ax.set_xlabel("token position (raster), 16-token moving mean")
    ax.set_ylabel("cosine distance to the right answer")
    ax.set_title("VSR Fig. 2 per variant (backbone embedding space)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
