"""``streamlstm bench engine``: the batched engine against the textbook loop, same run.

The textbook way keeps a dict of per-key ``(h, c)`` and calls ``nn.LSTM`` once per
event. The engine advances all keys of a micro-batch in one call. Both run the same
model and the same per-event work (score, normalise, step, de-normalise) on the same
synthetic events; both are timed here, in one process, as medians of several rounds,
because this kind of machine is shared and noisy. The compute bound is a GEMM probe's
FLOP/s divided by the FLOPs of one event. The engine runs with the defaults (the fused
step where it builds) and, in the same rounds, with ``engine.fused = false`` (the plain
reference path); each round times the probe, then both engines, so a busy moment of the
machine weighs on the bound and the engine alike, and the fraction of the bound is the
median of the rounds' fractions.

``--churn`` (:func:`bench_churn`) measures the state store at ``state.max_keys``: a full
table, batches with and without one brand-new key each (which evicts the least recently
used keys), timed alternately in one process.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch

from streamlstm import combine
from streamlstm.config import Settings, load_settings
from streamlstm.engine import Engine
from streamlstm.events import EventBatch
from streamlstm.model import RecurrentModel, flops_per_event


@dataclass
class EngineBench:
    events_per_s: float
    naive_events_per_s: float
    ratio: float
    bytes_per_key: int
    bound_events_per_s: float
    fraction_of_bound: float
    keys: int
    batch: int
    threads: int
    fused: bool  # the default engine ran the fused step (False: it could not be built)
    plain_events_per_s: float  # engine.fused = false, the same rounds
    plain_fraction_of_bound: float

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)

    def lines(self) -> list[str]:
        return [
            f"reference: {self.keys:,} keys, batch {self.batch}, {self.threads} thread(s)",
            f"engine        {self.events_per_s:>12,.0f} events/s "
            f"({'fused step' if self.fused else 'plain path: the fused step did not build'})",
            f"plain path    {self.plain_events_per_s:>12,.0f} events/s (engine.fused = false)",
            f"naive loop    {self.naive_events_per_s:>12,.0f} events/s",
            f"ratio         {self.ratio:>12.1f} x",
            f"compute bound {self.bound_events_per_s:>12,.0f} events/s "
            f"(engine at {100 * self.fraction_of_bound:.0f}%, "
            f"plain path at {100 * self.plain_fraction_of_bound:.0f}%)",
            f"state         {self.bytes_per_key:>12,} bytes per key",
        ]


def reference_settings(keys: int, batch: int, threads: int, fused: bool = True) -> Settings:
    return load_settings(
        overrides={
            "model.input_size": 8,
            "model.hidden_size": 64,
            "model.num_layers": 2,
            "engine.max_batch": batch,
            "engine.torch_threads": threads,
            "engine.fused": fused,
            "state.max_keys": max(keys, batch),
            "state.initial_capacity": keys,
        }
    )


def _median_rate(run: Callable[[], object], events: int, rounds: int) -> float:
    rates = []
    for _ in range(rounds):
        started = time.perf_counter()
        run()
        rates.append(events / (time.perf_counter() - started))
    return statistics.median(rates)


def gemm_flops(
    threads: int, rows: int = 4096, inner: int = 128, cols: int = 256, repeats: int = 20
) -> float:
    """Sustained FLOP/s of a float32 GEMM of the engine's shape (median of ``repeats``)."""
    torch.set_num_threads(threads)
    a, b = torch.randn(rows, inner), torch.randn(inner, cols)
    for _ in range(3):
        a @ b
    return _median_rate(lambda: a @ b, 2 * rows * inner * cols, repeats)


class NaiveLoop:
    """The textbook loop: a dict of per-key tensors, one ``nn.LSTM`` call per event."""

    def __init__(self, model: RecurrentModel, settings: Settings) -> None:
        self.model = model
        self.window = settings.state.scaler_window
        self.clip = settings.engine.input_clip
        self.states: dict[str, tuple] = {}

    @torch.inference_mode()
    def process(self, keys: list[str], values: np.ndarray) -> None:
        m = self.model
        shape = (m.num_layers, 1, m.hidden_size)
        width = m.input_size
        for key, row in zip(keys, torch.from_numpy(values), strict=True):
            state = self.states.get(key)
            if state is None:
                zeros = torch.zeros(width)
                state = (torch.zeros(shape), torch.zeros(shape), zeros, zeros, 0, None)
                state += (torch.zeros(1, len(combine.EXPERTS), width), zeros, zeros, zeros)
            h, c, mean, var, count, pending, loss, net, last, ewma = state
            if pending is not None:
                _error = (row - pending).abs().mean()
                std_before = torch.sqrt(var + 1e-14 * mean * mean + 1e-30)
                made = torch.stack((net, last, ewma)).unsqueeze(0)
                combine.learn(loss, made, row.unsqueeze(0), std_before.unsqueeze(0), _TRUE)
            ewma = row if count == 0 else ewma + combine.EWMA_ALPHA * (row - ewma)
            count += 1
            alpha = 1.0 / min(count, self.window)
            delta = row - mean
            mean = mean + alpha * delta
            var = (1 - alpha) * (var + alpha * delta * delta)
            std = torch.sqrt(var + 1e-14 * mean * mean + 1e-30)
            xn = ((row - mean) / std).clamp(-self.clip, self.clip)
            out, (h, c) = m.rnn(xn.view(1, 1, -1), (h, c))
            net = row + m.head(out[0, 0]) * std
            pending = combine.mix(loss, torch.stack((net, row, ewma)).unsqueeze(0))[0]
            self.states[key] = (h, c, mean, var, count, pending, loss, net, row, ewma)


_TRUE = torch.tensor([True])


def bench_engine(
    keys: int = 100_000, batch: int = 4096, threads: int = 1, rounds: int = 5, seed: int = 0
) -> EngineBench:
    """Measure the engine (fused and plain) and the naive loop on the same events, in
    this process, against the GEMM bound measured in the same rounds."""
    settings = reference_settings(keys, batch, threads)
    engine = Engine.from_settings(settings)
    plain = Engine.from_settings(reference_settings(keys, batch, threads, fused=False))
    rng = np.random.default_rng(seed)
    names = [f"sensor-{i:06d}" for i in range(keys)]

    def events(n: int, ts: float) -> EventBatch:
        picks = rng.integers(0, keys, n)
        values = rng.normal(size=(n, 8)).astype(np.float32)
        return EventBatch.from_arrays([names[i] for i in picks], np.full(n, ts), values)

    # Warm-up: every key gets its slot before timing starts.
    for start in range(0, keys, batch):
        chunk = names[start : start + batch]
        warm = EventBatch.from_arrays(chunk, np.zeros(len(chunk)), np.zeros((len(chunk), 8)))
        engine.process(warm)
        plain.process(warm)
    per_round = 10
    batches = [events(batch, 1.0 + i) for i in range(per_round)]
    flops = flops_per_event(8, 64, 2, "lstm")
    rates: dict[str, list[float]] = {"bound": [], "engine": [], "plain": []}
    for _ in range(rounds):
        rates["bound"].append(gemm_flops(threads, repeats=5) / flops)
        for name, which in (("engine", engine), ("plain", plain)):

            def run(which: Engine = which) -> None:
                for b in batches:
                    which.process(b)

            rates[name].append(_median_rate(run, per_round * batch, 1))

    naive = NaiveLoop(engine.model, settings)
    naive_events = events(1000, 1.0)
    naive.process(naive_events.keys[:50], naive_events.values[:50])  # warm up
    naive_rate = _median_rate(
        lambda: naive.process(naive_events.keys, naive_events.values), 1000, 3
    )
    engine_rate, plain_rate = (statistics.median(rates[n]) for n in ("engine", "plain"))

    def fraction(name: str) -> float:
        return statistics.median(r / b for r, b in zip(rates[name], rates["bound"], strict=True))

    return EngineBench(
        events_per_s=engine_rate,
        naive_events_per_s=naive_rate,
        ratio=engine_rate / naive_rate,
        bytes_per_key=engine.store.bytes_per_key(),
        bound_events_per_s=statistics.median(rates["bound"]),
        fraction_of_bound=fraction("engine"),
        keys=keys,
        batch=batch,
        threads=threads,
        fused=engine.fused_step is not None,
        plain_events_per_s=plain_rate,
        plain_fraction_of_bound=fraction("plain"),
    )


@dataclass
class ChurnBench:
    events_per_s: float  # full table, every key known (median batch time)
    churn_events_per_s: float  # full table, a new key in every batch (median batch time)
    ratio: float  # churn / no churn, of the medians
    churn_overall_events_per_s: float  # churn batches' events / their total time
    overall_ratio: float  # the same against the no-churn batches' total
    new_keys: int  # keys allocated during the counted churn rounds
    evictions: int  # capacity evictions during the churn rounds
    eviction_seconds: float  # one bulk eviction (the store's assign that did it, less a plain one)
    evicted_at_once: int  # keys that bulk eviction freed (state.max_keys x headroom)
    keys: int
    batch: int
    threads: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)

    def lines(self) -> list[str]:
        return [
            f"key churn at state.max_keys = {self.keys:,}, batch {self.batch}, "
            f"{self.threads} thread(s)",
            f"no churn      {self.events_per_s:>12,.0f} events/s",
            f"churn         {self.churn_events_per_s:>12,.0f} events/s "
            f"({self.new_keys:,} new keys, {self.evictions:,} evicted)",
            f"ratio         {self.ratio:>12.2f} x (medians; "
            f"{self.overall_ratio:.2f} x over the rounds' total time)",
            f"bulk eviction {1000 * self.eviction_seconds:>12,.1f} ms for "
            f"{self.evicted_at_once:,} keys (amortised into the churn figures)",
        ]


def bench_churn(
    keys: int = 100_000,
    batch: int = 4096,
    threads: int = 1,
    rounds: int = 5,
    seed: int = 0,
    per_round: int = 10,
) -> ChurnBench:
    """The engine with its table full (``state.max_keys = keys``), with and without a
    brand-new key in every batch: each round draws ``per_round`` batches of each kind from
    the keys the store holds then, and runs them alternately, one of each in turn."""
    settings = reference_settings(keys, batch, threads)
    engine = Engine.from_settings(settings, resume=False)
    store = engine.store
    rng = np.random.default_rng(seed)
    names = [f"sensor-{i:07d}" for i in range(keys)]
    for start in range(0, keys, batch):
        chunk = names[start : start + batch]
        engine.process(
            EventBatch.from_arrays(chunk, np.zeros(len(chunk)), np.zeros((len(chunk), 8)))
        )
    assert len(store) == keys == store.max_keys

    def batches(live: list[str], fresh: list[str] | None, first_ts: float) -> list[EventBatch]:
        out = []
        for i in range(per_round):
            picks = [live[j] for j in rng.integers(0, len(live), batch)]
            if fresh is not None:
                picks[0] = fresh[i]
            values = rng.normal(size=(batch, 8)).astype(np.float32)
            out.append(EventBatch.from_arrays(picks, np.full(batch, first_ts + i), values))
        return out

    def timed(work: list[EventBatch]) -> float:
        started = time.perf_counter()
        for b in work:
            engine.process(b)
        return time.perf_counter() - started

    # The first new key finds the table full: one bulk eviction down to the low-water
    # mark, which then takes the next `capacity_headroom` new keys. Its cost, spread over
    # them, is added to the churn figures (the rounds below see no eviction themselves
    # at this many keys per round).
    live = store.keys()
    picks = [live[j] for j in rng.integers(0, len(live), batch)]
    stamps = np.zeros(batch)
    started = time.perf_counter()
    store.assign(picks, stamps)
    plain_assign = time.perf_counter() - started
    started = time.perf_counter()
    store.assign(["churn-first", *picks[1:]], stamps)
    eviction_seconds = max(0.0, time.perf_counter() - started - plain_assign)
    evicted_first = store.evictions["capacity"]
    per_new_key = eviction_seconds / max(1, evicted_first)

    plain_times, churn_times, new_keys, evictions, ts = [], [], 0, 0, 1.0
    for r in range(rounds + 1):  # round 0 warms up both paths and is not counted
        live = store.keys()
        plain = batches(live, None, ts)
        churn = batches(live, [f"churn-{r}-{i}" for i in range(per_round)], ts + per_round)
        ts += 2 * per_round
        before_keys, before_evicted = len(store), store.evictions["capacity"]
        for pair in zip(plain, churn, strict=True):  # alternating: the machine's drift cancels
            times = [timed([b]) for b in pair]
            if r:
                plain_times.append(times[0])
                churn_times.append(times[1])
        if r:
            evicted = store.evictions["capacity"] - before_evicted
            evictions += evicted
            new_keys += len(store) - before_keys + evicted
    # eviction seconds owed per churn batch: the new keys that used the probe's headroom
    # (evictions inside the rounds are in their times already)
    amortised = per_new_key * min(new_keys, evicted_first) / len(churn_times)
    rate = batch / statistics.median(plain_times)
    churn_rate = batch / (statistics.median(churn_times) + amortised)
    churn_total = sum(churn_times) + amortised * len(churn_times)
    return ChurnBench(
        events_per_s=rate,
        churn_events_per_s=churn_rate,
        ratio=churn_rate / rate,
        churn_overall_events_per_s=batch * len(churn_times) / churn_total,
        overall_ratio=sum(plain_times) / churn_total,
        new_keys=new_keys,
        evictions=evictions,
        eviction_seconds=eviction_seconds,
        evicted_at_once=evicted_first,
        keys=keys,
        batch=batch,
        threads=threads,
    )
