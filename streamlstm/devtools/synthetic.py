"""Deterministic synthetic event streams for ``streamlstm produce``, the demo and benchmarks.

Each key is a seasonal signal with its own period, phase, amplitude and level
(keys span several orders of magnitude in scale, as real sensors do), plus
Gaussian noise, with occasional injected spike anomalies and persistent level
shifts. Events come out in rounds: every round is a fresh random permutation of
all keys, so each key advances one step per round and timestamps increase.

Generation is vectorized with numpy in fixed-size blocks of rounds, so the output
depends only on the constructor arguments, not on how it is sliced into batches:
``batch(10) + batch(10) == batch(20)`` for two streams with the same seed.
"""

from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass
from typing import Literal, overload

import numpy as np

__all__ = ["SyntheticBatch", "SyntheticStream"]

#: Target number of events per generated block (rounded to whole rounds).
_BLOCK_EVENTS = 1 << 15


@dataclass(frozen=True)
class SyntheticBatch:
    """A batch of events as arrays (no per-event Python objects).

    ``key_index[i]`` indexes :attr:`SyntheticStream.key_names`; ``anomaly`` marks
    injected spikes, ``shift`` marks the events at which a key's level shifted.
    """

    key_index: np.ndarray  # (n,) int64
    ts: np.ndarray  # (n,) float64, epoch seconds
    values: np.ndarray  # (n, width) float64
    anomaly: np.ndarray  # (n,) bool
    shift: np.ndarray  # (n,) bool

    def __len__(self) -> int:
        return int(self.key_index.shape[0])

    @staticmethod
    def concat(parts: list[SyntheticBatch]) -> SyntheticBatch:
        """Concatenate batches in order."""
        if len(parts) == 1:
            return parts[0]
        return SyntheticBatch(
            key_index=np.concatenate([p.key_index for p in parts]),
            ts=np.concatenate([p.ts for p in parts]),
            values=np.concatenate([p.values for p in parts]),
            anomaly=np.concatenate([p.anomaly for p in parts]),
            shift=np.concatenate([p.shift for p in parts]),
        )

    def slice(self, start: int, stop: int) -> SyntheticBatch:
        """Events ``start:stop`` of this batch."""
        return SyntheticBatch(
            self.key_index[start:stop],
            self.ts[start:stop],
            self.values[start:stop],
            self.anomaly[start:stop],
            self.shift[start:stop],
        )


class SyntheticStream:
    """An endless, seeded stream of ``{"key", "ts", "values"}`` events.

    Args:
        n_keys: number of distinct keys (``key-00000`` ...).
        width: length of each event's ``values`` vector.
        seed: all randomness derives from it; same arguments, same events.
        anomaly_rate: probability that an event carries an injected spike.
        shift_rate: probability that a key's level shifts at an event (persists).
        start_ts: timestamp of the first round; None takes the wall clock at
            construction (then only ``ts`` differs between runs).
        step_seconds: time between two consecutive events of one key.
    """

    def __init__(
        self,
        n_keys: int,
        width: int,
        seed: int,
        anomaly_rate: float = 0.001,
        shift_rate: float = 0.0002,
        start_ts: float | None = None,
        step_seconds: float = 1.0,
    ) -> None:
        if n_keys < 1:
            raise ValueError(f"n_keys must be >= 1, got {n_keys}")
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        for name, rate in (("anomaly_rate", anomaly_rate), ("shift_rate", shift_rate)):
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {rate}")
        if not step_seconds > 0:
            raise ValueError(f"step_seconds must be > 0, got {step_seconds}")

        self.n_keys = int(n_keys)
        self.width = int(width)
        self.seed = int(seed)
        self.anomaly_rate = float(anomaly_rate)
        self.shift_rate = float(shift_rate)
        self.step_seconds = float(step_seconds)
        self.start_ts = float(time.time() if start_ts is None else start_ts)

        digits = max(5, len(str(self.n_keys - 1)))
        self.key_names: list[str] = [f"key-{i:0{digits}d}" for i in range(self.n_keys)]

        params = np.random.default_rng([self.seed, 0])
        k, w = self.n_keys, self.width
        # Per-key period in steps (log-uniform 16..512) and overall scale (0.1..300).
        self.period = np.exp(params.uniform(math.log(16), math.log(512), size=k))
        self.scale = 10.0 ** params.uniform(-1.0, 2.5, size=k)
        base_phase = params.uniform(0, 2 * math.pi, size=(k, 1))
        self.phase = base_phase + params.uniform(-0.6, 0.6, size=(k, w))
        self.amplitude = self.scale[:, None] * params.uniform(0.5, 1.5, size=(k, w))
        self.level = self.scale[:, None] * params.normal(0.0, 3.0, size=(k, w))
        self.harmonic = self.amplitude * params.uniform(0.0, 0.35, size=(k, w))
        self.harmonic_phase = params.uniform(0, 2 * math.pi, size=(k, w))
        self.noise_sd = self.amplitude * params.uniform(0.05, 0.2, size=(k, w))
        # value = level + A sin(a + p) + H sin(2a + q) + noise, expanded with the angle-sum
        # identities so only sin/cos of the per-event angle a are computed; one gather
        # of this (k, 6, w) table fetches every per-key coefficient.
        self._coef = np.stack(
            [
                self.amplitude * np.cos(self.phase),  # * sin(a)
                self.amplitude * np.sin(self.phase),  # * cos(a)
                self.harmonic * np.cos(self.harmonic_phase),  # * sin(2a)
                self.harmonic * np.sin(self.harmonic_phase),  # * cos(2a)
                self.level,
                self.noise_sd,
            ],
            axis=1,
        )

        self._rng = np.random.default_rng([self.seed, 1])
        self._rounds_per_block = max(1, -(-_BLOCK_EVENTS // k))
        self._next_round = 0  # first round of the next block to generate
        self._offset = np.zeros((k, w))  # accumulated level shifts per key
        self._pending: list[SyntheticBatch] = []
        self._pending_len = 0
        self.emitted = 0  # events handed out so far

    # -- generation ---------------------------------------------------------------------

    def _generate_block(self) -> SyntheticBatch:
        """The next block of whole rounds, in event order."""
        rng, k, w = self._rng, self.n_keys, self.width
        r_count = self._rounds_per_block
        r0 = self._next_round
        self._next_round += r_count
        n = r_count * k

        # Key order: a fresh permutation of all keys per round.
        order = rng.permuted(np.broadcast_to(np.arange(k), (r_count, k)), axis=1)
        key_index = order.reshape(-1)
        local_round = np.repeat(np.arange(r_count), k)
        rounds = local_round + r0
        pos = np.tile(np.arange(k), r_count)
        ts = self.start_ts + (rounds + pos / k) * self.step_seconds

        # Seasonal signal + noise.
        coef = self._coef[key_index]  # (n, 6, w)
        angle = (2 * math.pi) * (rounds / self.period[key_index])
        sin1, cos1 = np.sin(angle)[:, None], np.cos(angle)[:, None]
        sin2, cos2 = 2.0 * sin1 * cos1, 1.0 - 2.0 * sin1 * sin1
        values = sin1 * coef[:, 0]
        values += cos1 * coef[:, 1]
        values += sin2 * coef[:, 2]
        values += cos2 * coef[:, 3]
        values += coef[:, 4]
        values += self._offset[key_index]
        noise = rng.standard_normal((n, w))
        noise *= coef[:, 5]
        values += noise

        # Level shifts: at a shift event the key's level moves by 2..5 amplitudes and
        # stays there; applied to that key's events from that round on.
        shift_rk = rng.random((r_count, k)) < self.shift_rate
        shift = np.zeros(n, dtype=bool)
        rr, kk = np.nonzero(shift_rk)
        if rr.size:
            sign = rng.choice([-1.0, 1.0], size=(rr.size, 1))
            deltas = sign * rng.uniform(2.0, 5.0, size=(rr.size, 1)) * self.amplitude[kk]
            position = np.empty_like(order)  # position[r, key] = index of key in round r
            position[np.arange(r_count)[:, None], order] = np.arange(k)
            for r, key, delta in zip(rr.tolist(), kk.tolist(), deltas, strict=True):
                later = np.arange(r, r_count) * k + position[r:, key]
                values[later] += delta
                shift[r * k + position[r, key]] = True
                self._offset[key] += delta

        # Spikes: every feature of the event jumps by 6..12 amplitudes, random sign.
        anomaly = rng.random(n) < self.anomaly_rate
        idx = np.flatnonzero(anomaly)
        if idx.size:
            mag = rng.uniform(6.0, 12.0, size=(idx.size, w))
            sign = rng.choice([-1.0, 1.0], size=(idx.size, w))
            values[idx] += sign * mag * self.amplitude[key_index[idx]]

        return SyntheticBatch(key_index.astype(np.int64), ts, values, anomaly, shift)

    def arrays(self, n: int) -> SyntheticBatch:
        """The next ``n`` events as arrays (fast path for benchmarks and producers)."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        while self._pending_len < n:
            block = self._generate_block()
            self._pending.append(block)
            self._pending_len += len(block)
        out: list[SyntheticBatch] = []
        need = n
        while need:
            head = self._pending[0]
            if len(head) <= need:
                out.append(self._pending.pop(0))
                need -= len(head)
            else:
                out.append(head.slice(0, need))
                self._pending[0] = head.slice(need, len(head))
                need = 0
        self._pending_len -= n
        self.emitted += n
        if not out:
            return SyntheticBatch(
                np.zeros(0, np.int64),
                np.zeros(0),
                np.zeros((0, self.width)),
                np.zeros(0, bool),
                np.zeros(0, bool),
            )
        return SyntheticBatch.concat(out)

    def to_events(self, arrays: SyntheticBatch) -> list[dict]:
        """Build event dicts ``{"key", "ts", "values"}`` from :meth:`arrays` output."""
        names = self.key_names
        # Millions of fresh lists/dicts would trigger the cyclic GC over and over
        # (4x slower); none of them can form a cycle, so pause it while building.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            return [
                {"key": names[k], "ts": t, "values": v}
                for k, t, v in zip(
                    arrays.key_index.tolist(),
                    arrays.ts.tolist(),
                    arrays.values.tolist(),
                    strict=True,
                )
            ]
        finally:
            if gc_was_enabled:
                gc.enable()

    @overload
    def batch(self, n: int, with_labels: Literal[False] = ...) -> list[dict]: ...

    @overload
    def batch(self, n: int, with_labels: Literal[True]) -> tuple[list[dict], np.ndarray]: ...

    def batch(
        self, n: int, with_labels: bool = False
    ) -> list[dict] | tuple[list[dict], np.ndarray]:
        """The next ``n`` events as dicts; with ``with_labels`` also a bool array of spikes."""
        arrays = self.arrays(n)
        events = self.to_events(arrays)
        if with_labels:
            return events, arrays.anomaly
        return events
