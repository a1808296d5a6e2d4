"""Validation rules a dead letter relies on: what is rejected by default, and a detail
that names the offending field (``values`` or ``target``) and type."""

from __future__ import annotations

import pytest

from streamlstm.validation import InvalidEvent, validate_event


def _rejected(obj: object, width: int = 2) -> InvalidEvent:
    with pytest.raises(InvalidEvent) as caught:
        validate_event(obj, width)
    return caught.value


def test_a_key_that_is_not_unicode_text_is_rejected_by_default() -> None:
    error = _rejected({"key": "a\ud800", "ts": 1, "values": [1, 2]})
    assert error.reason == "bad_key"


def test_a_rejection_names_the_type_of_a_non_object_element() -> None:
    error = _rejected([1, 2])
    assert error.reason == "not_object" and "array element is a list" in error.detail


def test_a_rejection_names_the_field_whose_numbers_are_wrong() -> None:
    bad_values = _rejected({"key": "k", "ts": 1, "values": [1]})
    assert bad_values.reason == "wrong_width"
    assert bad_values.detail.startswith("values has 1 numbers")
    bad_target = _rejected({"key": "k", "ts": 1, "values": [1, 2], "target": [1, "x"]})
    assert bad_target.reason == "bad_type" and bad_target.detail.startswith("target holds a str")
