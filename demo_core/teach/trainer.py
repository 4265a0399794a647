"""Teaching: a LoRA adapter trained on a few of the user's pairs, the backbone frozen.

Examples are leave-one-out in-context prompts built from the pairs alone: each pair in turn is the query
(its answer the target), K of the others (K drawn in 1..min(3, n-1)) its demonstrations, in LVM's layout
`[x1, y1, ..., xK, yK, xq]`. With `flips`, every example is also seen mirrored (the whole example, so the
task is unchanged for any flip-equivariant edit). The loss is the backbone trainer's own SCAN-form loss
(`train.backbone.build_batch` + `losses`: generation at every <at_n>, quality at every code with SCAN's
negatives and a refinement segment), so the adapter also keeps the quality head calibrated on the new
task. AdamW on the adapter's down and up projections only; `backward(inputs=...)` never touches the backbone's gradients,
and its weights are never written (tests hash them).

    adapter = teach(engine, pairs, TeachConfig(steps=200), progress=print)
    engine.run(pairs, query, adapter=adapter)
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from ..images import load_square
from .adapter import TARGETS, TaskAdapter, applied
from .pairs import MAX_PAIRS, MIN_PAIRS

# measured: 20 pairs of the embedded default (64x64, 8x8 codes) at batch 8 on 2 shared AMD EPYC cores (README, Teach)
DEFAULT_STEPS = 80


@dataclass
class TeachConfig:
    steps: int = DEFAULT_STEPS      # about two minutes for 20 pairs on two CPU cores with the embedded default
    batch_size: int = 4             # examples per step (one K per step, so no padding)
    learning_rate: float = 3e-3     # LoRA takes a larger rate than full fine-tuning
    warmup: int = 10                # steps of linear warm-up, then cosine to 10 %
    rank: int = 8                   # LoRA r
    alpha: float = 16.0             # LoRA alpha (scale alpha / r)
    targets: tuple[str, ...] = TARGETS  # projections of every layer that get a LoRA pair (attention + MLP)
    max_demonstrations: int = 3     # K <= min(this, n - 1, the model's max_pairs)
    flips: bool = True              # also every example mirrored left-right
    max_refine: int = 8             # longest appended SCAN refinement segment (pairs)
    seed: int = 0


@dataclass
class TeachStep:
    step: int                       # 1-based
    steps: int
    loss: float                     # generation + quality
    generation_loss: float
    quality_loss: float
    accuracy: float                 # teacher-forced token accuracy of the batch
    seconds: float                  # since teaching started


def check_pairs(pairs: Sequence) -> None:
    if len(pairs) < MIN_PAIRS:
        raise ValueError(f"teaching needs at least {MIN_PAIRS} pairs, got {len(pairs)}")
    if len(pairs) > MAX_PAIRS:
        raise ValueError(f"teaching takes at most {MAX_PAIRS} pairs, got {len(pairs)}")


def as_pair(pair) -> tuple:
    """A `pairs.NamedPair` or an (input, answer) tuple -> (input, answer)."""
    return (pair.input, pair.answer) if hasattr(pair, "answer") else tuple(pair)


@torch.no_grad()
def encode_pairs(engine, pairs: Sequence, flips: bool = True) -> torch.Tensor:
    """(input, answer) images -> codes (V, P, 2, N): V = 2 views with flips (as given, mirrored), else 1."""
    images = [(load_square(x, engine.image_size, "pair input"), load_square(y, engine.image_size, "pair answer"))
              for x, y in (as_pair(p) for p in pairs)]
    views = [images]
    if flips:
        views.append([tuple(image.transpose(0) for image in pair) for pair in images])   # 0: FLIP_LEFT_RIGHT
    flat = [image for view in views for pair in view for image in pair]
    codes = engine.tokenizer.encode(flat).view(len(views), len(images), 2, -1).cpu().long()
    return codes


def example_batch(codes: torch.Tensor, k: int, batch_size: int, rng: np.random.Generator):
    """Leave-one-out examples: context (B, (2k+1)N) and answer (B, N) codes; queries cycle through a shuffled order."""
    views, count = codes.shape[:2]
    queries = rng.permutation(np.resize(rng.permutation(count), batch_size))
    contexts, answers = [], []
    for query in queries:
        others = [i for i in range(count) if i != query]
        demos = rng.choice(others, size=k, replace=False)
        view = codes[int(rng.integers(views))]
        parts = [view[d, side] for d in demos for side in (0, 1)] + [view[query, 0]]
        contexts.append(torch.cat(parts))
        answers.append(view[query, 1])
    return torch.stack(contexts), torch.stack(answers)


def max_demonstrations(engine, count: int, config: TeachConfig) -> int:
    return max(1, min(config.max_demonstrations, count - 1, engine.max_pairs))


def new_adapter(engine, config: TeachConfig | None = None) -> TaskAdapter:
    config = config or TeachConfig()
    return TaskAdapter.for_backbone(engine.model, base_name=str(engine.bundle.info.get("name", "")), rank=config.rank,
                                    alpha=config.alpha, targets=config.targets, seed=config.seed)


def teach_steps(engine, pairs: Sequence, adapter: TaskAdapter, config: TeachConfig | None = None,
                codes: torch.Tensor | None = None, accelerator=None) -> Iterator[TeachStep]:
    """Train `adapter` in place on `pairs`, yielding a TeachStep after every optimiser step (stop by not asking
    for more). The adapter is applied only inside each step, under the backbone's lock (never across a yield).

    `accelerator` (train/distributed.py; `accelerate launch` of the teach CLI): every process builds the same
    global batch and trains on its rows; the adapter's gradients are averaged across processes (accelerate's
    reduce), so every process takes the same step and the result equals one process on the whole batch."""
    from ..train.backbone import build_batch, losses, teacher_forcing_codes
    from ..train.common import cosine_lr, set_lr

    config = config or TeachConfig()
    check_pairs(pairs)
    engine.check_adapter(adapter)
    model, vocab = engine.model, engine.vocab
    device = next(model.parameters()).device
    codes = encode_pairs(engine, pairs, config.flips) if codes is None else codes
    k_max = max_demonstrations(engine, codes.shape[1], config)
    rng = np.random.default_rng(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    params = list(adapter.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, betas=(0.9, 0.99), weight_decay=0.0)
    shard = None
    if accelerator is not None and accelerator.num_processes > 1:
        from ..train.distributed import per_process_batch, rows

        per_process_batch(accelerator, config.batch_size)
        shard = rows(accelerator, config.batch_size)
    adapter.train()
    started = time.perf_counter()
    try:
        for step in range(config.steps):
            set_lr(optimizer, cosine_lr(step, config.steps, config.learning_rate, min(config.warmup, config.steps // 4)))
            k = int(rng.integers(1, k_max + 1))
            context, answer = example_batch(codes, k, config.batch_size, rng)
            with applied(model, adapter):
                tf_codes = teacher_forcing_codes(model, vocab, context, answer, generator)   # SCAN's third negative
                ids, pos, gen_t, q_t, tail = build_batch(vocab, context, answer, tf_codes, generator, config.max_refine)
                if shard is not None:                 # this process's rows of the global batch
                    ids, pos, gen_t, q_t = ids[shard], pos[shard], gen_t[shard], q_t[shard]
                gen_loss, quality_loss, accuracy, _ = losses(model, vocab, ids.to(device), pos.to(device),
                                                             gen_t.to(device), q_t.to(device), tail)
                loss = gen_loss + quality_loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward(inputs=params)          # the adapter's gradients only
                if shard is not None:
                    for param in params:              # equal shards: the mean of the shards' gradients is the batch's
                        param.grad = accelerator.reduce(param.grad.contiguous(), reduction="mean")
                    loss = accelerator.reduce(loss.detach(), reduction="mean")
                    gen_loss = accelerator.reduce(gen_loss.detach(), reduction="mean")
                    quality_loss = accelerator.reduce(quality_loss.detach(), reduction="mean")
                    accuracy = accelerator.reduce(accuracy.detach(), reduction="mean")
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
            yield TeachStep(step + 1, config.steps, loss.item(), gen_loss.item(), quality_loss.item(), accuracy.item(),
                            time.perf_counter() - started)
    finally:
        adapter.eval()
        optimizer.zero_grad(set_to_none=True)


def teach(engine, pairs: Sequence, config: TeachConfig | None = None, progress: Callable[[TeachStep], None] | None = None,
          stop: Callable[[], bool] | None = None, adapter: TaskAdapter | None = None, accelerator=None) -> TaskAdapter:
    """Teach a new adapter (or continue `adapter`) on `pairs`; `progress(step)` after every step, `stop()` ends early
    (with several processes every one must stop at the same step: only the CLI runs that way, without `stop`).

    Returns the adapter, with what was taught recorded in its config's `info`."""
    config = config or TeachConfig()
    adapter = adapter or new_adapter(engine, config)
    last = None
    for record in teach_steps(engine, pairs, adapter, config, accelerator=accelerator):
        last = record
        if progress is not None:
            progress(record)
        if stop is not None and stop():
            break
    if last is not None:
        adapter.config.info = {"steps": last.step, "pairs": len(pairs), "loss": round(last.loss, 4),
                               "seconds": round(last.seconds, 1)}
    return adapter


@torch.no_grad()
def pairs_loss(engine, adapter: TaskAdapter | None, pairs: Sequence | None = None, codes: torch.Tensor | None = None,
               k: int = 1) -> float:
    """A fixed yardstick: the generation loss on every pair as the query of the next k pairs (no negatives, raster)."""
    from ..train.backbone import build_batch, losses

    codes = encode_pairs(engine, pairs, flips=False) if codes is None else codes[:1]
    count = codes.shape[1]
    k = max(1, min(k, count - 1))
    view = codes[0]
    contexts = torch.stack([torch.cat([view[(q + 1 + j) % count, side] for j in range(k) for side in (0, 1)] + [view[q, 0]])
                            for q in range(count)])
    answers = view[:, 1]
    generator = torch.Generator().manual_seed(0)
    model, vocab = engine.model, engine.vocab
    device = next(model.parameters()).device
    ids, pos, gen_t, q_t, tail = build_batch(vocab, contexts, answers, None, generator, max_refine=0,
                                             negative_ratio=(0.0, 0.0), random_order_share=0.0)
    with applied(model, adapter):
        gen_loss, _, _, _ = losses(model, vocab, ids.to(device), pos.to(device), gen_t.to(device), q_t.to(device), tail)
    return float(gen_loss)
