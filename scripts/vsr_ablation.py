"""Collect the VSR ablation runs into docs/results/vsr_ablation.{json,md} (paper Tables 6 and 7, plus +query).

The runs (each reuses the cached drafts in runs/refiner/, a few minutes each):
    python -m demo_core.train refiner                                   # default: attention, cosine -> the bundle
    python -m demo_core.train refiner --loss l2 --out runs/vsr-ablation/l2
    python -m demo_core.train refiner --kind mlp --out runs/vsr-ablation/mlp
    python -m demo_core.train refiner --kind conv --out runs/vsr-ablation/conv
    python -m demo_core.train refiner --with-query --out runs/vsr-ablation/query
    python -m demo_core.train refiner --loss ce --out runs/vsr-ablation/ce
    python -m demo_core.train refiner --epochs 10 --out runs/vsr-ablation/e10
    python -m demo_core.train refiner --space codes --loss l2 --out runs/vsr-ablation/codes   # issue 20: VQ code space
Figures are the trainer's validation (the same validation drafts for every variant).
"""
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"attention, cosine (default)": ROOT / "assets/retouch-tiny/refiner",
            "attention, L2 loss": ROOT / "runs/vsr-ablation/l2",
            "MLP mixer, cosine": ROOT / "runs/vsr-ablation/mlp",
            "1D conv, cosine": ROOT / "runs/vsr-ablation/conv",
            "attention + query tokens, cosine": ROOT / "runs/vsr-ablation/query",
            "attention, cross-entropy over codes": ROOT / "runs/vsr-ablation/ce",
            "attention, cosine, 10 epochs": ROOT / "runs/vsr-ablation/e10",
            "attention in the VQ code space, L2 loss": ROOT / "runs/vsr-ablation/codes"}
CORE = ("colorization", "inpainting", "edges")

rows, backbone = {}, None
for name, folder in VARIANTS.items():
    path = folder / "training.json"
    if not path.exists():
        print(f"skipped {name}: no {path}")
        continue
    report = json.loads(path.read_text())
    backbone = backbone or report["backbone_sha256"]
    if report["backbone_sha256"] != backbone:       # drafts of another backbone: not comparable
        print(f"skipped {name}: trained on another backbone ({report['backbone_sha256'][:12]} vs {backbone[:12]})")
        continue
    v = report["validation"]
    rows[name] = {"parameters": report["parameters"], "minutes": report["elapsed_minutes"],
                  "token_acc": [v["token_accuracy"]["draft"], v["token_accuracy"]["refined"]],
                  "cosine": [v["cosine_distance"]["draft"], v["cosine_distance"]["refined_tokens"]],
                  "fixed": v["cells_fixed"], "broken": v["cells_broken"],
                  "per_task_acc": {t: [r["token_accuracy"]["draft"], r["token_accuracy"]["refined"]] for t, r in v["per_task"].items()},
                  "overhead": report.get("overhead", {}).get("ratio")}
if not rows:
    raise SystemExit("no VSR runs found: train them first (see this script's docstring)")
out = ROOT / "docs/results"
out.mkdir(parents=True, exist_ok=True)
(out / "vsr_ablation.json").write_text(json.dumps(rows, indent=2) + "\n")
lines = ["| g_φ | params | token acc draft → refined | cosine dist draft → refined | cells fixed / broken | "
         + " | ".join(f"{t} acc" for t in CORE) + " | cost / draft |",
         "|---|---|---|---|---|" + "---|" * len(CORE) + "---|"]
for name, r in rows.items():
    per_task = " | ".join(f"{r['per_task_acc'][t][0]:.3f} → {r['per_task_acc'][t][1]:.3f}" if t in r["per_task_acc"] else ""
                          for t in CORE)
    cost = f"{100 * r['overhead']:.1f}%" if r["overhead"] is not None else ""
    lines.append(f"| {name} | {r['parameters']:,} | {r['token_acc'][0]:.3f} → {r['token_acc'][1]:.3f} | "
                 f"{r['cosine'][0]:.4f} → {r['cosine'][1]:.4f} | {100 * r['fixed']:.1f}% / {100 * r['broken']:.1f}% | {per_task} | {cost} |")
(out / "vsr_ablation.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
