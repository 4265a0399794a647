"""Eval on the task family (task_family.py): task specs with fixed parameters, edge scores that follow the
demonstrated convention, and in-context task following.

A task spec is a five-task name (`colorization`, `edges`...: tasks.py, the first generation) or a family
kind with optional fixed parameters, `kind[:name=value[+name=value...]]`, e.g. `inpaint:fill=black`,
`edges_canny:polarity=white+thick=false`. Parameters not fixed are drawn per example from the split's
values: `val` draws training values on held-out photos, `heldout` draws held-out values (and allows the
held-out kinds).
"""
from __future__ import annotations

import numpy as np

from ..task_family import KINDS, FamilyExample, FamilySampler, get_kind, sobel_map
from ..tasks import TASKS

FAMILY_CORE = ("colorize", "inpaint:fill=grey", "inpaint:fill=black", "edges_canny", "edges_sobel")


def is_family(spec: str) -> bool:
    return spec.split(":", 1)[0] in KINDS


def parse_spec(spec: str) -> tuple[str, dict]:
    """'inpaint:fill=black+shape=box' -> ('inpaint', {'fill': 'black', 'shape': 'box'}); raises ValueError."""
    kind, _, rest = spec.partition(":")
    if kind not in KINDS:
        raise ValueError(f"unknown task {spec!r}; tasks are {', '.join(TASKS)} or a family kind "
                         f"({', '.join(KINDS)}) with optional fixed parameters, e.g. inpaint:fill=black")
    sample = get_kind(kind).draw(np.random.default_rng(0), "any")
    fixed = {}
    for item in filter(None, rest.split("+")):
        name, equals, value = item.partition("=")
        if not equals or name not in sample:
            raise ValueError(f"{spec!r}: {kind} takes {', '.join(f'{k}=...' for k in sample)}; got {item!r}")
        fixed[name] = _typed(value, sample[name])
    return kind, fixed


def _typed(text: str, like):
    if isinstance(like, bool):
        if text.lower() not in ("true", "false"):
            raise ValueError(f"expected true or false, got {text!r}")
        return text.lower() == "true"
    if isinstance(like, int):
        return int(text)
    if isinstance(like, float):
        return float(text)
    return text


def validate_spec(spec: str) -> None:
    """A five-task name passes; anything else must parse as a family spec (the error names both kinds of task)."""
    if spec not in TASKS:
        parse_spec(spec)


class SpecSampler:
    """Examples of one task spec: `sample(k)` -> FamilyExample (the same fields eval reads from tasks.Example)."""

    def __init__(self, spec: str, split: str, size: int, seed: int, pool: str):
        self.kind, self.fixed = parse_spec(spec)
        self.family = FamilySampler("heldout" if split == "heldout" else "val", size, seed, kinds=[self.kind], pool=pool)
        self.split = split

    def sample(self, task: str | None = None, k: int | None = None, source=None) -> FamilyExample:
        params = {**get_kind(self.kind).draw(self.family.rng, "heldout" if self.split == "heldout" else "train"), **self.fixed}
        return self.family.sample(kind=self.kind, k=k, params=params, source=source)


def example_sampler(spec: str, split: str, size: int, seed: int, pool: str):
    """The sampler eval draws `spec`'s examples from (five-task names: tasks.ExampleSampler)."""
    if is_family(spec):
        return SpecSampler(spec, split, size, seed, pool)
    from ..tasks import ExampleSampler

    return ExampleSampler("val", size, seed, pool=pool)


def line_mask(image: np.ndarray, polarity: str) -> np.ndarray:
    """An edge map as lines-are-bright (black-on-white maps inverted), HxW."""
    grey = np.asarray(image, np.float32).mean(-1) if np.ndim(image) == 3 else np.asarray(image, np.float32)
    return grey if polarity == "white" else 1.0 - grey


def edge_scores(image: np.ndarray, example: FamilyExample) -> dict | None:
    """For edge kinds: precision/recall/F1 of the answer's lines against the target's (in the demonstrated
    polarity), and for Canny the same for a plain Sobel-threshold baseline computed on the query. None otherwise."""
    from ..metrics import edge_precision_recall

    if example.kind not in ("edges_canny", "edges_sobel"):
        return None
    polarity = example.params["polarity"]
    target = line_mask(example.answer, polarity)
    threshold = 0.5 if example.kind == "edges_canny" else 0.25
    p, r, f = edge_precision_recall(line_mask(image, polarity), target, threshold=threshold)
    scores = {"edge_precision": p, "edge_recall": r, "edge_f1": f}
    if example.kind == "edges_canny":
        scores["baseline_f1"] = sobel_baseline_f1(example.query, target)
    return scores


def sobel_baseline_f1(query: np.ndarray, target_lines: np.ndarray, share: float | None = None) -> float:
    """F1 of the Sobel magnitude of the query thresholded to mark as many pixels as the target has lines (an oracle
    density, so the baseline is not handicapped by a threshold choice)."""
    from ..metrics import edge_precision_recall

    magnitude = sobel_map(query)
    share = float((target_lines > 0.5).mean()) if share is None else share
    if share <= 0:
        return 1.0 if magnitude.max() <= 0 else 0.0
    cut = np.quantile(magnitude, 1.0 - share)
    return edge_precision_recall((magnitude > cut).astype(np.float32), target_lines, threshold=0.5)[2]


def task_following(engine, n: int, pairs: int, seed: int, split: str, settings: dict, pool: str, run_draft,
                   progress: bool = True) -> dict:
    """Same query photo, demonstrations of each photo-input kind with their own parameter draw: is the draft nearest
    (PSNR) to the demonstrated (kind, parameters)'s target among every candidate's target for that photo? Share of
    cases per kind. `split` 'heldout' draws held-out parameter values and includes the held-out kinds."""
    from tqdm import tqdm

    from ..images import pil_to_float
    from ..metrics import psnr
    from ..task_family import HELDOUT_KINDS, make_pair

    kinds = [name for name, kind in KINDS.items() if kind.photo_input and (split == "heldout" or name not in HELDOUT_KINDS)]
    family = FamilySampler("heldout" if split == "heldout" else "val", engine.image_size, seed + 99, kinds=kinds, pool=pool)
    draw_split = "heldout" if split == "heldout" else "train"
    hits = {kind: [] for kind in kinds}
    bar = tqdm(total=n * len(kinds), desc=f"task following ({split})", disable=not progress, dynamic_ncols=True)
    for index in range(n):
        photo = family.images.sample()
        candidates = {kind: get_kind(kind).draw(family.rng, draw_split) for kind in kinds}
        targets = {kind: make_pair(photo, kind, params, np.random.default_rng(0))[1] for kind, params in candidates.items()}
        for kind, params in candidates.items():
            example = family.sample(kind=kind, k=pairs, params=params, source=photo)
            image = pil_to_float(run_draft(example, seed + index))
            scores = {name: psnr(image, target) for name, target in targets.items()}
            hits[kind].append(max(scores, key=scores.get) == kind)
            bar.update(1)
    bar.close()
    return {"share": float(np.mean([h for v in hits.values() for h in v])),
            "per_kind": {kind: float(np.mean(v)) for kind, v in hits.items()}, "n": n, "split": split}
