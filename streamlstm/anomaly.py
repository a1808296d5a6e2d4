"""Per-key anomaly scores: how improbable a key's recent errors are for that key.

Errors come in the key's own units (absolute error of the combined forecast divided by
the key's running standard deviation), so a sensor in volts and a ticker in dollars are
scored alike. For each key we keep exponential averages of these errors over three time
scales (about 1, 7 and 35 events: a spike and a slow drift are both incidents), a long
mean of the errors and, for each scale, the long variance of that scale's average around
the mean (``long_alpha``). For each scale, the tail probability of its average under the
key's usual spread of that average is the evidence (the "anomaly likelihood" of Ahmad et
al., 2017, over several windows).

Why a variance per scale: forecast errors are autocorrelated (a level the forecast lags
behind errs for many events in a row), so the spread of an average is not the iid
``var * a / (2 - a)``; that formula makes the slow averages overconfident, and slow
excursions of a noisy key alarm too readily. Measuring each average's own spread calibrates
every scale alike, whatever the key's autocorrelation, for two floats per key more.

Why a long window of about 1,000 events (``state.anomaly_long_alpha`` 0.001): the
baseline must span several cycles of a key's usual rhythm, or each cycle's regular
jumps (a daily shape at one event per 5 minutes is 288 events) look new every time: with
a 100-event window the spread forgets yesterday's jump before today's. It also sets how
fast the one-alarm peak below decays (a half-life of ~700 events).

The fastest average sees an error only as far as the value itself is from the key's
running mean (``min(error, value_z)``): after a spike the forecast follows it, and the
value's return to normal errs as much as the spike did; that error is the forecaster's
lag behind an incident already reported, so a spike-and-return is one alarm, not two.
Slower averages keep the whole error: a pattern broken at ordinary values still builds
evidence there. The middle average (about 7 events) sees at least as much as the value's
own distance from the key's running mean (``max(error, value_z)``, at most ``max_error``):
a burst of far values that the forecast follows (persistence takes the lead in a few
events) errs only at its edges, yet the values stay far out all along. A run of them is
then judged against the key's usual spread of that average, like an error, and a single
far value still needs the distribution-free test below.

A value far outside the key's usual range is evidence too, with a distribution-free
bound (Cantelli: ``P(|z| >= k) <= 1 / (1 + k^2)``), since values are rarely Gaussian.

So is a value that repeats exactly where the key's values rarely do: a stuck sensor, a
flat-lined feed, a counter that stopped. Every forecaster predicts a flat line perfectly,
so its errors are no evidence at all. The key keeps counts over its long window (of
exact repeats of its last values, of events after a repeat and of repeats after a
repeat); the evidence of a run of repeats is its probability as the key's counts predict
it step by step: ``-log10 P(repeat)`` for the first, plus ``-log10 P(repeat | repeat)``
for each further one (one pseudo-event each way, so an unseen outcome has a
probability, never 0). The counts learn during the run, so a key whose runs are its
habit (a feed of zeros at night) soon finds them ordinary, while a key that never
repeated shows about ``log10(1 / long_alpha)`` decades at its first repeat, and
``log10(r + 1)`` more after ``r`` further ones.
Evidence is counted in decades of improbability, ``-log10 p``, less the
decades that picking the most surprising of several tests costs (Bonferroni).

One alarm per incident: after strong evidence, the key's next alarm needs *fresh*
evidence. The reported evidence is what exceeds the key's recent peak, which decays with
the long window's half-life; a sustained incident is reported once, at its start, and a
second, stronger one still shows. The peak is never more than the most evidence any event
could show against the key's baseline today (an error at the engine's clip, a value
``MAX_VALUE_Z`` stds out): a flat key's first spike, judged against a spread at its
floor, counts tens of thousands of decades, and would otherwise hold back every incident
for thousands of events after the baseline has learned that such spikes happen.

An incident *starts* with fresh evidence rarer than once per long window by chance
(``log10(1 / long_alpha)`` decades: 3, a score of 0.375, by default) once the slowest
error average has forgotten the last start (its span, 32 events by default). Within that
span the incident is still the one reported: an error that keeps growing there (a burst
building up over a few events) adds fresh evidence at every step, and only evidence more
than twice the decayed peak shows again.

Routine incidents: an incident that recurs on the key's own rhythm (a nightly job's
spike, every 288 events at one event per 5 minutes) is what the key does, not news.
A start as many events after the previous one as that one came after the one before it
(within the same span) is on rhythm, and unless its evidence is more than twice the
decayed peak, that whole incident scores 0. So a routine spike alarms twice (the second
sets the rhythm) and then no more, while a spike off the rhythm or much stronger than the
last still shows, and a change of rhythm shows once. Two floats per key: events since the
last start, and the gap before it (negative when it was on rhythm). The rhythm is
counted in events, so it assumes a regular event rate.

The score maps evidence ``d`` (decades) to ``d / (d + SCALE)`` in [0, 1): 0.5 means a
tail probability of 1e-5 beyond the key's recent peak, 0.75 means 1e-15. It never
reaches 1.0, so the strongest evidence always ranks above the merely strong. Until a key
has ``min_events`` errors its score is 0: there is no baseline to compare with yet. The
long statistics are updated after scoring, so an event is judged against the past only.

>>> import torch
>>> stats = AnomalyStats.zeros(1)
>>> for e in [0.1, 0.12, 0.09, 0.11] * 10:
...     score = update(stats, torch.tensor([e]), torch.tensor([0.5]), 0.5, 0.01, 20)
>>> float(score) < 0.3
True
>>> spike = float(update(stats, torch.tensor([3.0]), torch.tensor([3.0]), 0.5, 0.01, 20))
>>> 0.5 < spike < 1.0
True
>>> again = float(update(stats, torch.tensor([3.0]), torch.tensor([3.0]), 0.5, 0.01, 20))
>>> again < spike  # the same incident: no fresh evidence
True
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# The three error averages smooth with short_alpha times these: about 1, 7 and 35 events
# at the default short_alpha of 0.5.
SCALES = (1.0, 0.25, 0.0625)
VAR_FLOOR = 1e-4  # errors in std units: below 1% of a std the spread carries no signal
_LOG10 = math.log(10.0)
# Decades of evidence that score 0.5: a tail probability of 1e-5, the anomaly-likelihood
# threshold Ahmad et al. recommend (0.99999).
SCALE = 5.0
_SCALES = torch.tensor(SCALES)
MAX_VALUE_Z = 1e6
# The cost, in decades, of taking the most surprising of the error scales, the value
# test and the repeat test.
TESTS = math.log10(len(SCALES) + 2)


# The state row's columns (``rows.RowLayout``) holding AnomalyStats' fields, in order.
COLUMNS: tuple[str, ...] = ("err_scales", "err_mean", "err_var", "err_count", "err_peak")
COLUMNS += ("err_since", "err_gap", "err_repeats")
# The columns of ``repeats``: repeats seen, events after a repeat, repeats after a repeat
# (all over the long window), and the evidence of the current run (decades; 0: none).
REPEAT_COUNTS = 4


@dataclass
class AnomalyStats:
    """Rows of per-key evidence statistics (views into the state store, or standalone)."""

    short: torch.Tensor  # [B, S] float32: error averages, one per time scale
    mean: torch.Tensor  # [B] long mean of errors
    var: torch.Tensor  # [B, S] long variance of each scale's average around that mean
    count: torch.Tensor  # [B] errors seen (exact up to 2**24)
    peak: torch.Tensor  # [B] recent peak evidence (decades), decaying
    since: torch.Tensor  # [B] events since the key's last incident start
    gap: torch.Tensor  # [B] events between its last two starts; < 0: the last was on rhythm
    repeats: torch.Tensor  # [B, REPEAT_COUNTS] counts of exact repeats of the key's values

    @staticmethod
    def zeros(batch: int) -> AnomalyStats:
        s = len(SCALES)
        return AnomalyStats(
            torch.zeros(batch, s),
            torch.zeros(batch),
            torch.zeros(batch, s),
            torch.zeros(batch),
            torch.zeros(batch),
            torch.zeros(batch),
            torch.zeros(batch),
            torch.zeros(batch, REPEAT_COUNTS),
        )


def evidence_to_score(decades: torch.Tensor) -> torch.Tensor:
    """Map decades of improbability to [0, 1) without ever tying at 1.0.

    >>> evidence_to_score(torch.tensor([0.0, 5.0, 15.0])).tolist()
    [0.0, 0.5, 0.75]
    """
    return decades / (decades + SCALE)


def _decades(z: torch.Tensor) -> torch.Tensor:
    """-log10 of the upper normal tail beyond ``z``, accurate far into the tail."""
    return -torch.special.log_ndtr(-z) / _LOG10


def start_level(long_alpha: float) -> float:
    """Fresh evidence (decades) that starts an incident: rarer than once per long window.

    A key sees about ``1 / long_alpha`` events in its long window; evidence below
    ``log10(1 / long_alpha)`` decades comes by chance about once per window, so it starts
    nothing (3 decades, a score of 0.375, at the default 0.001).
    """
    return math.log10(1.0 / long_alpha)


def _incidents(
    stats: AnomalyStats,
    fresh: torch.Tensor,
    peak: torch.Tensor,
    short_alpha: float,
    long_alpha: float,
    min_events: int,
) -> torch.Tensor:
    """Hold back ``fresh`` evidence that is routine or part of an incident already reported.

    An incident starts with fresh evidence above ``start_level`` once the slowest error
    average has had time to forget the last one (``span`` events). Within its span, more
    evidence is the same incident growing: it is held back unless more than twice as
    strong as the decayed ``peak`` (``fresh > peak``). A start that comes as many events
    after the last one as that one came after the one before (within ``span``), and is
    no more than twice as strong as the peak, is the key's routine (a nightly job's
    spike): that whole incident is held back. Updates ``since`` and ``gap`` in place.
    """
    span = 1.0 / (short_alpha * SCALES[-1])
    counting = stats.count >= min_events
    since = stats.since + 1.0
    start = (fresh > start_level(long_alpha)) & (since >= span) & counting
    on_time = start & (fresh <= peak) & (stats.gap != 0.0)
    on_time &= (since - stats.gap.abs()).abs() <= span
    within = (fresh > 0.0) & (since < span) & (stats.gap != 0.0)  # after a start
    held = on_time | (within & ((stats.gap < 0.0) | (fresh <= peak)))
    stats.gap.copy_(torch.where(start, torch.where(on_time, -since, since), stats.gap))
    stats.since.copy_(torch.where(start, 0.0, torch.where(counting, since, stats.since)))
    return torch.where(held, 0.0, fresh)


def _reachable(stats: AnomalyStats, spread: torch.Tensor, max_error: float) -> torch.Tensor:
    """The most evidence (decades) one event could show against the key's baseline now.

    A peak set against an immature baseline (a flat key's first spike, its spread at the
    floor: tens of thousands of decades) would otherwise hold back every later incident
    for thousands of events after the baseline has learned that such spikes happen.
    """
    worst = (max_error - stats.mean.unsqueeze(1)) / spread
    value = torch.full_like(stats.mean, math.log10(1.0 + MAX_VALUE_Z * MAX_VALUE_Z))
    return torch.maximum(_decades(worst).amax(1), value) - TESTS


def _repeat_evidence(stats: AnomalyStats, repeat: torch.Tensor, long_alpha: float) -> torch.Tensor:
    """Decades of improbability of the run of repeats that ``repeat`` (the key's values
    equal its last ones) starts or continues, each step by the key's counts before it;
    then counts it.

    >>> stats = AnomalyStats.zeros(1)
    >>> stats.count.fill_(999.0)  # 999 events compared, none a repeat
    tensor([999.])
    >>> [round(float(_repeat_evidence(stats, torch.tensor([True]), 0.001)), 2) for _ in "abc"]
    [3.0, 3.3, 3.48]
    >>> float(_repeat_evidence(stats, torch.tensor([False]), 0.001))  # the run ends
    0.0
    """
    seen, followed, again, run = stats.repeats.unbind(1)
    window = 1.0 / long_alpha
    first = (seen + 1.0) / (stats.count.clamp(max=window) + 2.0)  # P(repeat)
    more = (again + 1.0) / (followed + 2.0)  # P(repeat | repeat)
    after = run > 0.0  # the last event was a repeat too
    decades = torch.where(repeat, run - torch.log10(torch.where(after, more, first)), 0.0)
    keep = torch.where(stats.count + 1.0 > window, 1.0 - long_alpha, 1.0)  # the long window
    seen.copy_(seen * keep + repeat)
    followed.copy_(followed * keep + after)
    again.copy_(again * keep + (after & repeat))
    run.copy_(decades)
    return decades


def update(
    stats: AnomalyStats,
    error: torch.Tensor,
    value_z: torch.Tensor,
    short_alpha: float,
    long_alpha: float,
    min_events: int,
    max_error: float = math.inf,
    repeat: torch.Tensor | None = None,
) -> torch.Tensor:
    """Score ``error`` (std units, one per key) and fold it into ``stats`` in place.

    ``value_z`` is how far the key's values sit from their running mean, in std units
    (the largest over features); ``max_error`` is the most an error can be (the engine
    clips errors at ``engine.input_clip``); ``repeat`` whether each key's values equal
    its last ones exactly (None: none does).
    """
    alphas = short_alpha * _SCALES
    # The fastest scale sees an error only as far as the value itself is from the key's
    # usual level: a value returning to normal after a spike errs against a forecast that
    # followed the spike, which is the forecaster's lag behind an excursion already
    # reported, not a second incident. Slower scales keep the whole error, so a pattern
    # broken at ordinary values (a flat stretch in a daily swing) still builds evidence.
    # A value a million stds out is as novel as it gets (and the square of a larger one
    # would overflow float32 into inf - inf = NaN below).
    z = value_z.clamp(max=MAX_VALUE_Z)
    e = error.unsqueeze(1).repeat(1, len(SCALES))
    e[:, 0] = torch.minimum(error, value_z)
    # The middle scale (about 7 events) sees the larger of the error and the value's
    # distance from the key's usual level (at most an error's): a burst of far values
    # that the forecast follows (persistence leads) errs only at its edges, yet stays
    # far out meanwhile.
    e[:, 1] = torch.maximum(error, z.clamp(max=max_error))
    first = stats.count == 0
    if bool(first.any()):
        stats.short.copy_(
            torch.where(first.unsqueeze(1), e, stats.short + alphas * (e - stats.short))
        )
    else:
        stats.short.add_(alphas * (e - stats.short))
    spread = torch.sqrt(stats.var + VAR_FLOOR)
    by_scale = _decades((stats.short - stats.mean.unsqueeze(1)) / spread).amax(1)
    # Cantelli's bound, two-sided.
    by_value = torch.log10(1.0 + z * z)
    if repeat is None:
        repeat = torch.zeros_like(stats.count, dtype=torch.bool)
    by_value = torch.maximum(by_value, _repeat_evidence(stats, repeat, long_alpha))
    decades = (torch.maximum(by_scale, by_value) - TESTS).clamp(min=0.0)
    decades = torch.where(stats.count >= min_events, decades, 0.0)
    # One alarm per incident: report only what exceeds the key's decaying recent peak,
    # which is never more than the most evidence any event could show against today's
    # baseline (an error of max_error, a value MAX_VALUE_Z stds out).
    peak = torch.minimum(stats.peak * (1.0 - long_alpha), _reachable(stats, spread, max_error))
    fresh = (decades - peak).clamp(min=0.0)
    fresh = _incidents(stats, fresh, peak, short_alpha, long_alpha, min_events)
    stats.peak.copy_(torch.maximum(peak, decades))
    # Exact running mean for the first 1/long_alpha errors, then exponential; each scale's
    # spread around it the same way (a first error leaves it 0: its average is the mean).
    alpha = torch.clamp(1.0 / (stats.count + 1), min=long_alpha)
    stats.mean.add_(alpha * (error - stats.mean))
    dev = stats.short - stats.mean.unsqueeze(1)
    a = alpha.unsqueeze(1)
    stats.var.copy_((1.0 - a) * stats.var + a * dev * dev)
    stats.count.add_(1)
    return evidence_to_score(fresh)
