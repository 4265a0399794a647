"""The quality table's measurements: every stage of every example, the scores and distances per token, the
in-context check and the SCAN T/c and K ablations (VSR Table 1, Fig. 2; SCAN Table 2)."""
from __future__ import annotations


import numpy as np
import torch
from tqdm import tqdm

from ..images import float_to_pil, pil_to_float
from ..tasks import PHOTO_INPUT_TASKS, Example, ExampleSampler, get_task
from .family import edge_scores, example_sampler, is_family

STAGE_RUNS = {  # label -> (refine order of the run, stage key in its Result)
    "draft": (("scan", "vsr"), "draft"),
    "+SCAN": (("scan", "vsr"), "scan"),
    "+VSR": (("vsr",), "vsr"),
    "+SCAN+VSR": (("scan", "vsr"), "vsr"),
}


def stage_labels(engine) -> list[str]:
    if "vsr" in engine.available_refiners:
        return list(STAGE_RUNS)
    return ["draft", "+SCAN"]


def run_stages(engine, example: Example, labels: list[str], seed: int, **settings) -> dict:
    """Every requested stage for one example; runs sharing a refine order are run once."""
    pairs = [(float_to_pil(x), float_to_pil(y)) for x, y in example.pairs]
    query = float_to_pil(example.query)
    results, outputs = {}, {}
    for label in labels:
        refine, key = STAGE_RUNS[label]
        if "vsr" not in engine.available_refiners:
            refine = tuple(stage for stage in refine if stage != "vsr")
        if refine not in results:
            results[refine] = engine.run(pairs, query, refine=refine, seed=seed, **settings)
        result = results[refine]
        spent = ("draft",) if key == "draft" else ("draft", *refine[: refine.index(key) + 1])
        outputs[label] = {"image": result.stages[key], "tokens": result.codes[key], "quality": result.quality.get(key),
                          "time": sum(result.timings.get(stage, 0.0) for stage in spent)}
    return outputs


def encode_example(engine, example: Example) -> tuple[torch.Tensor, torch.Tensor]:
    """One VQ encode of an example: its in-context prompt [x1, y1, ..., xK, yK, xq] and the answer's tokens (N,)."""
    from ..sequence import context_tokens

    images = [float_to_pil(im) for pair in example.pairs for im in pair] + [float_to_pil(example.query), float_to_pil(example.answer)]
    codes = engine.encode(images)
    return context_tokens([(codes[2 * i], codes[2 * i + 1]) for i in range(len(example.pairs))], codes[-2]), codes[-1]


def example_luminance(engine, example: Example, settings: dict):
    """The luminance map the engine renders this example's answers with (render.luminance_map of its pairs as the
    engine sees them, 8-bit), or None: where `settings["luma_carry"]` (None: the bundle's) is off or the pairs show
    no luminance relation. The eval renders the ceiling and its own decodes with it, as the engine renders a stage."""
    return engine.luminance_for([(float_to_pil(x), float_to_pil(y)) for x, y in example.pairs], settings.get("luma_carry"))


@torch.no_grad()
def truth_perplexity(engine, context: torch.Tensor, truth: torch.Tensor) -> float:
    """The ground-truth answer tokens' perplexity under the backbone (teacher forced, raster); NaN without one."""
    from ..drafts.scan_form import score_answer

    if engine.bundle.sequence_format != "scan":
        return float("nan")
    gen, _, _ = score_answer(engine.model, engine.vocab, context, truth[None])
    from ..token_metrics import perplexity

    return perplexity(torch.log_softmax(gen[0].float(), -1).gather(1, truth.to(gen.device)[:, None]).squeeze(1))


@torch.no_grad()
def head_scores(engine, context: torch.Tensor, tokens: np.ndarray) -> np.ndarray | None:
    """The quality head's own p(<good>) for an answer's tokens (raster, teacher forced): the SCAN paper's score, for
    the AUROC table next to the score the engine uses. None for models without quality tokens."""
    from ..drafts.scan_form import score_answer

    if engine.bundle.sequence_format != "scan":
        return None
    codes = torch.as_tensor(np.asarray(tokens)).flatten().long()[None]
    return score_answer(engine.model, engine.vocab, context, codes, score="head")[1][0].float().cpu().numpy()


def example_reach(example: Example, grid: int) -> np.ndarray | None:
    """(g, g) bool: the cells an edit touches (query differs from its clean photo) plus a one-cell margin; None when
    the query is the photo itself or a global transform (no cell is untouched)."""
    from ..token_metrics import edit_reach

    if example.query_source is None:
        return None
    changed = np.abs(example.query - example.query_source).max(-1) > 1e-6          # (H, W)
    if not changed.any() or changed.mean() > 0.75:
        return None
    return edit_reach(changed, grid)


def code_stability(example: Example, query_codes: torch.Tensor, answer_codes: torch.Tensor, grid: int) -> float | None:
    """Share of cells outside the edit's reach whose code is the same in the query and the answer (None: no edit).
    The codes are the ones `encode_example` already computed (the context's last image and the truth)."""
    reach = example_reach(example, grid)
    if reach is None or reach.all():
        return None
    same = (query_codes.reshape(-1) == answer_codes.reshape(-1)).numpy().reshape(grid, grid)
    return float(same[~reach].mean())


def evaluate(engine, tasks, n: int, pairs: int, seed: int, labels: list[str], settings: dict, examples_out: list | None = None,
             progress: bool = True, pool: str = "builtin", split: str = "val") -> dict:
    from ..metrics import edge_precision_recall, fid, lpips_batch, mean_psnr, psnr, ssim, token_accuracy
    from ..token_metrics import auroc, token_cosine_distances

    table, curves, task_curves = {}, {}, {}
    bar = tqdm(total=len(tasks) * n, desc="eval", disable=not progress, dynamic_ncols=True)
    for task in tasks:
        sampler = example_sampler(task, split, engine.image_size, seed, pool)
        rows = {label: {"psnr": [], "ssim": [], "acc": [], "time": [], "images": [], "cos": [], "edges": []} for label in labels}
        baseline_f1 = []
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
            query = float_to_pil(example.query)
            query_codes = context[-engine.grid ** 2:]
            references["identity"].append(pil_to_float(query))
            # the right answer rendered as the engine renders any answer (render.py: the query's pixels where it
            # keeps the query's codes, when paste is on)
            references["ceiling"].append(pil_to_float(engine.render(truth_codes, query, query_codes, settings.get("paste_query"),
                                                                    luminance=example_luminance(engine, example, settings))))
            kept = code_stability(example, query_codes, truth_codes, engine.grid)
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
                row["cos"].append(token_cosine_distances(engine.model.get_input_embeddings().weight, out["tokens"], truth))
                if task == "edges":
                    row["edges"].append(edge_precision_recall(image, target))
                elif is_family(task) and (scores := edge_scores(image, example)) is not None:
                    row["edges"].append((scores["edge_precision"], scores["edge_recall"], scores["edge_f1"]))
                    if label == "draft" and "baseline_f1" in scores:
                        baseline_f1.append(scores["baseline_f1"])
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
            entry = {"psnr": mean_psnr(row["psnr"]), "ssim": float(np.mean(row["ssim"])), "lpips": float(np.mean(lp)),
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
            name: {"psnr": mean_psnr(psnr(image, t) for image, t in zip(images, truths)),
                   "ssim": float(np.mean([ssim(image, t) for image, t in zip(images, truths)])),
                   "lpips": float(np.mean(lpips_batch(images, truths)))}
            for name, images in references.items()}
        if stability:
            table[task]["code_stability"] = float(np.mean(stability))
        if baseline_f1:
            table[task]["sobel_baseline_f1"] = float(np.mean(baseline_f1))     # the query's Sobel map, thresholded
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
    from ..metrics import psnr

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
    from ..metrics import mean_psnr, psnr
    from ..metrics import token_accuracy

    rows = []
    for t in iterations:
        for c in cells:
            values, accs, seconds = [], [], []
            for task in tasks:
                sampler = example_sampler(task, "val", engine.image_size, seed, "builtin")
                for index in range(n):
                    example = sampler.sample(task=task, k=pairs)
                    truth = encode_example(engine, example)[1].numpy()
                    s = dict(settings, scan_iterations=t, scan_cells=c)
                    out = run_stages(engine, example, ["+SCAN"], seed + index, **s)["+SCAN"]
                    values.append(psnr(pil_to_float(out["image"]), pil_to_float(float_to_pil(example.answer))))
                    accs.append(token_accuracy(out["tokens"].flatten(), truth))
                    seconds.append(out["time"])
            rows.append({"T": t, "c": c, "psnr": mean_psnr(values), "token_acc": float(np.mean(accs)),
                         "seconds": float(np.mean(seconds))})
    return rows


def pairs_ablation(engine, tasks, n, seed, ks: list[int], labels, settings) -> list[dict]:
    rows = []
    for k in ks:
        result = evaluate(engine, tasks, n, k, seed, labels, settings, progress=False)
        for label in labels:
            rows.append({"K": k, "stage": label, "psnr": float(np.mean([result["table"][t][label]["psnr"] for t in tasks]))})
    return rows
