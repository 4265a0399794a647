"""The studio's one-click examples (assets/examples: pair examples per task, sequence examples per kind) and the
demonstration-pair rows."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import gradio as gr
from PIL import Image

from demo_core import viz
from demo_core.sequences import SEQUENCE_KINDS
from demo_core.tasks import TASKS

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES_DIR = ROOT / "assets" / "examples"
MAX_ROWS = 8                      # pair rows built in the page; the loaded model's max_pairs limits how many show
SEQUENCE_PREFIX = "sequence-"     # assets/examples/sequence-<kind>/ holds a sequence example, not a task's pairs
SEQUENCE_TITLES = {"pan": "Pan", "zoom": "Zoom", "cutout": "Moving cut-out", "brightness": "Brightness"}


@dataclass
class Example:
    task: str
    pairs: list[tuple[str, str]]          # file paths
    query: str
    truth: str | None

    @property
    def title(self) -> str:
        return TASKS[self.task].title if self.task in TASKS else self.task


def list_examples(folder: Path = EXAMPLES_DIR) -> dict[str, Example]:
    """assets/examples/<task>/{pair1_input,pair1_answer,...,query,truth}.png, in TASKS order (sequence-* folders are
    `list_sequence_examples`')."""
    examples = {}
    if not folder.is_dir():
        return examples
    names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(SEQUENCE_PREFIX))
    names.sort(key=lambda n: list(TASKS).index(n) if n in TASKS else len(TASKS))
    for name in names:
        task_dir = folder / name
        pairs = []
        for number in range(1, MAX_ROWS + 1):
            x, y = task_dir / f"pair{number}_input.png", task_dir / f"pair{number}_answer.png"
            if not (x.exists() and y.exists()):
                break
            pairs.append((str(x), str(y)))
        query = task_dir / "query.png"
        if pairs and query.exists():
            truth = task_dir / "truth.png"
            examples[name] = Example(name, pairs, str(query), str(truth) if truth.exists() else None)
    return examples


@dataclass
class SequenceExample:
    name: str                             # its folder, e.g. "sequence-pan"
    frames: list[str]                     # file paths, oldest first
    next_frame: str | None                # the true next frame

    @property
    def kind(self) -> str:
        return self.name[len(SEQUENCE_PREFIX):]

    @property
    def title(self) -> str:
        return SEQUENCE_TITLES.get(self.kind, self.kind)


def list_sequence_examples(folder: Path = EXAMPLES_DIR) -> dict[str, SequenceExample]:
    """assets/examples/sequence-<kind>/{frame1,frame2,...,next}.png, in SEQUENCE_KINDS order."""
    examples = {}
    if not folder.is_dir():
        return examples
    names = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name.startswith(SEQUENCE_PREFIX))
    kinds = list(SEQUENCE_KINDS)
    names.sort(key=lambda n: kinds.index(n[len(SEQUENCE_PREFIX):]) if n[len(SEQUENCE_PREFIX):] in kinds else len(kinds))
    for name in names:
        frames = []
        while (folder / name / f"frame{len(frames) + 1}.png").exists():
            frames.append(str(folder / name / f"frame{len(frames) + 1}.png"))
        if frames:
            next_frame = folder / name / "next.png"
            examples[name] = SequenceExample(name, frames, str(next_frame) if next_frame.exists() else None)
    return examples


def sequence_preview(example: SequenceExample, tile: int = 48, gap: int = 4) -> Image.Image:
    """The gallery thumbnail: the frames in a row, an arrow, then the true next frame."""
    images = [Image.open(path) for path in example.frames]
    images.append(Image.open(example.next_frame) if example.next_frame else Image.new("RGB", (tile, tile), (226, 232, 240)))
    return viz.strip(images, tile=tile, gap=gap, arrows=[len(example.frames) - 1])


def example_preview(example: Example, tile: int = 64, gap: int = 4) -> Image.Image:
    """The gallery thumbnail: pair 1 (input → answer) above, query → ground truth below."""
    first = [Image.open(path) for path in example.pairs[0]]
    second = [Image.open(example.query),
              Image.open(example.truth) if example.truth else Image.new("RGB", (tile, tile), (226, 232, 240))]
    top, bottom = viz.strip(first, tile=tile, gap=gap, arrows=[0]), viz.strip(second, tile=tile, gap=gap, arrows=[0])
    sheet = Image.new("RGB", (top.width, top.height + bottom.height - gap), (255, 255, 255))
    sheet.paste(top, (0, 0))
    sheet.paste(bottom, (0, top.height - gap))
    return sheet


def pair_row_updates(count: int, values: Sequence | None = None) -> list:
    """Updates for the MAX_ROWS pair rows: visible up to `count`; with `values`, also set the images."""
    rows = [gr.update(visible=index < count) for index in range(MAX_ROWS)]
    if values is None:
        return rows
    images = []
    for index in range(MAX_ROWS):
        x, y = values[index] if index < len(values) else (None, None)
        images += [x, y]
    return rows + images


def add_pair(count: int, max_pairs: int):
    """+ pair: one more row, up to what the model's context holds."""
    count = int(count)
    if count >= MAX_ROWS or count >= int(max_pairs):
        gr.Warning(f"This model holds at most {min(int(max_pairs), MAX_ROWS)} demonstration pairs.")
        return [count, *pair_row_updates(count)]
    return [count + 1, *pair_row_updates(count + 1)]


def remove_pair(count: int):
    """− pair: hide the last row and clear its images (so hidden rows never reach the model)."""
    count = int(count)
    if count <= 1:
        gr.Warning("At least one demonstration pair is needed; replace its images instead.")
        return [count, *pair_row_updates(count), *([gr.skip()] * (2 * MAX_ROWS))]
    cleared = [None if index // 2 >= count - 1 else gr.skip() for index in range(2 * MAX_ROWS)]
    return [count - 1, *pair_row_updates(count - 1), *cleared]
