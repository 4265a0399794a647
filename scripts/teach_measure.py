"""Issue 21's measurement: teach the embedded default a task it never trained on, then compare drafts.

A task kind outside the default's five (solarize or a colour map from `demo_core.task_family`) with fixed
parameters; 20 pairs made from training photos (the user's pairs); 24 held-out queries from validation
photos, each prompted with K demonstrations drawn from those 20 pairs. Draft PSNR (no refiner) to the
true answer before teaching, after teaching with the default budget, and of identity (the query handed
back) and ceiling (the true answer through the tokenizer), over seeds. Also reports the measured
teaching speed (steps/s) and the CPU.

    OMP_NUM_THREADS=1 python -m scripts.teach_measure --kind solarize --out docs/results/teach_solarize.json
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


PARAMS = {"solarize": {"threshold": 0.5}, "colormap": {"cmap": "viridis"}}


def main(argv=None) -> int:
    from demo_core.data import ImageSampler
    from demo_core.engine import load_engine
    from demo_core.images import float_to_pil, pil_to_float
    from demo_core.metrics import psnr
    from demo_core.task_family import make_pair
    from demo_core.teach.trainer import DEFAULT_STEPS, TeachConfig, encode_pairs, pairs_loss, teach

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kind", choices=sorted(PARAMS), default="solarize")
    parser.add_argument("--pairs", type=int, default=20)
    parser.add_argument("--queries", type=int, default=24)
    parser.add_argument("--k", type=int, default=2, help="demonstrations per held-out prompt")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--bundle", default=None)
    parser.add_argument("--out", type=Path, default=None, help="write the numbers as JSON here")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]

    engine = load_engine(args.bundle)
    size = engine.image_size
    params = PARAMS[args.kind]
    rng = np.random.default_rng(0)
    train = ImageSampler("train", size, 0, pool="builtin")
    pairs = [tuple(float_to_pil(a) for a in make_pair(train.sample(), args.kind, params, rng)) for _ in range(args.pairs)]
    val = ImageSampler("val", size, 1, pool="builtin")
    queries = [tuple(float_to_pil(a) for a in make_pair(val.sample(), args.kind, params, rng)) for _ in range(args.queries)]
    demos = [list(rng.choice(len(pairs), size=args.k, replace=False)) for _ in queries]

    codes = encode_pairs(engine, pairs, flips=False)
    loss_before = pairs_loss(engine, None, codes=codes)
    started = time.perf_counter()
    adapter = teach(engine, pairs, TeachConfig(steps=args.steps))
    seconds = time.perf_counter() - started
    loss_after = pairs_loss(engine, adapter, codes=codes)

    def drafts(with_adapter) -> list[float]:
        scores = []
        for (query, answer), chosen in zip(queries, demos):
            for seed in seeds:
                result = engine.run([pairs[i] for i in chosen], query, refine=(), seed=seed,
                                    adapter=adapter if with_adapter else None)
                scores.append(psnr(pil_to_float(result.draft), pil_to_float(answer)))
        return scores

    before, after = drafts(False), drafts(True)
    identity = [psnr(pil_to_float(q), pil_to_float(a)) for q, a in queries]
    ceiling = [psnr(pil_to_float(engine.decode(engine.encode([a])[0])), pil_to_float(a)) for _, a in queries]
    report = {
        "command": "OMP_NUM_THREADS=1 python -m scripts.teach_measure " + " ".join(argv or __import__("sys").argv[1:]),
        "kind": args.kind, "params": params, "pairs": args.pairs, "queries": args.queries, "k": args.k, "seeds": seeds,
        "steps": args.steps, "teach_seconds": round(seconds, 1), "steps_per_second": round(args.steps / seconds, 3),
        "cpu": cpu_name(), "threads": __import__("torch").get_num_threads(),
        "pairs_loss": {"before": round(loss_before, 4), "after": round(loss_after, 4)},
        "draft_psnr": {"before": round(float(np.mean(before)), 2), "after": round(float(np.mean(after)), 2),
                       "identity": round(float(np.mean(identity)), 2), "ceiling": round(float(np.mean(ceiling)), 2)},
        "adapter_bytes": adapter.num_bytes(),
    }
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
