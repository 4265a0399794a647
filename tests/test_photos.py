"""Training photos from Debian packages: the .rcc reader, licences, splits, fetch errors and idempotence."""
import io
import json
import struct
import subprocess
import zlib

import numpy as np
import pytest
from PIL import Image

from demo_core import photos
from demo_core.rcc import COMPRESSED, DIRECTORY, RccError, RccFile


def _rcc(files: dict[str, tuple[bytes, bool]]) -> bytes:
    """A version-3 Qt resource file with one folder holding `files` (name -> (bytes, zlib?))."""
    names, name_offsets = b"", {}
    for name in ["pics", *files]:
        name_offsets[name] = len(names)
        encoded = name.encode("utf-16-be")
        names += struct.pack(">HI", len(name), 0) + encoded
    data, data_offsets = b"", {}
    for name, (payload, compress) in files.items():
        data_offsets[name] = len(data)
        stored = struct.pack(">I", len(payload)) + zlib.compress(payload) if compress else payload
        data += struct.pack(">I", len(stored)) + stored
    mtime = b"\0" * 8
    tree = struct.pack(">IHII", 0, DIRECTORY, 1, 1) + mtime                      # root -> node 1
    tree += struct.pack(">IHII", name_offsets["pics"], DIRECTORY, len(files), 2) + mtime
    for name, (_, compress) in files.items():
        tree += struct.pack(">IHHHI", name_offsets[name], COMPRESSED if compress else 0, 0, 0, data_offsets[name]) + mtime
    header = 24
    return (b"qres" + struct.pack(">IIIII", 3, header, header + len(tree), header + len(tree) + len(data), 0)
            + tree + data + names)


def _webp(colour_noise: bool, size=(240, 220)) -> bytes:
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8) if colour_noise else np.zeros((size[1], size[0], 3), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "WEBP", quality=90)
    return buffer.getvalue()


def test_rcc_lists_and_reads_compressed_and_plain_entries():
    archive = RccFile(_rcc({"a.txt": (b"hello", True), "b.bin": (b"\x00\x01raw", False)}))
    entries = {entry.path: entry for entry in archive.entries()}
    assert set(entries) == {"/pics/a.txt", "/pics/b.bin"}
    assert archive.read(entries["/pics/a.txt"]) == b"hello"
    assert archive.read(entries["/pics/b.bin"]) == b"\x00\x01raw"


def test_rcc_refuses_other_files():
    with pytest.raises(RccError, match="not a Qt resource file"):
        RccFile(b"PK\x03\x04 not an rcc")
    with pytest.raises(RccError, match="version 9"):
        RccFile(b"qres" + struct.pack(">IIII", 9, 20, 20, 20))


def test_dep5_licence_last_matching_stanza_wins():
    text = ("Format: x\n\nFiles: *\nCopyright: a\nLicense: GPL-3+\n\n"
            "Files: usr/share/backgrounds/*_by_Jo.jpg\n some/other.png\nCopyright: Jo\nLicense: CC-BY-SA-3.0\n")
    stanzas = photos.dep5_licences(text)
    assert photos.licence_for("usr/share/backgrounds/sea_by_Jo.jpg", stanzas) == "CC-BY-SA-3.0"
    assert photos.licence_for("usr/share/backgrounds/other.jpg", stanzas) == "GPL-3+"


def test_split_is_stable_and_holds_out_about_a_tenth():
    names = [f"pkg/photo{i}.jpg" for i in range(2000)]
    share = np.mean([photos.split_of(name) == "val" for name in names])
    assert 0.07 < share < 0.13
    assert photos.split_of("gcompris-qt-data/x.webp") == photos.split_of("gcompris-qt-data/x.webp")


def _fake_apt(tmp_path, monkeypatch, calls):
    """apt-get download writes a .deb; dpkg-deb -x unpacks a tree with an .rcc of one photo and one drawing."""
    def run(command, cwd, capture_output, text, timeout):
        calls.append(command[:2])
        if command[0] == "apt-get":
            (cwd / f"{command[2]}_1.0_all.deb").write_bytes(b"deb")
        else:
            root = tmp_path / "unpacked"
            rcc_dir = root / "usr/share/gcompris-qt/rcc"
            rcc_dir.mkdir(parents=True, exist_ok=True)
            (rcc_dir / "x.rcc").write_bytes(_rcc({"photo.webp": (_webp(True), True), "drawing.webp": (_webp(False), True)}))
            doc = root / "usr/share/doc/gcompris-qt-data"
            doc.mkdir(parents=True, exist_ok=True)
            (doc / "copyright").write_text("Files: *\nCopyright: GCompris\nLicense: GPL-3+\n")
            target = type(cwd)(command[3])
            if target.exists():
                import shutil
                shutil.rmtree(target)
            import shutil
            shutil.copytree(root, target)
        return subprocess.CompletedProcess(command, 0, "", "")
    monkeypatch.setattr(photos.subprocess, "run", run)


def test_fetch_unpacks_photos_writes_manifest_and_second_run_does_nothing(tmp_path, monkeypatch):
    calls = []
    _fake_apt(tmp_path, monkeypatch, calls)
    cache = tmp_path / "cache"
    first = photos.fetch(["gcompris-qt-data"], cache, log=lambda *_: None)
    assert [row["source"] for row in first["images"]] == ["pics/photo.webp"]      # the flat drawing is left out
    row = first["images"][0]
    assert row["licence"] == "GPL-3+" and row["package"] == "gcompris-qt-data" and row["kind"] == "photo"
    assert (cache / row["file"]).exists() and (cache / "images/gcompris-qt-data/copyright").exists()
    assert json.loads((cache / "manifest.json").read_text())["images"] == first["images"]
    count = len(calls)
    mtime = (cache / "manifest.json").stat().st_mtime_ns
    assert photos.fetch(["gcompris-qt-data"], cache, log=lambda *_: None) == first
    assert len(calls) == count                                  # nothing downloaded or unpacked again
    assert (cache / "manifest.json").stat().st_mtime_ns == mtime


@pytest.mark.parametrize("stderr, expected", [
    ("E: Unable to locate package gcompris-qt-data", "not in this machine's apt sources"),
    ("E: Failed to fetch http://deb.debian.org/... Could not resolve 'deb.debian.org'", "could not reach the Debian package registry"),
])
def test_fetch_failures_are_one_clear_line(tmp_path, monkeypatch, stderr, expected):
    monkeypatch.setattr(photos.subprocess, "run", lambda command, **_: subprocess.CompletedProcess(command, 100, "", stderr))
    with pytest.raises(photos.FetchError, match=expected) as caught:
        photos.fetch(["gcompris-qt-data"], tmp_path, log=lambda *_: None)
    assert "\n" not in str(caught.value)


def test_fetch_without_apt_says_so(tmp_path, monkeypatch):
    def missing(*args, **kwargs):
        raise FileNotFoundError("apt-get")
    monkeypatch.setattr(photos.subprocess, "run", missing)
    with pytest.raises(photos.FetchError, match="Debian-based"):
        photos.fetch(["mate-backgrounds"], tmp_path, log=lambda *_: None)


def test_debian_pool_without_fetch_points_at_the_command(tmp_path, monkeypatch):
    from demo_core.data import ImageSampler

    monkeypatch.setenv("RETOUCH_PHOTOS", str(tmp_path / "empty"))
    photos.manifest.cache_clear()
    with pytest.raises(photos.FetchError, match="data fetch"):
        ImageSampler("train", 64, 0, pool="debian")
    photos.manifest.cache_clear()
