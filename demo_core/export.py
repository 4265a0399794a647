"""`python -m demo_core export`: a push_to_hub-ready copy of a bundle, with a model card.

    python -m demo_core export --out DIR [--bundle B] [--revision R] [--repo-id ORG/NAME] [--license L]

B is the embedded default (no --bundle), a bundle folder, a Hub repo id, or `lvm-7b` (LVM-7B
with its MUSE VQGAN converted to a diffusers VQModel: the whole recipe as one standard bundle).
The copy holds bundle.json, each part's config and safetensors weights (sharded sets with their
index), generation_config.json and training.json where present, and a README.md model card;
nothing else (no pickles, checkpoints or logs). The copy is loaded back strictly before the
command ends. The upload command is printed, never run.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from .bundle import DEFAULT_BUNDLE, BundleError, load_bundle, pixel_range_of, resolve

PART_FILES = ("config.json", "generation_config.json", "training.json")   # plus *.safetensors and their index
VERIFY_LIMIT_BYTES = 2 * 2 ** 30       # larger copies (LVM-7B) are not loaded back by default
LICENSE = "apache-2.0"
TAGS = ["retouch", "image-to-image", "in-context-learning", "autoregressive", "visual-self-refinement", "scan",
        "vqgan", "llama", "transformers", "diffusers"]
PART_LIBRARIES = {
    "tokenizer": "`diffusers.VQModel` (`save_pretrained` layout)",
    "backbone": "`transformers.LlamaForCausalLM` (`save_pretrained` layout)",
    "refiner": "VSR g_phi, `demo_core.refiners.self_refine.SelfRefiner` (`PyTorchModelHubMixin`: config.json + model.safetensors)",
}


def _part_files(folder: Path) -> tuple[list[Path], list[str]]:
    """(files to copy, names left out) of one part folder."""
    keep, skipped = [], []
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        name = path.name
        if name in PART_FILES or name.endswith(".safetensors") or name.endswith(".safetensors.index.json"):
            keep.append(path)
        else:
            skipped.append(path.relative_to(folder).as_posix())
    return keep, skipped


def copy_bundle(folder: Path, out: Path) -> list[str]:
    """Copy what a bundle needs from `folder` to `out`; returns what was left out."""
    info = json.loads((folder / "bundle.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    skipped = []
    for part, name in info.get("parts", {}).items():
        files, left = _part_files(folder / name)
        skipped += [f"{name}/{item}" for item in left]
        for path in files:
            target = out / name / path.relative_to(folder / name)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
    (out / "bundle.json").write_text(json.dumps(info, indent=2) + "\n")
    return skipped


def save_loaded_bundle(bundle, out: Path) -> None:
    """Write a bundle held in memory (e.g. the lvm-7b recipe) in the standard layout, safetensors only."""
    parts = bundle.info["parts"]
    bundle.tokenizer.model.save_pretrained(out / parts["tokenizer"], safe_serialization=True)
    bundle.backbone.save_pretrained(out / parts["backbone"], safe_serialization=True)
    if bundle.vsr is not None:
        bundle.vsr.save_pretrained(out / parts["refiner"])
    info = {k: v for k, v in bundle.info.items() if k != "memory_estimate_bytes"}
    (out / "bundle.json").write_text(json.dumps(info, indent=2) + "\n")


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _parameters(folder: Path) -> int:
    """Parameter count of a part from its safetensors headers (no weights read)."""
    from safetensors import safe_open

    total = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(file, framework="pt") as handle:
            for key in handle.keys():
                count = 1
                for dim in handle.get_slice(key).get_shape():
                    count *= dim
                total += count
    return total


def _training_facts(folder: Path) -> list[str]:
    """Markdown lines from a part's training.json (what was trained, how long, how well), if any."""
    path = folder / "training.json"
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        return [f"- `{folder.name}/training.json` is not valid JSON"]
    lines = []
    for key, label in (("step", "steps"), ("elapsed_minutes", "training time (minutes, CPU)"), ("command", "command")):
        if key in data:
            value = f"`{data[key]}`" if key == "command" else data[key]
            lines.append(f"- {label}: {value}")
    validation = data.get("validation")
    if isinstance(validation, dict):
        numbers = {k: v for k, v in validation.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if numbers:
            lines.append("- validation: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                      for k, v in numbers.items()))
        for name, table in validation.items():
            if isinstance(table, dict) and table and all(isinstance(v, (int, float)) for v in table.values()):
                lines.append(f"- validation {name}: " + ", ".join(f"{k} {float(v):.3g}" for k, v in table.items()))
    return lines


def model_card(out: Path, repo_id: str, license_id: str = LICENSE) -> str:
    """README.md for the exported bundle in `out`: YAML front matter + what each part is and how to load it."""
    from huggingface_hub import ModelCardData

    info = json.loads((out / "bundle.json").read_text())
    parts = info["parts"]
    lvm = info.get("sequence_format") == "lvm"
    data = ModelCardData(library_name="retouch", license=license_id, pipeline_tag="image-to-image", tags=list(TAGS),
                         base_model=[info["sources"]["backbone"]["repo"], info["sources"]["tokenizer"]["repo"]]
                         if lvm and "sources" in info else None)
    name = info.get("name", out.name)
    codes, cells = int(info["codebook_size"]), int(info["tokens_per_image"])
    low, high = pixel_range_of(info)
    rows = []
    for part, folder in parts.items():
        rows.append(f"| `{folder}/` | {part} | {PART_LIBRARIES.get(part, part)} | {_parameters(out / folder) / 1e6:,.2f}M |")
    if lvm:
        sequence = (f"LVM format: each image is {cells} raster codes; the context `[x1, y1, ..., xK, yK, xq]` is the "
                    f"images concatenated with no BOS and no separators, then {cells} codes are sampled for `yq`. "
                    f"Ids >= {codes} are LVM's special tokens and are never sampled; `eos_token_id` 2 is a valid code "
                    f"and never stops generation. Quality has no trained signal here: {info.get('quality_signal', '')}.")
    else:
        special = info.get("special_tokens", {})
        sequence = (f"Context in LVM format `[x1, y1, ..., xK, yK, xq]` ({cells} raster codes per image, no BOS, no "
                    f"separators); the answer in SCAN form `[<at_n>, y_n, ...]`: ids {special.get('at_first')}..{special.get('at_last')} "
                    f"are the position-instruction tokens `<at_n>`, {special.get('good')} / {special.get('bad')} the quality "
                    f"tokens `<good>` / `<bad>` whose logits at `y_n` give the per-token quality score.")
    training = []
    for part, folder in parts.items():
        facts = _training_facts(out / folder)
        if facts:
            training += [f"**{part}**", "", *facts, ""]
    if not training:
        training = ["No `training.json` in the parts: " + ("these are the upstream LVM weights, converted, not retrained."
                                                           if lvm else "training facts were not recorded."), ""]
    tasks = ", ".join(info.get("tasks") or []) or "any (given by the demonstration pairs)"
    revision_hint = 'revision="<commit sha>"'
    refiner_lines = ([
        "# the VSR refiner (g_phi): PyTorchModelHubMixin has no subfolder argument, so fetch the folder first",
        "from huggingface_hub import snapshot_download",
        "from demo_core.refiners.self_refine import SelfRefiner",
        f'folder = snapshot_download("{repo_id}", allow_patterns=["{parts["refiner"]}/*"])',
        f'g_phi = SelfRefiner.from_pretrained(f"{{folder}}/{parts["refiner"]}")',
    ] if "refiner" in parts else [])
    body = "\n".join([
        f"# {name}: a Retouch bundle",
        "",
        "An in-context autoregressive image model with refiners, for the Retouch studio: give K demonstration "
        "pairs (x → y) and a query image; the model writes the answer token by token, then SCAN (quality-scored "
        "regeneration) and VSR (visual self-refinement) repair it.",
        "",
        f"- images: {info['image_size']}×{info['image_size']} RGB → {info['grid']}×{info['grid']} = {cells} tokens, "
        f"{codes} codes",
        f"- pixels: the VQ reads and writes RGB in [{low:g}, {high:g}] (`pixel_range` in bundle.json): map images in "
        f"[0, 1] onto it before `encode` and clamp decodes to it",
        f"- vocabulary: {info['vocab_size']} ids (codes 0..{codes - 1}, special ids above)",
        f"- context: up to {info['max_pairs']} demonstration pairs",
        f"- tasks trained on: {tasks}",
        "",
        "## Parts",
        "",
        "| folder | part | format | parameters |",
        "|---|---|---|---|",
        *rows,
        "",
        "`bundle.json` records the format version, image size, grid, tokens per image, codebook size, the "
        "tokenizer's pixel range, sequence format, special token ids, tasks, which parts are present and, where "
        "the model has its own, its default sampling.",
        "",
        "## Sequence format",
        "",
        sequence,
        "",
        "## Load it",
        "",
        "With Retouch (`demo_core`, from the Retouch repository):",
        "",
        "```python",
        "from demo_core import load_engine",
        f'engine = load_engine("{repo_id}", {revision_hint})   # or a local folder',
        'result = engine.run(pairs=[(x1, y1), (x2, y2)], query=q, refine=("scan",), seed=0)',
        "result.final.save(\"answer.png\")",
        "```",
        "",
        "With the plain libraries (each part is in its library's own layout):",
        "",
        "```python",
        "from diffusers import VQModel",
        "from transformers import LlamaForCausalLM",
        f'vq = VQModel.from_pretrained("{repo_id}", subfolder="{parts["tokenizer"]}")          # keep it float32',
        f'lm = LlamaForCausalLM.from_pretrained("{repo_id}", subfolder="{parts["backbone"]}")',
        *refiner_lines,
        "```",
        "",
        "The VQ's `decode` takes code *vectors* (`lookup_from_codebook` is off): look codes up in "
        "`vq.quantize.embedding.weight`, then `vq.decode(vectors, force_not_quantize=True)`.",
        "",
        "## Training",
        "",
        *training,
        "## Limitations",
        "",
        ("LVM-7B is a pretrained generalist without instruction tuning; the quality map and SCAN here are the "
         "training-free fallback (token probabilities), not a trained quality head." if lvm else
         "A small model trained on a CPU from images shipped in Python packages (scikit-image, matplotlib) and "
         "procedural images: a demonstration of the method, not a production image editor."),
        "",
    ])
    return f"---\n{data.to_yaml()}\n---\n\n{body}"


def upload_commands(out: Path, repo_id: str) -> str:
    return "\n".join([
        "To publish (not run here):",
        f"  hf upload {repo_id} {out} . --repo-type model",
        "or in Python:",
        f"  from huggingface_hub import HfApi; HfApi().create_repo('{repo_id}', exist_ok=True); "
        f"HfApi().upload_folder(repo_id='{repo_id}', folder_path='{out}')",
    ])


def export(source, out: Path, revision: str | None = None, repo_id: str | None = None, license_id: str = LICENSE,
           force: bool = False, verify: bool | None = None) -> dict:
    """Write the copy and its card; returns a summary. Raises BundleError for anything unusable."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not force:
            raise BundleError(f"{out} is not empty; choose a new folder or pass --force to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    skipped: list[str] = []
    if isinstance(source, str) and source.lower() in ("lvm-7b", "lvm"):
        import torch

        from .lvm import load_lvm_bundle

        bundle = load_lvm_bundle(device="cpu", dtype=torch.float16, revision=revision)
        save_loaded_bundle(bundle, out)
    else:
        folder = resolve(source, revision)
        load_bundle(folder)                                # strict: what is copied is known to load
        skipped = copy_bundle(folder, out)
    info = json.loads((out / "bundle.json").read_text())
    repo_id = repo_id or f"YOUR-ORG/{info.get('name', 'retouch-bundle')}"
    (out / "README.md").write_text(model_card(out, repo_id, license_id))
    size = _size(out)
    verified = False
    if verify or (verify is None and size <= VERIFY_LIMIT_BYTES):
        import torch

        load_bundle(out, dtype=torch.float16 if info.get("sequence_format") == "lvm" else torch.float32)
        verified = True
    return {"out": str(out), "bytes": size, "skipped": skipped, "verified": verified, "repo_id": repo_id}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo_core export", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write (must be empty, or --force)")
    parser.add_argument("--bundle", default=None, help=f"bundle folder, Hub repo id or lvm-7b (default: {DEFAULT_BUNDLE.name})")
    parser.add_argument("--revision", default=None, help="Hub revision of --bundle (a commit sha pins it)")
    parser.add_argument("--repo-id", default=None, help="the Hub repo it will be uploaded to (used in the card)")
    parser.add_argument("--license", default=LICENSE, help=f"license id for the card (default {LICENSE})")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--verify", action=argparse.BooleanOptionalAction, default=None,
                        help="load the copy back strictly (default: when under 2 GiB)")
    args = parser.parse_args(argv)
    try:
        summary = export(args.bundle, args.out, args.revision, args.repo_id, args.license, args.force, args.verify)
    except BundleError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {summary['out']} ({summary['bytes'] / 2 ** 20:.1f} MiB)"
          + ("; loaded back strictly" if summary["verified"] else "; not loaded back (large): load_bundle() it to check"))
    if summary["skipped"]:
        print("left out (not part of a bundle): " + ", ".join(summary["skipped"]))
    print(upload_commands(Path(summary["out"]), summary["repo_id"]))
    return 0
