"""Trainers under `accelerate launch` with two CPU processes (gloo): the same losses as one process on the same
global batch, sharded drafting, and checkpoints that resume with another process count.

On a CPU-only machine accelerate forms a process group only through its multi-process launcher: `--multi_gpu
--num_processes 2` with the trainers' Accelerator(cpu=True) gives DistributedType.MULTI_CPU (`--cpu` alone starts a
single process unless mpirun is set up). Tolerance: the two processes' gradients are averaged in another order
than one process sums them, so the losses agree to float32 rounding (1e-5 relative here), not bit for bit.
"""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from demo_core.testing import build_tiny_bundle
from demo_core.train import backbone as backbone_trainer
from demo_core.train import refiner as refiner_trainer
from demo_core.train.distributed import accelerator_for, per_process_batch, process_seed, uneven_rows

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5
BACKBONE = ["--data", "five", "--batch", "4", "--pool", "16", "--hidden", "32", "--layers", "1", "--heads", "4",
            "--warmup", "2", "--validate-every", "100", "--log-every", "1",
            "--autocast", "off"]      # float32: one process and two must agree to 1e-5, whatever the CPU
REFINER = ["--drafts", "9", "--val-drafts", "2", "--epochs", "2", "--batch", "4", "--heads", "2", "--device", "cpu"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_two(part: str, args: list[str]) -> subprocess.CompletedProcess:
    """`accelerate launch` of `python -m demo_core.train <part>` as two CPU processes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO),
           "ACCELERATE_CONFIG_FILE": os.devnull}     # no user config from ~/.cache/huggingface
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), "-m", "demo_core.train", part, *args]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def step_losses(log: Path) -> dict[int, tuple[float, float]]:
    """{step: (generation loss, quality loss)} from a backbone train.log (the last line of each step wins)."""
    found = {}
    for match in re.finditer(r"step (\d+) k=\d+ gen ([\d.]+) quality ([\d.]+)", log.read_text()):
        found[int(match[1])] = (float(match[2]), float(match[3]))
    return found


def fresh_bundle(folder: Path) -> Path:
    bundle = build_tiny_bundle(folder)
    shutil.rmtree(bundle / "backbone")
    return bundle


def test_backbone_two_processes_match_one_and_resume_in_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    backbone_trainer.main([*BACKBONE, "--steps", "3", "--bundle", str(fresh_bundle(one / "b")), "--run-dir", str(one / "run")])
    result = launch_two("backbone", [*BACKBONE, "--steps", "3", "--bundle", str(fresh_bundle(two / "b")),
                                     "--run-dir", str(two / "run")])
    log = (two / "run" / "train.log").read_text()
    assert "2 processes (MULTI_CPU" in log and "global batch 4: 2 per process" in log, result.stderr[-2000:]
    expected, got = step_losses(one / "run" / "train.log"), step_losses(two / "run" / "train.log")
    assert sorted(expected) == sorted(got) == [1, 2, 3]
    for step in expected:       # the logged losses are the means over both processes: the global batch's
        assert got[step] == pytest.approx(expected[step], rel=TOLERANCE, abs=1e-4), (step, expected[step], got[step])
    a = torch.load(one / "run" / "checkpoint.pt", weights_only=False)
    b = torch.load(two / "run" / "checkpoint.pt", weights_only=False)
    assert a["step"] == b["step"] == 3 and a["model"].keys() == b["model"].keys()      # unwrapped names, no "module."
    assert max((a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"]) < 1e-5
    # the checkpoint written by two processes resumes in one, on the same data as the one-process run's resume
    backbone_trainer.main([*BACKBONE, "--steps", "5", "--bundle", str(two / "b"), "--run-dir", str(two / "run")])
    backbone_trainer.main([*BACKBONE, "--steps", "5", "--bundle", str(one / "b"), "--run-dir", str(one / "run")])
    assert "resumed from" in (two / "run" / "train.log").read_text()
    expected, got = step_losses(one / "run" / "train.log"), step_losses(two / "run" / "train.log")
    for step in (4, 5):
        assert got[step] == pytest.approx(expected[step], rel=1e-4, abs=1e-4), (step, expected[step], got[step])
    info = json.loads((two / "b" / "backbone" / "training.json").read_text())
    assert info["step"] == 5 and [(h["from_step"], h["to_step"]) for h in info["history"]] == [(0, 3), (3, 5)]


def test_refiner_two_processes_draft_the_same_and_match_one(tmp_path):
    one, two = build_tiny_bundle(tmp_path / "one"), build_tiny_bundle(tmp_path / "two")
    assert refiner_trainer.main([*REFINER, "--bundle", str(one), "--run-dir", str(tmp_path / "run1")]) == 0
    launch_two("refiner", [*REFINER, "--bundle", str(two), "--run-dir", str(tmp_path / "run2")])
    a, b = (json.loads((folder / "refiner" / "training.json").read_text()) for folder in (one, two))
    assert b["processes"] == 2 and "processes" not in a
    # drafts: split between the processes, each example from its own (seed, index) stream: bit-identical
    for split in ("train", "val"):
        cache1, = (tmp_path / "run1").glob(f"drafts-{split}-*.pt")
        cache2 = tmp_path / "run2" / cache1.name
        x, y = torch.load(cache1), torch.load(cache2)
        assert x["tasks"] == y["tasks"] and all(torch.equal(x[key], y[key]) for key in ("query", "answer", "draft"))
    # 9 drafts, global batch 4: the last batch of one example leaves the second process no rows (weight 0)
    assert b["train_loss"]["per_epoch"] == pytest.approx(a["train_loss"]["per_epoch"], rel=TOLERANCE)
    assert b["train_loss"]["after"] == pytest.approx(a["train_loss"]["after"], rel=TOLERANCE)
    assert b["validation"]["loss"] == pytest.approx(a["validation"]["loss"], rel=TOLERANCE)


def test_batch_split_helpers():
    accelerator = accelerator_for("cpu")
    assert per_process_batch(accelerator, 6) == 6 and uneven_rows(accelerator, 5) == slice(0, 5)

    class Two:                  # the helpers read only these two attributes
        num_processes, process_index = 2, 1

    with pytest.raises(SystemExit, match="divisible by the number of processes"):
        per_process_batch(Two(), 5)
    assert per_process_batch(Two(), 6) == 3 and uneven_rows(Two(), 5) == slice(3, 5) and uneven_rows(Two(), 1) == slice(1, 1)
    assert len({process_seed(0, step, index) for step in range(50) for index in range(4)}) == 200


@pytest.mark.parametrize("name, kind", [("ddp.yaml", "MULTI_GPU"), ("fsdp_lvm7b.yaml", "FSDP")])
def test_accelerate_config_files_load(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(REPO / "configs" / "accelerate" / name))
    assert config.distributed_type.name == kind and config.mixed_precision == "bf16" and not config.use_cpu
    if kind == "FSDP":
        assert config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"


def test_teach_two_processes_match_one(tmp_path):
    """The teach CLI under `accelerate launch`: each process trains on its rows of the same global batch and the
    adapter's gradients are averaged, so both processes and one process end with the same adapter."""
    import numpy as np
    from PIL import Image
    from safetensors.torch import load_file

    from demo_core.teach import cli as teach_cli

    bundle = build_tiny_bundle(tmp_path / "b")
    rng = np.random.default_rng(0)
    files = []
    for index in range(4):
        x = (rng.uniform(0, 1, (16, 16, 3)) * 255).astype(np.uint8)
        for side, image in (("input", x), ("answer", 255 - x)):
            path = tmp_path / f"p{index}_{side}.png"
            Image.fromarray(image).save(path)
            files.append(str(path))
    args = [*files, "--steps", "3", "--batch", "4", "--bundle", str(bundle), "--device", "cpu"]
    assert teach_cli.main([*args, "--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO),
           "ACCELERATE_CONFIG_FILE": os.devnull}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), "-m", "demo_core", "teach", *args, "--out", str(tmp_path / "two")]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert "2 processes: global batch 4, 2 per process" in result.stdout, result.stdout[-2000:]
    one, two = (load_file(tmp_path / name / "adapter.safetensors") for name in ("one", "two"))
    assert one.keys() == two.keys() and any(t.abs().sum() > 0 for name, t in one.items() if name.endswith(".up"))
    for name in one:
        assert torch.allclose(one[name], two[name], rtol=TOLERANCE, atol=1e-6), name
