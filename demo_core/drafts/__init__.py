"""The decode loops, one per sequence format: `scan_form` (the default backbone's SCAN-form answer), `raster`
(LVM's raster answer) and `tensor` (TensorAR's sliding windows over the default backbone, scored in SCAN form).
`formats.py` wraps them as the objects `Engine.stream` plugs in."""
