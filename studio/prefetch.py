"""Run a generator in its own thread so its producer never waits for the consumer.

The served studio's frames cost time to send (Gradio postprocesses and streams each one). Iterated in one
thread, every frame stalls the engine for that time. `batches(frames)` iterates `frames` in a worker thread
and yields, each time the consumer asks, every item produced since the last ask (at least one): the consumer
keeps the views it must and sends only the newest picture, so the engine runs at its own speed and the live
view shows as many frames as the connection can take.

Closing the consumer (a visitor's Stop, a dropped connection) tells the worker to stop; the worker closes
the producer itself between two items (a generator can only be closed by the thread running it). An
exception in the producer is raised in the consumer.
"""
from __future__ import annotations

import queue
import threading
from typing import Iterator

_DONE = object()


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


def batches(items: Iterator, name: str = "retouch-frames") -> Iterator[list]:
    channel: queue.Queue = queue.Queue()
    stop = threading.Event()

    def produce():
        try:
            for item in items:
                channel.put(item)
                if stop.is_set():
                    break
        except BaseException as error:          # noqa: BLE001  handed to the consumer, which raises it
            channel.put(_Failure(error))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:               # noqa: BLE001  closing a finished or failed generator
                    pass
            channel.put(_DONE)

    worker = threading.Thread(target=produce, name=name, daemon=True)
    worker.start()
    try:
        while True:
            batch = [channel.get()]
            while True:                          # everything produced meanwhile, without waiting
                try:
                    batch.append(channel.get_nowait())
                except queue.Empty:
                    break
            done = any(item is _DONE for item in batch)
            failures = [item for item in batch if isinstance(item, _Failure)]
            batch = [item for item in batch if item is not _DONE and not isinstance(item, _Failure)]
            if batch:
                yield batch
            if failures:
                raise failures[0].error
            if done:
                return
    finally:
        stop.set()
