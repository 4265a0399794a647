"""Look of the studio: theme, CSS, the header and the stage/progress status line (HTML snippets).

No gradio components are built here (app.py does that) and nothing touches the model.
"""
from __future__ import annotations

import html

from demo_core.viz import ACCEPTED, CURRENT, REJECTED, VSR_CHANGED, WINDOW, stage_title

TITLE = "Retouch — autoregressive image models that fix their own mistakes"

HEADER = """
<div class="rt-header">
  <h1>Retouch <span class="rt-sub">studio</span></h1>
  <p class="rt-lede">Show a few <b>before → after</b> pairs and a query: an autoregressive image model works out
  the task <i>in context</i> (or show a few frames of a sequence: it writes the next one), writes the answer
  token by token, scores every token, then repairs the weak ones (SCAN) and refines all of them (VSR) — live.</p>
</div>
"""

LEGEND_ITEMS = {
    "written": (CURRENT, "token just written"),
    "window": (WINDOW, "TensorAR window (still revised)"),
    "accepted": (ACCEPTED, "SCAN fix kept (score improved)"),
    "rejected": (REJECTED, "SCAN fix rejected (old token kept)"),
    "vsr": (VSR_CHANGED, "changed by VSR"),
}


def legend(*items: str) -> str:
    """A row of colour keys for the boxes drawn on the images."""
    keys = "".join(f'<span><i style="background:{LEGEND_ITEMS[item][0]}"></i>{LEGEND_ITEMS[item][1]}</span>' for item in items)
    return f'<div class="rt-legend">{keys}</div>'


CSS = """
.gradio-container { max-width: 1320px !important; margin: auto; }
.rt-header h1 { font-size: 1.9rem; margin: 0.2rem 0 0.1rem 0; letter-spacing: -0.02em; }
.rt-header .rt-sub { font-weight: 400; color: var(--body-text-color-subdued); font-size: 1.2rem; }
.rt-header .rt-lede { margin: 0.1rem 0 0.4rem 0; font-size: 1.02rem; color: var(--body-text-color); max-width: 60rem; }
.rt-pair-row { align-items: center; gap: 6px !important; }
.rt-arrow { text-align: center; font-size: 1.5rem; color: var(--body-text-color-subdued);
            min-width: 24px !important; flex-grow: 0 !important; }
.rt-arrow p { margin: 0; }
.rt-canvas img, .rt-pixelated img { image-rendering: pixelated; }
#inputs .image-frame { height: 100%; width: 100%; display: flex; align-items: center; justify-content: center; }
#inputs .image-frame img { height: 100% !important; width: auto !important; max-width: 100%; object-fit: contain; }
.rt-status { font-size: 0.92rem; }
.rt-stages { display: flex; gap: 6px; align-items: center; flex-wrap: wrap; margin-bottom: 6px; }
.rt-stage { padding: 2px 10px; border-radius: 999px; border: 1px solid var(--border-color-primary);
            color: var(--body-text-color-subdued); font-size: 0.85rem; }
.rt-stage.done { background: #dcfce7; color: #166534; border-color: #86efac; }
.rt-stage.active { background: #e0e7ff; color: #3730a3; border-color: #818cf8; font-weight: 600; }
.rt-stage.stopped { background: #fee2e2; color: #991b1b; border-color: #fca5a5; }
.rt-sep { color: var(--body-text-color-subdued); }
.rt-bar { height: 6px; background: var(--border-color-primary); border-radius: 3px; overflow: hidden; }
.rt-bar > div { height: 100%; background: linear-gradient(90deg, #6366f1, #22c55e); transition: width 0.15s linear; }
.rt-message { margin-top: 5px; color: var(--body-text-color); }
.rt-status[data-state="error"] .rt-message { color: #b91c1c; font-weight: 600; }
.rt-legend { display: flex; flex-wrap: wrap; gap: 14px; font-size: 0.82rem; color: var(--body-text-color-subdued);
             margin: 2px 0 4px 0; }
.rt-legend i { display: inline-block; width: 11px; height: 11px; border-radius: 2px; margin-right: 5px; vertical-align: -1px; }
.rt-model { font-size: 0.85rem; color: var(--body-text-color-subdued); }
.rt-examples .grid-wrap { min-height: 0 !important; }
.rt-wide-thumbs .thumbnail-item { aspect-ratio: auto !important; height: 88px !important; }
.rt-hint { font-size: 0.85rem; color: var(--body-text-color-subdued); margin-top: -4px; }
#outputs label[data-testid="block-label"].float { position: static; margin-bottom: 4px; }
footer { display: none !important; }
"""


def theme():
    """A calm theme with system fonts only (no web-font downloads: the studio works offline)."""
    import gradio as gr

    return gr.themes.Soft(primary_hue="indigo", secondary_hue="emerald", neutral_hue="slate",
                          font=("ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "sans-serif"),
                          font_mono=("ui-monospace", "SFMono-Regular", "Menlo", "monospace"))


def status_html(stages: list[str], active: str | None, fraction: float, message: str, state: str = "running") -> str:
    """The status line: stage pills (done / active / pending), a progress bar of the active stage, a message.

    `state` ("idle", "running", "done", "stopped", "error") is kept in a data attribute so the Stop
    handler can tell whether a run was still going.
    """
    pills = []
    reached = False
    for stage in stages:
        if state == "done":
            kind = "done"
        elif stage == active:
            kind = "stopped" if state == "stopped" else "active"
            reached = True
        else:
            kind = "" if reached or active is None else "done"
        pills.append(f'<span class="rt-stage {kind}">{html.escape(stage_title(stage))}</span>')
    arrow = '<span class="rt-sep">›</span>'
    percent = 100.0 if state == "done" else max(0.0, min(1.0, fraction)) * 100
    return (f'<div class="rt-status" data-state="{state}">'
            f'<div class="rt-stages">{arrow.join(pills)}</div>'
            f'<div class="rt-bar"><div style="width:{percent:.1f}%"></div></div>'
            f'<div class="rt-message">{html.escape(message)}</div></div>')


IDLE_STATUS = status_html(["draft"], None, 0.0, "Pick an example (or upload pairs and a query), then press Generate.", "idle")
SEQUENCE_IDLE_STATUS = status_html(["draft"], None, 0.0, "Pick a sequence example (or add at least 2 frames), then press "
                                   "Generate: the model writes the next frame.", "idle")
