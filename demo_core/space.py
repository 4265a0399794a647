"""`python -m demo_core space`: assemble a deployable Hugging Face Space folder.

    python -m demo_core space --out DIR [--bundle B] [--force] [--require-pinned]

The folder holds exactly what the Space runs:
    README.md          the Space card (spaces/README.md with the LVM revisions filled in)
    requirements.txt   spaces/requirements.txt
    app.py             the Space entry (spaces/app.py): loads the engine at module scope, @spaces.GPU
    retouch_app.py     the repository's app.py (build_demo); renamed because the entry is app.py
    studio/            the UI package
    demo_core/         the engine
    assets/            the embedded default bundle (assets/retouch-tiny, or --bundle) and the examples
Nothing else: no tests, runs, caches, checkpoints or pickles. The revisions in the card come from
`demo_core.lvm` (RETOUCH_LVM_REVISION / RETOUCH_LVM_VQ_REVISION override them); a branch name is
reported as unpinned, and --require-pinned makes that an error.
"""
from __future__ import annotations

import argparse
import re
import shutil
import string
import sys
from pathlib import Path

from .bundle import DEFAULT_BUNDLE, BundleError, load_bundle, resolve
from .export import copy_bundle

REPO_ROOT = Path(__file__).resolve().parents[1]
SPACE_TEMPLATE = REPO_ROOT / "spaces"
COMMIT = re.compile(r"^[0-9a-f]{40}$")
# never shipped, wherever they are
EXCLUDE_DIRS = {"__pycache__", ".pytest_cache", ".ipynb_checkpoints", ".git", "runs", "tests", ".gradio", "flagged"}
EXCLUDE_SUFFIXES = (".pyc", ".pyo", ".pt", ".pth", ".ckpt", ".log", ".tmp")


def _ignore(directory: str, names: list[str]) -> set[str]:
    return {name for name in names if name in EXCLUDE_DIRS or name.endswith(EXCLUDE_SUFFIXES)}


def unpinned(lvm_revision: str, vq_revision: str) -> list[str]:
    """The LVM repos whose revision is not a 40-hex commit sha, each as repo@revision."""
    from .lvm import LVM_BACKBONE_REPO, LVM_TOKENIZER_REPO

    return [f"{repo}@{revision}" for repo, revision in ((LVM_BACKBONE_REPO, lvm_revision), (LVM_TOKENIZER_REPO, vq_revision))
            if not COMMIT.match(revision)]


def render_card(template: Path, lvm_revision: str, vq_revision: str) -> str:
    from .lvm import BACKBONE_FILES, TOKENIZER_FILES

    loose = unpinned(lvm_revision, vq_revision)
    note = "" if not loose else (f" Not pinned to a commit: {', '.join(loose)} (its sha could not be looked up where "
                                 "this was assembled): set it in `demo_core/lvm.py` or RETOUCH_LVM_REVISION / "
                                 "RETOUCH_LVM_VQ_REVISION and reassemble.")
    return string.Template(template.read_text()).substitute(
        lvm_files=",".join(BACKBONE_FILES), vq_files=",".join(TOKENIZER_FILES),
        lvm_revision=lvm_revision, vq_revision=vq_revision, pin_note=note)


def assemble(out: Path, bundle: str | Path | None = None, force: bool = False, require_pinned: bool = False,
             repo_root: Path = REPO_ROOT) -> dict:
    """Write the Space folder; returns {"out", "files", "warnings"}. Raises BundleError for what must change."""
    from .lvm import revisions

    out = Path(out)
    lvm_revision, vq_revision = revisions()
    warnings = []
    loose = unpinned(lvm_revision, vq_revision)
    if loose:
        message = (f"LVM revisions are not pinned to commits ({', '.join(loose)}): "
                   f"set RETOUCH_LVM_REVISION / RETOUCH_LVM_VQ_REVISION to 40-hex shas")
        if require_pinned:
            raise BundleError(message)
        warnings.append(message)
    template = repo_root / "spaces"
    for name in ("README.md", "requirements.txt", "app.py"):
        if not (template / name).is_file():
            raise BundleError(f"{template / name} is missing; the Space template is incomplete")
    default_bundle = resolve(bundle) if bundle is not None else repo_root / "assets" / DEFAULT_BUNDLE.name
    if not (default_bundle / "bundle.json").is_file():
        raise BundleError(f"no embedded default bundle at {default_bundle}; train it first or pass --bundle DIR")
    load_bundle(default_bundle)                             # strict: the Space must be able to load it

    if out.exists() and any(out.iterdir()):
        if not force:
            raise BundleError(f"{out} is not empty; choose a new folder or pass --force to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "README.md").write_text(render_card(template / "README.md", lvm_revision, vq_revision))
    shutil.copy2(template / "requirements.txt", out / "requirements.txt")
    shutil.copy2(template / "app.py", out / "app.py")
    if (repo_root / "app.py").is_file():
        shutil.copy2(repo_root / "app.py", out / "retouch_app.py")
    else:
        warnings.append(f"{repo_root / 'app.py'} does not exist yet: the Space has no UI until it does")
    for package in ("demo_core", "studio"):
        if (repo_root / package).is_dir():
            shutil.copytree(repo_root / package, out / package, ignore=_ignore)
        elif package == "studio":
            warnings.append(f"{repo_root / 'studio'} does not exist: the Space has no studio package")
    assets = repo_root / "assets"
    (out / "assets").mkdir()
    if assets.is_dir():
        for item in sorted(assets.iterdir()):
            if item.is_dir() and item.name not in EXCLUDE_DIRS and item.resolve() != default_bundle.resolve() \
                    and item.name != DEFAULT_BUNDLE.name:
                shutil.copytree(item, out / "assets" / item.name, ignore=_ignore)
            elif item.is_file() and not item.name.endswith(EXCLUDE_SUFFIXES):
                shutil.copy2(item, out / "assets" / item.name)
    copy_bundle(default_bundle, out / "assets" / DEFAULT_BUNDLE.name)   # configs + safetensors only
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    return {"out": str(out), "files": files, "warnings": warnings,
            "bytes": sum((out / f).stat().st_size for f in files)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo_core space", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write (must be empty, or --force)")
    parser.add_argument("--bundle", default=None,
                        help="the embedded default to ship (a bundle folder or Hub id; default assets/retouch-tiny)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--require-pinned", action="store_true", help="fail unless the LVM revisions are commit shas")
    args = parser.parse_args(argv)
    try:
        summary = assemble(args.out, args.bundle, args.force, args.require_pinned)
    except BundleError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for warning in summary["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"wrote {summary['out']}: {len(summary['files'])} files, {summary['bytes'] / 2 ** 20:.1f} MiB")
    print("To publish (not run here):\n"
          f"  hf upload YOUR-ORG/retouch {summary['out']} . --repo-type space\n"
          "then set the Space hardware (the card suggests a10g-small) and, optionally, RETOUCH_MODEL.")
    return 0
