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

import numpy as np
import torch
from tqdm import tqdm

from .images import float_to_pil, pil_to_float
from .tasks import CORE_TASKS, PHOTO_INPUT_TASKS, TASKS, Example, ExampleSampler, get_task

STAGE_RUNS = {  # label -> (refine order of the run, stage key in its Result)
    "draft": (("scan", "self"), "draft"),
    "+SCAN": (("scan", "self"), "scan"),
    "+VSR": (("self",), "self"),
    "+SCAN+VSR": (("scan", "self"), "self"),
}


def stage_labels(engine) -> list[str]:
    if "self" in engine.available_refiners:
        return list(STAGE_RUNS)
    return ["draft", "+SCAN"]


def run_stages(engine, example: Example, labels: list[str], seed: int, **settings) -> dict:
    """Every requested stage for one example; runs sharing a refine order are run once."""
    pairs = [(float_to_pil(x), float_to_pil(y)) for x, y in example.pairs]
    query = float_to_pil(example.query)
    results, outputs = {}, {}
    for label in labels:
        refine, key = STAGE_RUNS[label]
        if "self" not in engine.available_refiners:
            refine = tuple(stage for stage in refine if stage != "self")
        if refine not in results:
            results[refine] = engine.run(pairs, query, refine=refine, seed=seed, **settings)
        result = results[refine]
        spent = ("draft",) if key == "draft" else ("draft", *refine[: refine.index(key) + 1])
        outputs[label] = {"image": result.stages[key], "tokens": result.tokens[key], "quality": result.quality.get(key),
                          "time": sum(result.timings.get(stage, 0.0) for stage in spent)}
    return outputs


def encode_example(engine, example: Example) -> tuple[torch.Tensor, torch.Tensor]:
    """One VQ encode of an example: its in-context prompt [x1, y1, ..., xK, yK, xq] and the answer's tokens (N,)."""
    from .sequence import context_tokens

    images = [float_to_pil(im) for pair in example.pairs for im in pair] + [float_to_pil(example.query), float_to_pil(example.answer)]
    codes = engine.encode(images)
    return context_tokens([(codes[2 * i], codes[2 * i + 1]) for i in range(len(example.pairs))], codes[-2]), codes[-1]


@torch.no_grad()
def truth_perplexity(engine, context: torch.Tensor, truth: torch.Tensor) -> float:
    """The ground-truth answer tokens' perplexity under the backbone (teacher forced, raster); NaN without one."""
    from .backbone import score_answer

    if engine.bundle.sequence_format != "scan":
        return float("nan")
    gen, _, _ = score_answer(engine.model, engine.vocab, context, truth[None])
    log_probs = torch.log_softmax(gen[0].float(), -1).gather(1, truth.to(gen.device)[:, None]).squeeze(1)
    return float(torch.exp(-log_probs.mean()))


@torch.no_grad()
def head_scores(engine, context: torch.Tensor, tokens: np.ndarray) -> np.ndarray | None:
    """The quality head's own p(<good>) for an answer's tokens (raster, teacher forced): the SCAN paper's score, for
    the AUROC table next to the score the engine uses. None for models without quality tokens."""
    from .backbone import score_answer

    if engine.bundle.sequence_format != "scan":
        return None
    codes = torch.as_tensor(np.asarray(tokens)).flatten().long()[None]
    return score_answer(engine.model, engine.vocab, context, codes, score="head")[1][0].float().cpu().numpy()


def cosine_distances(engine, tokens: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per-token cosine distance between generated and ground-truth token embeddings (VSR Fig. 2)."""
    table = engine.model.get_input_embeddings().weight[: engine.vocab.codebook_size].detach().float().cpu()
    a, b = table[torch.as_tensor(tokens).flatten()], table[torch.as_tensor(truth).flatten()]
    return (1 - torch.nn.functional.cosine_similarity(a, b, dim=-1)).numpy()


def edit_reach(example: Example, grid: int) -> np.ndarray | None:
    """(g, g) bool: the cells an edit touches (query differs from its clean photo) plus a one-cell margin; None when
    the query is the photo itself or a global transform (no cell is untouched)."""
    if example.query_source is None:
        return None
    changed = np.abs(example.query - example.query_source).max(-1) > 1e-6          # (H, W)
    if not changed.any() or changed.mean() > 0.75:
        return None
    cell = changed.shape[0] // grid
    cells = np.pad(changed.reshape(grid, cell, grid, cell).any(axis=(1, 3)), 1)
    reach = np.zeros((grid, grid), bool)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            reach |= cells[dy:dy + grid, dx:dx + grid]
    return reach


def code_stability(engine, example: Example) -> float | None:
    """Share of cells outside the edit's reach whose code is the same in the query and the answer (None: no edit)."""
    reach = edit_reach(example, engine.grid)
    if reach is None or reach.all():
        return None
    codes = engine.encode([float_to_pil(example.query), float_to_pil(example.answer)])
    same = (codes[0] == codes[1]).numpy().reshape(engine.grid, engine.grid)
    return float(same[~reach].mean())


def evaluate(engine, tasks, n: int, pairs: int, seed: int, labels: list[str], settings: dict, examples_out: list | None = None,
             progress: bool = True, pool: str = "builtin") -> dict:
    from .metrics import edge_precision_recall, fid, lpips_batch, psnr, ssim, token_accuracy
    from .train.backbone import auroc

    table, curves, task_curves = {}, {}, {}
    bar = tqdm(total=len(tasks) * n, desc="eval", disable=not progress, dynamic_ncols=True)
    for task in tasks:
        sampler = ExampleSampler("val", engine.image_size, seed, pool=pool)
        rows = {label: {"psnr": [], "ssim": [], "acc": [], "time": [], "images": [], "cos": [], "edges": []} for label in labels}
        truths, perplexities, q_scores, q_wrong, q_head = [], [], [], [], []
        references = {"identity": [], "ceiling": []}       # the query handed back; the right answer through the tokenizer
        stability = []
        for index in range(n):
            example = sampler.sample(task=task, k=pairs)
            context, truth_codes = encode_example(engine, example)       # one VQ encode for perplexity and head scores
            truth = truth_codes.numpy()
            perplexities.append(truth_perplexity(engine, context, truth_codes))
            outputs = run_stages(engine, example, labels, seed + index, **settings)
            target = pil_to_float(float_to_pil(example.answer))
            truths.append(target)
            references["identity"].append(pil_to_float(float_to_pil(example.query)))
            references["ceiling"].append(engine.tokenizer.decode(truth_codes.view(1, engine.grid, engine.grid))[0])
            kept = code_stability(engine, example)
            if kept is not None:
                stability.append(kept)
            for label, out in outputs.items():
                image = pil_to_float(out["image"])
                row = rows[label]
                row["psnr"].append(psnr(image, target))
                row["ssim"].append(ssim(image, target))
                row["acc"].append(token_accuracy(out["tokens"].flatten(), truth))
                row["time"].append(out["time"])
                row["images"].append(image)
                row["cos"].append(cosine_distances(engine, out["tokens"], truth))
                if task == "edges":
                    row["edges"].append(edge_precision_recall(image, target))
            draft = outputs["draft"]
            if draft["quality"] is not None:
                q_scores.append(draft["quality"].flatten())
                q_wrong.append((draft["tokens"].flatten() != truth).astype(int))
                head = head_scores(engine, context, draft["tokens"])
                if head is not None:
                    q_head.append(head)
            if examples_out is not None and index == 0:
                examples_out.append((task, example, {label: out["image"] for label, out in outputs.items()}))
            bar.update(1)
        table[task] = {}
        for label, row in rows.items():
            lp = lpips_batch(row["images"], truths)
            entry = {"psnr": float(np.mean(row["psnr"])), "ssim": float(np.mean(row["ssim"])), "lpips": float(np.mean(lp)),
                     "token_acc": float(np.mean(row["acc"])), "cos_auc": float(np.mean(row["cos"])),
                     "seconds": float(np.mean(row["time"])),
                     "fid": float(fid(row["images"], truths)) if n >= 10 else None}
            if row["edges"]:
                p, r, f = np.mean(row["edges"], axis=0)
                entry.update(edge_precision=float(p), edge_recall=float(r), edge_f1=float(f))
            table[task][label] = entry
            curves.setdefault(label, []).extend(row["cos"])
            task_curves.setdefault(task, {})[label] = np.mean(row["cos"], axis=0).tolist()
        table[task]["references"] = {
            name: {"psnr": float(np.mean([psnr(image, t) for image, t in zip(images, truths)])),
                   "ssim": float(np.mean([ssim(image, t) for image, t in zip(images, truths)])),
                   "lpips": float(np.mean(lpips_batch(images, truths)))}
            for name, images in references.items()}
        if stability:
            table[task]["code_stability"] = float(np.mean(stability))
        table[task]["perplexity"] = float(np.nanmean(perplexities))
        if q_scores:
            # the score should be LOW for wrong tokens: AUROC of (1 - quality) for "token differs from truth"
            table[task]["quality_auroc"] = auroc(1 - np.concatenate(q_scores), np.concatenate(q_wrong))
        if q_head:
            table[task]["quality_auroc_head"] = auroc(1 - np.concatenate(q_head), np.concatenate(q_wrong))
    bar.close()
    return {"table": table, "curves": {label: np.mean(v, axis=0).tolist() for label, v in curves.items()},
            "task_curves": task_curves}


def incontext_check(engine, n: int, pairs: int, seed: int, settings: dict) -> dict:
    """Same query photo, demonstrations of each photo-input task: is the output nearest (PSNR) to the
    demonstrated task's target? Share of cases, per demonstrated task."""
    from .metrics import psnr

    sampler = ExampleSampler("val", engine.image_size, seed + 99)
    hits = {task: [] for task in PHOTO_INPUT_TASKS}
    for index in range(n):
        photo = sampler.images.sample()
        targets = {task: get_task(task).transform(photo, np.random.default_rng(0))[1] for task in PHOTO_INPUT_TASKS}
        for task in PHOTO_INPUT_TASKS:
            example = sampler.sample(task=task, k=pairs, source=photo)
            out = run_stages(engine, example, ["draft"], seed + index, **settings)["draft"]["image"]
            image = pil_to_float(out)
            scores = {t: psnr(image, target) for t, target in targets.items()}
            hits[task].append(max(scores, key=scores.get) == task)
    per_task = {task: float(np.mean(v)) for task, v in hits.items()}
    return {"share": float(np.mean([h for v in hits.values() for h in v])), "per_task": per_task, "n": n}


def scan_ablation(engine, tasks, n, pairs, seed, iterations: list[int], cells: list[int], settings) -> list[dict]:
    from .metrics import psnr
    from .metrics import token_accuracy

    rows = []
    for t in iterations:
        for c in cells:
            values, accs, seconds = [], [], []
            for task in tasks:
                sampler = ExampleSampler("val", engine.image_size, seed)
                for index in range(n):
                    example = sampler.sample(task=task, k=pairs)
                    truth = encode_example(engine, example)[1].numpy()
                    s = dict(settings, scan_iterations=t, scan_cells=c)
                    out = run_stages(engine, example, ["+SCAN"], seed + index, **s)["+SCAN"]
                    values.append(psnr(pil_to_float(out["image"]), pil_to_float(float_to_pil(example.answer))))
                    accs.append(token_accuracy(out["tokens"].flatten(), truth))
                    seconds.append(out["time"])
            rows.append({"T": t, "c": c, "psnr": float(np.mean(values)), "token_acc": float(np.mean(accs)),
                         "seconds": float(np.mean(seconds))})
    return rows


def pairs_ablation(engine, tasks, n, seed, ks: list[int], labels, settings) -> list[dict]:
    rows = []
    for k in ks:
        result = evaluate(engine, tasks, n, k, seed, labels, settings, progress=False)
        for label in labels:
            rows.append({"K": k, "stage": label, "psnr": float(np.mean([result["table"][t][label]["psnr"] for t in tasks]))})
    return rows


def markdown(report: dict) -> str:
    lines = [f"# Retouch eval: {report['bundle']}", "",
             f"N = {report['n']} validation examples per task (held-out source images), K = {report['pairs']} pairs, "
             f"seed {report['seed']}; sampling {report['settings']}. FID only for N >= 10.", "",
             "*identity*: the query handed back as the answer (what doing nothing scores); *ceiling*: the right answer "
             "through the tokenizer (the best any token sequence can score).", "",
             "| task | stage | PSNR ↑ | SSIM ↑ | LPIPS ↓ | token acc ↑ | cos-dist AUC ↓ | FID ↓ | s/image (model, excl. VQ) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for task, rows in report["table"].items():
        for name, e in rows.get("references", {}).items():
            lines.append(f"| {task} | *{name}* | {e['psnr']:.2f} | {e['ssim']:.3f} | {e['lpips']:.3f} | | | | |")
        for label, e in rows.items():
            if not isinstance(e, dict) or label == "references":
                continue
            fid = f"{e['fid']:.1f}" if e.get("fid") is not None else "n/a"
            lines.append(f"| {task} | {label} | {e['psnr']:.2f} | {e['ssim']:.3f} | {e['lpips']:.3f} | {e['token_acc']:.3f} | "
                         f"{e['cos_auc']:.3f} | {fid} | {e['seconds']:.2f} |")
    score = report.get("settings", {}).get("quality_score", "combined")
    lines += ["", f"| task | GT perplexity | quality AUROC, the engine's score ({score}) | AUROC, quality head alone "
                  "(SCAN paper) | edge P / R / F1 (draft) |", "|---|---|---|---|---|"]
    for task, rows in report["table"].items():
        edge = rows["draft"].get("edge_precision")
        edge_text = f"{edge:.2f} / {rows['draft']['edge_recall']:.2f} / {rows['draft']['edge_f1']:.2f}" if edge is not None else ""
        lines.append(f"| {task} | {rows['perplexity']:.1f} | {rows.get('quality_auroc', float('nan')):.3f} | "
                     f"{rows.get('quality_auroc_head', float('nan')):.3f} | {edge_text} |")
    lines += ["", "| task | stage | vs identity (dB) | vs ceiling (dB) |", "|---|---|---|---|"]
    for task, rows in report["table"].items():
        refs = rows.get("references")
        if not refs:
            continue
        for label in [l for l in STAGE_RUNS if l in rows]:
            lines.append(f"| {task} | {label} | {rows[label]['psnr'] - refs['identity']['psnr']:+.2f} | "
                         f"{rows[label]['psnr'] - refs['ceiling']['psnr']:+.2f} |")
    stable = {task: rows["code_stability"] for task, rows in report["table"].items() if "code_stability" in rows}
    if stable:
        lines += ["", "Code stability (cells outside the edit's reach, i.e. its cells plus a one-cell margin, whose code "
                      "is the same in query and answer): " + ", ".join(f"{t} {v * 100:.1f}%" for t, v in stable.items())]
    labels = [l for l in STAGE_RUNS if all(l in rows for rows in report["table"].values())]
    if len(labels) > 1:
        lines += ["", "Change vs draft (PSNR dB): " + "; ".join(
            f"{task}: " + ", ".join(f"{l} {rows[l]['psnr'] - rows['draft']['psnr']:+.2f}" for l in labels[1:])
            for task, rows in report["table"].items())]
    if report.get("incontext"):
        ic = report["incontext"]
        lines += ["", f"In-context: output nearest to the demonstrated task's target in {ic['share'] * 100:.0f}% of "
                      f"{ic['n'] * len(ic['per_task'])} cases (" + ", ".join(f"{t} {v * 100:.0f}%" for t, v in ic["per_task"].items()) + ")"]
    if report.get("scan_ablation"):
        lines += ["", "| SCAN T | c | PSNR | token acc | s/image |", "|---|---|---|---|---|"]
        lines += [f"| {r['T']} | {r['c']} | {r['psnr']:.2f} | {r['token_acc']:.3f} | {r['seconds']:.2f} |" for r in report["scan_ablation"]]
    if report.get("tensor"):
        from .eval_tensor import markdown as tensor_markdown

        lines += tensor_markdown(report["tensor"])
    if report.get("pairs_ablation"):
        lines += ["", "| K | stage | PSNR |", "|---|---|---|"]
        lines += [f"| {r['K']} | {r['stage']} | {r['psnr']:.2f} |" for r in report["pairs_ablation"]]
    return "\n".join(lines) + "\n"


def plot_curves(curves: dict, path: Path, task_curves: dict | None = None) -> None:
    """VSR Fig. 2: per-token cosine distance to the ground truth per stage; all tasks, then one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("all tasks", curves)] + list((task_curves or {}).items())
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 2.9 * rows), dpi=100, squeeze=False, sharey=True)
    for ax, (title, panel) in zip(axes.flat, panels):
        for label, curve in panel.items():
            ax.plot(np.arange(1, len(curve) + 1), curve, label=f"{label} (AUC {np.mean(curve):.3f})", lw=1.2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("token position (raster)", fontsize=8)
        ax.set_ylabel("cosine distance to truth", fontsize=8)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle("Per-token embedding distance to the ground truth (VSR Fig. 2 style; AUC = mean over positions)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_examples(examples: list, path: Path) -> None:
    from PIL import Image, ImageDraw

    if not examples:
        return
    labels = list(examples[0][2])
    size = 96
    columns = ["query", "truth", *labels]
    sheet = Image.new("RGB", (size * len(columns), (size + 14) * len(examples) + 14), "white")
    draw = ImageDraw.Draw(sheet)
    for c, name in enumerate(columns):
        draw.text((c * size + 4, 2), name, fill="black")
    for r, (task, example, images) in enumerate(examples):
        y = 14 + r * (size + 14)
        draw.text((4, y), task, fill="black")
        row = [float_to_pil(example.query), float_to_pil(example.answer), *images.values()]
        for c, image in enumerate(row):
            sheet.paste(image.resize((size, size), Image.Resampling.NEAREST), (c * size, y + 12))
    sheet.save(path)


def main(argv=None) -> int:
    from .backbone import QUALITY_SCORES

    parser = argparse.ArgumentParser(prog="python -m demo_core eval", description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", default=None, help="bundle folder or Hub id (default: embedded retouch-tiny)")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated tasks")
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
    parser.add_argument("--pool", choices=("builtin", "debian"), default="builtin",
                        help="validation images: the packaged ones, or + the held-out Debian photos (`data fetch`)")
    parser.add_argument("--out", type=Path, default=Path("runs/eval"))
    args = parser.parse_args(argv)
    from .bundle import BundleError
    from .engine import load_engine
    from .photos import FetchError

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    try:
        for task in tasks:
            get_task(task)
        engine = load_engine(args.bundle)
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
        from .eval_tensor import tensor_variants

        try:
            variants = tensor_variants(engine, extra)
        except (BundleError, OSError, ValueError) as error:
            print(f"error: --tensor-variants: {error}")
            return 1
    sampling = engine.sampling_defaults
    settings = {"temperature": sampling["temperature"] if args.temperature is None else args.temperature,
                "top_p": sampling["top_p"] if args.top_p is None else args.top_p, "scan_iterations": args.scan_iterations,
                "scan_cells": args.scan_cells, "quality_score": args.quality_score}
    labels = stage_labels(engine)
    start = time.time()
    examples: list = []
    report = {"bundle": str(args.bundle or "retouch-tiny (embedded)"), "n": args.n, "pairs": args.pairs, "seed": args.seed,
              "settings": settings, "stages": labels, "pool": args.pool,
              "command": "python -m demo_core eval " + shlex.join(sys.argv[1:] if argv is None else list(argv))}
    try:
        report.update(evaluate(engine, tasks, args.n, args.pairs, args.seed, labels, settings, examples, pool=args.pool))
    except FetchError as error:
        print(f"error: {error}")
        return 1
    if args.incontext:
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
        from .eval_tensor import tensor_comparison

        report["tensor"] = tensor_comparison(engine, [t for t in tasks if t in CORE_TASKS] or tasks, args.n, args.pairs,
                                             args.seed, settings, variants)
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
