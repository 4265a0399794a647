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
- generation order raster or random (half each), so any cell can be (re)generated.

    nohup nice -n 5 python -m demo_core.train backbone > runs/backbone.out 2>&1 &

Resumes from runs/backbone/checkpoint.pt, else from the weights exported in the bundle
(`backbone/training.json` records the step), so a run can span sessions.
"""
from __future__ import annotations

import argparse
import hashlib
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

from ..backbone import BackboneConfig, SamplingConfig, backbone_config_dict, build_backbone, sample_from_logits
from ..drafts.scan_form import draft_scan
from ..token_metrics import auroc
from ..sequence import Vocab, answer_positions, interleave_answer
from ..tasks import TASKS, ExampleSampler
from .common import DEFAULT_BUNDLE, RUNS, Timer, cosine_lr, load_checkpoint, save_checkpoint, set_lr, setup_logging, write_json

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
    from diffusers import VQModel

    from ..bundle import bundle_pixel_range
    from ..tokenizer import VQTokenizer

    return VQTokenizer(VQModel.from_pretrained(bundle / "tokenizer"), pixel_range=bundle_pixel_range(bundle))


def tokenizer_fingerprint(bundle: Path) -> str:
    return hashlib.sha256((bundle / "tokenizer" / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()[:16]


def encode_examples(tokenizer, examples) -> tuple[torch.Tensor, torch.Tensor]:
    """Examples with equal K -> context codes (B, (2K+1)N) and answer codes (B, N)."""
    images = []
    for example in examples:
        for x, y in example.pairs:
            images += [x, y]
        images += [example.query, example.answer]
    codes = tokenizer.encode(np.stack(images)).view(len(examples), -1, tokenizer.grid ** 2)  # (B, 2K+2, N)
    return codes[:, :-1].reshape(len(examples), -1), codes[:, -1]


VIEWS = ("photo", "colorization:x", "inpainting:x", "edges:y", "posterize:y", "invert:y")
# (x view, y view) of each task in terms of VIEWS
TASK_VIEWS = {"colorization": ("colorization:x", "photo"), "inpainting": ("inpainting:x", "photo"),
              "edges": ("photo", "edges:y"), "posterize": ("photo", "posterize:y"), "invert": ("photo", "invert:y")}


class TokenPool:
    """Pre-tokenized training images: for each of `size` random crops, the codes of the photo and of
    every task's non-photo side. Examples are then drawn from the pool for free, instead of
    VQ-encoding ~100 images per step (a third of a step's time). Cached under runs/ by tokenizer."""

    def __init__(self, tokenizer, size: int, seed: int, cache: Path | None = None, logger=None):
        if cache is not None and cache.exists():
            self.codes = torch.load(cache, weights_only=True)
            return
        from ..data import ImageSampler

        images = ImageSampler("train", tokenizer.image_size, seed + 17)
        rng = np.random.default_rng(seed + 23)
        chunks, batch = [], 128
        for start in tqdm(range(0, size, batch), desc="token pool", dynamic_ncols=True):
            views = []
            for _ in range(min(batch, size - start)):
                photo = images.sample()
                views += [photo, TASKS["colorization"].transform(photo, rng)[0], TASKS["inpainting"].transform(photo, rng)[0],
                          TASKS["edges"].transform(photo, rng)[1], TASKS["posterize"].transform(photo, rng)[1],
                          TASKS["invert"].transform(photo, rng)[1]]
            chunks.append(tokenizer.encode(np.stack(views)).view(-1, len(VIEWS), tokenizer.grid ** 2).to(torch.int16))
        self.codes = torch.cat(chunks)                                   # (size, views, N)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save(self.codes, cache)
        if logger:
            logger.info(f"token pool: {len(self.codes)} crops x {len(VIEWS)} views")

    def batch(self, count: int, k: int, rng: np.random.Generator, tasks=tuple(TASKS),
              weights: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """count examples of K=k pairs (one random task per example, drawn with `weights`; images never
        repeated within one) -> context codes (B, (2k+1)N), answer codes (B, N)."""
        contexts, answers = [], []
        for _ in range(count):
            x_view, y_view = (VIEWS.index(v) for v in TASK_VIEWS[tasks[int(rng.choice(len(tasks), p=weights))]])
            rows = rng.choice(len(self.codes), size=k + 1, replace=False)
            parts = []
            for row in rows[:-1]:
                parts += [self.codes[row, x_view], self.codes[row, y_view]]
            parts.append(self.codes[rows[-1], x_view])
            contexts.append(torch.cat(parts))
            answers.append(self.codes[rows[-1], y_view])
        return torch.stack(contexts).long(), torch.stack(answers).long()


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
                drafts: torch.Tensor | None = None):
    """Token ids, position ids and targets for one batch (all examples share K, so no padding).

    `drafts` (B, N), -1 where absent: examples with a draft take it whole as their answer inputs, in raster order.

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
    quality_targets = (all_codes == gen_targets).long()     # 1 = good
    return input_ids, position_ids, gen_targets, quality_targets, tail.shape[1]


def losses(model, vocab: Vocab, input_ids, position_ids, gen_targets, quality_targets, tail: int,
           quality_weights: torch.Tensor | None = None):
    """Generation and quality cross-entropies over the answer tail; `quality_weights` (B, N+R) weighs each
    code token's quality term (a weighted mean; None: all 1)."""
    # an explicit mask + no cache: cell-aligned (non-consecutive) position ids must never be read as packed sequences
    logits = model(input_ids=input_ids, position_ids=position_ids, attention_mask=torch.ones_like(input_ids),
                   use_cache=False, logits_to_keep=tail).logits   # (B, tail, V)
    at_logits = logits[:, 0::2, : vocab.codebook_size]
    code_logits = logits[:, 1::2]
    quality_logits = torch.stack([code_logits[..., vocab.bad], code_logits[..., vocab.good]], -1)   # class 1 = good
    gen_loss = F.cross_entropy(at_logits.reshape(-1, vocab.codebook_size).float(), gen_targets.reshape(-1))
    if quality_weights is None:
        quality_loss = F.cross_entropy(quality_logits.reshape(-1, 2).float(), quality_targets.reshape(-1))
    else:
        per_token = F.cross_entropy(quality_logits.reshape(-1, 2).float(), quality_targets.reshape(-1), reduction="none")
        weights = quality_weights.reshape(-1).float()
        quality_loss = (per_token * weights).sum() / weights.sum().clamp_min(1e-6)
    gen_accuracy = (at_logits.argmax(-1) == gen_targets).float().mean()
    return gen_loss, quality_loss, gen_accuracy, quality_logits


def model_drafts(model, vocab: Vocab, context: torch.Tensor, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Free-running drafts of every context (raster, the production sampler, KV-cached): codes (B, N) and the
    quality head's scores for them (B, N): p(<good>) alone, the part of the engine's score training shapes."""
    states = []
    for _ in draft_scan(model, vocab, context, SamplingConfig(top_p=0.9), generator, state_out=states, score="head"):
        pass
    return states[0].codes.cpu(), states[0].scores.float().cpu()


@torch.no_grad()
def teacher_forcing_codes(model, vocab: Vocab, context, answer, generator) -> torch.Tensor:
    """Sample every cell from the model's teacher-forced prediction (raster, clean answer): SCAN's third negative."""
    batch, cells = answer.shape
    order = torch.arange(cells)[None].repeat(batch, 1)
    tail = interleave_answer(vocab, order, answer)
    input_ids = torch.cat([context, tail], 1)
    positions = torch.cat([torch.arange(context.shape[1])[None].repeat(batch, 1), answer_positions(context.shape[1], order)], 1)
    logits = model(input_ids=input_ids, position_ids=positions, attention_mask=torch.ones_like(input_ids), use_cache=False,
                   logits_to_keep=tail.shape[1]).logits[:, 0::2, : vocab.codebook_size]
    # the production sampler (top-p 0.9), so these negatives look like the errors real drafts make
    codes = sample_from_logits(logits.reshape(-1, vocab.codebook_size), SamplingConfig(top_p=0.9), generator)
    return codes.view(batch, cells)


class ValidationSet:
    """Fixed held-out examples (validation source images), encoded once."""

    def __init__(self, tokenizer, count: int = 96, seed: int = 1234):
        sampler = ExampleSampler("val", tokenizer.image_size, seed)
        self.groups = []   # (task names, context, answer) grouped by K
        for k in (1, 2, 3):
            examples = [sampler.sample(task=list(TASKS)[i % len(TASKS)], k=k) for i in range(count // 3)]
            context, answer = encode_examples(tokenizer, examples)
            self.groups.append(([e.task for e in examples], context, answer))

    @torch.no_grad()
    def evaluate(self, model, vocab: Vocab) -> dict:
        """Teacher-forced token accuracy per task (clean answers), quality AUROC (answers with r=0.25 negatives),
        and on free-running drafts: token accuracy and the AUROC of the draft's own scores, per task."""
        model.eval()
        generator = torch.Generator().manual_seed(0)
        correct: dict[str, list] = {}
        quality_scores, quality_labels = [], []
        draft_hits: dict[str, list] = {}
        draft_scores: dict[str, list] = {}
        for tasks, context, answer in self.groups:
            codes, scores = model_drafts(model, vocab, context, generator)
            for task, row_codes, row_scores, truth in zip(tasks, codes, scores, answer):
                draft_hits.setdefault(task, []).append((row_codes == truth).numpy())
                draft_scores.setdefault(task, []).append(row_scores.numpy())
            ids, pos, gen_t, q_t, tail = build_batch(vocab, context, answer, None, generator, max_refine=0,
                                                     negative_ratio=(0.0, 0.0), random_order_share=0.0)
            logits = model(input_ids=ids, position_ids=pos, attention_mask=torch.ones_like(ids), use_cache=False,
                           logits_to_keep=tail).logits
            hits = (logits[:, 0::2, : vocab.codebook_size].argmax(-1) == gen_t).float().mean(1)
            for task, hit in zip(tasks, hits.tolist()):
                correct.setdefault(task, []).append(hit)
            tf = teacher_forcing_codes(model, vocab, context, answer, generator)
            ids, pos, gen_t, q_t, tail = build_batch(vocab, context, answer, tf, generator, max_refine=8,
                                                     negative_ratio=(0.25, 0.25))
            _, _, _, q_logits = losses(model, vocab, ids, pos, gen_t, q_t, tail)
            quality_scores.append(torch.softmax(q_logits.float(), -1)[..., 1].flatten().numpy())
            quality_labels.append(q_t.flatten().numpy())
        model.train()
        per_task = {task: float(np.mean(v)) for task, v in correct.items()}
        draft_auroc = {task: auroc(np.concatenate(draft_scores[task]), np.concatenate(hits).astype(int))
                       for task, hits in draft_hits.items()}
        return {"token_accuracy": float(np.mean([h for v in correct.values() for h in v])), "per_task": per_task,
                "quality_auroc": auroc(np.concatenate(quality_scores), np.concatenate(quality_labels)),
                "draft_accuracy": {task: float(np.mean(hits)) for task, hits in draft_hits.items()},
                "draft_auroc": draft_auroc}


def export(model, vocab: Vocab, config: BackboneConfig, bundle: Path, step: int, elapsed: float, args, validation: dict | None,
           fingerprint: str, tokenizer=None, history: list | None = None) -> None:
    """Write backbone/ (+ training.json) and (re)write bundle.json, keeping parts other trainers listed.

    `history`: one entry per run that trained these weights (command, first and last step), oldest first."""
    from ..bundle import manifest

    out = bundle / "backbone"
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        manifest_path = bundle / "bundle.json"
        old_parts = json.loads(manifest_path.read_text()).get("parts", {}) if manifest_path.exists() else {}
        info = manifest(tokenizer, model, name="retouch-tiny", tasks=list(TASKS))
        info["parts"] = {**old_parts, **info["parts"]}
        write_json(manifest_path, info)
    history = history or [{"command": "python -m demo_core.train backbone", "from_step": 0, "to_step": step}]
    write_json(out / "training.json", {"step": step, "elapsed_minutes": round(elapsed / 60, 1),
                                       "command": history[-1]["command"], "history": history,
                                       "tokenizer_sha256_16": fingerprint,
                                       "config": backbone_config_dict(config), "vocab": vocab.to_dict(),
                                       "args": {k: str(v) for k, v in vars(args).items()}, "validation": validation})


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m demo_core.train backbone", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--max-refine", type=int, default=16, help="longest appended refinement segment (pairs)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    parser.add_argument("--run-dir", type=Path, default=RUNS / "backbone")
    parser.add_argument("--validate-every", type=int, default=500)
    parser.add_argument("--checkpoint-minutes", type=float, default=5.0)
    parser.add_argument("--pool", type=int, default=6000, help="pre-tokenized training crops (0: encode every batch afresh)")
    parser.add_argument("--task-weights", default="", help="relative task frequencies, e.g. 'edges=2,posterize=2' (others 1)")
    parser.add_argument("--k-weights", default="1,1,1", help="relative frequencies of K = 1, 2, 3 demonstration pairs")
    parser.add_argument("--draft-negatives", type=float, default=0.0,
                        help="share of examples whose answer inputs are the model's own free-running draft")
    parser.add_argument("--draft-quality", type=float, default=1.0,
                        help="weight of the quality loss on a drafted answer's own tokens (0: drafts train generation only)")
    args = parser.parse_args(argv)
    task_weights, k_weights = parse_task_weights(args.task_weights), parse_k_weights(args.k_weights)
    command = " ".join(["python -m demo_core.train backbone", shlex.join(sys.argv[1:] if argv is None else argv)]).strip()

    torch.manual_seed(args.seed)
    logger = setup_logging(args.run_dir, "backbone")
    tokenizer = load_tokenizer(args.bundle)
    fingerprint = tokenizer_fingerprint(args.bundle)
    vocab = Vocab(tokenizer.codebook_size, tokenizer.grid ** 2)
    config = BackboneConfig(hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                            intermediate_size=3 * args.hidden)
    model = build_backbone(config, vocab)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.95))
    step, elapsed, warm_from = 0, 0.0, 0
    history: list = []
    checkpoint_path = args.run_dir / "checkpoint.pt"
    state = load_checkpoint(checkpoint_path)
    exported = args.bundle / "backbone" / "training.json"
    if state is not None and state.get("tokenizer_sha256_16", fingerprint) != fingerprint:
        logger.info(f"{checkpoint_path} was trained on another tokenizer: starting afresh")
        state = None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed = state["step"], state["elapsed"]
        history = state.get("history", [])
        logger.info(f"resumed from {checkpoint_path} at step {step}")
    elif exported.exists() and json.loads(exported.read_text()).get("tokenizer_sha256_16") == fingerprint:
        from safetensors.torch import load_file

        info = json.loads(exported.read_text())
        model.load_state_dict(load_file(args.bundle / "backbone" / "model.safetensors"), strict=True)
        step, elapsed = int(info["step"]), float(info["elapsed_minutes"]) * 60
        history = info.get("history") or [{"command": info.get("command", "python -m demo_core.train backbone"),
                                           "from_step": 0, "to_step": step}]
        warm_from = step   # optimizer moments were not saved with the export: re-warm the lr briefly
        logger.info(f"resumed from exported weights at step {step} (optimizer restarted, 100-step re-warm-up)")
    if not history or history[-1]["command"] != command:
        history.append({"command": command, "from_step": step, "to_step": step})
    timer = Timer(elapsed)
    logger.info(f"backbone {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, vocab {vocab.size}, "
                f"config {backbone_config_dict(config)}, args {vars(args)}")
    sampler = ExampleSampler("train", tokenizer.image_size, args.seed + step)
    generator = torch.Generator().manual_seed(args.seed + step)
    pool = None
    if args.pool:
        pool = TokenPool(tokenizer, args.pool, args.seed, args.run_dir / f"pool-{fingerprint}-{args.pool}-{args.seed}.pt", logger)
    validation_set = ValidationSet(tokenizer)
    validation = None
    if step and step < args.steps:     # a resumed run: where it starts from, on the same yardstick as its later validations
        validation = validation_set.evaluate(model, vocab)
        logger.info(f"step {step} validation {json.dumps(validation)}")
    last_save = time.time()

    def checkpoint():
        history[-1]["to_step"] = step
        save_checkpoint(checkpoint_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                          "step": step, "elapsed": timer.elapsed, "tokenizer_sha256_16": fingerprint,
                                          "history": history})
        export(model, vocab, config, args.bundle, step, timer.elapsed, args, validation, fingerprint, tokenizer, history)

    stop = []   # SIGTERM / Ctrl-C: finish the step, checkpoint, export, exit
    previous_handlers = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous_handlers[signum] = signal.signal(signum, lambda *_: stop.append(True))
    model.train()
    bar = tqdm(total=args.steps, initial=step, desc="backbone", dynamic_ncols=True)
    while step < args.steps and not stop:
        lr = cosine_lr(step, args.steps, args.lr, args.warmup)
        if warm_from and step - warm_from < 100:
            lr *= (step - warm_from + 1) / 100
        set_lr(optimizer, lr)
        k = int(sampler.rng.choice([1, 2, 3], p=k_weights))
        if pool is not None:
            context, answer = pool.batch(args.batch, k, sampler.rng, weights=task_weights)
        else:
            tasks = sampler.rng.choice(list(TASKS), size=args.batch, p=task_weights)
            context, answer = encode_examples(tokenizer, [sampler.sample(task=str(t), k=k) for t in tasks])
        model.eval()
        tf_codes = teacher_forcing_codes(model, vocab, context, answer, generator)
        drafts = None
        drafted = torch.rand(args.batch, generator=generator) < args.draft_negatives
        if drafted.any():
            drafts = torch.full_like(answer, -1)
            drafts[drafted] = model_drafts(model, vocab, context[drafted], generator)[0]
        model.train()
        ids, pos, gen_t, q_t, tail = build_batch(vocab, context, answer, tf_codes, generator, args.max_refine, drafts=drafts)
        quality_weights = None
        if drafts is not None and args.draft_quality != 1.0:
            quality_weights = torch.ones(q_t.shape)
            quality_weights[drafted, : answer.shape[1]] = args.draft_quality   # the draft segment; refinements keep 1
        gen_loss, quality_loss, gen_accuracy, _ = losses(model, vocab, ids, pos, gen_t, q_t, tail, quality_weights)
        loss = gen_loss + quality_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        bar.update(1)
        bar.set_postfix(gen=f"{gen_loss.item():.3f}", q=f"{quality_loss.item():.3f}", acc=f"{gen_accuracy.item():.3f}")
        if step % 25 == 0:
            logger.info(f"step {step} k {k} gen {gen_loss.item():.4f} quality {quality_loss.item():.4f} "
                        f"acc {gen_accuracy.item():.3f} lr {lr:.2e} elapsed {timer.elapsed / 60:.1f}m")
        if step % args.validate_every == 0 or step == args.steps:
            validation = validation_set.evaluate(model, vocab)
            logger.info(f"step {step} validation {json.dumps(validation)}")
        if time.time() - last_save > args.checkpoint_minutes * 60 or step == args.steps:
            checkpoint()
            last_save = time.time()
    bar.close()
    for signum, handler in previous_handlers.items():
        signal.signal(signum, handler)
    checkpoint()
    logger.info("stopped by signal" if stop else "done")


if __name__ == "__main__":
    main()
