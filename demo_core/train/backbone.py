"""Train the default in-context backbone with SCAN self-calibration.

Every example is [x1, y1, ..., xK, yK, xq] (LVM layout, K in 1..3) followed by the answer in
SCAN form and an appended refinement segment (SCAN Sec. "Training", Fig. 2a):
- generation loss at every <at_n>: the ground-truth code of cell n (codes only);
- quality loss at every code token: <good> if it equals the ground truth, else <bad> (Eq. 17);
- answer inputs mix ground truth with negatives at a ratio r ~ U[0, 0.4] drawn per example:
  random codes, position-permuted codes of the same answer, and teacher-forcing errors (codes
  sampled from the model's own teacher-forced predictions in a no-grad pass on the same batch);
- with probability --draft-negatives an example's whole answer is instead the model's own
  free-running draft (raster, the production sampler): the errors the quality score meets at
  inference, where most cells of a draft are wrong and the wrong ones cluster; --draft-quality weighs
  the quality loss on those drafted tokens (0: they teach generation only, the head learns from the rest);
- the refinement segment re-asks mostly the corrupted cells given the whole corrupted image,
  its new tokens again negatives with probability r;
- generation order raster or random (half each), so any cell can be (re)generated;
- --change-weight weighs the generation loss on the cells the task changes (answer code != query code there)
  over the copied ones, which a model learns first and which fill most of an answer.

    nohup nice -n 5 python -m demo_core.train backbone > runs/backbone.out 2>&1 &

Resumes from runs/backbone/checkpoint.pt, else from the weights exported in the bundle
(`backbone/training.json` records the step), so a run can span sessions.
"""
from __future__ import annotations

import argparse
import json
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..backbone import (BackboneConfig, SamplingConfig, backbone_config_dict, build_backbone, init_code_embeddings,
                        sample_from_logits)
from ..drafts.scan_form import draft_scan
from ..token_metrics import auroc
from ..sequence import Vocab, answer_positions, interleave_answer
from ..tasks import TASKS, ExampleSampler
from .common import (AUTOCAST_CHOICES, DEFAULT_BUNDLE, REPO_ROOT, RUNS, Timer, autocast, autocast_dtype, cosine_lr,  # noqa: F401
                     load_checkpoint, save_checkpoint, set_lr, setup_logging, write_json)
from .distributed import (accelerator_for, any_process, gather_rows, mean_across, per_process_batch, process_device,
                          process_logger, process_seed, refuse_fsdp, rows, sharded_map, unwrapped_state)

NEGATIVE_RATIO = (0.0, 0.4)


def parse_task_weights(text: str) -> np.ndarray:
    """'edges=2,posterize=2' -> normalised frequencies over TASKS (unnamed tasks weigh 1)."""
    weights = dict.fromkeys(TASKS, 1.0)
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        if name not in weights:
            raise SystemExit(f"--task-weights: unknown task {name!r}; tasks are {', '.join(TASKS)}")
        weights[name] = _number(value, "--task-weights", "'edges=2,posterize=2'")
    return _normalised(list(weights.values()), "--task-weights", "'edges=2,posterize=2'")


def parse_family_weights(text: str) -> dict[str, float]:
    """'edges_canny=2,inpaint=2' -> {kind: weight} over the task family's training kinds (unnamed kinds weigh 1)."""
    from ..task_family import parse_kind_weights

    try:
        weights = parse_kind_weights(text, "--task-weights")
    except ValueError as error:
        raise SystemExit(str(error)) from None
    _normalised(list(weights.values()) or [1.0], "--task-weights", "'edges_canny=2,inpaint=2'")
    return weights


def parse_k_weights(text: str) -> np.ndarray:
    """'1,2,2' -> normalised frequencies of K = 1, 2, 3."""
    values = [_number(v, "--k-weights", "1,2,2") for v in text.split(",")]
    if len(values) != 3:
        raise SystemExit("--k-weights takes three numbers (K = 1, 2, 3), e.g. 1,2,2")
    return _normalised(values, "--k-weights", "1,2,2")


def _number(text: str, option: str, example: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise SystemExit(f"{option}: {text.strip()!r} is not a number; e.g. {example}") from None


def _normalised(values: list[float], option: str, example: str) -> np.ndarray:
    array = np.array(values)
    if (array < 0).any() or array.sum() <= 0:
        raise SystemExit(f"{option}: weights must be non-negative and not all zero; e.g. {example}")
    return array / array.sum()


def load_tokenizer(bundle: Path):
    from ..bundle import bundle_pixel_range, load_tokenizer_part

    return load_tokenizer_part(bundle / "tokenizer", bundle_pixel_range(bundle))


def tokenizer_fingerprint(bundle: Path) -> str:
    """What the backbone's codes depend on: the tokenizer's encoder side and codebook (see codes_fingerprint), so a
    decoder-only fine-tune of the tokenizer keeps every backbone trained on it valid."""
    from ..tokenizer import codes_fingerprint

    return codes_fingerprint(load_tokenizer(bundle).model)


def legacy_fingerprint(bundle: Path) -> str | None:
    """The first generation's record: SHA-256 of the tokenizer's weight file (exports before codes_sha256_16)."""
    import hashlib

    path = bundle / "tokenizer" / "diffusion_pytorch_model.safetensors"
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.exists() else None


def negatives(answer: torch.Tensor, tf_codes: torch.Tensor | None, codebook: int, generator: torch.Generator) -> torch.Tensor:
    """One negative code per cell, each of a random kind: random code, permuted code, teacher-forcing error."""
    batch, cells = answer.shape
    random_codes = torch.randint(0, codebook, answer.shape, generator=generator)
    permuted = torch.stack([row[torch.randperm(cells, generator=generator)] for row in answer])
    kind = torch.randint(0, 3, answer.shape, generator=generator)
    out = torch.where(kind == 0, random_codes, permuted)
    if tf_codes is not None:
        use_tf = (kind == 2) & (tf_codes != answer)
        out = torch.where(use_tf, tf_codes, out)
    return out


def build_batch(vocab: Vocab, context: torch.Tensor, answer: torch.Tensor, tf_codes: torch.Tensor | None,
                generator: torch.Generator, max_refine: int = 16, negative_ratio=NEGATIVE_RATIO, random_order_share=0.5,
                drafts: torch.Tensor | None = None, cells_out: list | None = None):
    """Token ids, position ids and targets for one batch (all examples share K, so no padding).

    `drafts` (B, N), -1 where absent: examples with a draft take it whole as their answer inputs, in raster order.
    `cells_out`: a list that receives the cell of every target (B, N+R), for per-cell loss weights (change_weights).

    Returns input_ids (B, T), position_ids (B, T), gen_targets (B, N+R), quality_targets (B, N+R),
    and the answer length 2(N+R) (the tail of the sequence where the losses live).
    """
    batch, cells = answer.shape
    context_length = context.shape[1]
    orders = torch.stack([torch.randperm(cells, generator=generator) if torch.rand(1, generator=generator) < random_order_share
                          else torch.arange(cells) for _ in range(batch)])                       # (B, N)
    ratio = torch.empty(batch, 1).uniform_(*negative_ratio, generator=generator)              # r per example
    is_negative = torch.rand(batch, cells, generator=generator) < ratio
    inputs = torch.where(is_negative, negatives(answer, tf_codes, vocab.codebook_size, generator), answer)
    if drafts is not None:
        has_draft = (drafts >= 0).all(1, keepdim=True)                                      # (B, 1)
        orders = torch.where(has_draft, torch.arange(cells)[None], orders)
        inputs = torch.where(has_draft, drafts, inputs)
        is_negative = torch.where(has_draft, drafts != answer, is_negative)
    draft_codes = inputs.gather(1, orders)
    draft = interleave_answer(vocab, orders, draft_codes)                                     # (B, 2N)

    refine = int(torch.randint(0, max_refine + 1, (1,), generator=generator))
    if refine:
        preference = is_negative.float() + torch.rand(batch, cells, generator=generator)      # corrupted cells first
        refine_cells = preference.topk(refine, dim=1).indices                                 # (B, R)
        refine_negative = torch.rand(batch, refine, generator=generator) < ratio
        refine_truth = answer.gather(1, refine_cells)
        refine_codes = torch.where(refine_negative, negatives(answer, tf_codes, vocab.codebook_size, generator).gather(1, refine_cells),
                                   refine_truth)
        all_cells = torch.cat([orders, refine_cells], 1)
        all_codes = torch.cat([draft_codes, refine_codes], 1)
        tail = torch.cat([draft, interleave_answer(vocab, refine_cells, refine_codes)], 1)
    else:
        all_cells, all_codes, tail = orders, draft_codes, draft
    input_ids = torch.cat([context, tail], 1)
    position_ids = torch.cat([torch.arange(context_length)[None].repeat(batch, 1), answer_positions(context_length, all_cells)], 1)
    gen_targets = answer.gather(1, all_cells)
    if cells_out is not None:
        cells_out.append(all_cells)
    quality_targets = (all_codes == gen_targets).long()     # 1 = good
    return input_ids, position_ids, gen_targets, quality_targets, tail.shape[1]


def change_weights(context: torch.Tensor, answer: torch.Tensor, cells: torch.Tensor, weight: float) -> torch.Tensor:
    """Generation-loss weight per target (B, N+R): `weight` where the answer's code differs from the query's code at
    the same cell (the cells the task changes: an inpainting box, a colourised region), 1 where the answer copies the
    query (a sequence's query is its last frame). Copying is learned first and fills most of the loss; this weighs
    the task itself."""
    query = context[:, -answer.shape[1]:]
    changed = (answer != query).gather(1, cells)
    return torch.where(changed, torch.tensor(float(weight)), torch.tensor(1.0))


def output_rows(shape: str, cells: int) -> torch.Tensor:
    """Context rows whose next token belongs to an output image (a demonstration's y; every frame after the first):
    row t predicts token t + 1, so an image spanning [i N, (i + 1) N) is predicted by rows [i N - 1, (i + 1) N - 1)."""
    kind, _, count = shape.partition("=")
    images = range(1, 2 * int(count), 2) if kind == "k" else range(1, int(count))
    return torch.cat([torch.arange(i * cells - 1, (i + 1) * cells - 1) for i in images]) if len(images) else torch.zeros(0, dtype=torch.long)


class TrainingForward(torch.nn.Module):
    """The backbone's training forward as one module (what accelerate prepares: DDP sees every use of the weights).

    (input_ids, position_ids, tail, context_rows) -> (logits of the last `tail` rows, logits of `context_rows` or None).
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids, tail: int, context_rows: torch.Tensor | None = None):
        model = self.model
        # an explicit mask + no cache: cell-aligned (non-consecutive) position ids must never be read as packed sequences
        if context_rows is None:
            return model(input_ids=input_ids, position_ids=position_ids, attention_mask=torch.ones_like(input_ids),
                         use_cache=False, logits_to_keep=tail).logits, None   # (B, tail, V)
        hidden = model.model(input_ids=input_ids, position_ids=position_ids, attention_mask=torch.ones_like(input_ids),
                             use_cache=False).last_hidden_state
        return model.lm_head(hidden[:, -tail:]), model.lm_head(hidden[:, context_rows])


def losses(model, vocab: Vocab, input_ids, position_ids, gen_targets, quality_targets, tail: int,
           quality_weights: torch.Tensor | None = None, context_rows: torch.Tensor | None = None, forward=None,
           gen_weights: torch.Tensor | None = None):
    """Generation and quality cross-entropies over the answer tail; `quality_weights` (B, N+R) weighs each
    code token's quality term and `gen_weights` (B, N+R) each generation target (weighted means; None: all 1).
    With `context_rows` (see output_rows) also the plain next-token cross-entropy on the context's output images
    (LVM's own loss), returned as a fifth value.
    `forward`: the prepared TrainingForward to call (default: `model`'s own, unwrapped)."""
    logits, context_logits = (forward or TrainingForward(model))(input_ids, position_ids, tail, context_rows)
    context_loss = None
    if context_rows is not None:
        context_logits = context_logits[..., : vocab.codebook_size]
        context_targets = input_ids[:, context_rows + 1]
        context_loss = F.cross_entropy(context_logits.reshape(-1, vocab.codebook_size).float(), context_targets.reshape(-1))
    at_logits = logits[:, 0::2, : vocab.codebook_size]
    code_logits = logits[:, 1::2]
    quality_logits = torch.stack([code_logits[..., vocab.bad], code_logits[..., vocab.good]], -1)   # class 1 = good
    if gen_weights is None:
        gen_loss = F.cross_entropy(at_logits.reshape(-1, vocab.codebook_size).float(), gen_targets.reshape(-1))
    else:
        per_target = F.cross_entropy(at_logits.reshape(-1, vocab.codebook_size).float(), gen_targets.reshape(-1),
                                     reduction="none")
        weights = gen_weights.reshape(-1).to(per_target)
        gen_loss = (per_target * weights).sum() / weights.sum().clamp_min(1e-6)
    if quality_weights is None:
        quality_loss = F.cross_entropy(quality_logits.reshape(-1, 2).float(), quality_targets.reshape(-1))
    else:
        per_token = F.cross_entropy(quality_logits.reshape(-1, 2).float(), quality_targets.reshape(-1), reduction="none")
        weights = quality_weights.reshape(-1).float()
        quality_loss = (per_token * weights).sum() / weights.sum().clamp_min(1e-6)
    gen_accuracy = (at_logits.argmax(-1) == gen_targets).float().mean()
    if context_rows is None:
        return gen_loss, quality_loss, gen_accuracy, quality_logits
    return gen_loss, quality_loss, gen_accuracy, quality_logits, context_loss


def model_drafts(model, vocab: Vocab, context: torch.Tensor, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Free-running drafts of every context (raster, the production sampler, KV-cached): codes (B, N) and the
    quality head's scores for them (B, N): p(<good>) alone, the part of the engine's score training shapes."""
    device = next(model.parameters()).device
    if generator is not None and generator.device != device:    # a GPU backbone: a stream of its own, seeded from this one
        generator = torch.Generator(device=device).manual_seed(int(torch.randint(2 ** 62, (1,), generator=generator)))
    states = []
    for _ in draft_scan(model, vocab, context, SamplingConfig(top_p=0.9), generator, state_out=states, score="head"):
        pass
    return states[0].codes.cpu(), states[0].scores.float().cpu()


@torch.no_grad()
def teacher_forcing_codes(model, vocab: Vocab, context, answer, generator, accelerator=None) -> torch.Tensor:
    """Sample every cell from the model's teacher-forced prediction (raster, clean answer): SCAN's third negative.

    With an `accelerator` over several processes each process runs its rows of the batch; the logits are
    gathered once and every process samples the whole batch from the same generator (the same codes everywhere)."""
    batch, cells = answer.shape
    split = accelerator is not None and accelerator.num_processes > 1
    if split:
        context, answer = context[rows(accelerator, batch)], answer[rows(accelerator, batch)]
    share = answer.shape[0]
    order = torch.arange(cells)[None].repeat(share, 1)
    tail = interleave_answer(vocab, order, answer)
    input_ids = torch.cat([context, tail], 1)
    positions = torch.cat([torch.arange(context.shape[1])[None].repeat(share, 1), answer_positions(context.shape[1], order)], 1)
    device = next(model.parameters()).device
    input_ids, positions = input_ids.to(device), positions.to(device)
    logits = model(input_ids=input_ids, position_ids=positions, attention_mask=torch.ones_like(input_ids), use_cache=False,
                   logits_to_keep=tail.shape[1]).logits[:, 0::2, : vocab.codebook_size]
    if split:
        logits = gather_rows(accelerator, logits.float()).cpu()
    elif device.type != "cpu":
        logits = logits.cpu()                   # sampled from the CPU generator
    # the production sampler (top-p 0.9), so these negatives look like the errors real drafts make
    codes = sample_from_logits(logits.reshape(-1, vocab.codebook_size), SamplingConfig(top_p=0.9), generator)
    return codes.view(batch, cells)


class ValidationSet:
    """Fixed validation groups (curriculum.Group), each one prompt shape, encoded once."""

    def __init__(self, groups):
        self.groups = list(groups)

    @torch.no_grad()
    def evaluate(self, model, vocab: Vocab) -> dict:
        """Teacher-forced token accuracy per label and per group (clean answers), quality AUROC (answers with r=0.25
        negatives), and on the drafted groups' free-running drafts: token accuracy and the AUROC of the draft's own
        scores, per label."""
        model.eval()
        device = next(model.parameters()).device      # batches are built on the CPU, run on the model's device
        generator = torch.Generator().manual_seed(0)
        correct: dict[str, list] = {}
        per_group: dict[str, float] = {}
        quality_scores, quality_labels = [], []
        draft_hits: dict[str, list] = {}
        draft_scores: dict[str, list] = {}
        copy_hits: dict[str, list] = {}       # per label: hits on the cells whose answer code is the query's own
        change_hits: dict[str, list] = {}     # per label: hits on the cells the task changes (the rest)
        for group in self.groups:
            context, answer = group.context, group.answer
            if group.draft:
                codes, scores = model_drafts(model, vocab, context, generator)
                for label, row_codes, row_scores, truth in zip(group.labels, codes, scores, answer):
                    draft_hits.setdefault(label, []).append((row_codes == truth).numpy())
                    draft_scores.setdefault(label, []).append(row_scores.numpy())
            hits = []
            for start in range(0, len(answer), 16):       # bounded memory at 2,304 tokens
                ids, pos, gen_t, q_t, tail = build_batch(vocab, context[start:start + 16], answer[start:start + 16], None,
                                                         generator, max_refine=0, negative_ratio=(0.0, 0.0),
                                                         random_order_share=0.0)
                ids, pos = ids.to(device), pos.to(device)
                logits = model(input_ids=ids, position_ids=pos, attention_mask=torch.ones_like(ids), use_cache=False,
                               logits_to_keep=tail).logits
                cell_hits = logits[:, 0::2, : vocab.codebook_size].argmax(-1).cpu() == gen_t     # raster: cell n at n
                hits += cell_hits.float().mean(1).tolist()
                copyable = context[start:start + 16, -vocab.cells:] == answer[start:start + 16]
                for offset, (row_hits, row_copyable) in enumerate(zip(cell_hits, copyable)):
                    for found, cells in ((copy_hits, row_copyable), (change_hits, ~row_copyable)):
                        if group.labels and cells.any():
                            found.setdefault(group.labels[start + offset], []).append(row_hits[cells].numpy())
                tf = teacher_forcing_codes(model, vocab, context[start:start + 16], answer[start:start + 16], generator)
                ids, pos, gen_t, q_t, tail = build_batch(vocab, context[start:start + 16], answer[start:start + 16], tf,
                                                         generator, max_refine=8, negative_ratio=(0.25, 0.25))
                _, _, _, q_logits = losses(model, vocab, ids.to(device), pos.to(device), gen_t.to(device), q_t.to(device), tail)
                quality_scores.append(torch.softmax(q_logits.float(), -1)[..., 1].flatten().cpu().numpy())
                quality_labels.append(q_t.flatten().numpy())
            per_group[group.name] = float(np.mean(hits))
            if group.labels:
                for label, hit in zip(group.labels, hits):
                    correct.setdefault(label, []).append(hit)
        model.train()

        def accuracy_on(found: dict) -> dict:     # per label, where at least 5 % of the cells are of that sort
            return {label: float(np.mean(np.concatenate(rows))) for label, rows in found.items()
                    if sum(len(r) for r in rows) >= 0.05 * vocab.cells * len(rows)}

        draft_auroc = {label: auroc(np.concatenate(draft_scores[label]), np.concatenate(hits).astype(int))
                       for label, hits in draft_hits.items()}
        return {"token_accuracy": float(np.mean([h for v in correct.values() for h in v])) if correct
                else float(np.mean(list(per_group.values()))),
                "per_task": {label: float(np.mean(v)) for label, v in correct.items()}, "per_group": per_group,
                "quality_auroc": auroc(np.concatenate(quality_scores), np.concatenate(quality_labels)),
                "draft_accuracy": {label: float(np.mean(hits)) for label, hits in draft_hits.items()},
                "draft_auroc": draft_auroc,
                # teacher-forced accuracy on the cells an answer shares with its query (inpainting's untouched cells,
                # a sequence's still background): how well the model copies; labels where at least 5 % of cells are such
                "copy_accuracy": accuracy_on(copy_hits),
                # and on the cells it changes (the box, the recoloured cells): whether the task itself is done
                "change_accuracy": accuracy_on(change_hits)}


def export(model, vocab: Vocab, config: BackboneConfig, bundle: Path, step: int, elapsed: float, args, validation: dict | None,
           fingerprint: str, tokenizer=None, history: list | None = None, tasks=tuple(TASKS), name: str = "retouch-tiny",
           extra: dict | None = None, dtype: torch.dtype = torch.float32) -> None:
    """Write backbone/ (+ training.json) and (re)write bundle.json, keeping parts other trainers listed.

    `history`: one entry per run that trained these weights (command, first and last step), oldest first.
    `dtype`: the stored weights' type (float16 halves the bundle; the engine loads them as float32)."""
    import copy

    from ..bundle import manifest

    out = bundle / "backbone"
    (model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)).save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        manifest_path = bundle / "bundle.json"
        old = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
        info = manifest(tokenizer, model, name=name, tasks=list(tasks), extra=extra)
        info["parts"] = {**old.get("parts", {}), **info["parts"]}
        for key in ("sampling", "vsr", "paste_query", "luma_carry"):   # measured defaults (tune-sampling, VSR's decode) outlive a re-export
            if key in old:
                info[key] = old[key]
        write_json(manifest_path, info)
    history = history or [{"command": "python -m demo_core.train backbone", "from_step": 0, "to_step": step}]
    write_json(out / "training.json", {"step": step, "elapsed_minutes": round(elapsed / 60, 1),
                                       "command": history[-1]["command"], "history": history,
                                       "codes_sha256_16": fingerprint,
                                       "config": backbone_config_dict(config), "vocab": vocab.to_dict(),
                                       "args": {k: str(v) for k, v in vars(args).items()}, "validation": validation})


def grown_start(model, source: Path, same_codes, logger):
    """`model` filled from `source`'s exported backbone grown to `model`'s depth (train/grow.py): step 0 of a new
    schedule, the source's training history kept. SystemExit with one line when the export does not fit."""
    from ..bundle import BundleError, load_backbone_part
    from .grow import grow_depth

    folder = source / "backbone"
    if not (folder / "training.json").exists():
        raise SystemExit(f"--grow-from {source}: no backbone/training.json there (a bundle this trainer exported)")
    info = json.loads((folder / "training.json").read_text())
    if not same_codes(info):
        raise SystemExit(f"--grow-from {source}: its backbone was trained on other codes than --bundle's tokenizer")
    try:
        small = load_backbone_part(folder)
        grow_depth(small, model)
    except (BundleError, ValueError) as error:
        raise SystemExit(f"--grow-from {source}: {error}") from None
    history = [{**record, "grown_from": str(source)} for record in (info.get("history") or [])]
    logger.info(f"grown from {source} (step {info['step']}, {small.config.num_hidden_layers} layers) to "
                f"{model.config.num_hidden_layers} layers: step 0 of a new schedule")
    return model, 0, history


def leg_lr(step: int, args) -> float:
    """The schedule's lr at `step`: warm-up and cosine from --schedule-start to --steps (0: the whole run)."""
    start = getattr(args, "schedule_start", 0) or 0
    return cosine_lr(max(0, step - start), max(1, args.steps - start), args.lr, args.warmup)


NEW_BUNDLE = REPO_ROOT / "checkpoints" / "retouch16"     # the second-generation bundle while it trains


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m demo_core.train backbone", description=__doc__.split("\n")[0])
    parser.add_argument("--data", choices=("family", "five"), default="family",
                        help="family: the task family + frame sequences (second generation); five: the first "
                             "generation's five tasks (the embedded retouch-tiny)")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--schedule-start", type=int, default=0,
                        help="step where the warm-up and cosine begin (a leg resumed from a finished run: "
                             "--schedule-start 8000 --steps 9000 anneals from --lr to a tenth of it in 1,000 steps)")
    parser.add_argument("--max-refine", type=int, default=16, help="longest appended refinement segment (pairs)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bundle", type=Path, default=None,
                        help=f"bundle folder holding tokenizer/ (default: {NEW_BUNDLE.relative_to(REPO_ROOT)} for "
                             f"--data family, the embedded default for --data five)")
    parser.add_argument("--run-dir", type=Path, default=None, help="default: runs/backbone16 (family), runs/backbone (five)")
    parser.add_argument("--validate-every", type=int, default=500,
                        help="steps between validations (0: none, and no validation images are needed: a machine "
                             "that has the episode pool but not the photos, such as a lent GPU)")
    parser.add_argument("--checkpoint-minutes", type=float, default=5.0)
    parser.add_argument("--log-every", type=int, default=25, help="steps between training-loss log lines")
    parser.add_argument("--pool", type=int, default=6000, help="five: pre-tokenized training crops (0: encode every batch afresh)")
    parser.add_argument("--episodes", type=int, default=4000, help="family: pre-tokenized task episodes (4 pairs each)")
    parser.add_argument("--sequences", type=int, default=1000, help="family: pre-tokenized frame sequences (5 frames each)")
    parser.add_argument("--sequence-share", type=float, default=0.2, help="family: share of batches that are frame sequences")
    parser.add_argument("--images", choices=("debian", "builtin"), default="debian",
                        help="family: photo pool (debian needs `python -m demo_core data fetch`)")
    parser.add_argument("--task-weights", default="",
                        help="relative task frequencies, e.g. 'edges_canny=2' for family, 'edges=2,posterize=2' for five "
                             "(others 1)")
    parser.add_argument("--k-weights", default="1,1,1", help="relative frequencies of K = 1, 2, 3 demonstration pairs")
    parser.add_argument("--draft-negatives", type=float, default=0.0,
                        help="share of examples whose answer inputs are the model's own free-running draft")
    parser.add_argument("--draft-quality", type=float, default=1.0,
                        help="weight of the quality loss on a drafted answer's own tokens (0: drafts train generation only)")
    parser.add_argument("--change-weight", type=float, default=1.0,
                        help="generation-loss weight of the cells the task changes (answer code != the query's code at "
                             "that cell) against 1 for copied cells: weighs the task over copying (1: plain mean)")
    parser.add_argument("--code-init", choices=("codebook", "random"), default="codebook",
                        help="a fresh model's code embeddings and head: the tokenizer's code geometry, or plain random")
    parser.add_argument("--fresh", action="store_true",
                        help="do not start from a bundle export made with another --code-init: step 0 unless the "
                             "run's checkpoint or such an export resumes it (so the same command resumes, on a new "
                             "machine too; move both away to start over)")
    parser.add_argument("--grow-from", type=Path, default=None,
                        help="a bundle whose backbone (same codes, same width, fewer layers) starts this run, grown to "
                             "--layers without changing its output (train/grow.py); used only when the run has no "
                             "checkpoint and --bundle no export of its own")
    parser.add_argument("--context-loss", type=float, default=0.0,
                        help="weight of LVM's plain next-token loss on the context's output images (demonstration "
                             "answers, later frames): more targets per step at little extra cost (0: off)")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda, cuda:1 (default: the best available; several processes: each its own)")
    parser.add_argument("--autocast", choices=AUTOCAST_CHOICES, default="auto",
                        help="bf16 mixed precision for the training forward (weights, gradients and optimizer state "
                             "stay float32; validation runs in float32): auto = where the device computes bf16 "
                             "natively (a GPU, or a CPU with AVX-512 BF16 / AMX)")
    args = parser.parse_args(argv)
    family = args.data == "family"
    args.bundle = args.bundle or (NEW_BUNDLE if family else DEFAULT_BUNDLE)
    args.run_dir = args.run_dir or RUNS / ("backbone16" if family else "backbone")
    k_weights = parse_k_weights(args.k_weights)
    task_weights = parse_family_weights(args.task_weights) if family else parse_task_weights(args.task_weights)
    command = " ".join(["python -m demo_core.train backbone", shlex.join(sys.argv[1:] if argv is None else argv)]).strip()
    if not (args.bundle / "tokenizer").is_dir():
        raise SystemExit(f"{args.bundle} has no tokenizer/ folder: the backbone trains on a bundle's tokenizer "
                         f"(second generation: python -m demo_core.train tokenizer)")

    from ..engine import choose_device

    accelerator = accelerator_for(args.device)
    processes, main_process = accelerator.num_processes, accelerator.is_main_process
    refuse_fsdp(accelerator, "backbone")
    per_process_batch(accelerator, args.batch)
    my_rows = rows(accelerator, args.batch)
    # one process: --device (default the best available: a GPU where there is one); several: each its own device
    device = choose_device(args.device)[0] if processes == 1 else process_device(accelerator, "cpu")
    mixed = autocast_dtype(args.autocast, torch.device(device))

    torch.manual_seed(args.seed)
    logger = process_logger(accelerator, args.run_dir, "backbone")
    tokenizer = load_tokenizer(args.bundle)
    fingerprint = tokenizer_fingerprint(args.bundle)
    vocab = Vocab(tokenizer.codebook_size, tokenizer.grid ** 2)
    config = BackboneConfig(hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                            intermediate_size=3 * args.hidden, max_positions=8 * tokenizer.grid ** 2)  # K <= 3
    model = build_backbone(config, vocab)
    if args.code_init == "codebook":       # resumed weights replace these below
        init_code_embeddings(model, tokenizer.codebook, seed=args.seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.95))
    step, elapsed, warm_from = 0, 0.0, 0
    history: list = []
    checkpoint_path = args.run_dir / "checkpoint.pt"
    state = load_checkpoint(checkpoint_path)
    exported = args.bundle / "backbone" / "training.json"
    export_info = json.loads(exported.read_text()) if exported.exists() else None     # the bundle's export, if any
    same_codes = lambda record: record.get("codes_sha256_16") == fingerprint or (  # noqa: E731
        record.get("tokenizer_sha256_16") is not None and record.get("tokenizer_sha256_16") == legacy_fingerprint(args.bundle))
    if state is not None and not same_codes(state):
        logger.info(f"{checkpoint_path} was trained on other codes (another tokenizer): starting afresh")
        state = None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed = state["step"], state["elapsed"]
        history = state.get("history", [])
        logger.info(f"resumed from {checkpoint_path} at step {step}")
    elif export_info is not None and same_codes(export_info) and (
            not args.fresh or (export_info.get("args") or {}).get("code_init") == args.code_init):
        # --fresh refuses an export of the old init, not one this same recipe made (a new machine resumes it)
        from safetensors.torch import load_file

        model.load_state_dict(load_file(args.bundle / "backbone" / "model.safetensors"), strict=True)
        step, elapsed = int(export_info["step"]), float(export_info["elapsed_minutes"]) * 60
        history = export_info.get("history") or [{"command": export_info.get("command", "python -m demo_core.train backbone"),
                                                  "from_step": 0, "to_step": step}]
        warm_from = step   # optimizer moments were not saved with the export: re-warm the lr briefly
        logger.info(f"resumed from exported weights at step {step} (optimizer restarted, 100-step re-warm-up)")
    elif args.grow_from is not None:
        model, step, history = grown_start(model, args.grow_from, same_codes, logger)
    if not history or history[-1]["command"] != command:
        history.append({"command": command, "from_step": step, "to_step": step})
    model.to(device)
    forward, optimizer = accelerator.prepare(TrainingForward(model), optimizer)   # one process: unwrapped; several: DDP
    timer = Timer(elapsed)
    if processes > 1:
        logger.info(f"{processes} processes ({accelerator.distributed_type.name}, {accelerator.mixed_precision} mixed precision), "
                    f"global batch {args.batch}: {args.batch // processes} per process")
    logger.info(f"backbone {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, vocab {vocab.size}, "
                f"config {backbone_config_dict(config)}, args {vars(args)}")
    logger.info(f"training forward in {'bf16 autocast' if mixed else 'float32'} on {device}"
                f"{'' if args.autocast != 'auto' else ' (auto: native bf16 ' + ('found' if mixed else 'not found') + ')'}")
    rng = np.random.default_rng(args.seed + step)            # a fresh data stream after every resume
    generator = torch.Generator().manual_seed(args.seed + step)
    if family:
        from .curriculum import FamilyCurriculum, validation_groups
        from ..task_family import KINDS
        from .episodes import FRAMES_PER_EPISODE, EpisodePool

        with accelerator.main_process_first():    # the main process encodes and caches the pool, the others read it
            pool = EpisodePool(tokenizer, args.episodes, args.sequences, args.seed,
                               args.run_dir / f"episodes-{fingerprint}-{args.images}-{args.seed}.pt", pool=args.images,
                               logger=logger)
        curriculum = FamilyCurriculum(pool, k_weights, task_weights, args.sequence_share)
        validation_set = ValidationSet(validation_groups(tokenizer, pool=args.images)) if args.validate_every > 0 else None
        tasks, name = list(KINDS), "retouch-16"
        extra = {"max_frames": FRAMES_PER_EPISODE - 1}     # the longest sequences it trained on
    else:
        from .five_tasks import FiveTaskCurriculum, TokenPool, validation_groups

        with accelerator.main_process_first():
            pool = TokenPool(tokenizer, args.pool, args.seed, args.run_dir / f"pool-{fingerprint}-{args.pool}-{args.seed}.pt",
                             logger) if args.pool else None
        sampler = ExampleSampler("train", tokenizer.image_size, args.seed + step)
        curriculum = FiveTaskCurriculum(pool, tokenizer, sampler, k_weights, task_weights)
        validation_set = ValidationSet(validation_groups(tokenizer)) if args.validate_every > 0 else None
        tasks, name, extra = list(TASKS), "retouch-tiny", None
    validation = None

    def validate():       # the main process validates (the same numbers as one process); the others wait for it
        result = validation_set.evaluate(model, vocab) if main_process else None
        accelerator.wait_for_everyone()
        return result

    if validation_set is not None and step >= args.validate_every and step < args.steps:   # a resumed run: where it starts from, on its later yardstick
        validation = validate()
        logger.info(f"step {step} validation {json.dumps(validation)}")
    last_save = time.time()

    def checkpoint():       # the unwrapped weights and optimizer state, and the step: resumable with any process count
        history[-1]["to_step"] = step
        accelerator.wait_for_everyone()
        if main_process:
            save_checkpoint(checkpoint_path, {"model": unwrapped_state(accelerator, model), "optimizer": optimizer.state_dict(),
                                              "step": step, "elapsed": timer.elapsed, "codes_sha256_16": fingerprint,
                                              "history": history})
            export(model, vocab, config, args.bundle, step, timer.elapsed, args, validation, fingerprint, tokenizer, history,
                   tasks=tasks, name=name, extra=extra, dtype=torch.float16 if family else torch.float32)
        accelerator.wait_for_everyone()

    stop = []   # SIGTERM / Ctrl-C: finish the step, checkpoint, export, exit
    previous_handlers = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous_handlers[signum] = signal.signal(signum, lambda *_: stop.append(True))
    model.train()
    bar = tqdm(total=args.steps, initial=step, desc="backbone", dynamic_ncols=True, mininterval=30, disable=not main_process)
    halt = stop if processes == 1 else []       # several processes stop together, at a step they agreed on
    while step < args.steps and not halt:
        lr = leg_lr(step, args)
        if warm_from and step - warm_from < 100:
            lr *= (step - warm_from + 1) / 100
        set_lr(optimizer, lr)
        batch = curriculum.batch(args.batch, rng)
        context, answer = batch.context, batch.answer
        # every process draws the same global batch (and the same random choices below); each trains on its rows
        model.eval()
        with autocast(torch.device(device), mixed):
            tf_codes = teacher_forcing_codes(model, vocab, context, answer, generator, accelerator)
        drafts = None
        drafted = torch.rand(args.batch, generator=generator) < args.draft_negatives
        if drafted.any():
            drafts = torch.full_like(answer, -1)
            if processes == 1:
                drafts[drafted] = model_drafts(model, vocab, context[drafted], generator)[0]
            else:           # the drafted examples split between the processes, each from its own stream, gathered once
                draft_generator = torch.Generator(device=device).manual_seed(process_seed(args.seed, step, accelerator.process_index))
                indices = drafted.nonzero()[:, 0].tolist()
                drafts[drafted] = torch.stack(sharded_map(accelerator, indices, lambda mine: list(
                    model_drafts(model, vocab, context[mine], draft_generator)[0])))
        model.train()
        target_cells: list = []
        ids, pos, gen_t, q_t, tail = build_batch(vocab, context, answer, tf_codes, generator, args.max_refine, drafts=drafts,
                                                 cells_out=target_cells)
        gen_weights = change_weights(context, answer, target_cells[0], args.change_weight) if args.change_weight != 1.0 else None
        quality_weights = None
        if drafts is not None and args.draft_quality != 1.0:
            quality_weights = torch.ones(q_t.shape)
            quality_weights[drafted, : answer.shape[1]] = args.draft_quality   # the draft segment; refinements keep 1
        if processes > 1:   # this process's rows of the global batch
            ids, pos, gen_t, q_t = (t[my_rows] for t in (ids, pos, gen_t, q_t))
            quality_weights = None if quality_weights is None else quality_weights[my_rows]
            gen_weights = None if gen_weights is None else gen_weights[my_rows]
        # batches are built on the CPU; the step runs on the process's device (a no-op on the CPU)
        ids, pos, gen_t, q_t = (t.to(device) for t in (ids, pos, gen_t, q_t))
        quality_weights = None if quality_weights is None else quality_weights.to(device)
        gen_weights = None if gen_weights is None else gen_weights.to(device)
        context_loss = None
        with autocast(torch.device(device), mixed):          # the losses themselves are taken in float32
            if args.context_loss > 0:
                gen_loss, quality_loss, gen_accuracy, _, context_loss = losses(
                    model, vocab, ids, pos, gen_t, q_t, tail, quality_weights, output_rows(batch.shape, vocab.cells).to(device),
                    forward=forward, gen_weights=gen_weights)
                loss = gen_loss + quality_loss + args.context_loss * context_loss
            else:
                gen_loss, quality_loss, gen_accuracy, _ = losses(model, vocab, ids, pos, gen_t, q_t, tail, quality_weights,
                                                                 forward=forward, gen_weights=gen_weights)
                loss = gen_loss + quality_loss
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        if processes > 1 and any_process(accelerator, bool(stop)):   # a signal to any process stops them all
            halt.append(True)
        if processes > 1:   # the logs: means over the processes' equal shards, the global batch's values
            gen_loss, quality_loss, gen_accuracy = (mean_across(accelerator, v) for v in (gen_loss, quality_loss, gen_accuracy))
            context_loss = None if context_loss is None else mean_across(accelerator, context_loss)
        bar.update(1)
        bar.set_postfix(gen=f"{gen_loss.item():.3f}", q=f"{quality_loss.item():.3f}", acc=f"{gen_accuracy.item():.3f}")
        if step % args.log_every == 0:
            context_text = f" context {context_loss.item():.4f}" if context_loss is not None else ""
            logger.info(f"step {step} {batch.shape} gen {gen_loss.item():.4f} quality {quality_loss.item():.4f}{context_text} "
                        f"acc {gen_accuracy.item():.3f} lr {lr:.2e} tokens {ids.numel() * processes} elapsed {timer.elapsed / 60:.1f}m")
        if validation_set is not None and (step % args.validate_every == 0 or step == args.steps):
            validation = validate()
            logger.info(f"step {step} validation {json.dumps(validation)}")
        if any_process(accelerator, time.time() - last_save > args.checkpoint_minutes * 60) or step == args.steps:
            checkpoint()
            last_save = time.time()
    bar.close()
    for signum, handler in previous_handlers.items():
        signal.signal(signum, handler)
    checkpoint()
    logger.info("stopped by signal" if halt else "done")
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
