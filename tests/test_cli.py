import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from demo_core.__main__ import SUBCOMMANDS, main
from demo_core.testing import build_tiny_bundle


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    bundle = build_tiny_bundle(folder / "bundle")
    rng = np.random.default_rng(0)
    paths = []
    for name in ("x", "y", "q"):
        path = folder / f"{name}.png"
        Image.fromarray((rng.random((40, 40, 3)) * 255).astype(np.uint8)).save(path)
        paths.append(path)
    return bundle, paths, folder


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in SUBCOMMANDS)


@pytest.mark.parametrize("command", ["reconstruct", "generate", "train"])
def test_subcommand_help(command):
    done = subprocess.run([sys.executable, "-m", "demo_core", command, "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and ("usage" in done.stdout.lower() or "parts" in done.stdout)


def test_reconstruct_and_generate(tiny, capsys):
    bundle, (x, y, q), folder = tiny
    assert main(["reconstruct", str(q), "--bundle", str(bundle), "--out", str(folder / "r.png")]) == 0
    assert "PSNR" in capsys.readouterr().out and Image.open(folder / "r.png").size == (16, 16)
    out = folder / "g.png"
    assert main(["generate", "--pair", str(x), str(y), "--query", str(q), "--bundle", str(bundle), "--refine", "scan",
                 "--scan-iterations", "3", "--out", str(out), "--stages"]) == 0
    assert out.exists() and (folder / "g.draft.png").exists() and "SCAN accepted" in capsys.readouterr().out


def test_generate_offers_the_studios_options(tiny, tmp_path, capsys):
    """Every engine option the studio has is on the command line: the TensorAR draft and VSR (old name "self")."""
    _, (x, y, q), _ = tiny
    bundle = build_tiny_bundle(tmp_path / "bundle", refiner=True, tensor=True)
    out = tmp_path / "t.png"
    assert main(["generate", "--pair", str(x), str(y), "--query", str(q), "--bundle", str(bundle), "--draft-mode", "tensor",
                 "--refine", "scan,self", "--scan-iterations", "2", "--top-k", "5", "--candidates", "2",
                 "--quality-score", "head", "--device", "cpu", "--out", str(out), "--stages"]) == 0
    assert out.exists() and (tmp_path / "t.vsr.png").exists() and "stages draft, scan, vsr" in capsys.readouterr().out
    assert main(["generate", "--pair", str(x), str(y), "--query", str(q), "--bundle", str(tiny[0]),
                 "--draft-mode", "tensor", "--out", str(out)]) == 1
    assert "no TensorAR part" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["reconstruct", "/nope.png"], "file not found"),
    (["generate", "--query", "Q"], "at least one --pair"),
    (["generate", "--pair", "X", "/missing.png", "--query", "Q"], "pair 1 answer: file not found"),
    (["reconstruct", "Q", "--bundle", "/no/bundle"], "no such folder"),
])
def test_errors_are_one_line(tiny, capsys, args, message):
    bundle, (x, y, q), _ = tiny
    args = [{"X": str(x), "Q": str(q)}.get(a, a) for a in args]
    if "--bundle" not in args:
        args += ["--bundle", str(bundle)]
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err
