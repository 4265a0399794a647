"""The plotting scripts that read training logs (scripts/), on small synthetic logs."""
import json

from scripts import backbone_curves


def validation_line(step: int, accuracy: float, copy: float | None = None) -> str:
    values = {"token_accuracy": accuracy, "per_task": {"inpaint": accuracy, "colorize": accuracy / 2, "edges_canny": 0.3},
              "per_group": {"heldout-params k=2": 0.1, "heldout-kind k=2": 0.05}, "quality_auroc": 0.6 + accuracy,
              "draft_auroc": {"inpaint": float("nan")}}               # json writes NaN, as the trainer's log does
    if copy is not None:
        values["copy_accuracy"] = {"inpaint": copy}
    return f"2026-12-02 07:00:00 step {step} validation {json.dumps(values)}"


def test_runs_split_where_the_step_goes_back_and_a_resumed_validation_replaces_its_twin():
    text = "\n".join([validation_line(150, 0.03), validation_line(300, 0.035), "2026-12-02 stopped by signal",
                      validation_line(150, 0.04), validation_line(300, 0.08), validation_line(300, 0.09),
                      validation_line(450, 0.12, copy=0.4)])
    runs = backbone_curves.runs(text)
    assert [[step for step, _ in run] for run in runs] == [[150, 300], [150, 300, 450]]
    assert runs[1][1][1]["token_accuracy"] == 0.09
    assert backbone_curves.value(runs[1][2][1], "copy:inpaint") == 0.4 and backbone_curves.value(runs[1][0][1], "copy:inpaint") is None


def test_the_plot_is_written(tmp_path, capsys):
    log = tmp_path / "train.log"
    log.write_text("\n".join([validation_line(150, 0.03), validation_line(100, 0.05), validation_line(200, 0.1, copy=0.5)]))
    assert backbone_curves.main(["--log", str(log), "--out", str(tmp_path / "curves.png")]) == 0
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    assert "2 run(s); last run steps 100-200, token accuracy 5.0 % -> 10.0 %" in capsys.readouterr().out
    (tmp_path / "empty.log").write_text("nothing here\n")
    assert backbone_curves.main(["--log", str(tmp_path / "empty.log"), "--out", str(tmp_path / "x.png")]) == 1


def test_lookup_probe_reports_every_kind_beside_identity_and_ceiling(tmp_path):
    from demo_core.testing import build_tiny_bundle
    from scripts import lookup_probe

    bundle = build_tiny_bundle(tmp_path / "b")
    out = tmp_path / "probe.json"
    assert lookup_probe.main(["--bundle", str(bundle), "--train", "6", "--val", "3", "--pool", "builtin", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["kinds"]) == set(lookup_probe.CASES)
    for row in report["kinds"].values():
        assert 0.0 <= row["lookup_token_accuracy"] <= 1.0
        assert {"lookup_psnr", "identity_psnr", "ceiling_psnr"} <= set(row)


def test_luma_probe_carries_on_colorize_and_reports_each_tolerance(tmp_path):
    from demo_core.testing import build_tiny_bundle
    from scripts import luma_probe

    bundle = build_tiny_bundle(tmp_path / "b")
    out = tmp_path / "luma.json"
    assert luma_probe.main(["--bundle", str(bundle), "--tasks", "colorize,inpaint:fill=grey", "--n", "1",
                            "--pool", "builtin", "--tolerances", "0.01,0.5", "--out", str(out)]) == 0
    tasks = json.loads(out.read_text())["tasks"]
    assert tasks["colorize"]["residual_percentiles_0_50_100"][1] < 0.01       # grey -> colour keeps the luminance
    assert tasks["inpaint:fill=grey"]["tolerance 0.01"] == tasks["inpaint:fill=grey"]["draft"]   # no relation: unchanged
    assert {"*identity*", "carried always", "tolerance 0.5"} <= set(tasks["colorize"])
