"""Which luminance-carry tolerance? A probe over the task family's kinds (render.py's luminance carry).

    OMP_NUM_THREADS=1 python -m scripts.luma_probe --bundle checkpoints/retouch16 --n 16 --seed 0 \
        --out docs/results/luma_probe16.json

Per kind, on the eval's validation examples (K = 2), the engine's draft with luminance carry off, then the same draft
with the query's luminance carried whenever the pairs' fit leaves an RMS residual at most each tolerance; beside them
identity and the fit residuals' spread. The chosen tolerance (render.LUMA_TOLERANCE) is the largest that loses on no kind.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

KINDS = ("colorize", "invert", "tone", "colormap", "posterize", "channels", "deblur", "denoise", "inpaint:fill=grey",
         "inpaint:fill=black", "edges_canny", "edges_sobel")


def main(argv=None) -> int:
    from demo_core.engine import load_engine
    from demo_core.eval.family import example_sampler
    from demo_core.images import float_to_pil, pil_to_float
    from demo_core.metrics import mean_psnr, psnr
    from demo_core.render import carry_luminance, luminance_map
    from demo_core.train.common import write_json

    parser = argparse.ArgumentParser(prog="python -m scripts.luma_probe", description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", default="checkpoints/retouch16")
    parser.add_argument("--tasks", default=",".join(KINDS))
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tolerances", default="0.01,0.02,0.05")
    parser.add_argument("--pool", default="debian")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    engine = load_engine(args.bundle)
    tolerances = [float(t) for t in args.tolerances.split(",") if t.strip()]
    report = {"command": "python -m scripts.luma_probe " + " ".join(argv or sys.argv[1:]), "tasks": {}}
    for task in [t.strip() for t in args.tasks.split(",") if t.strip()]:
        sampler = example_sampler(task, "val", engine.image_size, args.seed, args.pool)
        rows: dict[str, list] = {}
        residuals = []
        start = time.time()
        for index in range(args.n):
            example = sampler.sample(task=task, k=2)
            pairs = [(float_to_pil(x), float_to_pil(y)) for x, y in example.pairs]
            query, target = float_to_pil(example.query), pil_to_float(float_to_pil(example.answer))
            draft = engine.run(pairs, query, refine=(), seed=args.seed + index, luma_carry=False).final
            fitted = luminance_map(pairs, tolerance=float("inf"))       # the fit whatever its residual
            residuals.append(fitted.residual)
            carried = carry_luminance(draft, query, fitted)
            rows.setdefault("*identity*", []).append(psnr(pil_to_float(query), target))
            rows.setdefault("draft", []).append(psnr(pil_to_float(draft), target))
            rows.setdefault("carried always", []).append(psnr(pil_to_float(carried), target))
            for tolerance in tolerances:
                chosen = carried if fitted.residual <= tolerance else draft
                rows.setdefault(f"tolerance {tolerance:g}", []).append(psnr(pil_to_float(chosen), target))
        report["tasks"][task] = {"residual_percentiles_0_50_100": [round(float(v), 4) for v in np.percentile(residuals, [0, 50, 100])],
                                 **{name: round(mean_psnr(values), 2) for name, values in rows.items()}}
        print(task, report["tasks"][task], f"{time.time() - start:.0f} s", flush=True)
    if args.out:
        write_json(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
