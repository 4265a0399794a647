"""`python -m demo_core tune-sampling`: choose a bundle's default sampling by measurement.

Two sweeps on validation examples (held-out photos) of the bundle's core tasks, every setting on the same
examples and seeds:
1. the draft: temperature x top-p (top-k off), scored by the draft's mean PSNR against the answer;
2. SCAN's regeneration temperature, with the draft's best setting, scored by the +SCAN PSNR.
With --write the winners go into the bundle's bundle.json ("sampling": temperature, top_p, top_k,
scan_temperature and a "source" line the studio shows), so the studio, CLI and eval start from them.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def measure(engine, tasks, n: int, pairs: int, seed: int, settings: dict, stage: str, pool: str, progress=None) -> dict:
    """Mean PSNR of `stage` ('draft' or '+SCAN') per task for one setting; the same examples for every setting."""
    from ..images import float_to_pil, pil_to_float
    from ..metrics import mean_psnr, psnr
    from .family import example_sampler
    from .quality import run_stages

    per_task = {}
    for task in tasks:
        sampler = example_sampler(task, "val", engine.image_size, seed, pool)
        values = []
        for index in range(n):
            example = sampler.sample(task=task, k=pairs)
            out = run_stages(engine, example, [stage], seed + index, **settings)[stage]
            values.append(psnr(pil_to_float(out["image"]), pil_to_float(float_to_pil(example.answer))))
            if progress:
                progress()
        per_task[task] = mean_psnr(values)
    return {"per_task": per_task, "mean": float(np.mean(list(per_task.values())))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo_core tune-sampling", description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", default=None, help="bundle folder (default: the embedded default)")
    parser.add_argument("--tasks", default=None, help="comma-separated task specs (default: the bundle's core tasks)")
    parser.add_argument("--n", type=int, default=6, help="examples per task and setting")
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--temperatures", default="0,0.5,0.8,1.0", help="draft temperatures (0: greedy)")
    parser.add_argument("--top-ps", default="0.9,1.0", help="draft nucleus sizes")
    parser.add_argument("--scan-temperatures", default="0,0.5,1.0", help="SCAN regeneration temperatures")
    parser.add_argument("--scan-iterations", type=int, default=30)
    parser.add_argument("--pool", choices=("builtin", "debian"), default="debian")
    parser.add_argument("--write", action="store_true", help="store the winners in the bundle's bundle.json")
    parser.add_argument("--out", type=Path, default=Path("runs/tune-sampling.json"))
    args = parser.parse_args(argv)
    from tqdm import tqdm

    from ..bundle import BundleError
    from ..engine import load_engine
    from .family import FAMILY_CORE, is_family, validate_spec

    try:
        engine = load_engine(args.bundle)
        family_bundle = any(is_family(t) for t in engine.bundle.info.get("tasks", ()))
        default = ",".join(FAMILY_CORE) if family_bundle else "colorization,inpainting,edges"
        tasks = [t.strip() for t in (args.tasks or default).split(",") if t.strip()]
        for task in tasks:
            validate_spec(task)
        temperatures, top_ps, scan_temperatures = _floats(args.temperatures), _floats(args.top_ps), _floats(args.scan_temperatures)
    except (ValueError, BundleError) as error:
        print(f"error: {error}")
        return 1
    if args.write and args.bundle is None:
        print("error: --write needs --bundle FOLDER (the embedded default is not rewritten in place by accident)")
        return 1
    grid = [(t, p) for t in temperatures for p in (top_ps if t > 0 else [1.0])]   # greedy ignores top-p
    total = (len(grid) + len(scan_temperatures)) * len(tasks) * args.n
    bar = tqdm(total=total, desc="tune-sampling", dynamic_ncols=True)
    start = time.time()
    drafts = []
    for temperature, top_p in grid:
        settings = {"temperature": temperature, "top_p": top_p, "top_k": 0}
        drafts.append({**settings, **measure(engine, tasks, args.n, args.pairs, args.seed, settings, "draft", args.pool,
                                             lambda: bar.update(1))})
    best = max(drafts, key=lambda row: row["mean"])
    scans = []
    for scan_temperature in scan_temperatures:
        settings = {"temperature": best["temperature"], "top_p": best["top_p"], "top_k": 0,
                    "scan_temperature": scan_temperature, "scan_iterations": args.scan_iterations}
        scans.append({"scan_temperature": scan_temperature, **measure(engine, tasks, args.n, args.pairs, args.seed, settings,
                                                                      "+SCAN", args.pool, lambda: bar.update(1))})
    bar.close()
    best_scan = max(scans, key=lambda row: row["mean"])
    command = "python -m demo_core tune-sampling " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    chosen = {"temperature": best["temperature"], "top_p": best["top_p"], "top_k": 0,
              "scan_temperature": best_scan["scan_temperature"],
              "source": f"measured on validation ({', '.join(tasks)}; N = {args.n}, K = {args.pairs}): {command}"}
    report = {"tasks": tasks, "n": args.n, "pairs": args.pairs, "seed": args.seed, "draft": drafts, "scan": scans,
              "chosen": chosen, "seconds": round(time.time() - start, 1), "command": command}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print("| temperature | top-p | draft PSNR | " + " | ".join(tasks) + " |")
    print("|---|---|---|" + "---|" * len(tasks))
    for row in drafts:
        print(f"| {row['temperature']} | {row['top_p']} | {row['mean']:.2f} | "
              + " | ".join(f"{row['per_task'][t]:.2f}" for t in tasks) + " |")
    print("\n| SCAN temperature | +SCAN PSNR | " + " | ".join(tasks) + " |")
    print("|---|---|" + "---|" * len(tasks))
    for row in scans:
        print(f"| {row['scan_temperature']} | {row['mean']:.2f} | " + " | ".join(f"{row['per_task'][t]:.2f}" for t in tasks) + " |")
    print(f"chosen: temperature {chosen['temperature']}, top-p {chosen['top_p']}, SCAN temperature "
          f"{chosen['scan_temperature']} ({report['seconds']} s; {args.out})")
    if args.write:
        path = Path(args.bundle) / "bundle.json"
        info = json.loads(path.read_text())
        info["sampling"] = chosen
        path.write_text(json.dumps(info, indent=2) + "\n")
        print(f"wrote the sampling defaults into {path}")
    return 0
