"""`python -m demo_core eval`: the paper-style quality table (VSR Table 1, Fig. 2; SCAN Table 2).

For each task and stage (draft, +SCAN, +VSR, +SCAN+VSR) on held-out validation images (or a
folder of the user's own x/y pairs): PSNR, SSIM, LPIPS, FID (only when N >= 10 per cell),
token accuracy against the tokenized ground truth, perplexity of the ground truth under the
backbone, edge precision/recall for the edges task, quality-score AUROC, and the per-token
cosine-distance curve between generated and ground-truth token embeddings with its AUC.
Ablations on the same command: SCAN T and c, and the number of demonstration pairs K, and the
in-context check (same query photo, demonstrations of different photo-input tasks).
Writes results.json, results.md and PNG plots into --out. Deterministic for a seed.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from ..tasks import CORE_TASKS, TASKS
from .family import FAMILY_CORE, is_family, task_following, validate_spec
from .quality import evaluate, incontext_check, pairs_ablation, run_stages, scan_ablation, stage_labels
from .report import markdown, plot_curves, plot_examples


def main(argv=None) -> int:
    from ..backbone import QUALITY_SCORES

    parser = argparse.ArgumentParser(prog="python -m demo_core eval", description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", default=None, help="bundle folder or Hub id (default: embedded retouch-tiny)")
    parser.add_argument("--tasks", default=None,
                        help="comma-separated task specs: five-task names, or family kinds with optional fixed parameters "
                             "(inpaint:fill=black; see eval/family.py). Default: the bundle's core tasks")
    parser.add_argument("--split", choices=("val", "heldout"), default="val",
                        help="family tasks: training parameter values (val) or held-out ones (heldout); photos are "
                             "held out either way")
    parser.add_argument("--sequences", type=int, default=0,
                        help="sequences per kind (pan, zoom, cutout, brightness) for the sequential-prompt rows (0: skip)")
    parser.add_argument("--frames", type=int, default=3, help="context frames of those sequences")
    parser.add_argument("--following", type=int, default=0,
                        help="family bundles: query photos for the task-following check, on both splits (0: skip)")
    parser.add_argument("--n", type=int, default=8, help="examples per task (FID needs >= 10)")
    parser.add_argument("--pairs", type=int, default=2, help="demonstration pairs K")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=None, help="default: the bundle's own (engine.sampling_defaults)")
    parser.add_argument("--top-p", type=float, default=None, help="default: the bundle's own")
    parser.add_argument("--scan-iterations", type=int, default=30)
    parser.add_argument("--scan-cells", type=int, default=4)
    parser.add_argument("--quality-score", choices=QUALITY_SCORES, default="combined",
                        help="the score SCAN ranks and compares: p(<good>) x p(code), or the quality head alone")
    parser.add_argument("--incontext", type=int, default=8, help="query photos for the in-context check (0: skip)")
    parser.add_argument("--ablate-T", default="", help="SCAN ablation iterations, e.g. 0,10,20,30")
    parser.add_argument("--ablate-c", default="", help="SCAN ablation cells per iteration, e.g. 1,2,4,8")
    parser.add_argument("--ablate-K", default="", help="pairs ablation, e.g. 1,2,3")
    parser.add_argument("--tensor", choices=("auto", "off"), default="auto",
                        help="TensorAR rows (AR vs TensorAR vs control) when the bundle has tensor/ (auto) or never (off)")
    parser.add_argument("--tensor-variants", default="",
                        help="more TensorAR adapters to compare, name=folder,... (k / schedule ablations; the last = splits)")
    parser.add_argument("--paste", choices=("bundle", "on", "off"), default="bundle",
                        help="show the query's pixels where an answer keeps its codes (render.py; the ceiling too); "
                             "bundle: the bundle's default (on for local codes)")
    parser.add_argument("--luma-carry", choices=("bundle", "on", "off"), default="bundle",
                        help="take the answer's luminance from the query where the pairs show it (render.py; the "
                             "ceiling too); bundle: the bundle's default")
    parser.add_argument("--pool", choices=("builtin", "debian"), default="builtin",
                        help="validation images: the packaged ones, or + the held-out Debian photos (`data fetch`)")
    parser.add_argument("--out", type=Path, default=Path("runs/eval"))
    args = parser.parse_args(argv)
    from ..bundle import BundleError
    from ..engine import load_engine
    from ..photos import FetchError

    try:
        engine = load_engine(args.bundle)
        family_bundle = any(is_family(t) for t in engine.bundle.info.get("tasks", ()))
        default = ",".join(FAMILY_CORE) if family_bundle else ",".join(TASKS)
        tasks = [t.strip() for t in (args.tasks or default).split(",") if t.strip()]
        for task in tasks:
            validate_spec(task)
    except (ValueError, BundleError) as error:
        print(f"error: {error}")
        return 1
    if not 1 <= args.pairs <= engine.max_pairs:
        print(f"error: --pairs must be between 1 and {engine.max_pairs}")
        return 1
    variants = None
    items = [item.strip() for item in args.tensor_variants.split(",") if item.strip()]
    if any("=" not in item for item in items):
        print("error: --tensor-variants takes name=folder items separated by commas")
        return 1
    extra = dict(item.rsplit("=", 1) for item in items)
    if extra and args.tensor == "off":
        print("error: --tensor off and --tensor-variants contradict each other")
        return 1
    if args.tensor != "off" and (engine.bundle.tensor is not None or extra):
        from .tensor_rows import tensor_variants

        try:
            variants = tensor_variants(engine, extra)
        except (BundleError, OSError, ValueError) as error:
            print(f"error: --tensor-variants: {error}")
            return 1
    sampling = engine.sampling_defaults
    settings = {"temperature": sampling["temperature"] if args.temperature is None else args.temperature,
                "top_p": sampling["top_p"] if args.top_p is None else args.top_p, "scan_iterations": args.scan_iterations,
                "scan_cells": args.scan_cells, "quality_score": args.quality_score,
                "paste_query": engine.bundle.paste_query if args.paste == "bundle" else args.paste == "on",
                "luma_carry": engine.bundle.luma_carry if args.luma_carry == "bundle" else args.luma_carry == "on"}
    labels = stage_labels(engine)
    start = time.time()
    examples: list = []
    report = {"bundle": str(args.bundle or "retouch-tiny (embedded)"), "n": args.n, "pairs": args.pairs, "seed": args.seed,
              "settings": settings, "stages": labels, "pool": args.pool, "split": args.split,
              "command": "python -m demo_core eval " + shlex.join(sys.argv[1:] if argv is None else list(argv))}
    try:
        report.update(evaluate(engine, tasks, args.n, args.pairs, args.seed, labels, settings, examples, pool=args.pool,
                               split=args.split))
        if args.following:
            def run_draft(example, seed):
                return run_stages(engine, example, ["draft"], seed, **settings)["draft"]["image"]

            report["following"] = {split: task_following(engine, args.following, args.pairs, args.seed, split, settings,
                                                         args.pool, run_draft) for split in ("val", "heldout")}
        if args.sequences:
            from .sequences import evaluate_sequences

            report["sequences"] = evaluate_sequences(engine, args.sequences, args.frames, args.seed, settings, args.pool)
    except FetchError as error:
        print(f"error: {error}")
        return 1
    if args.incontext and not family_bundle:
        report["incontext"] = incontext_check(engine, args.incontext, args.pairs, args.seed, settings)
    ints = lambda text: [int(v) for v in text.split(",") if v.strip()]
    if args.ablate_T or args.ablate_c:
        report["scan_ablation"] = scan_ablation(engine, [t for t in tasks if t in CORE_TASKS] or tasks, max(2, args.n // 2),
                                                args.pairs, args.seed, ints(args.ablate_T) or [args.scan_iterations],
                                                ints(args.ablate_c) or [args.scan_cells], settings)
    if args.ablate_K:
        report["pairs_ablation"] = pairs_ablation(engine, [t for t in tasks if t in CORE_TASKS] or tasks, max(2, args.n // 2),
                                                  args.seed, [k for k in ints(args.ablate_K) if k <= engine.max_pairs], labels, settings)
    if variants:
        from .tensor_rows import tensor_comparison

        report["tensor"] = tensor_comparison(engine, [t for t in tasks if t in CORE_TASKS] or tasks, args.n, args.pairs,
                                             args.seed, settings, variants, pool=args.pool)
    report["seconds"] = round(time.time() - start, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    (args.out / "results.md").write_text(text)
    plot_curves(report["curves"], args.out / "cosine_curve.png", report.get("task_curves"))
    plot_examples(examples, args.out / "examples.png")
    print(text)
    print(f"wrote {args.out}/results.json, results.md, cosine_curve.png, examples.png in {report['seconds']} s")
    return 0
