"""Issue 21's measurement: teach the embedded default a task it never trained on, then compare drafts.

A task kind outside the default's five (solarize or a colour map from `demo_core.task_family`) with fixed
parameters; 20 pairs made from training photos (the user's pairs); 24 held-out queries from validation
photos, each prompted with K demonstrations drawn from those 20 pairs. Draft PSNR (no refiner) to the
true answer before teaching, after teaching with the default budget, and of identity (the query handed
back) and ceiling (the true answer through the tokenizer), over seeds. Also reports the measured
teaching speed (steps/s) and the CPU.

    OMP_NUM_THREADS=1 python -m scripts.teach_measure --kind solarize --out docs/results/teach_solarize.json

`--ablation` teaches one adapter per form in FORMS (LoRA rank and which projections get it) on the same pairs and
queries and reports each form's draft PSNR, teaching time and size beside the shared before / identity / ceiling:
the measurement behind TeachConfig's default form.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from scripts.serving import cpu_name


PARAMS = {"solarize": {"threshold": 0.5}, "colormap": {"cmap": "viridis"}}
ATTENTION, MLP = "q_proj,k_proj,v_proj,o_proj", "gate_proj,up_proj,down_proj"
# (name, rank, targets): the adapter forms `--ablation` compares
FORMS = (("r8 attention+MLP", 8, ATTENTION + "," + MLP), ("r4 attention+MLP", 4, ATTENTION + "," + MLP),
         ("r16 attention+MLP", 16, ATTENTION + "," + MLP), ("r8 attention", 8, ATTENTION), ("r8 MLP", 8, MLP),
         ("r2 attention+MLP", 2, ATTENTION + "," + MLP))


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
    parser.add_argument("--rank", type=int, default=None, help="LoRA rank (default: TeachConfig's)")
    parser.add_argument("--targets", default=None, help="comma-separated projections (default: TeachConfig's)")
    parser.add_argument("--ablation", action="store_true", help="compare every adapter form in FORMS")
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

    def drafts(adapter) -> list[float]:
        scores = []
        for (query, answer), chosen in zip(queries, demos):
            for seed in seeds:
                result = engine.run([pairs[i] for i in chosen], query, refine=(), seed=seed, adapter=adapter)
                scores.append(psnr(pil_to_float(result.draft), pil_to_float(answer)))
        return scores

    def taught(rank, targets) -> dict:
        config = TeachConfig(steps=args.steps)
        if rank is not None:
            config.rank = int(rank)
        if targets:
            config.targets = tuple(t.strip() for t in targets.split(",") if t.strip())
        started = time.perf_counter()
        adapter = teach(engine, pairs, config)
        seconds = time.perf_counter() - started
        after = drafts(adapter)
        return {"rank": config.rank, "targets": list(config.targets), "teach_seconds": round(seconds, 1),
                "steps_per_second": round(args.steps / seconds, 3),
                "pairs_loss_after": round(pairs_loss(engine, adapter, codes=codes), 4),
                "draft_psnr_after": round(float(np.mean(after)), 2),
                "draft_psnr_after_std": round(float(np.std(after)), 2), "adapter_bytes": adapter.num_bytes()}

    before = drafts(None)
    identity = [psnr(pil_to_float(q), pil_to_float(a)) for q, a in queries]
    ceiling = [psnr(pil_to_float(engine.decode(engine.encode([a])[0])), pil_to_float(a)) for _, a in queries]
    report = {
        "command": "OMP_NUM_THREADS=1 python -m scripts.teach_measure " + " ".join(argv or __import__("sys").argv[1:]),
        "kind": args.kind, "params": params, "pairs": args.pairs, "queries": args.queries, "k": args.k, "seeds": seeds,
        "steps": args.steps, "cpu": cpu_name(), "threads": __import__("torch").get_num_threads(),
        "pairs_loss_before": round(loss_before, 4),
        "draft_psnr": {"before": round(float(np.mean(before)), 2),
                       "identity": round(float(np.mean(identity)), 2), "ceiling": round(float(np.mean(ceiling)), 2)},
    }
    if args.ablation:
        report["forms"] = {}
        for name, rank, targets in FORMS:
            report["forms"][name] = taught(rank, targets)
            print(name, json.dumps(report["forms"][name]), flush=True)
    else:
        one = taught(args.rank, args.targets)
        report.update({key: one[key] for key in ("teach_seconds", "steps_per_second", "adapter_bytes", "rank", "targets")})
        report["pairs_loss"] = {"before": report.pop("pairs_loss_before"), "after": one["pairs_loss_after"]}
        report["draft_psnr"]["after"] = one["draft_psnr_after"]
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
