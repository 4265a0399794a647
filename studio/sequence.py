"""Sequence mode (sequential prompting, LVM's second prompt kind): the prompt-kind switch and the frames gallery.

In sequence mode the user gives frames, oldest first, and the model writes the next one. The frames live in
one gr.Gallery (its value: (file path, caption) items); the functions here read and edit that value — add
uploads at the end, remove the selected frame, move it one place earlier or later — and return the
gallery and the selected index (a gr.State) again. Nothing here opens an image: the engine reads the frames
when Generate is pressed and explains any that are unusable.
"""
from __future__ import annotations

from typing import Sequence

import gradio as gr

from .layout import IDLE_STATUS, SEQUENCE_IDLE_STATUS

PROMPT_KINDS = [("Pairs: input → answer", "pairs"), ("Sequence: the next frame", "sequence")]


def prompt_kind_updates(kind: str, status: str | None = None) -> list:
    """The prompt-kind switch: visibility of (pair examples, sequence examples, pair inputs, sequence inputs), then
    the status line (its hint for that kind while nothing has run yet; otherwise left as it is). Both kinds'
    inputs stay as they were, so switching back finds them again."""
    sequence = kind == "sequence"
    idle = status is None or 'data-state="idle"' in status
    return [gr.update(visible=not sequence), gr.update(visible=sequence),
            gr.update(visible=not sequence), gr.update(visible=sequence),
            (SEQUENCE_IDLE_STATUS if sequence else IDLE_STATUS) if idle else gr.skip()]


def clear_refusal(status: str | None):
    """After an edit of the frames: a refused run's red line gives way to the hint (it may be fixed now)."""
    return SEQUENCE_IDLE_STATUS if status and 'data-state="error"' in status else gr.skip()


def frame_paths(value) -> list[str]:
    """The gallery's value (paths, or (path, caption) items, or None) -> file paths, oldest first."""
    if isinstance(value, (str, dict)):                 # one frame given on its own (API callers)
        value = [value]
    paths = []
    for item in value or []:
        path = item[0] if isinstance(item, (tuple, list)) else item
        if isinstance(path, dict):                      # a FileData payload (API callers)
            path = path.get("path")
        if path is not None:
            paths.append(str(path))
    return paths


def frames_gallery(paths: Sequence[str]) -> list[tuple[str, str]]:
    """Gallery items with each frame's place as its caption."""
    last = len(paths)
    return [(path, f"{number}" + (" · oldest" if number == 1 and last > 1 else " · latest" if number == last else ""))
            for number, path in enumerate(paths, 1)]


def _gallery(paths: Sequence[str], selected: int | None) -> list:
    """[gallery update, selected index]: the gallery shows `paths` with `selected` highlighted."""
    selected = selected if selected is not None and 0 <= selected < len(paths) else None
    return [gr.update(value=frames_gallery(paths), selected_index=selected), selected]


def _selected(paths: Sequence[str], selected) -> int | None:
    try:
        index = int(selected)
    except (TypeError, ValueError):
        return None
    return index if 0 <= index < len(paths) else None


def add_frames(value, files, max_frames: int) -> list:
    """+ Add frames: the uploaded files after the last frame (a warning when there are more than the model holds)."""
    paths = frame_paths(value)
    uploaded = [str(getattr(file, "name", file)) for file in (files if isinstance(files, (list, tuple)) else [files])
                if file is not None]
    paths += uploaded
    if len(paths) > max_frames:
        gr.Warning(f"This model holds at most {max_frames} frames; remove {len(paths) - max_frames} before generating.")
    return _gallery(paths, len(paths) - 1 if uploaded else None)


def remove_frame(value, selected) -> list:
    """Remove the selected frame (click a frame first); the one after it becomes the selection."""
    paths = frame_paths(value)
    index = _selected(paths, selected)
    if index is None:
        gr.Warning("Click a frame first, then remove it." if paths else "There are no frames to remove.")
        return [gr.skip(), selected]
    del paths[index]
    return _gallery(paths, min(index, len(paths) - 1) if paths else None)


def move_frame(value, selected, offset: int) -> list:
    """Move the selected frame `offset` places (-1: earlier, +1: later); it stays selected."""
    paths = frame_paths(value)
    index = _selected(paths, selected)
    if index is None:
        gr.Warning("Click a frame first, then move it.")
        return [gr.skip(), selected]
    target = min(max(index + offset, 0), len(paths) - 1)
    paths.insert(target, paths.pop(index))
    return _gallery(paths, target)


def move_earlier(value, selected) -> list:
    return move_frame(value, selected, -1)


def move_later(value, selected) -> list:
    return move_frame(value, selected, +1)


def clear_frames() -> list:
    return [gr.update(value=[], selected_index=None), None]


def select_frame(event: gr.SelectData = None) -> int | None:
    """A click on a frame: remember which one (for remove and move)."""
    return None if event is None else int(event.index)
