"""Train TensorAR on the bundle's frozen backbone: input encoder, output decoder and LoRA (drafts/tensor.py).

    nohup nice -n 5 python -m demo_core.train tensor > runs/tensor.out 2>&1 &
    nohup nice -n 5 python -m demo_core.train tensor --control > runs/tensor-control.out 2>&1 &

Every example is [x1, y1, ..., xK, yK, xq] (K in 1..3, the bundle's tasks: the five tasks, or for a task-family
bundle such as retouch-16 its training kinds, parameters drawn per example, from the `data fetch` photos unless
`--pool builtin`) followed by the answer in LVM raster format. The input at answer index a is the window [y_a .. y_{a+k-1}] with tensor
noise on the overlapped slots j >= 1: `--noise self` (default) puts the model's own drafts there
(`self_draft_windows`, one extra no-grad pass per step, sampled like the studio: T = 1, top-p 0.9);
`--noise uniform` is the paper's discrete noise, slot j replaced by a uniform random code with
probability beta(j) (`--schedule`, exponential by default; beta(0) = 0, beta(k-1) = 1). The
uniform noise is what the first default was trained with; its drafts copied themselves (see
docs/training.md). Each output predicts the next window; the loss
is the paper's weighted sum over the k slots of each slot's cross-entropy (averaged over its valid
positions; `--slot-weights front`, the default, halves the weight per slot, `equal` is the plain sum),
padding past the answer's end ignored. Only the adapter trains; the backbone is checked
bit-identical at every export.

--control trains the paper's equal-steps control: the same LoRA budget with k = 1 (no encoder,
no decoder, no noise) on the same raster answers, into runs/tensor-control and <bundle>/tensor-control.

Resumes from <run-dir>/checkpoint.pt (adapter, optimizer, step, RNG seeds derive from the step);
exports <bundle>/tensor (config.json + model.safetensors + training.json) at every checkpoint and
lists it in bundle.json. Validation (fixed validation-split examples): teacher-forced accuracy per
slot, and greedy sliding drafts: token accuracy of each cell's first (coarse) and final prediction.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..backbone import SamplingConfig
from ..drafts.tensor import (SCHEDULES, TensorAdapter, TensorAR, add_tensor_noise, answer_windows,
                               draft_tensor, parameter_count, self_draft_windows, teacher_forced_logits)
from ..tasks import ExampleSampler
from .curriculum import encode_examples
from .common import DEFAULT_BUNDLE, RUNS, Timer, cosine_lr, load_checkpoint, save_checkpoint, set_lr, setup_logging, write_json  # noqa: F401
from .distributed import (accelerator_for, any_process, mean_across, per_process_batch, process_device,
                          process_logger, process_seed, refuse_fsdp, rows)
from .refiner import is_family_tasks, recipe_tasks, state_fingerprint

VALIDATION_SEED = 1234


@dataclass
class TensorTrainConfig:
    """One TensorAR (or control) run. Defaults: the paper's k = 4, exponential noise, 1-layer query transformer."""

    k: int = 4                      # window size (paper default 4; 1 = plain AR)
    schedule: str = "exponential"   # beta(j): exponential, linear, sine, sqrt
    schedule_rate: float = 3.0      # exponential only: beta = (e^(rate u) - 1) / (e^rate - 1)
    noise: str = "self"             # self: the model's own drafts in slots >= 1; uniform: the paper's beta(j) noise
    noise_top_p: float = 0.9        # self noise: drafts sampled at temperature 1 with this top-p (the studio's default)
    slot_weights: str = "front"     # the loss's weights over the k slots: front (halving per slot) or equal
    control: bool = False           # the paper's control: k = 1, LoRA only, same steps
    steps: int = 2000
    batch: int = 16                 # the backbone trainer's batch
    lr: float = 1e-3                # AdamW peak (adapter only)
    warmup: int = 100
    weight_decay: float = 0.01
    lora_rank: int = 16             # on q, k, v, o of every layer
    lora_alpha: float = 32.0
    heads: int = 8                  # query-transformer heads
    ffn_multiple: int = 2           # query-transformer FFN width / D
    decoder_multiple: int = 2       # output decoder MLP width / D
    seed: int = 0
    val_examples: int = 48          # validation examples (16 per K)

    def adapter_kwargs(self) -> dict:
        return dict(k=1 if self.control else self.k, heads=self.heads, ffn_multiple=self.ffn_multiple,
                    decoder_multiple=self.decoder_multiple, lora_rank=self.lora_rank, lora_alpha=self.lora_alpha,
                    schedule=self.schedule, schedule_rate=self.schedule_rate)


# -- batches and loss ----------------------------------------------------------------------------------

NOISES = ("self", "uniform", "none")
SLOT_WEIGHTS = ("front", "equal")


def slot_weights(k: int, kind: str = "front") -> torch.Tensor:
    """The paper's weighted sum over the k window slots, weights summing to k (the equal sum's scale).

    equal: 1 each. front: proportional to 2^-j. All k outputs come from one hidden state; with equal
    weights that state is pulled towards the average of k future tokens (measured: after 800 steps the
    front slot, whose prediction is the final token, had a higher loss than slots 1 and 2, and a
    quarter of the k = 1 control's accuracy), so the default weights the front slot most.
    """
    if kind not in SLOT_WEIGHTS:
        raise ValueError(f"unknown slot weights {kind!r}; choose from {', '.join(SLOT_WEIGHTS)}")
    weights = torch.ones(k) if kind == "equal" else 0.5 ** torch.arange(k, dtype=torch.float32)
    return weights * (k / weights.sum())


def build_batch(model: TensorAR, context: torch.Tensor, answer: torch.Tensor, generator: torch.Generator | None,
                noise: str = "self", top_p: float = 0.9) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """context (B, L), answer (B, N) -> context, input windows (B, N-1, k) noised, their valid mask, targets (B, N, k).

    Window w (answer index a = w) is [y_a .. y_{a+k-1}]; the last answer token is never an input.
    targets[:, s, j] = y_{s+j} (output s predicts the window over cells s .. s+k-1), -100 past the end.
    """
    if noise not in NOISES:
        raise ValueError(f"unknown tensor noise {noise!r}; choose from {', '.join(NOISES)}")
    adapter = model.adapter
    k = adapter.k
    windows, valid = answer_windows(answer, k)                                         # (B, N, k)
    targets = windows.masked_fill(~valid, -100)
    windows, valid = windows[:, :-1], valid[:, :-1]
    if noise == "uniform" and k > 1:
        windows = add_tensor_noise(windows, valid, adapter.beta(), adapter.codebook_size, generator)
    elif noise == "self" and k > 1:                  # the adapter has no dropout: train/eval mode changes nothing here
        windows = self_draft_windows(model, context, windows, valid, SamplingConfig(temperature=1.0, top_p=top_p), generator)
    return context, windows, valid, targets


def tensor_loss(model: TensorAR, context, windows, valid, targets, weights: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weighted sum (default: plain sum) over the k slots of each slot's mean cross-entropy over valid positions;
    also the per-slot losses and accuracies."""
    logits = teacher_forced_logits(model, context, windows, valid)[..., : model.codebook_size]   # (B, N, k, C)
    k = logits.shape[2]
    per_slot, accuracy = [], []
    for j in range(k):
        target = targets[:, :, j]
        keep = target >= 0
        per_slot.append(F.cross_entropy(logits[:, :, j].float().reshape(-1, logits.shape[-1]), target.reshape(-1),
                                        ignore_index=-100))
        accuracy.append((logits[:, :, j].argmax(-1) == target)[keep].float().mean())
    per_slot = torch.stack(per_slot)
    total = per_slot.sum() if weights is None else (per_slot * weights.to(per_slot.device)).sum()
    return total, per_slot.detach(), torch.stack(accuracy).detach()


# -- validation ------------------------------------------------------------------------------------------

def default_pool(tasks: tuple[str, ...]) -> str:
    """The image pool a bundle's adapter trains on when none is named: the Debian photos for a task family (what
    retouch-16 trained on), the packaged images for the five tasks (retouch-tiny's)."""
    return "debian" if is_family_tasks(tasks) else "builtin"


def example_sampler(split: str, image_size: int, seed: int, tasks: tuple[str, ...], pairs_range=(1, 3),
                    pool: str | None = None):
    """The examples the adapter trains (or validates) on: the five tasks (tasks.ExampleSampler) or, for a task-family
    bundle, task_family.FamilySampler over its training kinds, parameters drawn per example and shared by the pairs
    and the query. Both answer `.sample(task=name, k=K)`. pool None: default_pool(tasks)."""
    from ..task_family import FamilySampler

    pool = pool or default_pool(tasks)
    if is_family_tasks(tasks):
        return _FamilyExamples(FamilySampler(split, image_size, seed, kinds=tasks, pairs_range=pairs_range, pool=pool))
    return ExampleSampler(split, image_size, seed, tasks, pairs_range, pool=pool)


class _FamilyExamples:
    """FamilySampler behind ExampleSampler's `sample(task=, k=)` (its examples' `.task` is their kind), its rng
    exposed like ExampleSampler's."""

    def __init__(self, sampler):
        self.sampler, self.rng = sampler, sampler.rng

    def sample(self, task: str | None = None, k: int | None = None):
        return self.sampler.sample(kind=task, k=k)


class TensorValidation:
    """Fixed validation-split examples (equal K per group), encoded once."""

    def __init__(self, tokenizer, tasks: tuple[str, ...], count: int = 48, seed: int = VALIDATION_SEED, max_pairs: int = 3,
                 pool: str | None = None):
        self.groups = []
        ks = list(range(1, max(1, min(3, max_pairs)) + 1))
        for k in ks:
            sampler = example_sampler("val", tokenizer.image_size, seed + k, tasks, pool=pool)
            examples = [sampler.sample(task=tasks[i % len(tasks)], k=k) for i in range(max(1, count // len(ks)))]
            context, answer = encode_examples(tokenizer, examples)
            self.groups.append(([e.task for e in examples], context, answer))

    @torch.no_grad()
    def evaluate(self, model: TensorAR, noise: str = "self") -> dict:
        """Teacher-forced loss/accuracy per slot (clean and noised windows) and greedy sliding drafts (first vs final)."""
        greedy = SamplingConfig(temperature=0.0)
        generator = torch.Generator().manual_seed(0)
        slot_loss, slot_acc, slot_acc_clean = [], [], []
        hits: dict[str, dict[str, list]] = {}
        draft_seconds = 0.0
        for tasks, context, answer in self.groups:
            device = model.device
            context, answer = context.to(device), answer.to(device)
            batch = build_batch(model, context, answer, generator, noise=noise)
            _, per_slot, accuracy = tensor_loss(model, *batch)
            slot_loss.append(per_slot)
            slot_acc.append(accuracy)
            slot_acc_clean.append(tensor_loss(model, *build_batch(model, context, answer, None, noise="none"))[2])
            states = []
            start = time.perf_counter()
            for _ in draft_tensor(model, context, answer.shape[1], greedy, None, states):
                pass
            draft_seconds += time.perf_counter() - start
            draft = states[0]
            for row, task in enumerate(tasks):
                entry = hits.setdefault(task, {"final": [], "first": []})
                entry["final"].append((draft.codes[row] == answer[row]).float().mean().item())
                entry["first"].append((draft.first[row] == answer[row]).float().mean().item())
        examples = sum(len(group[0]) for group in self.groups)
        every = {key: float(np.mean([h for entry in hits.values() for h in entry[key]])) for key in ("final", "first")}
        return {"loss": torch.stack(slot_loss).mean(0).sum().item(),
                "slot_loss": torch.stack(slot_loss).mean(0).tolist(),
                "slot_accuracy_noised": torch.stack(slot_acc).mean(0).tolist(),
                "slot_accuracy_clean": torch.stack(slot_acc_clean).mean(0).tolist(),
                "draft_accuracy": every["final"], "first_prediction_accuracy": every["first"],
                "per_task": {task: {"draft_accuracy": float(np.mean(entry["final"])),
                                    "first_prediction_accuracy": float(np.mean(entry["first"]))} for task, entry in hits.items()},
                "draft_seconds_per_image": draft_seconds / max(1, examples), "examples": examples}


# -- training -------------------------------------------------------------------------------------------

def make_optimizer(adapter: TensorAdapter, config: TensorTrainConfig) -> torch.optim.Optimizer:
    decay = [p for p in adapter.parameters() if p.dim() >= 2]
    no_decay = [p for p in adapter.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.95))


class TensorLoss(torch.nn.Module):
    """tensor_loss as one module: what accelerate prepares, so DDP sees the adapter's every use inside the backbone."""

    def __init__(self, model: TensorAR):
        super().__init__()
        self.model = model

    def forward(self, context, windows, valid, targets, weights=None):
        return tensor_loss(self.model, context, windows, valid, targets, weights)


def train_step(model: TensorAR, optimizer, context, answer, generator, lr: float | None = None, noise: str = "self",
               top_p: float = 0.9, weights: str = "front", accelerator=None, forward=None) -> dict:
    """One optimizer step on a batch of (context, answer) codes; returns the scalar logs.

    With an `accelerator` (and `forward`, the TensorLoss it prepared): this process's rows of the global batch,
    the gradients averaged by DDP, the logs averaged over the processes."""
    if lr is not None:
        set_lr(optimizer, lr)
    model.backbone.requires_grad_(False)          # frozen: gradients flow through it to the adapter, never into it
    model.adapter.train()
    loss, per_slot, accuracy = (forward or TensorLoss(model))(*build_batch(model, context, answer, generator, noise, top_p),
                                                              slot_weights(model.k, weights))
    optimizer.zero_grad(set_to_none=True)
    if accelerator is None:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.adapter.parameters(), 1.0)
    else:
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.adapter.parameters(), 1.0)
    optimizer.step()
    model.adapter.eval()
    if accelerator is not None and accelerator.num_processes > 1:
        loss, per_slot, accuracy = (mean_across(accelerator, v) if v.dim() == 0 else
                                    torch.stack([mean_across(accelerator, x) for x in v]) for v in (loss, per_slot, accuracy))
    return {"loss": loss.item(), "slot_loss": per_slot.tolist(), "slot_accuracy": accuracy.tolist()}


def part_name(config: TensorTrainConfig) -> str:
    return "tensor_control" if config.control else "tensor"


def export(model: TensorAR, out: Path, bundle_folder: Path | None, config: TensorTrainConfig, step: int, elapsed: float,
           validation: dict | None, backbone_hash: str, command: str, history: list) -> None:
    """Save the adapter (config.json + model.safetensors), its training.json, and list it in bundle.json."""
    if state_fingerprint(model.backbone) != backbone_hash:
        raise RuntimeError("training changed the backbone's weights")
    model.adapter.save_pretrained(out)
    write_json(out / "training.json", {
        "step": step, "elapsed_minutes": round(elapsed / 60, 1), "command": command, "config": asdict(config),
        "adapter_config": dict(model.adapter._hub_mixin_config), "parameters": parameter_count(model.adapter),
        "backbone_sha256": backbone_hash, "backbone_unchanged": True, "validation": validation, "validation_history": history})
    if bundle_folder is not None and out.resolve().is_relative_to(bundle_folder.resolve()):
        info_path = bundle_folder / "bundle.json"
        info = json.loads(info_path.read_text())
        info.setdefault("parts", {})[part_name(config)] = out.resolve().relative_to(bundle_folder.resolve()).as_posix()
        write_json(info_path, info)


def train_tensor(bundle, config: TensorTrainConfig, run_dir: Path, out: Path, bundle_folder: Path | None = None,
                 validate_every: int = 250, checkpoint_minutes: float = 5.0, command: str = "", logger=None,
                 accelerator=None, pool: str | None = None) -> dict:
    """Train (or resume) the adapter for `config.steps` total steps; returns the last validation.

    Under P processes `config.batch` is the global batch: every process samples the same examples (from the step)
    and encodes, noises (self drafts: its own stream from (seed, step, process)) and trains on its rows of them."""
    if config.schedule not in SCHEDULES:
        raise ValueError(f"unknown noise schedule {config.schedule!r}; choose from {', '.join(SCHEDULES)}")
    if bundle.sequence_format != "scan":
        raise ValueError("TensorAR trains on the default bundle layout (tokenizer + backbone); this bundle is "
                         f"{bundle.sequence_format!r}")
    backbone, tokenizer, vocab = bundle.backbone, bundle.tokenizer, bundle.vocab
    accelerator = accelerator or accelerator_for(str(next(backbone.parameters()).device))
    processes, main_process = accelerator.num_processes, accelerator.is_main_process
    per_process_batch(accelerator, config.batch)
    refuse_fsdp(accelerator, "TensorAR")
    logger = logger or process_logger(accelerator, run_dir, part_name(config))
    backbone.eval().requires_grad_(False)
    backbone_hash = state_fingerprint(backbone)
    tasks = recipe_tasks(bundle)      # the five tasks, or a family bundle's training kinds (held-out ones stay out)
    max_k = max(1, min(3, bundle.max_pairs))

    torch.manual_seed(config.seed)
    adapter = TensorAdapter.for_backbone(backbone, vocab.codebook_size, **config.adapter_kwargs())
    model = TensorAR(backbone, adapter.to(next(backbone.parameters()).device).eval())
    optimizer = make_optimizer(adapter, config)
    step, elapsed, history, validation = 0, 0.0, [], None
    checkpoint_path = run_dir / "checkpoint.pt"
    state = load_checkpoint(checkpoint_path)
    if state is not None:
        if state["backbone_sha256"] != backbone_hash:
            raise SystemExit(f"{checkpoint_path} was trained on another backbone; move it away to start afresh")
        if state["adapter_config"] != dict(adapter._hub_mixin_config):
            raise SystemExit(f"{checkpoint_path} has another adapter shape {state['adapter_config']}; "
                             f"use another --run-dir or the same options")
        adapter.load_state_dict(state["adapter"], strict=True)
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed, history, validation = state["step"], state["elapsed"], state["history"], state["validation"]
        logger.info(f"resumed from {checkpoint_path} at step {step}")
    timer = Timer(elapsed)
    logger.info(f"{part_name(config)}: adapter {parameter_count(adapter):,} params "
                f"({parameter_count(adapter) * 4 / 2**20:.2f} MB float32) on a frozen {parameter_count(backbone):,}-param "
                f"backbone; beta {[round(b, 3) for b in adapter.beta().tolist()]}; tasks {', '.join(tasks)} ({pool or default_pool(tasks)} pool); config {asdict(config)}")
    backbone_ids = {id(p) for p in backbone.parameters()}
    assert not any(id(p) in backbone_ids for group in optimizer.param_groups for p in group["params"])

    sampler = example_sampler("train", tokenizer.image_size, config.seed + step, tasks, (1, max_k), pool)
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
    validation_set = TensorValidation(tokenizer, tasks, config.val_examples, max_pairs=max_k, pool=pool)
    last_save = time.time()

    forward, optimizer = accelerator.prepare(TensorLoss(model), optimizer)   # one process: as is; several: DDP

    def checkpoint():       # main process only: the unwrapped adapter, its optimizer state and the step
        accelerator.wait_for_everyone()
        if main_process:
            save_checkpoint(checkpoint_path, {"adapter": adapter.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                                              "elapsed": timer.elapsed, "history": history, "validation": validation,
                                              "backbone_sha256": backbone_hash, "adapter_config": dict(adapter._hub_mixin_config),
                                              "config": asdict(config)})
            export(model, out, bundle_folder, config, step, timer.elapsed, validation, backbone_hash, command, history)
        accelerator.wait_for_everyone()

    device = next(backbone.parameters()).device
    bar = tqdm(total=config.steps, initial=step, desc=part_name(config), dynamic_ncols=True, disable=not main_process)
    while step < config.steps:
        lr = cosine_lr(step, config.steps, config.lr, config.warmup)
        pairs = int(sampler.rng.integers(1, max_k + 1))
        examples = [sampler.sample(k=pairs) for _ in range(config.batch)]      # the global batch, on every process
        if processes == 1:
            context, answer = encode_examples(tokenizer, examples)
            logs = train_step(model, optimizer, context.to(device), answer.to(device), generator, lr, config.noise,
                              config.noise_top_p, config.slot_weights, accelerator, forward)
        else:               # this process's rows; their noise from a stream of its own, re-derived from the step
            context, answer = encode_examples(tokenizer, examples[rows(accelerator, config.batch)])
            own = torch.Generator().manual_seed(process_seed(config.seed, step, accelerator.process_index))
            logs = train_step(model, optimizer, context.to(device), answer.to(device), own, lr, config.noise,
                              config.noise_top_p, config.slot_weights, accelerator, forward)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{logs['loss']:.3f}", acc0=f"{logs['slot_accuracy'][0]:.3f}")
        if step % 25 == 0:
            logger.info(f"step {step} K {pairs} loss {logs['loss']:.4f} slots "
                        f"{' '.join(f'{v:.3f}' for v in logs['slot_loss'])} acc "
                        f"{' '.join(f'{v:.3f}' for v in logs['slot_accuracy'])} lr {lr:.2e} elapsed {timer.elapsed / 60:.1f}m")
        if step % validate_every == 0 or step == config.steps:      # every process: the same numbers, all in step
            validation = {"step": step, **validation_set.evaluate(model, config.noise)}
            history.append({key: validation[key] for key in ("step", "loss", "draft_accuracy", "first_prediction_accuracy")})
            logger.info(f"step {step} validation {json.dumps(validation)}")
        if any_process(accelerator, time.time() - last_save > checkpoint_minutes * 60) or step == config.steps:
            checkpoint()
            last_save = time.time()
    bar.close()
    checkpoint()
    logger.info(f"done: {out}")
    return validation or {}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    defaults = TensorTrainConfig()
    parser = argparse.ArgumentParser(prog="python -m demo_core.train tensor", description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE, help="a local bundle folder (its backbone stays frozen)")
    parser.add_argument("--control", action="store_true", help="the equal-steps control: k = 1, LoRA only, no noise")
    parser.add_argument("--k", type=int, default=defaults.k, help="window size")
    parser.add_argument("--schedule", choices=SCHEDULES, default=defaults.schedule, help="noise schedule beta(j)")
    parser.add_argument("--schedule-rate", type=float, default=defaults.schedule_rate)
    parser.add_argument("--noise", choices=NOISES[:2], default=defaults.noise,
                        help="self: the model's own drafts in the overlapped slots; uniform: the paper's beta(j) noise")
    parser.add_argument("--noise-top-p", type=float, default=defaults.noise_top_p)
    parser.add_argument("--slot-weights", choices=SLOT_WEIGHTS, default=defaults.slot_weights,
                        help="the loss's weights over the window slots (front: halving per slot; equal: the plain sum)")
    for name in ("steps", "batch", "warmup", "lora_rank", "heads", "ffn_multiple", "decoder_multiple", "seed", "val_examples"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    for name in ("lr", "weight_decay", "lora_alpha"):
        parser.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(defaults, name))
    parser.add_argument("--run-dir", type=Path, default=None, help="checkpoint and train.log (default runs/tensor[-control])")
    parser.add_argument("--out", type=Path, default=None, help="adapter folder (default <bundle>/tensor[-control])")
    parser.add_argument("--validate-every", type=int, default=250)
    parser.add_argument("--checkpoint-minutes", type=float, default=5.0)
    parser.add_argument("--device", default=None, help="cpu, cuda, mps (default: the best available)")
    parser.add_argument("--pool", choices=("builtin", "debian"), default=None,
                        help="image pool (default: debian, the `data fetch` photos, for a task-family bundle such as "
                             "retouch-16; builtin, the packaged images, for the five tasks)")
    args = parser.parse_args(argv)
    config = TensorTrainConfig(**{f.name: getattr(args, f.name) for f in fields(TensorTrainConfig)})
    if config.k < 1 or config.steps < 1 or config.batch < 1:
        parser.error("--k, --steps and --batch must each be at least 1")
    folder_name = "tensor-control" if config.control else "tensor"
    run_dir = args.run_dir or RUNS / folder_name
    bundle_folder = args.bundle.expanduser()
    if not (bundle_folder / "bundle.json").exists():
        parser.error(f"{bundle_folder} is not a bundle folder (no bundle.json)")
    out = (args.out or bundle_folder / folder_name).expanduser()

    from ..bundle import load_bundle
    from ..engine import choose_device

    accelerator = accelerator_for(args.device)
    per_process_batch(accelerator, config.batch)
    device = choose_device(args.device)[0] if accelerator.num_processes == 1 else process_device(accelerator, None)
    logger = process_logger(accelerator, run_dir, folder_name)
    command = "python -m demo_core.train tensor " + " ".join(argv)
    logger.info(command)
    bundle = load_bundle(bundle_folder, device=device, dtype=torch.float32)
    train_tensor(bundle, config, run_dir, out, bundle_folder, args.validate_every, args.checkpoint_minutes, command, logger,
                 accelerator, args.pool)
    return 0


if __name__ == "__main__":
    sys.exit(main())
