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


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    """Four 40x40 frames of a pan across one random picture (the first three in, the fourth the truth) and a 30x30 one."""
    folder = tmp_path_factory.mktemp("frames")
    picture = (np.random.default_rng(1).random((40, 64, 3)) * 255).astype(np.uint8)
    paths = []
    for index in range(4):
        path = folder / f"f{index + 1}.png"
        Image.fromarray(picture[:, 4 * index:4 * index + 40]).save(path)
        paths.append(str(path))
    Image.fromarray(picture[:30, :30]).save(folder / "small.png")
    return paths, str(folder / "small.png")


def test_generate_the_next_frame(tiny, frames, tmp_path, capsys):
    bundle = tiny[0]
    paths, _ = frames
    out = tmp_path / "next.png"
    assert main(["generate", "--frames", *paths[:3], "--truth", paths[3], "--bundle", str(bundle), "--refine", "scan",
                 "--scan-iterations", "2", "--top-k", "5", "--candidates", "2", "--seed", "1", "--out", str(out),
                 "--stages", "--heatmap"]) == 0
    printed = capsys.readouterr().out
    assert out.exists() and (tmp_path / "next.draft.png").exists() and (tmp_path / "next.quality.png").exists()
    assert "stages draft, scan" in printed and "SCAN accepted" in printed
    truth_line = next(line for line in printed.splitlines() if line.startswith("vs truth:"))
    assert "last frame (identity) PSNR" in truth_line and "draft PSNR" in truth_line and "scan PSNR" in truth_line
    # the same run from Python writes the same image
    from demo_core.engine import load_engine

    engine = load_engine(str(bundle))
    again = engine.run(frames=paths[:3], refine=("scan",), seed=1, scan_iterations=2, top_k=5, candidates=2)
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(again.final))


@pytest.mark.parametrize("args, message", [
    (["--frames", "F1"], "at least 2 frames"),
    (["--frames", *["F1"] * 8], "8 frames do not fit in the context: this model holds at most 7"),
    (["--frames", "F1", "F2", "--query", "F3"], "not both"),
    (["--frames", "F1", "F2", "--pair", "F1", "F2"], "not both"),
    (["--frames", "F1", "SMALL"], "Frame 2 is 30x30 but frame 1 is 40x40"),
    (["--frames", "F1", "F2", "--truth", "SMALL"], "truth is 30x30 but the frames are 40x40"),
    (["--frames", "F1", "/missing.png"], "frame 2: file not found"),
    (["--frames", "F1", "F2", "--truth", "/missing.png"], "truth: file not found"),
])
def test_bad_sequences_are_one_line_on_the_command_line(tiny, frames, capsys, args, message):
    paths, small = frames
    names = {"F1": paths[0], "F2": paths[1], "F3": paths[2], "SMALL": small}
    assert main(["generate", *[names.get(a, a) for a in args], "--bundle", str(tiny[0]), "--out", "/tmp/unused.png"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err
