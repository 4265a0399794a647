"""TensorAR rows of `python -m demo_core eval` (TensorAR paper's comparisons, on our validation split).

Draft quality, with no refiner, of: the default AR draft (SCAN form, one token per step); the
bundle's TensorAR (tensor/, k = 4 by default); the paper's equal-steps control (tensor-control/:
the same LoRA budget fine-tuned with k = 1 for the same number of steps); and any further adapter
folders given as `--tensor-variants name=folder,...` (the k and noise-schedule ablations, each
trained with `python -m demo_core.train tensor --k K --schedule S --out folder`). Every variant
drafts the same examples with the same seeds; the time is the draft's own (model only). Every draft is rendered as
the main table's rows are (the query's pixels where it keeps the query's codes when paste is on), and beside the
variants stand the two references: *identity* (the query handed back) and *ceiling* (the right answer through the
tokenizer).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from ..images import float_to_pil, pil_to_float
from .family import example_sampler

AR = "AR (SCAN-form draft)"
CONTROL = "control (k=1, same steps)"
IDENTITY, CEILING = "*identity*", "*ceiling*"


def adapter_info(folder: Path) -> dict:
    """k, noise, schedule and training steps of an adapter folder (from its config.json and training.json).

    Runs from before `--noise` existed trained with the paper's uniform noise; k = 1 has no noise at all.
    """
    config = json.loads((folder / "config.json").read_text())
    training = folder / "training.json"
    report = json.loads(training.read_text()) if training.exists() else {}
    k = int(config.get("k", 1))
    trained = report.get("config", {})
    noise = trained.get("noise", "uniform") if k > 1 else None
    return {"k": k, "noise": noise, "schedule": config.get("schedule") if noise == "uniform" else None,
            "weights": trained.get("slot_weights", "equal") if k > 1 else None, "steps": report.get("step")}


def tensor_variants(engine, extra: dict[str, str] | None = None) -> dict[str, tuple]:
    """name -> (TensorAR or None for the AR draft, info). The bundle's tensor/ and tensor-control/ first, then `extra`."""
    from ..bundle import load_tensor_part

    bundle = engine.bundle
    parts = bundle.info.get("parts", {})
    folder = bundle.folder
    backbone_training = folder / parts.get("backbone", "backbone") / "training.json" if folder is not None else None
    backbone_steps = (json.loads(backbone_training.read_text()).get("step")
                      if backbone_training is not None and backbone_training.exists() else None)
    variants = {AR: (None, {"k": 1, "noise": None, "schedule": None, "steps": backbone_steps})}
    if bundle.tensor is not None and folder is not None:
        info = adapter_info(folder / parts["tensor"])
        variants[f"TensorAR k={info['k']}"] = (bundle.tensor, info)
    if folder is not None and "tensor_control" in parts and (folder / parts["tensor_control"]).is_dir():
        path = folder / parts["tensor_control"]
        variants[CONTROL] = (load_tensor_part(path, engine.model, "tensor-control"), adapter_info(path))
    for name, path in (extra or {}).items():
        if name in variants:
            raise ValueError(f"{name!r} is already a row of the comparison; give the extra adapter another name")
        path = Path(path).expanduser()
        variants[name] = (load_tensor_part(path, engine.model, name), adapter_info(path))
    return variants


@torch.no_grad()
def draft_codes(engine, model, context: torch.Tensor, seed: int, settings: dict) -> tuple[torch.Tensor, float]:
    """One draft's codes (N,) and its seconds: the AR draft loop when `model` is None, else the sliding TensorAR draft."""
    from ..backbone import SamplingConfig
    from ..drafts.scan_form import draft_scan
    from ..drafts.tensor import draft_tensor

    sampling = SamplingConfig(temperature=settings.get("temperature", 1.0), top_p=settings.get("top_p", 0.9))
    generator = torch.Generator(device=engine.device).manual_seed(seed)
    states: list = []
    start = time.perf_counter()
    if model is None:
        for _ in draft_scan(engine.model, engine.vocab, context, sampling, generator, state_out=states):
            pass
    else:
        for _ in draft_tensor(model, context, engine.vocab.cells, sampling, generator, state_out=states):
            pass
    seconds = time.perf_counter() - start
    return states[0].codes[0].cpu(), seconds


def tensor_comparison(engine, tasks, n: int, pairs: int, seed: int, settings: dict, variants: dict, progress: bool = True,
                      pool: str = "builtin") -> list[dict]:
    """Per task: *identity* and *ceiling*, then per variant PSNR, SSIM, token accuracy and seconds of the draft, on the
    same examples (from `pool`) and seeds, rendered with `settings["paste_query"]` (None: the bundle's default)."""
    from tqdm import tqdm

    from .quality import encode_example, example_luminance
    from ..metrics import mean_psnr, psnr, ssim, token_accuracy

    rows = []
    paste = settings.get("paste_query")
    bar = tqdm(total=len(tasks) * n * len(variants), desc="eval tensor", disable=not progress, dynamic_ncols=True)
    for task in tasks:
        sampler = example_sampler(task, "val", engine.image_size, seed, pool)
        values = {name: {"psnr": [], "ssim": [], "acc": [], "time": []} for name in (IDENTITY, CEILING, *variants)}

        def add(name, image, target, codes=None, truth=None, seconds=None):
            image = pil_to_float(image)
            value = values[name]
            value["psnr"].append(psnr(image, target))
            value["ssim"].append(ssim(image, target))
            if codes is not None:
                value["acc"].append(token_accuracy(np.asarray(codes), truth))
            if seconds is not None:
                value["time"].append(seconds)

        for index in range(n):
            example = sampler.sample(task=task, k=pairs)
            context, truth_codes = encode_example(engine, example)   # no perplexity pass: the drafts need only these
            truth = truth_codes.numpy()
            query, query_codes = float_to_pil(example.query), context[-engine.vocab.cells:]
            target = pil_to_float(float_to_pil(example.answer))
            add(IDENTITY, query, target)
            luminance = example_luminance(engine, example, settings)
            add(CEILING, engine.render(truth_codes, query, query_codes, paste, luminance=luminance), target, truth, truth)
            for name, (model, _) in variants.items():
                codes, seconds = draft_codes(engine, model, context, seed + index, settings)
                add(name, engine.render(codes, query, query_codes, paste, luminance=luminance), target, codes.numpy(), truth,
                    seconds)
                bar.update(1)
        for name, value in values.items():
            info = variants[name][1] if name in variants else {}
            rows.append({"task": task, "variant": name, "k": info.get("k"), "noise": info.get("noise"),
                         "weights": info.get("weights"), "schedule": info.get("schedule"), "steps": info.get("steps"),
                         "psnr": mean_psnr(value["psnr"]), "ssim": float(np.mean(value["ssim"])),
                         "token_acc": float(np.mean(value["acc"])) if value["acc"] else None,
                         "seconds": float(np.mean(value["time"])) if value["time"] else None})
    bar.close()
    return rows


def markdown(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    lines = ["", "TensorAR (draft only, no refiner; same examples and seeds for every variant; the AR draft runs on "
             "the plain-torch fast path, the adapters on transformers' forward with LoRA hooks, so s/image compares "
             "implementations as well as methods):", "",
             "| task | draft | k | noise, slot weights | training steps | PSNR ↑ | SSIM ↑ | token acc ↑ | s/image |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        steps = r["steps"] if r["steps"] is not None else ""
        noise = {"self": "own drafts", "uniform": f"uniform, {r.get('schedule')} β"}.get(r.get("noise"), "")
        noise += f", {r['weights']}" if noise and r.get("weights") else ""
        blank = lambda value, form: "" if value is None else format(value, form)      # noqa: E731
        lines.append(f"| {r['task']} | {r['variant']} | {blank(r['k'], 'd')} | {noise} | {steps} | {r['psnr']:.2f} | "
                     f"{r['ssim']:.3f} | {blank(r['token_acc'], '.3f')} | {blank(r['seconds'], '.2f')} |")
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    by = {(r["task"], r["variant"]): r for r in rows}
    tensor = next((r["variant"] for r in rows if r["variant"].startswith("TensorAR")), None)
    if tensor is not None:
        for other in (AR, CONTROL):
            if not any((t, other) in by for t in tasks):
                continue
            wins = [t for t in tasks if (t, other) in by and by[(t, tensor)]["psnr"] > by[(t, other)]["psnr"]]
            lines.append(f"\n{tensor} beats {other} in PSNR on {len(wins)} of {len(tasks)} tasks"
                         + (f" ({', '.join(wins)})" if wins else "") + ".")
    return lines
