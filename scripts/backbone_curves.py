"""Plot a backbone training log's validations: teacher-forced token accuracy per kind and quality AUROC by step.

    python -m scripts.backbone_curves [--log docs/training/backbone16.log] [--out docs/training/backbone16_curves.png]

The log may hold several runs (a restart begins again at a lower step); the last run is drawn in colour and
the one before it, if any, in grey, so a restart's effect is visible beside what it replaced.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

VALIDATION = re.compile(r"step (\d+) validation (\{.*\})\s*$")
KINDS = (("token_accuracy", "all kinds", "black"), ("inpaint", "inpaint", "tab:blue"),
         ("colorize", "colorize", "tab:orange"), ("edges_canny", "edges (Canny)", "tab:green"),
         ("heldout-params k=2", "held-out parameters", "tab:purple"), ("heldout-kind k=2", "held-out kind", "tab:red"))


def runs(text: str) -> list[list[tuple[int, dict]]]:
    """The log's validations split into runs: a new run starts where the step goes back."""
    out: list[list[tuple[int, dict]]] = []
    for line in text.splitlines():
        match = VALIDATION.search(line)
        if not match:
            continue
        step, values = int(match.group(1)), json.loads(match.group(2).replace("NaN", "null"))
        if not out or step < out[-1][-1][0]:
            out.append([])
        if out[-1] and out[-1][-1][0] == step:       # a validation repeated at a resume: keep the later one
            out[-1][-1] = (step, values)
        else:
            out[-1].append((step, values))
    return out


def value(entry: dict, key: str):
    if key == "token_accuracy":
        return entry.get("token_accuracy")
    if key.startswith("copy:"):
        return (entry.get("copy_accuracy") or {}).get(key[5:])
    return entry.get("per_task", {}).get(key, entry.get("per_group", {}).get(key))


def plot(all_runs: list, out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
    if len(all_runs) > 1:
        steps = [s for s, _ in all_runs[-2]]
        left.plot(steps, [100 * value(v, "token_accuracy") for _, v in all_runs[-2]], color="0.6", ls="--",
                  label="all kinds, previous run")
        inpaint = [value(v, "inpaint") for _, v in all_runs[-2]]
        left.plot(steps, [100 * x for x in inpaint], color="0.75", ls=":", label="inpaint, previous run")
        right.plot(steps, [v.get("quality_auroc") for _, v in all_runs[-2]], color="0.6", ls="--", label="previous run")
    last = all_runs[-1]
    steps = [s for s, _ in last]
    for key, label, color in KINDS:
        ys = [value(v, key) for _, v in last]
        if all(y is not None for y in ys):
            left.plot(steps, [100 * y for y in ys], marker="o", ms=3, color=color, lw=2 if key == "token_accuracy" else 1.2,
                      label=label)
    copied = [(s, value(v, "copy:inpaint")) for s, v in last if value(v, "copy:inpaint") is not None]
    if copied:              # logged since session 10: the cells inpainting leaves untouched, copied or not
        left.plot([s for s, _ in copied], [100 * y for _, y in copied], marker="s", ms=4, color="tab:blue", ls="--",
                  label="inpaint, untouched cells (copying)")
    right.plot(steps, [v.get("quality_auroc") for _, v in last], marker="o", ms=3, color="black", label="this run")
    left.set(xlabel="step (batch 8)", ylabel="teacher-forced token accuracy (%)", title=title)
    right.set(xlabel="step", ylabel="quality AUROC (<good>/<bad> head)", ylim=(0.45, 1.0), title="quality head")
    right.axhline(0.85, color="tab:red", lw=0.8, ls=":", label="aim 0.85 (core tasks)")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--log", type=Path, default=Path("docs/training/backbone16.log"))
    parser.add_argument("--out", type=Path, default=Path("docs/training/backbone16_curves.png"))
    parser.add_argument("--title", default="retouch-16 backbone: validation")
    args = parser.parse_args(argv)
    found = runs(args.log.read_text())
    if not found:
        print(f"error: {args.log} has no validation lines")
        return 1
    plot(found, args.out, args.title)
    last = found[-1]
    print(f"{len(found)} run(s); last run steps {last[0][0]}-{last[-1][0]}, token accuracy "
          f"{100 * value(last[0][1], 'token_accuracy'):.1f} % -> {100 * value(last[-1][1], 'token_accuracy'):.1f} %; {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
