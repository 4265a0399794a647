"""The Teach tab: a visitor's own pairs -> a taught adapter in their session, then generation with it or without.

Uploads (image files named NAME_input.* / NAME_answer.*, or a zip of them) are read by
`demo_core.teach.pairs` and shown as a grid; Teach trains a LoRA adapter (`demo_core.teach`) through the
same queue as generation, step by step, so Stop can end it between steps; the loss plot and the progress
bar follow every step. The adapter lives only in the visitor's gr.State (`Taught`: one adapter, about
0.7 MB for the embedded default, dropped with the session), never on the server's disk. Download writes a
zip to a temp file and hands it over through Gradio's file output, only where the operator allows it
(`download_allowed`: RETOUCH_ADAPTER_DOWNLOAD=1 or 0; unset, allowed except on a Hugging Face Space). Load
takes such a zip back (read in memory, checked against the visitor's model) as the session's adapter.
Every bad upload is one gr.Error line.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

from demo_core.teach.adapter import CONFIG, MAX_BYTES, WEIGHTS, AdapterError, TaskAdapter
from demo_core.teach.pairs import MAX_PAIRS, PairFilesError, read_pair_files
from demo_core.teach.trainer import DEFAULT_STEPS, TeachConfig, new_adapter, teach_steps  # noqa: F401  (DEFAULT_STEPS: app.py reads it here)

from .layout import status_html

MAX_STEPS = 400
TEACH_IDLE = status_html(["teach"], None, 0.0, f"Upload 2 to {MAX_PAIRS} pairs (NAME_input.png + NAME_answer.png, or a zip), "
                         "then press Teach.", "idle")
STATE_SECONDS = 3600        # a session's taught adapter is dropped an hour after its last use


@dataclass
class Taught:
    """A visitor's taught adapter and what it was taught on (their session state)."""

    adapter: object                 # demo_core.teach.adapter.TaskAdapter
    model: str | None               # the visitor's model id it was taught on
    pairs: int
    steps: int = 0
    total: int = 0
    losses: list = field(default_factory=list)

    def summary(self) -> str:
        return f"taught {self.steps} of {self.total} steps on {self.pairs} pairs"


def upload_paths(files) -> list[str]:
    """gr.File values (paths, FileData dicts, tempfile wrappers) -> paths."""
    files = files if isinstance(files, (list, tuple)) else [files]
    paths = []
    for item in files:
        if item is None:
            continue
        path = item.get("path") if isinstance(item, dict) else getattr(item, "name", item)
        paths.append(str(path))
    return paths


def read_uploads(files):
    try:
        return read_pair_files(upload_paths(files))
    except PairFilesError as error:
        raise gr.Error(f"{error}.")


def preview(files):
    """The upload grid: [(image, caption), ...] input then answer of each pair, and the status line."""
    if not upload_paths(files):
        return [], TEACH_IDLE
    try:
        pairs = read_pair_files(upload_paths(files))
    except PairFilesError as error:
        return [], status_html(["teach"], None, 0.0, f"{error}.", "error")
    items = []
    for pair in pairs:
        items += [(pair.input, f"{pair.name} · input"), (pair.answer, f"{pair.name} · answer")]
    return items, status_html(["teach"], None, 0.0, f"{len(pairs)} pairs ready: press Teach.", "idle")


def loss_frame(losses: list):
    """The loss plot's data: (step, loss) per step, numeric even when empty (the plot takes its axis types from it)."""
    import pandas as pd

    frame = pd.DataFrame({"step": [step for step, _ in losses], "loss": [loss for _, loss in losses]})
    return frame.astype({"step": "int64", "loss": "float64"})


def run_teach(engine, model, files, steps):
    """Teach: yields (status, loss plot, taught state) after every step; the state holds the adapter so far."""
    if getattr(engine.format, "name", "scan") != "scan":
        raise gr.Error("This model has no SCAN-form backbone to teach (LVM-format models cannot be taught here).")
    pairs = read_uploads(files)
    try:
        steps = int(float(steps))
    except (TypeError, ValueError):
        raise gr.Error(f"steps must be a number between 1 and {MAX_STEPS}.")
    if not 1 <= steps <= MAX_STEPS:
        raise gr.Error(f"steps must be between 1 and {MAX_STEPS}, got {steps}.")
    config = TeachConfig(steps=steps)
    adapter = new_adapter(engine, config)
    taught = Taught(adapter, model, len(pairs), 0, steps)
    yield (status_html(["teach"], "teach", 0.0, f"Encoding {len(pairs)} pairs…"), loss_frame([]), gr.skip())
    started = time.perf_counter()
    for record in teach_steps(engine, [(p.input, p.answer) for p in pairs], adapter, config):
        taught.steps = record.step
        taught.losses.append((record.step, round(record.loss, 4)))
        message = f"Teaching: step {record.step}/{steps}, loss {record.loss:.3f} ({record.seconds:.0f} s)"
        yield status_html(["teach"], "teach", record.step / steps, message), loss_frame(taught.losses), taught
    adapter.config.info = {"steps": taught.steps, "pairs": taught.pairs, "loss": taught.losses[-1][1] if taught.losses else None}
    done = (f"Taught in {time.perf_counter() - started:.0f} s ({taught.summary()}). Tick “use taught adapter” and "
            f"press Generate.")
    yield status_html(["teach"], None, 1.0, done, "done"), loss_frame(taught.losses), taught


def stopped(status: str | None, taught: Taught | None):
    """After Stop: say what was kept (the adapter so far), unless nothing was running."""
    if not status or 'data-state="running"' not in status:
        return gr.skip()
    if isinstance(taught, Taught) and taught.steps:
        return status_html(["teach"], "teach", taught.steps / max(1, taught.total),
                           f"Stopped: {taught.summary()}; that adapter is kept.", "stopped")
    return status_html(["teach"], "teach", 0.0, "Stopped before the first step; nothing was taught.", "stopped")


def download_allowed(environ=None) -> bool:
    """Whether Download may write the adapter's zip to the server's disk (a temp file): the operator's
    RETOUCH_ADAPTER_DOWNLOAD (1 / 0); unset, yes, except on a Hugging Face Space (SPACE_ID set)."""
    environ = os.environ if environ is None else environ
    value = str(environ.get("RETOUCH_ADAPTER_DOWNLOAD", "")).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    return not environ.get("SPACE_ID")


def export(taught: Taught | None):
    """Download: the adapter folder (adapter.safetensors + config.json) as a zip in a temp file."""
    if not download_allowed():
        raise gr.Error("Downloading adapters is off on this server: nothing of a visitor's is written to its disk "
                       "(the operator can allow it with RETOUCH_ADAPTER_DOWNLOAD=1).")
    if not isinstance(taught, Taught):
        raise gr.Error("Teach a task first: there is no adapter to download yet.")
    parent = Path(os.environ.get("GRADIO_TEMP_DIR") or tempfile.gettempdir())
    for old in parent.glob("retouch-adapter-*"):           # earlier downloads: kept an hour, then removed
        if old.is_dir() and time.time() - old.stat().st_mtime > STATE_SECONDS:
            shutil.rmtree(old, ignore_errors=True)
    folder = Path(tempfile.mkdtemp(prefix="retouch-adapter-", dir=parent))
    taught.adapter.save(folder / "adapter")
    archive = folder / "retouch-adapter.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted((folder / "adapter").iterdir()):
            zf.write(path, f"adapter/{path.name}")
    return str(archive)


def adapter_for_run(use_adapter, taught):
    """The adapter a generation runs with: None unless the box is ticked; a gr.Error if nothing was taught."""
    if not use_adapter:
        return None
    if not isinstance(taught, Taught):
        raise gr.Error("Nothing taught yet: teach a task in the Teach tab first, or untick “use taught adapter”.")
    return taught.adapter


def load_uploaded(engine, model, file):
    """Load: an adapter zip (Download's, or any zip holding config.json + adapter.safetensors) -> (status, Taught).

    Read in memory; refused in one line unless it was taught on this visitor's model (the same backbone weights)."""
    paths = upload_paths(file)
    if not paths:
        return gr.skip(), gr.skip()
    path = paths[0]

    def refused(message: str):
        return status_html(["teach"], None, 0.0, message, "error"), gr.skip()

    try:
        with zipfile.ZipFile(path) as archive:
            members = {Path(info.filename).name: info for info in archive.infolist() if not info.is_dir()}
            missing = [name for name in (CONFIG, WEIGHTS) if name not in members]
            if missing:
                return refused(f"{Path(path).name} holds no {' or '.join(missing)}: upload the zip that "
                               f"“Download adapter” made.")
            if sum(members[name].file_size for name in (CONFIG, WEIGHTS)) > MAX_BYTES + 2**20:
                return refused(f"{Path(path).name} is too large for an adapter (at most {MAX_BYTES / 2**20:.0f} MB).")
            config, weights = archive.read(members[CONFIG]), archive.read(members[WEIGHTS])
    except (zipfile.BadZipFile, OSError, ValueError):
        return refused(f"{Path(path).name} is not a zip file: upload the zip that “Download adapter” made.")
    try:
        adapter = TaskAdapter.from_bytes(config, weights, engine.model, where=Path(path).name)
    except AdapterError as error:
        return refused(f"{error}.")
    info = dict(getattr(adapter.config, "info", None) or {})
    steps = int(info.get("steps") or 0)
    taught = Taught(adapter, model, int(info.get("pairs") or 0), steps, steps)
    return (status_html(["teach"], None, 1.0, f"Loaded {Path(path).name} ({taught.summary()}). Tick “use taught "
                        f"adapter” and press Generate.", "done"), taught)
