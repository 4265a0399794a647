"""Where a served generation's time goes: the engine alone vs the studio's handler vs the HTTP API.

Serves app.py's page (a free port on 127.0.0.1), then runs the default colorization example with the
studio's default settings, unpaced (frame_ms=0), in three ways, interleaved run by run so all three share
the machine's momentary speed:

    engine   engine.stream(...) to Finished, the same settings the studio passes (request -> final image)
    handler  Studio.generate(...) exhausted in this process (presentation, metrics, plots; no HTTP)
    api      gradio_client submit to /generate and wait for the job (HTTP, queue, encoding, files)

    python -m scripts.api_speed [--runs 5] [--bundle FOLDER] [--server process|thread] [--out docs/results/api_speed.json]

--server process (the default) runs the server as its own process (`python app.py`), as a deployment does, so the
client (the visitor's browser, here gradio_client: it reads every frame and downloads its image) does not share the
server's interpreter; "thread" serves it inside this process (the handler row is then measured on the server's engine).

Prints medians and the API / engine ratio (issue 18's aim: <= 1.5), and the same without the client's uploads of
the request's input files (timed separately, as gradio_client makes them: one POST per file), which a browser makes
when the files are dropped, before Generate.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from scripts.serving import cpu_name, start_server


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--bundle", default=os.environ.get("RETOUCH_BUNDLE"))
    parser.add_argument("--example", default="colorization")
    parser.add_argument("--refiners", default=None, help="studio refiner label (default: the model's default)")
    parser.add_argument("--server", choices=("process", "thread"), default="process")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("GRADIO_TEMP_DIR", tempfile.mkdtemp(prefix="retouch-api-speed-"))

    import app
    from demo_core.engine import load_engine
    from demo_core.events import Finished
    from gradio_client import Client, handle_file
    from studio.handlers import LIVE_OUTPUTS, REFINER_CHOICES, default_refiner, list_examples

    engine = load_engine(args.bundle)
    app.warm_up(engine)
    example = list_examples()[args.example]
    pairs = example.pairs[:engine.max_pairs]
    refiners = args.refiners or default_refiner(engine.available_refiners)
    settings = dict(scan_iterations=30, scan_cells=4, canvas_every=4, seed=0)
    demo = app.build_demo(engine, "embedded default" if not args.bundle else args.bundle)
    studio = demo.studio
    server = None
    if args.server == "thread":
        _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True, **app.launch_options())
    else:
        server, url = _serve(args.bundle)
    rows = []
    try:
        client = Client(url, verbose=False)
        files = {}
        for index, (x, y) in enumerate(pairs, start=1):
            files[f"pair{index}_input"], files[f"pair{index}_answer"] = handle_file(x), handle_file(y)
        upload_paths = [str(path) for pair in pairs for path in pair] + [str(example.query), str(example.truth)]
        request = dict(**files, query=handle_file(example.query), truth=handle_file(example.truth), refiners=refiners,
                       frame_ms=0, api_name="/generate", **settings)
        for index in range(args.runs + 1):                     # run 0 warms every path up
            start = time.perf_counter()
            for event in engine.stream(pairs, example.query, refine=REFINER_CHOICES[refiners], decode_scan_steps=True,
                                       **{**settings, "seed": settings["seed"]}):
                if isinstance(event, Finished):
                    break
            engine_s = time.perf_counter() - start

            start = time.perf_counter()
            handler_frames = sum(1 for _ in studio.generate(pairs, example.query, example.truth, refiners, frame_ms=0, **settings))
            handler_s = time.perf_counter() - start

            start = time.perf_counter()
            job = client.submit(**request)
            first = final = None
            for output in job:
                now = time.perf_counter() - start
                if first is None:
                    first = now
                status = output[LIVE_OUTPUTS.index("status")]
                if final is None and isinstance(status, str) and 'data-state="done"' in status:
                    final = now
            api_s = time.perf_counter() - start
            api_frames = len(job.outputs())
            upload_s = _uploads(client, upload_paths)
            start = time.perf_counter()
            client.predict(api_name="/report")                  # what the page's report event fetches after a run
            report_s = time.perf_counter() - start
            if index:
                rows.append(dict(engine_s=engine_s, handler_s=handler_s, api_s=api_s, upload_s=upload_s,
                                 api_without_uploads_s=api_s - upload_s, api_first_s=first,
                                 api_final_s=final or api_s, report_s=report_s, handler_frames=handler_frames, api_frames=api_frames))
            print(f"run {index}: engine {engine_s * 1000:.0f} ms, handler {handler_s * 1000:.0f} ms ({handler_frames} frames), "
                  f"api {api_s * 1000:.0f} ms ({api_frames} frames; final image at {(final or api_s) * 1000:.0f} ms), "
                  f"then the report {report_s * 1000:.0f} ms",
                  file=sys.stderr)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
        else:
            demo.close()
    median = {key: statistics.median(r[key] for r in rows) for key in rows[0]}
    report = dict(runs=args.runs, example=args.example, refiners=refiners, settings=settings, threads=_threads(),
                  server=args.server, cpu=cpu_name(),
                  median=median, ratio_api_to_engine=median["api_s"] / median["engine_s"],
                  ratio_api_final_image_to_engine=median["api_final_s"] / median["engine_s"],
                  ratio_api_without_uploads_to_engine=median["api_without_uploads_s"] / median["engine_s"],
                  per_api_frame_ms=(median["api_s"] - median["engine_s"]) * 1000 / max(1, median["api_frames"]), rows=rows)
    print(f"medians of {args.runs}: engine {median['engine_s'] * 1000:.0f} ms, handler {median['handler_s'] * 1000:.0f} ms, "
          f"api {median['api_s'] * 1000:.0f} ms ({median['api_frames']:.0f} frames), report {median['report_s'] * 1000:.0f} ms; "
          f"api / engine = "
          f"{report['ratio_api_to_engine']:.2f}x; the client's {len(upload_paths)} uploads {median['upload_s'] * 1000:.0f} ms "
          f"(a browser uploads on drop, before Generate): without them {report['ratio_api_without_uploads_to_engine']:.2f}x")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _uploads(client, paths) -> float:
    """Seconds the client spends uploading a request's input files as gradio_client does (one POST each)."""
    import httpx

    start = time.perf_counter()
    for path in paths:
        with open(path, "rb") as handle:
            httpx.post(client.upload_url, files=[("files", (Path(path).name, handle))], headers=client.headers,
                       cookies=client.cookies).raise_for_status()
    return time.perf_counter() - start


def _serve(bundle):
    """`python app.py` on a free port, in its own process; (process, url) once it answers."""
    env = dict(os.environ, **({"RETOUCH_BUNDLE": str(bundle)} if bundle else {}))
    return start_server(lambda port: ["app.py"], "studio", env=env)


def _threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    sys.exit(main())
