"""The eval report: results.md and the PNG plots (the cosine-distance curve of VSR Fig. 2, example sheets)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..images import float_to_pil
from .quality import STAGE_RUNS


def markdown(report: dict) -> str:
    lines = [f"# Retouch eval: {report['bundle']}", "",
             f"N = {report['n']} validation examples per task (held-out source images), K = {report['pairs']} pairs, "
             f"seed {report['seed']}; sampling {report['settings']}. FID only for N >= 10.", "",
             "*identity*: the query handed back as the answer (what doing nothing scores); *ceiling*: the right answer "
             "through the tokenizer (the best any token sequence can score)"
             + (", rendered as every answer is: the query's own pixels where it keeps the query's codes (paste on, "
                "`demo_core/render.py`)." if report.get("settings", {}).get("paste_query") else
                "; paste off: every answer, the ceiling too, is the tokenizer's decode of its codes.")
             + (" Luminance carry on: where an example's pairs show their answers' luminance following their inputs', "
                "every answer and the ceiling take the query's luminance (`demo_core/render.py`)."
                if report.get("settings", {}).get("luma_carry") else ""), "",
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
        if rows.get("sobel_baseline_f1") is not None:
            edge_text += f" (Sobel-threshold baseline on the query: F1 {rows['sobel_baseline_f1']:.2f})"
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
    for name, following in (report.get("following") or {}).items():
        lines += ["", f"Task following ({name}: {'held-out parameter values and kinds' if following['split'] == 'heldout' else 'training kinds and values'}, "
                      f"held-out photos): draft nearest to the demonstrated kind's target in {following['share'] * 100:.0f}% of "
                      f"{following['n'] * len(following['per_kind'])} cases ("
                      + ", ".join(f"{k} {v * 100:.0f}%" for k, v in following["per_kind"].items()) + ")"]
    if report.get("sequences"):
        from .sequences import markdown as sequence_markdown

        lines += sequence_markdown(report["sequences"])
    if report.get("scan_ablation"):
        lines += ["", "| SCAN T | c | PSNR | token acc | s/image |", "|---|---|---|---|---|"]
        lines += [f"| {r['T']} | {r['c']} | {r['psnr']:.2f} | {r['token_acc']:.3f} | {r['seconds']:.2f} |" for r in report["scan_ablation"]]
    if report.get("tensor"):
        from .tensor_rows import markdown as tensor_markdown

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
