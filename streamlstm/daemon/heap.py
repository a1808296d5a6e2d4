"""The daemon's heap and CPython's cyclic garbage collector: start-up objects frozen.

A full (generation-2) collection traverses every object the collector tracks, and the
daemon starts with some 250,000 of them (torch, the settings models, the Kafka clients,
the engine) that live as long as it does. One such collection took 80-400 ms on the
2-core test machine, and while it runs nothing else in the process does: the loop, the
Kafka client's callbacks, the acknowledgement reports. Every event in flight then waits
that long. They come on their own: objects that outlive two young collections (each
poll's records and tickets, kept until their outputs are acknowledged) count towards
the next full one, which came every ~14 s at 6,000 events/s.

:func:`settled` collects once and moves what is left into the permanent generation
(``gc.freeze``), which collections skip: a full collection then traverses only what
was made since, and the pauses go. Objects frozen are still freed when their last
reference goes; only a reference cycle among them would wait for the end of the
block, which gives them back to the collector (a process that runs daemons one after
another, the tests and benchmarks, keeps its heap as it was).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from collections.abc import Iterator

log = logging.getLogger(__name__)


@contextlib.contextmanager
def settled() -> Iterator[int]:
    """Collect, freeze every object alive now (yields how many), unfreeze on exit."""
    started = time.perf_counter()
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.debug(
        "heap: %d start-up objects frozen (%.0f ms)",
        frozen,
        (time.perf_counter() - started) * 1000,
    )
    try:
        yield frozen
    finally:
        gc.unfreeze()
