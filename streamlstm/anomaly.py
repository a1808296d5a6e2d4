"""Per-key anomaly scores: how unusual a key's recent errors are for that key.

Errors are first put in the key's own units (absolute error divided by the key's
running standard deviation, per feature), so a sensor in volts and a ticker in
dollars are scored alike. For each key we keep a *short* exponential average of
these errors and a *long* exponential mean and variance. The score is

    score = Phi((short - long_mean) / long_std)

the standard normal CDF of how far the recent errors sit above the key's usual
errors: about 0.5 for an ordinary event, close to 1 when the errors jump. This is
the "anomaly likelihood" of Ahmad et al. (2017), over a short and a long window,
vectorised over all keys of a batch. Until a key has ``min_events`` errors the
score is 0: there is no baseline to compare with yet. The long statistics are
updated after scoring, so an event is judged against the past only.

>>> import torch
>>> stats = AnomalyStats.zeros(1)
>>> for e in [0.1, 0.12, 0.09, 0.11] * 10:
...     score = update(stats, torch.tensor([e]), short_alpha=0.5, long_alpha=0.01, min_events=20)
>>> round(float(score), 1) < 0.9
True
>>> bool(update(stats, torch.tensor([3.0]), 0.5, 0.01, 20) > 0.99)
True
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_VAR_FLOOR = 1e-4  # errors in std units: below 1% of a std the spread carries no signal


@dataclass
class AnomalyStats:
    """Rows of per-key error statistics (views into the state store, or standalone)."""

    short: torch.Tensor  # [B] float32
    mean: torch.Tensor  # [B] float32
    var: torch.Tensor  # [B] float32
    count: torch.Tensor  # [B] float32 (exact up to 2**24)

    @staticmethod
    def zeros(batch: int) -> AnomalyStats:
        return AnomalyStats(*(torch.zeros(batch) for _ in range(4)))


def update(
    stats: AnomalyStats,
    error: torch.Tensor,
    short_alpha: float,
    long_alpha: float,
    min_events: int,
) -> torch.Tensor:
    """Score ``error`` (std units, one per key) and fold it into ``stats`` in place."""
    first = stats.count == 0
    stats.short.copy_(torch.where(first, error, stats.short + short_alpha * (error - stats.short)))
    z = (stats.short - stats.mean) / torch.sqrt(stats.var + _VAR_FLOOR)
    score = 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))
    score = torch.where(stats.count >= min_events, score, torch.zeros_like(score))
    # Exact running mean/variance for the first 1/long_alpha errors, then exponential.
    alpha = torch.clamp(1.0 / (stats.count + 1), min=long_alpha)
    delta = error - stats.mean
    stats.mean.add_(alpha * delta)
    stats.var.copy_((1.0 - alpha) * (stats.var + alpha * delta * delta))
    stats.count.add_(1)
    return score
