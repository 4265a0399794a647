"""Real photos for training, offline, from Debian packages: fetch, unpack, credit, list.

    python -m demo_core data fetch            # idempotent: a second run does nothing
    python -m demo_core data list             # what the cache holds, per package and kind

Each package is downloaded with `apt-get download` and unpacked with `dpkg-deb -x` into a cache
outside the repository (`~/.cache/retouch/photos`, or `$RETOUCH_PHOTOS`); nothing is installed on
the system and nothing is committed. Images are stored downscaled (short side <= 1024: a 64x64
crop at the largest scale we draw still comes from at least 200 source pixels) as
`images/<package>/<name>.png`, and `manifest.json` lists every file with its package, kind
(photo, wallpaper, stamp), the licence that the package's DEP-5 copyright file gives for it, and
the split. The copyright files are kept beside the images for the per-file credits.

GCompris packs its photos inside Qt resource files (`demo_core.rcc` reads them); only opaque WebP
entries with a short side >= 200 px and many colours are kept (its drawings are SVG or have alpha
or few colours).
"""
from __future__ import annotations

import fnmatch
import functools
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

MAX_SHORT_SIDE = 1024
VALIDATION_SHARE = 0.1     # of each package's images, chosen by a hash of the name (stable everywhere)


@dataclass(frozen=True)
class Package:
    name: str
    kind: str                    # photo | wallpaper | stamp
    patterns: tuple[str, ...]    # globs of wanted files inside the unpacked package (rcc: the .rcc files)
    packed: bool = False         # images live inside Qt .rcc files


PACKAGES = (
    Package("gcompris-qt-data", "photo", ("usr/share/gcompris-qt/rcc/*.rcc",), packed=True),
    Package("plasma-workspace-wallpapers", "wallpaper", ("usr/share/wallpapers/*/contents/images/*",)),
    Package("lomiri-wallpapers-16.04", "wallpaper", ("usr/share/backgrounds/*.jpg",)),
    Package("lomiri-wallpapers-20.04", "wallpaper", ("usr/share/backgrounds/*.jpg",)),
    Package("mate-backgrounds", "wallpaper", ("usr/share/backgrounds/mate/*/*",)),
    Package("tuxpaint-stamps-default", "stamp", ("usr/share/tuxpaint/stamps/**/*.png",)),
)
PACKAGE_NAMES = tuple(package.name for package in PACKAGES)


class FetchError(RuntimeError):
    """A package could not be fetched; the message is one line saying what to do."""


def cache_dir() -> Path:
    return Path(os.environ.get("RETOUCH_PHOTOS") or Path.home() / ".cache" / "retouch" / "photos")


def split_of(name: str) -> str:
    """'val' for a stable ~10 % of names, else 'train' (sha1 of the name, so every machine agrees)."""
    digest = int(hashlib.sha1(name.encode()).hexdigest()[:8], 16)
    return "val" if digest % 1000 < VALIDATION_SHARE * 1000 else "train"


# -- licences ------------------------------------------------------------------------------
def dep5_licences(text: str) -> list[tuple[tuple[str, ...], str]]:
    """(file globs, licence short name) stanzas of a machine-readable Debian copyright file."""
    stanzas, files, licence = [], None, None
    for line in text.splitlines() + [""]:
        if not line.strip():
            if files and licence:
                stanzas.append((tuple(files), licence))
            files, licence = None, None
        elif line.startswith("Files:"):
            files = line[6:].split()
        elif files is not None and line.startswith(" ") and licence is None and not line.strip().startswith("."):
            files += line.split()
        elif line.startswith("License:"):
            licence = licence or line[8:].strip()
    return stanzas


def licence_for(path: str, stanzas) -> str:
    """The licence of the last stanza whose globs match `path` (DEP-5: the last match wins)."""
    found = "see copyright file"
    for globs, licence in stanzas:
        if any(fnmatch.fnmatch(path, glob) or fnmatch.fnmatch(Path(path).name, glob) for glob in globs):
            found = licence
    return found


# -- images ----------------------------------------------------------------------------------
def looks_like_photo(image: Image.Image) -> bool:
    """Many distinct colours in a 64x64 thumbnail: photos have thousands, drawings a few hundred."""
    thumb = np.asarray(image.convert("RGB").resize((64, 64), Image.Resampling.BILINEAR))
    return len(np.unique(thumb.reshape(-1, 3), axis=0)) >= 1500


def downscale(image: Image.Image) -> Image.Image:
    short = min(image.size)
    if short <= MAX_SHORT_SIDE:
        return image
    scale = MAX_SHORT_SIDE / short
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.LANCZOS)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("_")[:120]


def _unpacked_images(package: Package, root: Path):
    """(name inside the package, PIL image) for every wanted image of an unpacked package."""
    from .rcc import RccFile

    for pattern in package.patterns:
        for path in sorted(root.glob(pattern)):
            relative = str(path.relative_to(root))
            if package.packed:
                archive = RccFile.open(path)
                for entry in archive.entries():
                    if not entry.path.endswith(".webp"):
                        continue
                    image = Image.open(io.BytesIO(archive.read(entry)))
                    # photos are opaque; drawings, icons and cut-outs carry alpha or few colours
                    if image.mode == "RGB" and min(image.size) >= 200 and looks_like_photo(image):
                        yield entry.path.lstrip("/"), image.convert("RGB")
            elif package.kind == "stamp":
                image = Image.open(path)
                if image.mode in ("RGBA", "LA", "P") and min(image.size) >= 64:
                    yield relative, image.convert("RGBA")
            elif path.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"):
                yield relative, Image.open(path).convert("RGB")


def _largest_per_folder(items):
    """Plasma wallpapers ship one picture at several sizes: keep the largest of each folder."""
    best: dict[str, tuple[str, Image.Image]] = {}
    for name, image in items:
        key = str(Path(name).parent) if "/contents/images" in name else name
        if key not in best or image.width * image.height > best[key][1].width * best[key][1].height:
            best[key] = (name, image)
    return list(best.values())


# -- fetch -----------------------------------------------------------------------------------
def _run(command: list[str], cwd: Path, package: str) -> None:
    try:
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=1800)
    except FileNotFoundError:
        raise FetchError(f"{command[0]} is not on this machine: `data fetch` needs a Debian-based system "
                         "(apt-get and dpkg-deb)") from None
    except subprocess.TimeoutExpired:
        raise FetchError(f"{' '.join(command)} took over 30 minutes; check the network and run `data fetch` again") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        if "Unable to locate" in done.stderr or "has no installation candidate" in done.stderr:
            raise FetchError(f"package {package} is not in this machine's apt sources ({last}); "
                             f"run `apt-get update` or fetch the others with --packages")
        if any(word in done.stderr for word in ("Could not resolve", "Failed to fetch", "Temporary failure", "Connection")):
            raise FetchError(f"could not reach the Debian package registry for {package} ({last}); "
                             "check the network and run `data fetch` again")
        raise FetchError(f"{' '.join(command)} failed for {package}: {last}")


def fetch_package(package: Package, cache: Path, progress=None) -> list[dict]:
    """Download, unpack and convert one package; returns its manifest rows. Skips a finished package."""
    target = cache / "images" / package.name
    done_marker = target / ".done.json"
    if done_marker.exists():
        return json.loads(done_marker.read_text())
    with tempfile.TemporaryDirectory(prefix=f"retouch-{package.name}-", dir=cache) as work:
        work = Path(work)
        _run(["apt-get", "download", package.name], work, package.name)
        debs = sorted(work.glob(f"{package.name}_*.deb"))
        if not debs:
            raise FetchError(f"apt-get download {package.name} wrote no .deb file")
        root = work / "root"
        _run(["dpkg-deb", "-x", str(debs[0]), str(root)], work, package.name)
        copyright_file = root / "usr/share/doc" / package.name / "copyright"
        stanzas = dep5_licences(copyright_file.read_text(errors="replace")) if copyright_file.exists() else []
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        if copyright_file.exists():
            shutil.copy(copyright_file, target / "copyright")
        items = _unpacked_images(package, root)
        if package.kind == "wallpaper":
            items = _largest_per_folder(items)
        rows = []
        for name, image in items:
            file = target / f"{_safe(name.rsplit('.', 1)[0])}.png"
            downscale(image).save(file, optimize=False, compress_level=1)
            rows.append({"file": str(file.relative_to(cache)), "package": package.name, "kind": package.kind,
                         "source": name, "licence": licence_for(name, stanzas), "size": list(image.size),
                         "split": split_of(f"{package.name}/{name}")})
            if progress:
                progress(package.name, len(rows))
    done_marker.write_text(json.dumps(rows, indent=1))
    return rows


def fetch(packages=PACKAGE_NAMES, cache: Path | None = None, log=print) -> dict:
    """Fetch every package that is not in the cache yet; write manifest.json. Returns the manifest."""
    cache = Path(cache or cache_dir())
    cache.mkdir(parents=True, exist_ok=True)
    chosen = [package for package in PACKAGES if package.name in packages]
    unknown = set(packages) - set(PACKAGE_NAMES)
    if unknown:
        raise FetchError(f"unknown package(s) {', '.join(sorted(unknown))}; choose from {', '.join(PACKAGE_NAMES)}")
    rows = []
    for number, package in enumerate(chosen, 1):
        fresh = not (cache / "images" / package.name / ".done.json").exists()
        if fresh:
            log(f"[{number}/{len(chosen)}] {package.name}: downloading and unpacking")
        counter = (lambda name, count: log(f"  {name}: {count} images") if count % 50 == 0 else None) if fresh else None
        got = fetch_package(package, cache, counter)
        log(f"[{number}/{len(chosen)}] {package.name}: {len(got)} images" + ("" if fresh else " (already in the cache)"))
        rows += got
    manifest = {"cache": str(cache), "images": rows}
    path = cache / "manifest.json"
    text = json.dumps(manifest, indent=1)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return manifest


@functools.lru_cache(maxsize=1)
def manifest(cache: str | None = None) -> tuple[dict, ...]:
    """The manifest's rows, or () when `data fetch` has not run on this machine."""
    path = Path(cache or cache_dir()) / "manifest.json"
    if not path.exists():
        return ()
    return tuple(json.loads(path.read_text())["images"])


def require_manifest() -> tuple[dict, ...]:
    rows = manifest()
    if not rows:
        raise FetchError(f"no photos in {cache_dir()}: run `python -m demo_core data fetch` first")
    return rows


@functools.lru_cache(maxsize=2048)
def load_image(file: str) -> np.ndarray:
    """One cached image as uint8 HxWxC (RGB, or RGBA for stamps)."""
    with Image.open(cache_dir() / file) as image:
        return np.asarray(image).copy()


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m demo_core data", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fetch_parser = sub.add_parser("fetch", help="download and unpack the photo packages (idempotent)")
    fetch_parser.add_argument("--packages", default=",".join(PACKAGE_NAMES),
                              help=f"comma-separated subset of: {', '.join(PACKAGE_NAMES)}")
    sub.add_parser("list", help="what the cache holds")
    args = parser.parse_args(argv)
    try:
        if args.command == "fetch":
            chosen = [name.strip() for name in args.packages.split(",") if name.strip()]
            rows = fetch(chosen)["images"]
            print(f"{len(rows)} images in {cache_dir()} (manifest.json lists file, package, licence, split)")
        else:
            rows = require_manifest()
            from collections import Counter

            for (package, kind, split), count in sorted(Counter((r["package"], r["kind"], r["split"]) for r in rows).items()):
                print(f"{package:30s} {kind:10s} {split:6s} {count:4d}")
    except FetchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0
