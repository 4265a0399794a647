"""Train VSR's g_phi on a frozen backbone's own drafts (paper Algorithm 1, Sec. 3.3, Eq. 4).

    python -m demo_core.train refiner [--bundle assets/retouch-tiny] [--drafts 1500] [--loss cosine]

1. Drafts: the frozen backbone answers training-split in-context examples exactly as in
   production (`draft_scan`, or `drafts.raster.draft_raster` for an LVM bundle; the engine's default sampling
   for the bundle: temperature 1.0, top-p 0.9, or its own, LVM-7B's top-p 1.0; images through the
   tokenizer's own pixel range; the bundle's tasks, K = 1..3). Cached under runs/refiner/ by a
   hash of the backbone and tokenizer weights, the tokenizer's pixel range and the sampler
   settings; every example and its sampling generator are derived from (seed, index), so a
   rerun reuses the cache and a larger --drafts only drafts the rest.
2. g_phi: e = f_embed(draft), e' = g_phi(e) (Eq. 3), loss = mean cosine distance to the
   ground-truth answer's embeddings (Eq. 4; --loss l2 for Table 6); AdamW 1e-4, batch 4,
   2 epochs (paper Sec. 4). Only g_phi's parameters change; the backbone is checked
   bit-identical at the end.
3. Validation on validation-split drafts: token accuracy and cosine distance to the ground
   truth, draft vs refined, per task, the per-token cosine curve (Fig. 2) and g_phi's cost
   relative to drafting.
4. Save: <bundle>/refiner (config.json + model.safetensors + training.json), listed in
   bundle.json's parts; or --out elsewhere.

Any bundle works: g_phi's width comes from the backbone's input embeddings. The device is
chosen once below (CUDA > MPS > CPU); the same code runs on a GPU.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..backbone import SamplingConfig
from ..drafts.scan_form import draft_scan
from ..refiners.self_refine import KINDS, SPACES, SelfRefiner, cosine_distance, refine_table, self_refine, snap_codes
from ..task_family import KINDS as FAMILY_KINDS, TRAIN_KINDS
from ..tasks import CORE_TASKS, TASKS, ExampleSampler
from ..tokenizer import DEFAULT_PIXEL_RANGE
from .curriculum import encode_examples
from .common import DEFAULT_BUNDLE, RUNS, setup_logging, write_json  # noqa: F401  (setup_logging: for callers)
from .distributed import (accelerator_for, per_process_batch, process_device, process_logger, sharded_map, uneven_rows,
                          unwrapped_state)

LOSSES = ("cosine", "l2", "ce")
CE_TEMPERATURE = 0.1            # --loss ce: softmax over cosine similarities to every code embedding / tau
VALIDATION_SEED = 1234          # the validation drafts stay the same whatever --seed is


@dataclass
class RefinerTrainConfig:
    """What a g_phi training run does (defaults: the paper's recipe where it gives one)."""

    drafts: int = 1500              # training drafts (the paper: 12K pairs per task on LVM-7B)
    val_drafts: int = 150           # validation drafts (validation source images)
    epochs: int = 2                 # paper Sec. 4
    batch: int = 4                  # paper Sec. 4
    lr: float = 1e-4                # AdamW, paper Sec. 4
    loss: str = "cosine"            # Eq. 4; "l2" is Table 6's alternative
    kind: str = "attention"         # g_phi's token mixer: attention (paper), mlp or conv (Table 7)
    with_query: bool = False        # beyond the paper: g_phi also sees the query image's tokens
    heads: int = 8                  # appendix: 8 heads, 1 block
    space: str = "backbone"         # what g_phi refines: the backbone's code embeddings (paper) or the VQ code vectors
    width: int | None = None        # g_phi's block width (default: the refined vectors' width; "codes": 128)
    draft_batch: int = 1            # drafts written together (grouped by K); SCAN-form bundles only
    seed: int = 0                   # training examples, g_phi init, batch order
    pool: str = "builtin"           # image pool: "debian" (the `data fetch` photos) for a retouch-16 bundle
    learned_gate: bool = False      # beyond the paper: a per-cell head learns where g_phi's new code helps
    gate_weight: float = 1.0        # its binary cross-entropy's weight beside the refinement loss
    gate_label: str = "codes"       # what "helps" means for the gate: the VQ vector nears the answer's ("codes"), or
                                    # the decoded cell's pixels near the right answer's decode ("pixels")


# -- drafts ----------------------------------------------------------------------------------------

def state_fingerprint(module: torch.nn.Module) -> str:
    """sha256 over every tensor of the state dict (names, dtypes, shapes, bytes): equal iff bit-identical."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class DraftRecipe:
    """Everything that decides which drafts a cache holds (its hash names the cache file)."""

    split: str                      # "train" or "val" (source images are split, data.py)
    seed: int
    image_size: int
    tasks: tuple[str, ...]
    pairs_range: tuple[int, int]    # K, inclusive
    sequence_format: str            # "scan" (draft_scan) or "lvm" (drafts.raster.draft_raster: plain raster sampling)
    sampling: tuple                 # SamplingConfig fields
    backbone: str                   # state_fingerprint of the backbone
    tokenizer: str                  # state_fingerprint of the VQ model
    dtype: str
    pixel_range: tuple = DEFAULT_PIXEL_RANGE    # the tokenizer's: its weights alone do not say what it reads
    pool: str = "builtin"           # image pool (data.POOLS): packaged images, or + the `data fetch` photos
    draft_batch: int = 1            # > 1: blocks of this many consecutive indices drafted together, grouped by K

    def key(self) -> str:
        values = asdict(self)
        if tuple(values["pixel_range"]) == DEFAULT_PIXEL_RANGE:
            del values["pixel_range"]           # the keys of caches written before the field existed stay valid
        if values["pool"] == "builtin":
            del values["pool"]                  # likewise for the pool
        if values["draft_batch"] == 1:
            del values["draft_batch"]           # and for one-at-a-time drafting
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]

    def example_seed(self, index: int) -> int:
        return self.seed * 1_000_003 + index

    def example(self, index: int):
        """Example `index`: tasks in turn (balanced), K, parameters and images from its own seed.

        Five-task names draw from tasks.ExampleSampler; task-family kinds (a retouch-16 bundle) from
        task_family.FamilySampler, whose parameters are drawn per example and shared by its pairs and query."""
        task = self.tasks[index % len(self.tasks)]
        if task in FAMILY_KINDS:
            from ..task_family import FamilySampler

            sampler = FamilySampler(self.split, self.image_size, self.example_seed(index), kinds=self.tasks,
                                    pairs_range=self.pairs_range, pool=self.pool)
            return sampler.sample(kind=task)
        sampler = ExampleSampler(self.split, self.image_size, self.example_seed(index), self.tasks, self.pairs_range,
                                 pool=self.pool)
        return sampler.sample(task=task)


def is_family_tasks(tasks) -> bool:
    """A task-family list (a retouch-16 bundle's) rather than the five tasks: some kind that is not a five-task name
    ("posterize" and "invert" are both, so they alone do not decide)."""
    return any(task in FAMILY_KINDS and task not in TASKS for task in tasks)


def recipe_tasks(bundle) -> tuple[str, ...]:
    """What g_phi trains on: the bundle's five-task names, else its task-family kinds that training may see
    (held-out kinds stay held out), else the five tasks' core three."""
    listed = tuple(bundle.info.get("tasks", ()))
    family = tuple(task for task in listed if task in TRAIN_KINDS)
    if is_family_tasks(listed):
        return family
    return tuple(task for task in listed if task in TASKS) or family or CORE_TASKS


def draft_example(bundle, example, sampling: SamplingConfig, generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """One example -> (query codes (N,), answer codes (N,), draft codes (N,)) on the CPU, and the draft's seconds."""
    vocab, cells = bundle.vocab, bundle.vocab.cells
    context, answer = encode_examples(bundle.tokenizer, [example])                  # (1, (2K+1)N), (1, N)
    context = context[0].cpu()
    start = time.perf_counter()                 # the draft alone, as the engine's "draft" timing
    if bundle.sequence_format == "scan":
        states = []
        for _ in draft_scan(bundle.backbone, vocab, context, sampling, generator, state_out=states):
            pass
        draft = states[0].codes[:1]
    else:                                       # a Hub LVM backbone: plain raster sampling, as the engine drafts (formats.LvmRaster)
        from ..drafts.raster import draft_raster

        states = []
        for _ in draft_raster(bundle.backbone, context, cells, vocab.codebook_size, sampling, generator, states):
            pass
        draft = states[0].codes[:1]
    return context[-cells:], answer[0].cpu(), draft[0].cpu(), time.perf_counter() - start


def draft_block(bundle, recipe: DraftRecipe, start: int, sampling: SamplingConfig, device) -> list[tuple]:
    """Examples start .. start + recipe.draft_batch - 1, drafted together: one `draft_scan` batch per K (equal K, equal
    context length), each with its own generator seeded from (seed, start, K), so a block's drafts depend on the
    block alone (whatever the process count, or where an earlier run stopped). Rows: (task, K, query (N,),
    answer (N,), draft (N,), seconds), seconds being its group's draft time over the group's size."""
    cells = bundle.vocab.cells
    examples = [(index, recipe.example(index)) for index in range(start, start + recipe.draft_batch)]
    rows = {}
    for pairs in sorted({len(example.pairs) for _, example in examples}):
        group = [(index, example) for index, example in examples if len(example.pairs) == pairs]
        context, answer = encode_examples(bundle.tokenizer, [example for _, example in group])   # (G, (2K+1)N), (G, N)
        generator = torch.Generator(device=device).manual_seed(recipe.example_seed(start) * 4 + pairs)
        begin = time.perf_counter()
        states = []
        for _ in draft_scan(bundle.backbone, bundle.vocab, context.cpu(), sampling, generator, state_out=states):
            pass
        seconds = (time.perf_counter() - begin) / len(group)
        drafts = states[0].codes.cpu()
        for row, (index, example) in enumerate(group):
            rows[index] = (example.task, pairs, context[row, -cells:].cpu(), answer[row].cpu(), drafts[row], seconds)
    return [rows[index] for index, _ in examples]


def load_or_make_drafts(bundle, recipe: DraftRecipe, count: int, run_dir: Path, logger, save_every: int = 50,
                        accelerator=None) -> dict:
    """The first `count` drafts of `recipe`: read from the cache, drafting (and caching) only what is missing.

    Under several processes the missing drafts are split between them (split_between_processes, each example
    drafted from its own (seed, index) generator, so the drafts are the same whatever the process count) and
    gathered once per block of `save_every` per process; only the main process writes the cache."""
    accelerator = accelerator or accelerator_for(str(next(bundle.backbone.parameters()).device))
    main = accelerator.is_main_process
    path = run_dir / f"drafts-{recipe.split}-{recipe.key()}.pt"
    cache = {"recipe": json.dumps(asdict(recipe)), "tasks": [], "pairs": [], "query": [], "answer": [], "draft": [],
             "draft_seconds": []}
    if path.exists():
        stored = torch.load(path, map_location="cpu", weights_only=True)     # our own file: lists and tensors only
        cache.update(tasks=stored["tasks"], pairs=stored["pairs"], draft_seconds=stored["draft_seconds"].tolist(),
                     **{key: list(stored[key].unbind(0)) for key in ("query", "answer", "draft")})
    accelerator.wait_for_everyone()             # every process has read the same cache before the main one rewrites it
    have = len(cache["tasks"])
    logger.info(f"{recipe.split} drafts: {min(have, count)} of {count} cached in {path.name}")

    def save():
        tmp = path.with_suffix(".tmp")
        torch.save({**cache, "draft_seconds": torch.tensor(cache["draft_seconds"], dtype=torch.float64),
                    **{key: torch.stack(cache[key]) for key in ("query", "answer", "draft")}}, tmp)
        os.replace(tmp, path)

    if have < count:
        if main:
            run_dir.mkdir(parents=True, exist_ok=True)
        sampling = SamplingConfig(*recipe.sampling)
        device = next(bundle.backbone.parameters()).device
        bar = tqdm(total=count - have, desc=f"drafting ({recipe.split})", dynamic_ncols=True, disable=not main)

        def draft_indices(indices):
            out = []
            for index in indices:
                example = recipe.example(index)
                generator = torch.Generator(device=device).manual_seed(recipe.example_seed(index))
                query, answer, draft, seconds = draft_example(bundle, example, sampling, generator)
                out.append((example.task, len(example.pairs), query, answer, draft, seconds))
                bar.update(accelerator.num_processes)
            return out

        def draft_blocks(starts):
            out = []
            for begin in starts:
                out += draft_block(bundle, recipe, begin, sampling, device)
                bar.update(recipe.draft_batch * accelerator.num_processes)
            return out

        width = recipe.draft_batch
        if width > 1 and have % width:
            raise ValueError(f"{path.name} holds {have} drafts, not whole blocks of {width}: delete it and draft again")
        block = max(1, save_every // width) * width * accelerator.num_processes
        for start in range(have, count, block):
            stop = min(count, start + block)
            shard = (sharded_map(accelerator, range(start, stop), draft_indices) if width == 1 else
                     sharded_map(accelerator, range(start, stop, width), draft_blocks))   # whole blocks: may pass count
            for task, pairs, query, answer, draft, seconds in shard:
                cache["draft_seconds"].append(seconds)
                cache["tasks"].append(task)
                cache["pairs"].append(pairs)
                for key, value in (("query", query), ("answer", answer), ("draft", draft)):
                    cache[key].append(value)
            if main:
                save()
        bar.close()
        accelerator.wait_for_everyone()
    return {"tasks": cache["tasks"][:count], "pairs": cache["pairs"][:count],
            **{key: torch.stack(cache[key][:count]) for key in ("query", "answer", "draft")},
            "draft_seconds": torch.tensor(cache["draft_seconds"][:count], dtype=torch.float64)}


# -- g_phi training ------------------------------------------------------------------------------

def refiner_loss(refined: torch.Tensor, target: torch.Tensor, loss: str, table: torch.Tensor | None = None,
                 answer: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over tokens of the cosine distance (Eq. 4), of the squared L2 distance (Table 6), or (beyond the
    paper, "ce") the cross-entropy of the ground-truth code under a softmax of cosine similarities to every
    code embedding: the nearest-code decoding's own argmax, trained directly."""
    if loss == "cosine":
        return cosine_distance(refined, target).mean()
    if loss == "ce":
        logits = F.normalize(refined.float(), dim=-1) @ F.normalize(table.float(), dim=-1).T / CE_TEMPERATURE
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), answer.reshape(-1).to(logits.device))
    return (refined.float() - target.float()).pow(2).sum(-1).mean()


def refine_batch(refiner: SelfRefiner, table: torch.Tensor, drafts: dict, index: torch.Tensor, forward=None, with_gate=False):
    """e' = g_phi(f_embed(draft)) and e* = f_embed(answer) for the examples `index`: (B, N, D) each [, and the
    learned gate's logits (B, N)]. `forward`: the module to call (g_phi as accelerate prepared it; default g_phi)."""
    device = table.device
    embeddings = table[drafts["draft"][index].to(device)]
    query = table[drafts["query"][index].to(device)] if refiner.with_query else None
    target = table[drafts["answer"][index].to(device)]
    if with_gate:
        refined, logits = (forward or refiner)(embeddings, query, with_gate=True)
        return refined, target, logits
    return (forward or refiner)(embeddings, query), target


# -- the learned gate (beyond the paper) ----------------------------------------------------------

def code_error(codes: torch.Tensor, answer: torch.Tensor, vq: torch.Tensor) -> torch.Tensor:
    """(B, N) squared L2 distance between the VQ code vectors of `codes` and of the right answer: what the decoder
    reads, so a pixel proxy whichever space g_phi refines in."""
    return (vq[codes.to(vq.device)] - vq[answer.to(vq.device)]).pow(2).sum(-1)


@torch.no_grad()
def gate_labels(refiner: SelfRefiner, refined: torch.Tensor, table: torch.Tensor, draft: torch.Tensor, answer: torch.Tensor,
                vq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(proposed (B, N) bool: g_phi's snapped code differs from the draft's, helps (B, N) float: taking it brings
    the cell's VQ vector closer to the right answer's). The gate learns P(helps | proposed)."""
    proposed, helps, _ = CodeLabels(vq)(refiner, refined, table, {"draft": draft, "answer": answer}, slice(None))
    return proposed, helps


GATE_LABELS = ("codes", "pixels", "pixels-answer")


def cell_errors(images: torch.Tensor, target: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, 3, H, W) decodes against (B, 3, H, W) targets -> (B, N) mean squared error of each cell's patch."""
    error = (images.float() - target.float()).pow(2).mean(1, keepdim=True)              # (B, 1, H, W)
    return F.avg_pool2d(error, images.shape[-1] // grid).flatten(1)                      # (B, g*g), raster


class PixelLabels:
    """The learned gate's pixel label: a proposal helps where the decoded cell (the whole proposal decoded together,
    as the engine decodes it) is nearer the right answer's decode than the draft's decode is. Cells the draft copied
    from the query are left out: `keep_copies` keeps them at decode. The right answers' and the drafts' decodes are
    made once per draft set; each step decodes its batch's proposals."""

    def __init__(self, tokenizer, batch: int = 64, scope: str = "cells"):
        self.tokenizer, self.batch, self.cache, self.scope = tokenizer, batch, {}, scope
        self.name = "pixels-answer" if scope == "answer" else "pixels"      # its --gate-label

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        grid = self.tokenizer.grid
        return self.tokenizer.decode_codes(codes.reshape(-1, grid, grid)).float()

    def prepared(self, drafts: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(right answers' decodes (M, 3, H, W), drafts' cell errors (M, N)) of a draft set, made once."""
        key = id(drafts)
        if key not in self.cache:
            targets, errors = [], []
            for index in torch.arange(len(drafts["tasks"])).split(self.batch):
                target = self.decode(drafts["answer"][index])
                targets.append(target)
                errors.append(cell_errors(self.decode(drafts["draft"][index]), target, self.tokenizer.grid))
            self.cache[key] = (torch.cat(targets), torch.cat(errors))
        return self.cache[key]

    @torch.no_grad()
    def __call__(self, refiner: SelfRefiner, refined: torch.Tensor, table: torch.Tensor, drafts: dict,
                 index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(proposed (B, N) bool, helps (B, N) float, error change (B, N): the proposal's cell error minus the draft's)."""
        targets, draft_errors = self.prepared(drafts)
        draft = drafts["draft"][index]
        new = snap_codes(refiner, refined.detach(), table).to(draft.device)
        change = cell_errors(self.decode(new), targets[index], self.tokenizer.grid).cpu() - draft_errors[index]
        proposed = (new != draft) & (draft != drafts["query"][index])
        if self.scope == "answer":          # one label per answer: do its proposals, taken together, lower its error?
            total = (change * proposed).sum(1, keepdim=True)
            return proposed, (total < 0).float().expand_as(change), change
        return proposed, (change < 0).float(), change


class CodeLabels:
    """The learned gate's VQ-space label (`gate_labels`), with the same interface as `PixelLabels`."""

    name = "codes"

    def __init__(self, vq: torch.Tensor):
        self.vq = vq

    @torch.no_grad()
    def __call__(self, refiner, refined, table, drafts, index):
        draft, answer = drafts["draft"][index], drafts["answer"][index]
        new = snap_codes(refiner, refined.detach(), table).to(draft.device)
        change = (code_error(new, answer, self.vq) - code_error(draft, answer, self.vq)).cpu()
        return new != draft, (change < 0).float(), change


def gate_scope(config: "RefinerTrainConfig") -> str:
    """The decode rule's scope for the gate `config.gate_label` trains: one decision per answer for pixels-answer."""
    return "answer" if config.gate_label == "pixels-answer" else "cells"


def gate_labeler(bundle, config: "RefinerTrainConfig", vq: torch.Tensor):
    """The labeler `config.gate_label` names (checked by `train_refiner`)."""
    if config.gate_label == "codes":
        return CodeLabels(vq)
    return PixelLabels(bundle.tokenizer, scope=gate_scope(config))


def gate_loss(logits: torch.Tensor, proposed: torch.Tensor, helps: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy over the proposed cells (zero, with a graph, when g_phi proposes nothing)."""
    proposed = proposed.to(logits.device)
    if not proposed.any():
        return logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(logits[proposed].float(), helps.to(logits.device)[proposed])


@torch.no_grad()
def choose_gate_threshold(refiner: SelfRefiner, bundle, drafts: dict, thresholds=None, batch: int = 64,
                          labeler=None) -> dict:
    """The threshold that most lowers the error to the right answer on `drafts` (validation), as `labeler` measures
    it (default the VQ-space one; `PixelLabels`: the decoded cells'), per candidate: mean error change per cell
    (negative is better) and the share of cells changed. 1.0 (change nothing) wins when no threshold helps."""
    thresholds = list(thresholds or (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95))
    table = refiner_table(refiner, bundle)
    labeler = labeler or CodeLabels(bundle.tokenizer.codebook.detach().float())
    sums = {t: [0.0, 0.0] for t in thresholds}
    cells = 0
    for index in torch.arange(len(drafts["tasks"])).split(batch):
        refined, _, logits = refine_batch(refiner, table, drafts, index, with_gate=True)
        proposed, _, gain = labeler(refiner, refined, table, drafts, index)
        probability = torch.sigmoid(logits.float()).cpu()
        if refiner.gate_scope == "answer":
            probability = probability.mean(1, keepdim=True).expand_as(probability)
        for t in thresholds:
            take = (probability > t) & proposed.cpu()
            sums[t][0] += (gain * take).sum().item()
            sums[t][1] += take.float().sum().item()
        cells += proposed.numel()
    table_rows = {t: {"error_change": sums[t][0] / max(1, cells), "changed": sums[t][1] / max(1, cells)} for t in thresholds}
    best = min(thresholds, key=lambda t: table_rows[t]["error_change"])
    if table_rows[best]["error_change"] >= 0:
        best = 1.0
    return {"threshold": best, "label": labeler.name, "candidates": {f"{t:g}": row for t, row in table_rows.items()}}


@torch.no_grad()
def evaluate(refiner: SelfRefiner, bundle, drafts: dict, loss: str, batch: int = 64) -> dict:
    """Draft vs refined on `drafts`: the training objective, token accuracy, cosine distances, per task, Fig. 2 curve."""
    was_training = refiner.training
    refiner.eval()
    vocab = bundle.vocab
    table = refiner_table(refiner, bundle)
    losses, rows = [], {key: [] for key in ("hit_draft", "hit_refined", "cos_draft", "cos_embedding", "cos_refined")}
    for index in torch.arange(len(drafts["tasks"])).split(batch):
        refined, target = refine_batch(refiner, table, drafts, index)
        losses.append(refiner_loss(refined, target, loss, table, drafts["answer"][index]).item() * len(index))
        query_codes = drafts["query"][index] if refiner.with_query else None
        codes = self_refine(refiner, bundle.backbone, vocab, drafts["draft"][index], query_codes,   # the production path
                            codebook=bundle.tokenizer.codebook)
        answer, draft = drafts["answer"][index], drafts["draft"][index]
        rows["hit_draft"].append((draft == answer).float())
        rows["hit_refined"].append((codes == answer).float())
        rows["cos_draft"].append(cosine_distance(table[draft.to(table.device)], target).cpu())
        rows["cos_embedding"].append(cosine_distance(refined, target).cpu())
        rows["cos_refined"].append(cosine_distance(table[codes.to(table.device)], target).cpu())
    refiner.train(was_training)
    rows = {key: torch.cat(value) for key, value in rows.items()}                         # each (M, N)
    tasks = drafts["tasks"]

    def summary(select) -> dict:
        hit_d, hit_r = rows["hit_draft"][select], rows["hit_refined"][select]
        return {"examples": int(hit_d.shape[0]),
                "token_accuracy": {"draft": hit_d.mean().item(), "refined": hit_r.mean().item()},
                "cosine_distance": {"draft": rows["cos_draft"][select].mean().item(),
                                    "refined_embedding": rows["cos_embedding"][select].mean().item(),
                                    "refined_tokens": rows["cos_refined"][select].mean().item()},
                "cells_fixed": ((hit_d == 0) & (hit_r == 1)).float().mean().item(),     # wrong -> right
                "cells_broken": ((hit_d == 1) & (hit_r == 0)).float().mean().item()}    # right -> wrong

    every = torch.ones(len(tasks), dtype=torch.bool)
    return {**summary(every), "loss": sum(losses) / max(1, len(tasks)),
            "per_task": {task: summary(torch.tensor([t == task for t in tasks])) for task in dict.fromkeys(tasks)},
            # Fig. 2: per-token (raster position) cosine distance to the ground truth, and its area
            "cosine_curve": {"draft": rows["cos_draft"].mean(0).tolist(), "refined": rows["cos_refined"].mean(0).tolist()},
            "cosine_auc": {"draft": rows["cos_draft"].mean(0).sum().item(), "refined": rows["cos_refined"].mean(0).sum().item()}}


@torch.no_grad()
def refine_overhead(refiner: SelfRefiner, bundle, drafts: dict, repeats: int = 20, draft_seconds: float | None = None) -> dict:
    """Seconds of one self_refine call (g_phi + nearest code, batch 1) against the draft time: `draft_seconds`
    (one unbatched draft, as the engine drafts) or else the cached drafts' mean."""
    count = min(repeats, len(drafts["tasks"]))
    if count == 0:
        return {}

    def refine(row: int):
        query = drafts["query"][row:row + 1] if refiner.with_query else None
        self_refine(refiner, bundle.backbone, bundle.vocab, drafts["draft"][row:row + 1], query,
                    codebook=bundle.tokenizer.codebook)

    refine(0)                                   # warm-up
    start = time.perf_counter()
    for row in range(count):
        refine(row)
    seconds = (time.perf_counter() - start) / count
    draft_seconds = draft_seconds or drafts["draft_seconds"].mean().item()
    return {"self_refine_seconds": seconds, "draft_seconds": draft_seconds, "ratio": seconds / draft_seconds}


def step_loss(refiner: SelfRefiner, model, table: torch.Tensor, labeler, drafts: dict, index: torch.Tensor,
              config: "RefinerTrainConfig") -> torch.Tensor:
    """One batch's loss: the refinement objective, plus the learned gate's cross-entropy on `labeler`'s labels
    (`CodeLabels`, `PixelLabels`) when g_phi has one."""
    if not refiner.learned_gate:
        refined, target = refine_batch(refiner, table, drafts, index, model)
        return refiner_loss(refined, target, config.loss, table, drafts["answer"][index])
    refined, target, logits = refine_batch(refiner, table, drafts, index, model, with_gate=True)
    proposed, helps, _ = labeler(refiner, refined, table, drafts, index)
    return (refiner_loss(refined, target, config.loss, table, drafts["answer"][index])
            + config.gate_weight * gate_loss(logits, proposed, helps))


def new_refiner(bundle, config: RefinerTrainConfig) -> SelfRefiner:
    """A fresh g_phi for `bundle` as `config` asks: as wide as the backbone's embeddings (space "backbone"), or
    refining the tokenizer's code vectors in a `width`-wide block (space "codes")."""
    if config.space not in SPACES:
        raise ValueError(f"unknown space {config.space!r}; choose from {', '.join(SPACES)}")
    grid = bundle.tokenizer.grid
    if config.space == "codes":
        return SelfRefiner(dim=int(bundle.tokenizer.codebook.shape[1]), grid=grid, heads=config.heads, kind=config.kind,
                           with_query=config.with_query, space="codes", width=config.width or 128,
                           learned_gate=config.learned_gate, gate_scope=gate_scope(config))
    return SelfRefiner.for_backbone(bundle.backbone, grid=grid, heads=config.heads, kind=config.kind,
                                    with_query=config.with_query, width=config.width, learned_gate=config.learned_gate,
                                    gate_scope=gate_scope(config))


def refiner_table(refiner: SelfRefiner, bundle) -> torch.Tensor:
    """The frozen vectors g_phi refines (float32, on g_phi's device): f_embed's code rows or the VQ codebook."""
    table = refine_table(refiner, bundle.backbone, bundle.vocab, bundle.tokenizer.codebook)
    return table.detach().float().to(next(refiner.parameters()).device)


def train_refiner(bundle, config: RefinerTrainConfig, run_dir: Path, logger=None, accelerator=None) -> tuple[SelfRefiner, dict]:
    """Draft, train g_phi on the frozen backbone, validate. Returns (g_phi, report for training.json).

    Under P processes (`accelerate launch`): drafting is split between them, `config.batch` is the global batch
    (each process refines its rows of it, DDP averages the gradients) and every process ends with the same g_phi."""
    if config.loss not in LOSSES:
        raise ValueError(f"unknown loss {config.loss!r}; choose from {', '.join(LOSSES)}")
    if config.gate_label not in GATE_LABELS:
        raise ValueError(f"unknown gate label {config.gate_label!r}; choose from {', '.join(GATE_LABELS)}")
    if min(config.drafts, config.val_drafts, config.epochs, config.batch, config.draft_batch) < 1:
        raise ValueError("drafts, val_drafts, epochs, batch and draft_batch must each be at least 1")
    backbone = bundle.backbone
    device = next(backbone.parameters()).device
    accelerator = accelerator or accelerator_for(str(device))
    processes = accelerator.num_processes
    per_process_batch(accelerator, config.batch)
    logger = logger or process_logger(accelerator, run_dir, "refiner")
    backbone.eval().requires_grad_(False)                       # frozen: Algorithm 1 updates g_phi only
    backbone_hash = state_fingerprint(backbone)
    tasks = recipe_tasks(bundle)
    recipe = dict(pool=config.pool, image_size=bundle.tokenizer.image_size, tasks=tasks, pairs_range=(1, max(1, min(3, bundle.max_pairs))),
                  sequence_format=bundle.sequence_format,
                  sampling=tuple(asdict(SamplingConfig(**bundle.sampling_defaults)).values()),   # as the engine samples
                  backbone=backbone_hash, tokenizer=state_fingerprint(bundle.tokenizer.model),
                  dtype=str(next(backbone.parameters()).dtype), pixel_range=tuple(bundle.tokenizer.pixel_range),
                  draft_batch=config.draft_batch if bundle.sequence_format == "scan" else 1)
    if config.draft_batch > 1 and bundle.sequence_format != "scan":
        logger.info(f"--draft-batch {config.draft_batch} ignored: {bundle.sequence_format} bundles draft one at a time")
    timings = {}
    start = time.perf_counter()
    train = load_or_make_drafts(bundle, DraftRecipe("train", config.seed, **recipe), config.drafts, run_dir, logger,
                                accelerator=accelerator)
    val_recipe = DraftRecipe("val", VALIDATION_SEED, **recipe)
    validation = load_or_make_drafts(bundle, val_recipe, config.val_drafts, run_dir, logger, accelerator=accelerator)
    timings["drafting"] = time.perf_counter() - start
    unbatched = None
    if recipe["draft_batch"] > 1:       # batched drafts' seconds are amortised: time a few as the engine drafts them
        sampling = SamplingConfig(*val_recipe.sampling)
        unbatched = sum(draft_example(bundle, val_recipe.example(i), sampling, torch.Generator().manual_seed(i))[3]
                        for i in range(3)) / 3

    torch.manual_seed(config.seed)
    refiner = new_refiner(bundle, config).to(device)
    logger.info(f"g_phi {config.kind}{' +query' if config.with_query else ''}: {sum(p.numel() for p in refiner.parameters()):,} "
                f"params, width {refiner.dim}, {len(train['tasks'])} train / {len(validation['tasks'])} val drafts, "
                f"tasks {', '.join(tasks)}, config {asdict(config)}")
    table = refiner_table(refiner, bundle)                             # frozen f_embed rows or VQ codes, (C, D)
    vq = bundle.tokenizer.codebook.detach().float().to(device)          # the learned gate's VQ-space label
    labeler = gate_labeler(bundle, config, vq)
    optimizer = torch.optim.AdamW(refiner.parameters(), lr=config.lr)
    backbone_parameters = {id(p) for p in backbone.parameters()}
    assert not any(id(p) in backbone_parameters for group in optimizer.param_groups for p in group["params"])
    model, optimizer = accelerator.prepare(refiner, optimizer)   # one process: g_phi itself; several: DDP around it

    train_before = evaluate(refiner, bundle, train, config.loss)["loss"]
    start = time.perf_counter()
    order = torch.Generator().manual_seed(config.seed)
    steps_per_epoch = math.ceil(len(train["tasks"]) / config.batch)
    epoch_losses = []
    refiner.train()
    bar = tqdm(total=config.epochs * steps_per_epoch, desc="g_phi", dynamic_ncols=True, disable=not accelerator.is_main_process)
    for epoch in range(config.epochs):
        total = 0.0
        for step, index in enumerate(torch.randperm(len(train["tasks"]), generator=order).split(config.batch)):
            if processes == 1:
                loss = step_loss(refiner, model, table, labeler, train, index, config)
                optimizer.zero_grad(set_to_none=True)
                accelerator.backward(loss)
                optimizer.step()
            else:       # this process's rows of the global batch, weighted so DDP's mean is the global batch's gradient
                mine = index[uneven_rows(accelerator, len(index))]     # a short last batch may leave a process none
                weight = len(mine) * processes / len(index)
                mine = mine if len(mine) else index[:1]                # weight 0: it still joins the gradient reduction
                local = step_loss(refiner, model, table, labeler, train, mine, config)
                optimizer.zero_grad(set_to_none=True)
                accelerator.backward(local * weight)
                optimizer.step()
                loss = accelerator.reduce(local.detach() * weight, "mean")     # the global batch's loss
            total += loss.item() * len(index)
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.4f}")
            if (step + 1) % 100 == 0:
                logger.info(f"epoch {epoch + 1} step {step + 1}/{steps_per_epoch} loss {loss.item():.4f}")
        epoch_losses.append(total / len(train["tasks"]))
        logger.info(f"epoch {epoch + 1}: mean training loss {epoch_losses[-1]:.4f}")
    bar.close()
    timings["training"] = time.perf_counter() - start
    if accelerator.distributed_type.name == "FSDP":   # sharded g_phi: validate and save a whole copy of its weights
        whole = new_refiner(bundle, config)
        whole.load_state_dict(unwrapped_state(accelerator, model))
        refiner = whole.to(device)
    refiner.eval()
    gate = None
    if config.learned_gate:             # chosen on validation drafts, stored in the saved config
        gate = choose_gate_threshold(refiner, bundle, validation, labeler=labeler)
        refiner.gate_threshold = gate["threshold"]
        refiner._hub_mixin_config["gate_threshold"] = gate["threshold"]
        rows = ", ".join(f"{t} {r['error_change']:+.4f}/{r['changed']:.3f}" for t, r in gate["candidates"].items())
        logger.info(f"learned gate: threshold {gate['threshold']:g} (by threshold: {config.gate_label} error change per cell / cells changed: {rows})")
    train_after = evaluate(refiner, bundle, train, config.loss)["loss"]

    # Algorithm 1, line 10: g_phi only. The backbone must be exactly what it was.
    assert not backbone.training and not any(p.requires_grad for p in backbone.parameters()), "the backbone was unfrozen"
    assert state_fingerprint(backbone) == backbone_hash, "training changed the backbone's weights"

    report = {"train_loss": {"before": train_before, "after": train_after, "per_epoch": epoch_losses},
              "validation": evaluate(refiner, bundle, validation, config.loss),
              "overhead": refine_overhead(refiner, bundle, validation, draft_seconds=unbatched),
              **({"learned_gate": gate} if gate else {}),
              "timings_seconds": timings, "backbone_sha256": backbone_hash, "backbone_unchanged": True,
              "refiner_config": dict(refiner._hub_mixin_config), "parameters": sum(p.numel() for p in refiner.parameters()),
              "tasks": list(tasks), "train_drafts": len(train["tasks"]), "val_drafts": len(validation["tasks"]),
              "device": str(device), "config": asdict(config)}
    v = report["validation"]
    logger.info(f"training loss {train_before:.4f} -> {train_after:.4f}; validation token accuracy "
                f"{v['token_accuracy']['draft']:.3f} -> {v['token_accuracy']['refined']:.3f}, cosine distance "
                f"{v['cosine_distance']['draft']:.4f} -> {v['cosine_distance']['refined_tokens']:.4f} "
                f"(fixed {v['cells_fixed']:.3f}, broken {v['cells_broken']:.3f} of cells)")
    for task, row in v["per_task"].items():
        logger.info(f"  {task:13s} accuracy {row['token_accuracy']['draft']:.3f} -> {row['token_accuracy']['refined']:.3f}  "
                    f"cosine {row['cosine_distance']['draft']:.4f} -> {row['cosine_distance']['refined_tokens']:.4f}")
    return refiner, report


# -- command line --------------------------------------------------------------------------------

def load_for_training(source: str, revision: str | None, device: str | None, dtype: str | None):
    """The bundle on the device chosen once here: CUDA > MPS > CPU; float32 unless asked (the 7B recipe: half)."""
    from ..bundle import load_bundle
    from ..engine import choose_device

    target, half = choose_device(device)
    if str(source).lower() in ("lvm-7b", "lvm"):
        try:
            from ..lvm import load_lvm_bundle
        except ImportError as error:
            raise SystemExit(f"the {source} recipe needs demo_core/lvm.py ({error})") from error
        return load_lvm_bundle(device=target, dtype=getattr(torch, dtype) if dtype else half, revision=revision)
    return load_bundle(source, revision=revision, device=target, dtype=getattr(torch, dtype) if dtype else torch.float32)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    defaults = RefinerTrainConfig()
    parser = argparse.ArgumentParser(prog="python -m demo_core.train refiner", description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", default=str(DEFAULT_BUNDLE), help="bundle folder, Hub repo id, or lvm-7b")
    parser.add_argument("--revision", default=None, help="Hub revision of --bundle")
    parser.add_argument("--drafts", type=int, default=defaults.drafts, help="training drafts")
    parser.add_argument("--val-drafts", type=int, default=defaults.val_drafts)
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--batch", type=int, default=defaults.batch)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--loss", choices=LOSSES, default=defaults.loss, help="cosine (Eq. 4), l2 (Table 6) or ce (cross-entropy over codes)")
    parser.add_argument("--kind", choices=KINDS, default=defaults.kind, help="g_phi's token mixer (Table 7)")
    parser.add_argument("--with-query", action="store_true", help="g_phi also sees the query image's tokens")
    parser.add_argument("--heads", type=int, default=defaults.heads)
    parser.add_argument("--space", choices=SPACES, default=defaults.space,
                        help="refine the backbone's code embeddings (the paper) or the tokenizer's VQ code vectors")
    parser.add_argument("--width", type=int, default=None, help="g_phi's block width (space codes: default 128)")
    parser.add_argument("--learned-gate", action="store_true",
                        help="also train a per-cell gate: change a cell only where g_phi's new code is likely to help")
    parser.add_argument("--gate-weight", type=float, default=defaults.gate_weight, help="the gate's loss weight")
    parser.add_argument("--gate-label", choices=GATE_LABELS, default=defaults.gate_label,
                        help="what the learned gate learns helps: the VQ vector nearing the answer's (codes), the "
                             "decoded cell's pixels nearing the right answer's decode (pixels), or the whole decoded "
                             "answer's, one decision per answer at decode (pixels-answer); pixels* are meant with keep "
                             "copies")
    parser.add_argument("--draft-batch", type=int, default=defaults.draft_batch,
                        help="drafts written together, grouped by K (SCAN-form bundles; about 3x faster at 16 on a CPU)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--pool", choices=("builtin", "debian"), default=defaults.pool,
                        help="image pool for the drafts' examples (debian: the `data fetch` photos, as retouch-16 trained on)")
    parser.add_argument("--out", type=Path, default=None, help="where to save g_phi (default <bundle>/refiner, listed in bundle.json)")
    parser.add_argument("--run-dir", type=Path, default=RUNS / "refiner", help="draft cache and train.log")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: the best available)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None, help="backbone dtype for drafting")
    args = parser.parse_args(argv)
    config = RefinerTrainConfig(**{f.name: getattr(args, f.name) for f in fields(RefinerTrainConfig)})

    if args.bundle in ("", "default", "retouch-tiny"):
        args.bundle = str(DEFAULT_BUNDLE)
    local = Path(args.bundle).expanduser().is_dir()
    if args.out is None and not local:
        parser.error(f"{args.bundle} is not a local bundle folder: give --out for the trained g_phi")
    started = datetime.now(timezone.utc)
    accelerator = accelerator_for(args.device)
    per_process_batch(accelerator, config.batch)
    logger = process_logger(accelerator, args.run_dir, "refiner")
    logger.info(f"python -m demo_core.train refiner {' '.join(argv)}"
                + (f" ({accelerator.num_processes} processes)" if accelerator.num_processes > 1 else ""))
    device = args.device if accelerator.num_processes == 1 else str(process_device(accelerator, None))  # a backbone per process
    bundle = load_for_training(args.bundle, args.revision, device, args.dtype)
    refiner, report = train_refiner(bundle, config, args.run_dir, logger, accelerator)
    if accelerator.num_processes > 1:
        report["processes"] = accelerator.num_processes

    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:         # only the main process writes g_phi and the bundle
        return 0
    folder = Path(args.bundle).expanduser().resolve() if local else None
    out = (args.out or folder / "refiner").expanduser().resolve()
    refiner.cpu().save_pretrained(out)
    report = {"command": "python -m demo_core.train refiner " + " ".join(argv), "started": started.isoformat(timespec="seconds"),
              "elapsed_minutes": round((datetime.now(timezone.utc) - started).total_seconds() / 60, 2),
              "bundle": str(args.bundle), **report}
    write_json(out / "training.json", report)
    if folder is not None and out.is_relative_to(folder):
        info = json.loads((folder / "bundle.json").read_text())
        info.setdefault("parts", {})["refiner"] = out.relative_to(folder).as_posix()
        write_json(folder / "bundle.json", info)
        logger.info(f"saved g_phi to {out} and listed it in {folder / 'bundle.json'}")
    else:
        logger.info(f"saved g_phi to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
