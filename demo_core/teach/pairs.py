"""The user's pair files -> (name, input, answer) image pairs, for teaching.

A pair is two image files named `NAME_input.EXT` and `NAME_answer.EXT` (any image type PIL reads, any size);
they may come as files or inside zip archives (folders inside the zip are ignored, so are macOS `__MACOSX`
entries and hidden files). Every problem is one `PairFilesError` line that says what to fix.
"""
from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from PIL import Image

from ..images import MAX_FILE_BYTES, ImageInputError, open_image

MIN_PAIRS = 2           # leave-one-out needs one pair to answer and one to demonstrate
MAX_PAIRS = 50          # a couple of minutes of teaching sees each pair a few dozen times at most
NAME = re.compile(r"^(?P<name>.+)_(?P<side>input|answer)$", re.IGNORECASE)


class PairFilesError(ValueError):
    """A problem with the pair files; the message is one line."""


@dataclass
class NamedPair:
    name: str
    input: Image.Image
    answer: Image.Image


def _entries(path) -> list[tuple[str, bytes | Path]]:
    """(file name, contents or path) of a file, or of every file inside a zip."""
    path = Path(path)
    if not path.is_file():
        raise PairFilesError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):
        return [(path.name, path)]
    entries = []
    try:
        with zipfile.ZipFile(path) as archive:
            members = [m for m in archive.infolist() if not m.is_dir()]
            members = [m for m in members if "__MACOSX" not in m.filename
                       and not PurePosixPath(m.filename).name.startswith(".")]
            if len(members) > 2 * MAX_PAIRS + 10:
                raise PairFilesError(f"{path.name} holds {len(members)} files; a task takes at most {MAX_PAIRS} pairs "
                                     f"({2 * MAX_PAIRS} images)")
            for member in members:
                if member.file_size > MAX_FILE_BYTES:
                    raise PairFilesError(f"{path.name}: {member.filename} is over {MAX_FILE_BYTES // 2**20} MB; "
                                         f"use smaller images")
                entries.append((PurePosixPath(member.filename).name, archive.read(member)))
    except zipfile.BadZipFile as error:
        raise PairFilesError(f"{path.name} is not a readable zip ({error})") from error
    return entries


def read_pair_files(paths, max_pairs: int = MAX_PAIRS, min_pairs: int = MIN_PAIRS) -> list[NamedPair]:
    """Files (and zips of files) named NAME_input.* / NAME_answer.* -> pairs sorted by name."""
    sides: dict[str, dict[str, tuple[str, object]]] = {}
    for path in paths or []:
        for filename, contents in _entries(path):
            match = NAME.match(PurePosixPath(filename).stem)
            if match is None:
                raise PairFilesError(f"{filename} is not named NAME_input.EXT or NAME_answer.EXT (e.g. cat_input.png "
                                     f"and cat_answer.png)")
            name, side = match["name"], match["side"].lower()
            if side in sides.setdefault(name, {}):
                raise PairFilesError(f"pair {name!r} has two {side} files ({sides[name][side][0]} and {filename}); keep one")
            sides[name][side] = (filename, contents)
    for name, found in sorted(sides.items()):
        if len(found) == 1:
            have = next(iter(found))
            missing = "answer" if have == "input" else "input"
            raise PairFilesError(f"{found[have][0]} has no {missing}: add {name}_{missing}.png (or another image type) "
                                 f"or remove it")
    if len(sides) > max_pairs:
        raise PairFilesError(f"{len(sides)} pairs are too many: teaching takes at most {max_pairs}; remove "
                             f"{len(sides) - max_pairs}")
    if len(sides) < min_pairs:
        raise PairFilesError(f"{len(sides)} pair{'s' if len(sides) != 1 else ''} given; teaching needs at least "
                             f"{min_pairs} (each pair in turn is answered from the others)")
    pairs = []
    for name, found in sorted(sides.items()):
        images = {}
        for side, (filename, contents) in found.items():
            try:
                images[side] = open_image(contents, filename)
            except ImageInputError as error:
                raise PairFilesError(str(error).rstrip(".")) from error
        pairs.append(NamedPair(name, images["input"], images["answer"]))
    return pairs
