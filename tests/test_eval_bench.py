import json

import numpy as np
import pytest

from demo_core import bench as bench_module
from demo_core import eval as eval_module
from demo_core.eval import quality as eval_quality
from demo_core.engine import load_engine
from demo_core.images import float_to_pil
from demo_core.testing import build_tiny_bundle


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return build_tiny_bundle(tmp_path_factory.mktemp("evalbundle") / "b")


def test_eval_writes_table_json_and_plots(bundle, tmp_path):
    out = tmp_path / "eval"
    code = eval_module.main(["--bundle", str(bundle), "--n", "2", "--tasks", "colorization,edges", "--incontext", "1",
                             "--scan-iterations", "2", "--ablate-T", "0,2", "--ablate-K", "1,2", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "results.json").read_text())
    assert set(report["table"]) == {"colorization", "edges"}
    for task, rows in report["table"].items():
        for stage in ("draft", "+SCAN"):
            assert set(rows[stage]) >= {"psnr", "ssim", "lpips", "token_acc", "cos_auc", "fid", "seconds"}
            assert rows[stage]["fid"] is None          # N < 10: FID is not reported
        assert "perplexity" in rows and "quality_auroc" in rows
    assert "edge_f1" in report["table"]["edges"]["draft"]
    assert len(report["curves"]["draft"]) == 16
    assert [r["T"] for r in report["scan_ablation"]] == [0, 2] and {r["K"] for r in report["pairs_ablation"]} == {1, 2}
    assert report["incontext"]["n"] == 1
    for name in ("results.md", "cosine_curve.png", "examples.png"):
        assert (out / name).stat().st_size > 100
    again = tmp_path / "again"
    eval_module.main(["--bundle", str(bundle), "--n", "2", "--tasks", "colorization,edges", "--incontext", "0",
                      "--scan-iterations", "2", "--out", str(again)])
    first = json.loads((again / "results.json").read_text())["table"]["edges"]["draft"]
    assert first["psnr"] == report["table"]["edges"]["draft"]["psnr"]   # deterministic for a seed


def test_eval_paste_flag_reaches_the_runs_and_the_ceiling(bundle, tmp_path):
    """--paste on renders every answer and the ceiling with the query's pixels where it keeps its codes; the tiny
    bundle's default (a whole-image tokenizer) is off."""
    ceilings = {}
    for paste in ("bundle", "on"):
        out = tmp_path / paste
        assert eval_module.main(["--bundle", str(bundle), "--n", "2", "--tasks", "inpainting", "--incontext", "0",
                                 "--scan-iterations", "1", "--paste", paste, "--out", str(out)]) == 0
        report = json.loads((out / "results.json").read_text())
        assert report["settings"]["paste_query"] is (paste == "on")
        assert ("paste on" in (out / "results.md").read_text()) is (paste == "on")
        ceilings[paste] = report["table"]["inpainting"]["references"]["ceiling"]["psnr"]
    assert all(np.isfinite(value) for value in ceilings.values())


def test_eval_luma_carry_flag_reaches_the_runs_and_the_ceiling(bundle, tmp_path):
    """--luma-carry on renders the ceiling, as every answer, with the query's luminance where the pairs show their
    answers keep their inputs' (colorization does): the ceiling moves; the bundle's default is off."""
    ceilings = {}
    for carry in ("bundle", "on"):
        out = tmp_path / carry
        assert eval_module.main(["--bundle", str(bundle), "--n", "2", "--tasks", "colorization", "--incontext", "0",
                                 "--scan-iterations", "1", "--luma-carry", carry, "--out", str(out)]) == 0
        report = json.loads((out / "results.json").read_text())
        assert report["settings"]["luma_carry"] is (carry == "on")
        ceilings[carry] = report["table"]["colorization"]["references"]["ceiling"]["psnr"]
    assert ceilings["on"] != ceilings["bundle"]


def test_perfect_predictor_scores_perfectly(bundle, monkeypatch):
    engine = load_engine(str(bundle))

    def perfect(engine_, example, labels, seed, **settings):
        truth_tokens = engine_.encode([float_to_pil(example.answer)])[0].numpy().reshape(engine_.grid, engine_.grid)
        return {label: {"image": float_to_pil(example.answer), "tokens": truth_tokens, "quality": np.ones((4, 4)),
                        "time": 0.0} for label in labels}

    monkeypatch.setattr(eval_quality, "run_stages", perfect)      # the eval package measures in eval/quality.py
    result = eval_module.evaluate(engine, ["inpainting"], n=2, pairs=1, seed=0, labels=["draft"], settings={}, progress=False)
    row = result["table"]["inpainting"]["draft"]
    assert row["psnr"] == 100.0 and row["ssim"] == pytest.approx(1.0) and row["token_acc"] == 1.0   # exact: capped
    assert row["lpips"] == pytest.approx(0.0, abs=1e-6) and row["cos_auc"] == pytest.approx(0.0, abs=1e-6)


def test_bench_reports_every_figure(bundle, capsys, tmp_path):
    assert bench_module.main(["--bundle", str(bundle), "--runs", "1", "--scan-iterations", "2", "--out", str(tmp_path / "b.json")]) == 0
    report = json.loads((tmp_path / "b.json").read_text())
    for key in ("draft_tokens_per_s", "generate_tokens_per_s", "loop_vs_generate", "scan_vs_draft", "first_canvas_ms",
                "final_ms", "peak_rss_mb"):
        assert report[key] > 0, key
    assert set(report["per_stage_ms"]) >= {"draft", "scan", "decode", "total"}
    q1, mid, q3 = report["scan_vs_draft_per_run"]
    assert 0 < q1 <= mid <= q3
    assert report["fast_path"] == {"runner": "fast_llama", "dtype": "float32", "calibration_ms_per_step": None}  # pinned
    out = capsys.readouterr().out
    assert "our loop / generate" in out and "loops' forward: fast_llama in float32" in out


def test_eval_reports_every_stage_when_a_refiner_exists(tmp_path):
    bundle = build_tiny_bundle(tmp_path / "with_refiner", refiner=True)
    out = tmp_path / "eval"
    assert eval_module.main(["--bundle", str(bundle), "--n", "1", "--tasks", "inpainting", "--incontext", "0",
                             "--scan-iterations", "2", "--out", str(out)]) == 0
    report = json.loads((out / "results.json").read_text())
    assert report["stages"] == ["draft", "+SCAN", "+VSR", "+SCAN+VSR"]
    assert set(report["table"]["inpainting"]) >= {"draft", "+SCAN", "+VSR", "+SCAN+VSR"}


def test_eval_compares_ar_tensorar_control_and_extra_variants(tmp_path):
    """TensorAR rows: the AR draft, the bundle's tensor/, its tensor-control/ and a --tensor-variants folder,
    each on the same examples; a bad variant folder is one error line before any work."""
    from demo_core.drafts.tensor import TensorAdapter
    from demo_core.bundle import load_bundle

    folder = build_tiny_bundle(tmp_path / "with_tensor", tensor=True)
    backbone = load_bundle(folder).backbone
    control = TensorAdapter.for_backbone(backbone, 16, k=1, heads=4)
    control.save_pretrained(folder / "tensor-control")
    info = json.loads((folder / "bundle.json").read_text())
    info["parts"]["tensor_control"] = "tensor-control"
    (folder / "bundle.json").write_text(json.dumps(info))
    TensorAdapter.for_backbone(backbone, 16, k=2, heads=4, schedule="linear").save_pretrained(tmp_path / "k2")
    out = tmp_path / "eval"
    assert eval_module.main(["--bundle", str(folder), "--n", "1", "--tasks", "colorization,posterize", "--incontext", "0",
                             "--scan-iterations", "1", "--tensor-variants", f"k=2 linear={tmp_path / 'k2'}", "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["tensor"]
    assert {r["task"] for r in rows} == {"colorization"}           # core tasks only
    assert [r["variant"] for r in rows] == ["*identity*", "*ceiling*", "AR (SCAN-form draft)", "TensorAR k=4",
                                            "control (k=1, same steps)", "k=2 linear"]    # the references first
    references, rows = rows[:2], rows[2:]
    assert [r["k"] for r in rows] == [1, 4, 1, 2] and rows[3]["schedule"] == "linear"
    assert all(0 <= r["token_acc"] <= 1 and r["seconds"] > 0 for r in rows)
    assert references[0]["token_acc"] is None and references[1]["token_acc"] == 1.0 and references[1]["seconds"] is None
    assert "TensorAR k=4 beats AR (SCAN-form draft) in PSNR on" in (out / "results.md").read_text()
    assert eval_module.main(["--bundle", str(folder), "--n", "1", "--tensor-variants", f"x={tmp_path / 'missing'}",
                             "--out", str(tmp_path / "bad")]) == 1
