"""demo_core.viz: pure picture and plot functions, checked on tiny arrays."""
import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

from demo_core import viz


def solid(colour, size=8):
    return Image.new("RGB", (size, size), colour)


def gradient_image(size=8):
    ramp = np.linspace(0, 255, size, dtype=np.uint8)
    return Image.fromarray(np.stack(list(np.meshgrid(ramp, ramp)) + [np.full((size, size), 128, np.uint8)], axis=-1))


@pytest.mark.parametrize("side, expected", [(64, 6), (16, 24), (384, 1), (1000, 1)])
def test_display_scale_reaches_the_display_side(side, expected):
    assert viz.display_scale(side) == expected
    assert side * expected >= viz.DISPLAY_SIDE or expected == 1


def test_upscale_is_nearest_blocks():
    image = gradient_image(4)
    big = viz.upscale(image, 3)
    assert big.size == (12, 12)
    pixels = np.asarray(big)
    assert np.array_equal(pixels[::3, ::3], np.asarray(image))       # each pixel became a 3x3 block
    assert np.array_equal(pixels[1::3, 2::3], np.asarray(image))


def test_cell_box_and_mask_tile_the_image():
    grid, side = 4, 30      # side not a multiple of grid: boxes still tile without gaps
    total = np.zeros((side, side), int)
    for cell in range(grid * grid):
        x0, y0, x1, y1 = viz.cell_box(cell, grid, side)
        total[y0:y1, x0:x1] += 1
    assert (total == 1).all()
    mask = viz.cell_mask([0, 5], grid, side)
    assert mask.shape == (side, side) and mask[0, 0] and not mask[0, side - 1]
    for cell in range(grid * grid):        # boxes and masks agree pixel for pixel
        x0, y0, x1, y1 = viz.cell_box(cell, grid, side)
        single = viz.cell_mask([cell], grid, side)
        assert single[y0:y1, x0:x1].all() and single.sum() == (x1 - x0) * (y1 - y0)


def test_canvas_view_keeps_written_cells_and_dims_the_rest():
    canvas = solid((200, 180, 40), 8)
    written = np.zeros((2, 2), bool)
    written[0, 0] = True
    view = np.asarray(viz.canvas_view(canvas, written, scale=10)).astype(int)
    assert view.shape == (80, 80, 3)
    assert (view[:40, :40] == (200, 180, 40)).all()                  # written cell untouched
    pending = view[40:, 40:]
    assert pending.mean() < np.array((200, 180, 40)).mean()           # dimmed ...
    assert len({tuple(p) for p in pending.reshape(-1, 3)}) >= 2        # ... and hatched (two colours)


def test_canvas_view_marks_the_current_cell():
    written = np.ones((2, 2), bool)
    view = np.asarray(viz.canvas_view(solid((0, 0, 0)), written, scale=10, current_cell=3))
    assert tuple(view[40, 40]) == viz._rgb(viz.CURRENT)               # top-left corner of cell 3
    assert tuple(view[0, 0]) == (0, 0, 0)


def test_canvas_view_boxes_the_tensor_window():
    written = np.ones((2, 2), bool)
    view = np.asarray(viz.canvas_view(solid((0, 0, 0)), written, scale=10, current_cell=0, window_cells=[1, 2]))
    assert view.shape == (80, 80, 3)                                     # 8 px image x 10, cells of 40 px
    assert tuple(view[0, 40]) == viz._rgb(viz.WINDOW) and tuple(view[40, 0]) == viz._rgb(viz.WINDOW)
    assert tuple(view[0, 0]) == viz._rgb(viz.CURRENT) and tuple(view[20, 20]) == (0, 0, 0)
    assert tuple(view[60, 60]) == (0, 0, 0)                              # cell 3: neither


def test_quality_overlay_colours_low_red_and_high_green():
    quality = np.array([[0.0, 1.0], [1.0, 0.0]])
    overlay = np.asarray(viz.quality_overlay(solid((128, 128, 128)), quality, alpha=1.0, scale=4)).astype(int)
    assert overlay.shape == (32, 32, 3)
    low, high = overlay[0, 0], overlay[0, 31]
    assert low[0] > low[1] and high[1] > high[0]


def test_quality_overlay_default_is_display_sized():
    assert viz.quality_overlay(solid((1, 2, 3), 64), np.full((8, 8), 0.5)).size == (384, 384)


def test_quality_bands_cover_each_token_once():
    quality = np.array([[0.1, 0.3], [0.6, 0.9]])
    bands = viz.quality_bands(quality, side=20, opacity=0.5)
    assert [label for _, label in bands] == [label for label, _ in viz.QUALITY_BANDS]   # best first, all four
    coverage = sum((mask > 0).astype(int) for mask, _ in bands)
    assert coverage.shape == (20, 20) and (coverage == 1).all()
    assert all(mask.max() == pytest.approx(0.5) for mask, _ in bands)
    assert bands[0][0][15, 15] > 0 and bands[-1][0][0, 0] > 0               # 0.9 is "high", 0.1 is "low"
    assert set(label for _, label in bands) <= set(viz.quality_band_colours())
    assert len(viz.quality_bands(np.full((2, 2), 0.9), 4)) == 1          # empty bands are left out


def test_quality_bands_follow_a_narrow_range():
    quality = np.array([[0.40, 0.43], [0.45, 0.48]])
    low, high = viz.quality_range(quality, min_span=0.08)
    assert (low, high) == pytest.approx((0.40, 0.48))
    labels = [label for _, label in viz.quality_bands(quality, 4, low, high)]
    assert labels == ["high", "mid-high", "mid-low", "low"]
    assert [label for _, label in viz.quality_bands(quality, 4)] == ["mid-low"]   # on [0, 1] all in one band
    assert viz.quality_band_edges(0.4, 0.48)[2] == pytest.approx(0.44)


def test_quality_range_is_at_least_min_span_and_inside_0_1():
    assert viz.quality_range(np.full((2, 2), 0.5)) == pytest.approx((0.45, 0.55))
    assert viz.quality_range(np.full((2, 2), 0.99)) == pytest.approx((0.9, 1.0))
    assert viz.quality_range(np.zeros((2, 2)), np.ones((2, 2))) == (0.0, 1.0)


def test_patch_boxes_use_accepted_and_rejected_colours():
    view = np.asarray(viz.patch_boxes(solid((0, 0, 0)), cells=[0, 3], accepted=[True, False], grid=2, scale=20))
    assert tuple(view[0, 0]) == viz._rgb(viz.ACCEPTED)
    assert tuple(view[80, 80]) == viz._rgb(viz.REJECTED)
    assert tuple(view[40, 120]) == (0, 0, 0)                            # untouched cell stays as is
    assert viz._rgb(viz.ACCEPTED) != viz._rgb(viz.REJECTED)


def test_changed_cells_view_boxes_in_vsr_colour():
    view = np.asarray(viz.changed_cells_view(solid((255, 255, 255)), [1], grid=2, scale=20))
    assert tuple(view[0, 80]) == viz._rgb(viz.VSR_CHANGED)
    assert tuple(view[0, 0]) == (255, 255, 255)


def test_stage_titles():
    assert viz.stage_title("scan") == "SCAN" and viz.stage_title("vsr") == viz.stage_title("self") == "VSR"
    assert viz.stage_title("scan#2") == "SCAN (2)" and viz.stage_title("draft") == "draft"


def test_stage_grid_lays_out_tiles_with_labels():
    sheet = viz.stage_grid({"draft": solid((255, 0, 0)), "scan": solid((0, 255, 0))}, {"draft": "20.1 dB"}, tile=50, gap=5)
    assert sheet.width == 2 * 50 + 3 * 5 and sheet.height > 50
    pixels = np.asarray(sheet)
    assert tuple(pixels[30, 30]) == (255, 0, 0) and tuple(pixels[30, 85]) == (0, 255, 0)
    below = pixels[50 + 5:, :]
    assert (below < 200).any()                                           # some dark label text
    with pytest.raises(ValueError):
        viz.stage_grid({})


def test_strip_draws_arrows_between_pairs():
    sheet = viz.strip([solid((255, 0, 0)), solid((0, 0, 255))], tile=20, gap=4, arrows=[0])
    assert sheet.width == 2 * 20 + 3 * 4 + 20 // 4


def test_running_mean_has_no_edge_dip():
    assert np.allclose(viz.running_mean(np.ones(10), 4), 1.0)


def test_cosine_distance_figure_has_one_curve_pair_per_stage():
    figure = viz.cosine_distance_figure({"draft": np.linspace(0, 1, 16), "self": np.linspace(0, 0.5, 16)})
    assert isinstance(figure, Figure)
    lines = figure.axes[0].get_lines()
    assert len(lines) == 4                                               # raw + running mean per stage
    assert figure.legends and "VSR" in " ".join(t.get_text() for t in figure.legends[0].get_texts())


def test_quality_figure_plots_the_mean_and_the_bars():
    figure = viz.quality_figure([1, 2, 3], [0.5, 0.55, 0.6], accepted=[2, 1, 0], rejected=[2, 3, 4], draft_quality=0.45)
    line_axes = figure.axes[0]
    assert list(line_axes.get_lines()[-1].get_ydata()) == [0.5, 0.55, 0.6]
    assert len(figure.axes[1].patches) == 6                              # accepted + rejected bars


def test_tensor_canvas_fades_provisional_cells_and_counts_revisions():
    from demo_core.viz import canvas_view

    canvas = Image.new("RGB", (4, 4), (200, 200, 200))
    written = np.array([[1, 1], [1, 0]], dtype=bool)
    final = np.array([[1, 0], [0, 0]], dtype=bool)
    revisions = np.array([[1, 2], [3, 0]])
    plain = np.asarray(canvas_view(canvas, written, scale=40))
    view = np.asarray(canvas_view(canvas, written, scale=40, final=final, revisions=revisions))
    final_cell, provisional, unwritten = view[5:75, 5:75], view[100:150, 30:75], view[100:150, 100:150]   # 80-px cells
    assert np.array_equal(final_cell, plain[5:75, 5:75])                         # final cells untouched
    assert provisional.mean() < final_cell.mean() and provisional.mean() > unwritten.mean()   # faded, less than unwritten
    assert (view[0:20, 80:100] == 255).all(axis=-1).any()                         # a white revision digit in the corner
    assert not (plain[0:20, 80:100] == 255).all(axis=-1).any()
