"""What every trainer needs to run as one process or as many (`accelerate launch`), through accelerate's own objects.

One process (plain `python -m demo_core.train ...`): an Accelerator over a single process; nothing is wrapped
and every number is what it was before the trainers learned to scale out.

P processes (`accelerate launch --num_processes P -m demo_core.train ...`, or with a config from
configs/accelerate/): `--batch` stays the *global* batch. Every process derives the same global batch from
(seed, step) and takes its own rows (`rows`), so the union of the per-process batches is exactly the batch one
process would train on; DDP averages the gradients of equal shards, which is the global batch's gradient.
Work that depends on the model (drafts, teacher-forcing samples) is split with `split_between_processes` and
gathered once. Only the main process writes checkpoints, exports and logs; checkpoints hold the unwrapped
state and the step, so a run resumes with any process count.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, gather_object

from .common import setup_logging

def accelerator_for(device: str | None = None, find_unused_parameters: bool = False) -> Accelerator:
    """The run's Accelerator (accelerate keeps one state per process; each call shares it).

    `device` "cpu" keeps a single process on the CPU even where a GPU is present (accelerate's own `cpu` flag).
    Mixed precision comes from `accelerate launch --mixed_precision` / the config file, never from here.
    Device placement is the trainers' own (device_placement=False): a single process keeps the device it chose.
    """
    # without a GPU, accelerate only forms a process group (gloo) when told the processes run on the CPU
    cpu = (device is not None and str(device).startswith("cpu")) or not torch.cuda.is_available()
    accelerator = Accelerator(cpu=cpu, device_placement=False,
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)])
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != launched:     # every process would think itself the main one and write
        raise SystemExit(f"launched as {launched} processes but accelerate formed {accelerator.num_processes}: "
                         f"on a CPU-only machine launch with `accelerate launch --multi_gpu --num_processes {launched}` "
                         f"(`--cpu` starts one process without mpirun)")
    return accelerator


def refuse_fsdp(accelerator: Accelerator, trainer: str) -> None:
    """Trainers whose no-grad passes (drafts, noise, validation) call the unwrapped model need whole weights on
    every process: DDP, not FSDP."""
    if accelerator.distributed_type.name == "FSDP":
        raise SystemExit(f"the {trainer} trainer runs under DDP (configs/accelerate/ddp.yaml): its no-grad passes read "
                         f"the whole weights, which FSDP shards (FSDP: the refiner trainer, configs/accelerate/fsdp_lvm7b.yaml)")


def process_device(accelerator: Accelerator, chosen: str | torch.device) -> torch.device:
    """One process: the device the trainer chose itself (unchanged behaviour); several: each process's own."""
    if accelerator.num_processes == 1:
        return torch.device(chosen)
    device = accelerator.device
    return torch.device("cpu") if device.type == "cpu" else device      # gloo processes report "cpu:0"


def per_process_batch(accelerator: Accelerator, global_batch: int, option: str = "--batch") -> int:
    """The global batch's share of one process; a global batch that does not split evenly is refused."""
    processes = accelerator.num_processes
    if global_batch % processes:
        raise SystemExit(f"{option} {global_batch} is the global batch: it must be divisible by the number of "
                         f"processes ({processes}); e.g. {option} {max(processes, global_batch // processes * processes)}")
    return global_batch // processes


def rows(accelerator: Accelerator, count: int) -> slice:
    """This process's rows of a global batch of `count` (even split; see per_process_batch)."""
    share = count // accelerator.num_processes
    return slice(accelerator.process_index * share, (accelerator.process_index + 1) * share)


def uneven_rows(accelerator: Accelerator, count: int) -> slice:
    """This process's contiguous rows of `count` items split as evenly as possible (split_between_processes' split)."""
    processes, index = accelerator.num_processes, accelerator.process_index
    base, extra = divmod(count, processes)
    start = index * base + min(index, extra)
    return slice(start, start + base + (1 if index < extra else 0))


def gather_rows(accelerator: Accelerator, tensor: torch.Tensor) -> torch.Tensor:
    """Every process's equal-sized rows, concatenated in process order (the global batch again); one process: as is."""
    return tensor if accelerator.num_processes == 1 else accelerator.gather(tensor.contiguous())


def sharded_map(accelerator: Accelerator, items: list, work) -> list:
    """`work(my_items) -> my_results` on this process's share of `items` (split_between_processes), the results of
    all processes gathered once, in the order of `items`. One process: work(items)."""
    if accelerator.num_processes == 1:
        return list(work(list(items)))
    with accelerator.split_between_processes(list(items)) as mine:
        results = list(work(mine)) if len(mine) else []
    return gather_object(results)           # every process's list, concatenated in process order


def mean_across(accelerator: Accelerator, value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar over processes (equal shards: the global batch's value); one process: as is."""
    if accelerator.num_processes == 1:
        return value
    return accelerator.reduce(value.detach().float().reshape(1).to(accelerator.device), "mean")[0]


def any_process(accelerator: Accelerator, flag: bool) -> bool:
    """True on every process if `flag` is true on any (time-based checkpoints and exports decided together, so the
    collective operations inside them never wait on a process that decided otherwise); one process: `flag`."""
    if accelerator.num_processes == 1:
        return flag
    return accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), "sum").item() > 0


def share_ema(accelerator: Accelerator, ema):
    """Several processes: an EMAQuantizer's codebook statistics summed over all of them (the global batch), so every
    process's codebook moves the same; one process, or no EMA yet: as is. Returns `ema`."""
    if ema is not None and accelerator.num_processes > 1:
        ema.reduce = lambda tensor: accelerator.reduce(tensor, "sum")
    return ema


def process_seed(seed: int, step: int, process_index: int) -> int:
    """A per-process random stream re-derived from (seed, step, process index): resumes need no saved RNG state."""
    return (seed * 1_000_003 + step) * 1009 + process_index


def process_logger(accelerator: Accelerator, run_dir: Path, name: str) -> logging.Logger:
    """The main process logs to run_dir/train.log and stderr; the others stay silent."""
    if accelerator.is_main_process:
        return setup_logging(run_dir, name)
    logger = logging.getLogger(f"retouch.train.{name}.process{accelerator.process_index}")
    logger.handlers.clear()
    logger.addHandler(logging.NullHandler())
    logger.propagate = False
    return logger


def unwrapped_state(accelerator: Accelerator, model: torch.nn.Module) -> dict:
    """The model's full, unwrapped state dict (gathered from FSDP shards where sharded) on the CPU."""
    if accelerator.num_processes == 1:
        return accelerator.unwrap_model(model).state_dict()
    return {key: value.cpu() for key, value in accelerator.get_state_dict(model).items()}
