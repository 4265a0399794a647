"""Eval on the task family: task specs, convention-following edge scores, task following."""
import json

import numpy as np
import pytest

from demo_core.eval import cli as eval_cli
from demo_core.eval.family import edge_scores, line_mask, parse_spec, sobel_baseline_f1
from demo_core.task_family import FamilyExample, canny_map
from demo_core.testing import build_tiny_bundle


def test_specs_fix_parameters_with_their_types():
    assert parse_spec("inpaint:fill=black") == ("inpaint", {"fill": "black"})
    assert parse_spec("edges_canny:thick=true+sigma=1.5") == ("edges_canny", {"thick": True, "sigma": 1.5})
    assert parse_spec("posterize:levels=3") == ("posterize", {"levels": 3})
    with pytest.raises(ValueError, match="unknown task"):
        parse_spec("sketch")
    with pytest.raises(ValueError, match="fill="):
        parse_spec("inpaint:colour=red")


def test_edge_scores_follow_the_demonstrated_polarity():
    photo = np.full((32, 32, 3), 0.2, np.float32)
    photo[8:24, 10:22] = 0.9                                                    # one bright square: a few lines
    lines = canny_map(photo, 1.0)
    for polarity in ("white", "black"):
        answer = np.repeat((lines if polarity == "white" else 1 - lines)[..., None], 3, -1)
        example = FamilyExample("edges_canny", {"polarity": polarity, "sigma": 1.0, "thick": False}, [], photo, answer, photo)
        assert edge_scores(answer, example)["edge_f1"] == 1.0                   # the right map in its own convention
        assert edge_scores(1 - answer, example)["edge_f1"] < 0.5                # the other polarity is not
        assert 0.0 <= edge_scores(answer, example)["baseline_f1"] <= 1.0
    assert np.allclose(line_mask(np.zeros((4, 4, 3)), "black"), 1.0)
    assert sobel_baseline_f1(photo, lines) < 1.0


def test_eval_runs_family_specs_splits_and_following(tmp_path):
    bundle = build_tiny_bundle(tmp_path / "b")
    out = tmp_path / "eval"
    assert eval_cli.main(["--bundle", str(bundle), "--n", "1", "--tasks", "inpaint:fill=black,edges_canny", "--pairs", "1",
                          "--following", "1", "--split", "heldout", "--sequences", "1", "--frames", "2", "--out", str(out)]) == 0
    report = json.loads((out / "results.json").read_text())
    assert set(report["table"]) == {"inpaint:fill=black", "edges_canny"} and report["split"] == "heldout"
    assert "edge_f1" in report["table"]["edges_canny"]["draft"] and "sobel_baseline_f1" in report["table"]["edges_canny"]
    assert set(report["following"]) == {"val", "heldout"} and "solarize" in report["following"]["heldout"]["per_kind"]
    assert "Task following" in (out / "results.md").read_text()
    sequences = report["sequences"]["table"]
    assert set(sequences) == {"pan", "zoom", "cutout", "brightness"} and {"identity", "ceiling", "draft", "+SCAN"} <= set(sequences["pan"])
    assert "last frame repeated" in (out / "results.md").read_text()
    assert eval_cli.main(["--bundle", str(bundle), "--tasks", "inpaint:colour=red", "--out", str(out)]) == 1


def test_tune_sampling_measures_and_writes_the_bundles_defaults(tmp_path):
    from demo_core.engine import load_engine
    from demo_core.eval import sampling

    bundle = build_tiny_bundle(tmp_path / "b")
    out = tmp_path / "tune.json"
    assert sampling.main(["--bundle", str(bundle), "--tasks", "inpaint:fill=grey", "--n", "1", "--temperatures", "0,1",
                          "--top-ps", "0.9", "--scan-temperatures", "0,1", "--scan-iterations", "2", "--pool", "builtin",
                          "--write", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [(r["temperature"], r["top_p"]) for r in report["draft"]] == [(0.0, 1.0), (1.0, 0.9)]
    engine = load_engine(bundle)
    chosen = report["chosen"]
    assert engine.sampling_defaults == {"temperature": chosen["temperature"], "top_p": chosen["top_p"], "top_k": 0}
    assert engine.bundle.scan_temperature == chosen["scan_temperature"] and "tune-sampling" in engine.sampling_source
    assert sampling.main(["--write", "--n", "1"]) == 1                          # never rewrites the embedded default
