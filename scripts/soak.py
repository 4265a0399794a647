"""Soak: N concurrent clients x M generations against a real server, Stop pressed at random moments.

Serves app.py's page in its own process (a free port on 127.0.0.1; `--server thread`: in this one), as a
deployment does, so RSS is the server's alone; each client is its own gradio_client session (a thread of this
process) submitting /generate back to back; with probability --stop-rate a run is
cancelled (the Stop button's job.cancel()) after a random delay. Reports completed, stopped, errors, lost
requests, p50/p95 latency of completed runs, Stop -> free worker (from the cancel to the next run starting
on the server, measured only when another run was waiting), and RSS at start, after warm-up and at the end.

    python -m scripts.soak [--clients 4] [--generations 100] [--bundle FOLDER | --tiny] [--out docs/results/soak.json]

The server process is this script with `--serve PORT --starts FILE`: the studio of app.py, whose live-frame
generator appends the wall-clock time of every run's start to FILE (what Stop -> free worker is measured from).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

from scripts.serving import start_server


def rss_mb(pid: int | str = "self") -> float:
    """Resident memory of a process (this one by default), in MB."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def percentile(values, q):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def _launch_options() -> dict:
    import app

    return app.launch_options()


def build_server(bundle, on_start):
    """The studio around `bundle`, its live-frame generator calling on_start(time.time()) as each run begins."""
    import app
    import studio.handlers as handlers
    from demo_core.engine import load_engine

    engine = load_engine(bundle)
    app.warm_up(engine)
    live = handlers.live

    def timed_live(frames, **options):
        on_start(time.time())
        yield from live(frames, **options)

    handlers.live = timed_live
    return app.build_demo(engine, "soak"), engine


def serve(bundle, port: int, starts: Path, clients: int) -> int:
    """The server process: serve until terminated, appending each run's start time to `starts`."""
    def log_start(at: float):
        with open(starts, "a") as handle:
            handle.write(f"{at:.6f}\n")

    demo, _ = build_server(bundle, log_start)
    demo.launch(server_name="127.0.0.1", server_port=port, quiet=True, max_threads=clients + 8, **_launch_options())
    return 0


def soak_server(args, starts: Path):
    """This script in --serve mode on a free port; (process, url) once it answers."""
    bundle = ["--bundle", str(args.bundle)] if args.bundle else []
    return start_server(lambda port: ["-m", "scripts.soak", "--serve", str(port), "--starts", str(starts),
                                      "--clients", str(args.clients), *bundle], "soak")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--generations", type=int, default=100)
    parser.add_argument("--bundle", default=os.environ.get("RETOUCH_BUNDLE"))
    parser.add_argument("--tiny", action="store_true", help="the tiny random bundle of demo_core.testing (fast)")
    parser.add_argument("--stop-rate", type=float, default=0.2)
    parser.add_argument("--scan-iterations", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--server", choices=("process", "thread"), default="process")
    parser.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)    # the server process's port
    parser.add_argument("--starts", type=Path, default=None, help=argparse.SUPPRESS)  # where it logs run starts
    args = parser.parse_args(argv)
    os.environ.setdefault("GRADIO_TEMP_DIR", tempfile.mkdtemp(prefix="retouch-soak-"))

    import studio.handlers as handlers
    from gradio_client import Client, handle_file

    if args.tiny:
        from demo_core.testing import build_tiny_bundle

        args.bundle = str(build_tiny_bundle(Path(tempfile.mkdtemp(prefix="retouch-soak-bundle-")) / "tiny"))
    if args.serve is not None:
        return serve(args.bundle, args.serve, args.starts, args.clients)
    example = next(iter(handlers.list_examples().values()))
    server = None
    if args.server == "thread":
        starts: list[float] = []             # server side: when each run began (the worker taken)
        demo, engine = build_server(args.bundle, starts.append)
        _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True, max_threads=args.clients + 8, **_launch_options())
        server_rss = rss_mb
    else:
        from demo_core.engine import load_engine

        engine = load_engine(args.bundle)        # here only for what the requests need: pairs, refiners, grid
        starts_file = Path(tempfile.mkdtemp(prefix="retouch-soak-starts-")) / "starts.txt"
        server, url = soak_server(args, starts_file)
        server_rss = lambda: rss_mb(server.pid)   # noqa: E731
    rss_start = server_rss()
    lock = threading.Lock()
    completed, stopped, errors, lost, latencies, cancels = [], [], [], [], [], []
    rss_after_warmup = [None]

    def client_loop(index: int):
        rng = random.Random(args.seed * 1000 + index)
        client = Client(url, verbose=False, download_files=False)
        files = {}
        for number, (x, y) in enumerate(example.pairs[:engine.max_pairs], start=1):
            files[f"pair{number}_input"], files[f"pair{number}_answer"] = handle_file(x), handle_file(y)
        refiners = "SCAN" if "scan" in engine.available_refiners else "none (draft only)"
        for generation in range(args.generations):
            request = dict(**files, query=handle_file(example.query), refiners=refiners, scan_iterations=args.scan_iterations,
                           scan_cells=4 if engine.grid ** 2 >= 4 else 1, canvas_every=4, frame_ms=0,
                           seed=rng.randrange(2**31), api_name="/generate")
            start = time.time()
            stop_it = rng.random() < args.stop_rate
            try:
                job = client.submit(**request)
                if stop_it:
                    # a random moment: wait until this run is live, then up to 0.5 s more
                    while not job.done() and not job.outputs() and time.time() - start < args.timeout:
                        time.sleep(0.005)
                    time.sleep(rng.random() * 0.5)
                    if not job.done():
                        at = time.time()
                        job.cancel()
                        with lock:
                            cancels.append(at)
                            stopped.append(generation)
                        continue
                outputs = job.result(timeout=args.timeout)
                status = outputs[1] if isinstance(outputs, (list, tuple)) else ""
                with lock:
                    if 'data-state="done"' in str(status):
                        completed.append(generation)
                        latencies.append(time.time() - start)
                    else:
                        lost.append(f"client {index} run {generation}: no final status")
            except Exception as error:     # a lost request or a server error
                with lock:
                    errors.append(f"client {index} run {generation}: {type(error).__name__}: {error}"[:300])
            if index == 0 and generation == min(9, args.generations - 1):
                rss_after_warmup[0] = server_rss()

    began = time.perf_counter()
    threads = [threading.Thread(target=client_loop, args=(index,), daemon=True) for index in range(args.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    time.sleep(0.5)
    rss_end = server_rss()
    if server is None:
        demo.close()
    else:
        server.terminate()
        server.wait(timeout=30)
        starts = [float(line) for line in starts_file.read_text().split()] if starts_file.exists() else []
    free = []
    for at in cancels:
        later = [s for s in starts if s > at]
        if later and min(later) - at < 30:
            free.append(min(later) - at)
    warm = rss_after_warmup[0] or rss_start
    report = dict(
        clients=args.clients, generations_per_client=args.generations, requested=args.clients * args.generations,
        model="tiny random bundle (demo_core.testing)" if args.tiny else (args.bundle or "embedded default"),
        settings=dict(stop_rate=args.stop_rate, scan_iterations=args.scan_iterations, frame_ms=0, canvas_every=4),
        completed=len(completed), stopped=len(stopped), errors=len(errors), lost=len(lost), error_samples=errors[:5] + lost[:5],
        latency_s=dict(p50=percentile(latencies, 0.5), p95=percentile(latencies, 0.95), max=max(latencies) if latencies else None),
        stop_to_free_worker_s=dict(n=len(free), p50=percentile(free, 0.5), p95=percentile(free, 0.95), max=max(free) if free else None),
        rss_mb=dict(start=round(rss_start), after_warmup=round(warm), end=round(rss_end),
                    growth_after_warmup=round((rss_end - warm) / warm, 4)),
        wall_s=round(wall, 1), threads=os.environ.get("OMP_NUM_THREADS"), server=args.server)
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    ok = report["errors"] == 0 and report["lost"] == 0 and report["completed"] + report["stopped"] == report["requested"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
