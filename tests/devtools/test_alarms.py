"""The demo's scorecard: injected incidents matched to output records by each key's order."""

from __future__ import annotations

from streamlstm.devtools.alarms import WINDOW, AlarmTally, labelled_events
from streamlstm.devtools.synthetic import SyntheticStream


def test_injected_places_are_the_labelled_events_of_each_key() -> None:
    tally = AlarmTally(threshold=0.5)
    chunks = labelled_events(SyntheticStream(7, 2, seed=1, anomaly_rate=0.05), tally, 100)
    events = [e for _ in range(5) for e in next(chunks)]
    twin = SyntheticStream(7, 2, seed=1, anomaly_rate=0.05).arrays(500)  # same draws
    flagged = twin.anomaly | twin.shift
    expected = set()
    seen: dict[str, int] = {}
    for event, label in zip(events, flagged.tolist(), strict=True):
        place = seen.get(event["key"], 0)
        seen[event["key"]] = place + 1
        if label:
            expected.add((event["key"], place))
    assert expected and tally._injected == expected


def test_an_incident_is_caught_once_and_other_alarms_are_false() -> None:
    tally = AlarmTally(threshold=0.5)
    tally.injected("a", 1)
    tally.injected("b", 0)
    for score in [0.0, 0.0, 0.0, 0.0, 0.9]:  # "a": no alarm in its window, one after it
        tally.record("a", score)
    for score in [None, 0.6, 0.6]:  # "b": caught late in its window, then a repeat
        tally.record("b", score)
    assert WINDOW == 3
    assert tally.summary() == (
        "injected incidents: 1 caught, 1 missed; false alarms: 2 (of 3 alarms)"
    )


def test_incidents_not_yet_predicted_are_not_counted() -> None:
    tally = AlarmTally(threshold=0.5)
    tally.injected("a", 10)
    tally.record("a", 0.9)
    assert (tally.caught, tally.missed, tally.false_alarms) == (0, 0, 1)


def test_output_arrays_count_record_by_record_in_order() -> None:
    """``kafka.output_per_message`` writes one JSON array per input message."""
    from types import SimpleNamespace

    import orjson

    from streamlstm.devtools.alarms import tally_outputs

    one, arrays = AlarmTally(threshold=0.5), AlarmTally(threshold=0.5)
    for tally in (one, arrays):
        tally.injected("a", 1)
    records = [{"key": "a", "anomaly_score": s} for s in (0.9, 0.8, 0.0)]
    tally_outputs(one, [SimpleNamespace(value=orjson.dumps(r)) for r in records])
    messages = [records[:2], [], records[2:]]
    tally_outputs(arrays, [SimpleNamespace(value=orjson.dumps(m)) for m in messages])
    for tally in (one, arrays):
        assert (tally.alarms, tally.false_alarms, tally._seen) == (2, 1, {"a": 3})
