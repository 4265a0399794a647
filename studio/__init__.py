"""The Retouch studio (Gradio UI): `handlers` (event functions, from its parts `examples`, `sequence`, `models`,
`presentation`, `report`) and `layout` (theme, CSS, HTML snippets).

`app.py` builds the page from these; the model lives in `demo_core`.
"""
