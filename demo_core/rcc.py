"""Read Qt binary resource files (`.rcc`) without Qt: list entries and read their bytes.

GCompris ships its photos packed in `.rcc` files. The layout (Qt's `rcc` format, versions 1-3):
a 20-byte header (`qres`, version, tree, data and names offsets, all big-endian uint32; version 3
adds a uint32 of flags), a tree of fixed-size nodes (14 bytes in version 1, 22 bytes with the
8-byte modification time from version 2 on), a names table (uint16 length, uint32 hash,
UTF-16BE characters) and a data table (uint32 size, then the bytes; zlib entries carry a
4-byte big-endian uncompressed size first, Qt's `qCompress` format).
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

MAGIC = b"qres"
COMPRESSED, DIRECTORY, COMPRESSED_ZSTD = 0x1, 0x2, 0x4


class RccError(ValueError):
    """The file is not a Qt resource file this reader understands."""


@dataclass(frozen=True)
class RccEntry:
    path: str          # "/categorization/resource/board/apple.webp"
    offset: int        # absolute offset of the entry's size field
    flags: int


def _u16(data: bytes, at: int) -> int:
    return struct.unpack_from(">H", data, at)[0]


def _u32(data: bytes, at: int) -> int:
    return struct.unpack_from(">I", data, at)[0]


class RccFile:
    """One `.rcc` file held in memory."""

    def __init__(self, data: bytes, name: str = "<rcc>"):
        if len(data) < 20 or data[:4] != MAGIC:
            raise RccError(f"{name} is not a Qt resource file (no 'qres' header)")
        self.data, self.name = data, name
        self.version = _u32(data, 4)
        if self.version not in (1, 2, 3):
            raise RccError(f"{name}: rcc format version {self.version} is not supported (1-3 are)")
        self.tree, self.payload, self.names = _u32(data, 8), _u32(data, 12), _u32(data, 16)
        self.node_size = 14 if self.version == 1 else 22

    @classmethod
    def open(cls, path) -> "RccFile":
        path = Path(path)
        return cls(path.read_bytes(), path.name)

    def _name(self, offset: int) -> str:
        at = self.names + offset
        length = _u16(self.data, at)
        return self.data[at + 6: at + 6 + 2 * length].decode("utf-16-be")

    def entries(self) -> list[RccEntry]:
        """Every file entry, depth first from the root node."""
        found: list[RccEntry] = []
        stack = [(0, "")]
        seen = 0
        while stack:
            index, prefix = stack.pop()
            seen += 1
            if seen > 1_000_000:
                raise RccError(f"{self.name}: resource tree does not terminate")
            at = self.tree + index * self.node_size
            if at + self.node_size > len(self.data):
                raise RccError(f"{self.name}: tree node {index} lies outside the file")
            name = "" if index == 0 else self._name(_u32(self.data, at))
            flags = _u16(self.data, at + 4)
            path = f"{prefix}/{name}" if index else ""
            if flags & DIRECTORY:
                count, first = _u32(self.data, at + 6), _u32(self.data, at + 10)
                stack.extend((first + k, path) for k in reversed(range(count)))
            else:
                found.append(RccEntry(path, self.payload + _u32(self.data, at + 10), flags))
        return found

    def read(self, entry: RccEntry) -> bytes:
        """The entry's bytes, decompressed."""
        size = _u32(self.data, entry.offset)
        raw = self.data[entry.offset + 4: entry.offset + 4 + size]
        if entry.flags & COMPRESSED_ZSTD:
            raise RccError(f"{self.name}:{entry.path} is zstd-compressed; only zlib entries are supported")
        if entry.flags & COMPRESSED:
            return zlib.decompress(raw[4:])  # qCompress: 4-byte uncompressed size, then a zlib stream
        return raw
