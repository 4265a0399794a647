"""Means over seeds of `eval` results, one column group per bundle, as a markdown table.

    python -m scripts.seed_means NAME=DIR [NAME=DIR ...] [--out table.md]

Each DIR holds seed*/results.json written by `python -m demo_core eval --out DIR/seedS`; every bundle must
cover the same tasks. Per task and bundle: identity, ceiling, the draft's and each refined stage's PSNR (means of
the seeds' means), the draft's gap to identity and the quality AUROC.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

STAGES = ("draft", "+SCAN", "+VSR", "+SCAN+VSR")


def load(folder: Path) -> list[dict]:
    runs = [json.loads(p.read_text()) for p in sorted(folder.glob("seed*/results.json"))]
    if not runs:
        raise SystemExit(f"{folder}: no seed*/results.json")
    return runs


def mean(runs: list[dict], task: str, *path: str) -> float | None:
    values = []
    for run in runs:
        node = run["table"].get(task)
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, (int, float)):
            values.append(float(node))
    return float(np.mean(values)) if values else None


def fmt(value: float | None, digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def table(bundles: dict[str, list[dict]]) -> str:
    first = next(iter(bundles.values()))
    tasks = list(first[0]["table"])
    seeds = {name: sorted(run["seed"] for run in runs) for name, runs in bundles.items()}
    lines = [f"Seeds: {', '.join(f'{n} {s}' for n, s in seeds.items())}; N = {first[0]['n']} per task and seed, "
             f"K = {first[0]['pairs']}. PSNR in dB, means of the seeds' means.", ""]
    head = ["task"]
    for name in bundles:
        head += [f"{name} identity", f"{name} ceiling", f"{name} draft", f"{name} " + " / ".join(STAGES[1:]),
                 f"{name} draft − identity", f"{name} AUROC"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for task in tasks:
        row = [task]
        for runs in bundles.values():
            identity = mean(runs, task, "references", "identity", "psnr")
            draft = mean(runs, task, "draft", "psnr")
            refined = " / ".join(fmt(mean(runs, task, stage, "psnr")) for stage in STAGES[1:])
            gap = None if identity is None or draft is None else draft - identity
            row += [fmt(identity), fmt(mean(runs, task, "references", "ceiling", "psnr")), fmt(draft), refined,
                    ("+" if gap is not None and gap >= 0 else "") + fmt(gap), fmt(mean(runs, task, "quality_auroc"))]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundles", nargs="+", help="NAME=DIR")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    bundles = {}
    for item in args.bundles:
        name, _, folder = item.partition("=")
        bundles[name] = load(Path(folder or name))
    text = table(bundles)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
