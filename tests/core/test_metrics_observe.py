"""Bulk histogram observations equal one ``observe`` per value."""

from __future__ import annotations

import numpy as np
from prometheus_client import CollectorRegistry, Histogram

from streamlstm.metrics import Metrics, observe_many


def _samples(h: Histogram) -> dict:
    return {(s.name, tuple(s.labels.items())): s.value for m in h.collect() for s in m.samples}


def test_observe_many_matches_observe() -> None:
    values = np.array([0.0005, 0.001, 0.0011, 0.3, 7.0, 100.0, np.nan, 0.02])
    a = Histogram("a", "a", buckets=(0.001, 0.01, 0.1, 1, 10), registry=CollectorRegistry())
    b = Histogram("a", "a", buckets=(0.001, 0.01, 0.1, 1, 10), registry=CollectorRegistry())
    observe_many(a, values)
    for v in values[~np.isnan(values)]:
        b.observe(float(v))
    assert _samples(a) == _samples(b)


def test_metric_names_follow_the_contract() -> None:
    text = Metrics().exposition().decode()
    for name in (
        "streamlstm_events_total",
        "streamlstm_events_rejected_total",
        "streamlstm_predictions_total",
        "streamlstm_batch_size",
        "streamlstm_inference_seconds",
        "streamlstm_event_latency_seconds",
        "streamlstm_processing_latency_seconds",
        "streamlstm_consumer_lag",
        "streamlstm_keys",
        "streamlstm_state_evictions_total",
        "streamlstm_commits_total",
        "streamlstm_model_version",
        "streamlstm_build_info",
    ):
        assert f"# TYPE {name.removesuffix('_total')}" in text, name
