"""Dead letters: every rejected record goes to ``kafka.dead_letter_topic`` with its reason.

A message that failed as a whole is copied unchanged (key, value and its own headers).
When one element of a JSON-array message failed, only that element is sent (as JSON),
with ``streamlstm.element`` naming its index; the good elements were predicted. Headers
(values are UTF-8 text):

==========================  ====================================================
``streamlstm.reason``       reason code (see :data:`streamlstm.events.REASONS`)
``streamlstm.topic``        source topic
``streamlstm.partition``    source partition
``streamlstm.offset``       source offset
``streamlstm.error``        short human-readable message
``streamlstm.element``      index in the source JSON array (element failures only)
==========================  ====================================================
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import orjson

from streamlstm.events import Rejection
from streamlstm.io.offsets import Send

DEAD_LETTER_HEADERS = (
    "streamlstm.reason",
    "streamlstm.topic",
    "streamlstm.partition",
    "streamlstm.offset",
    "streamlstm.error",
    "streamlstm.element",
)
_MAX_ERROR_CHARS = 200


def _element(payload: bytes, index: int) -> bytes:
    """The ``index``-th element of a JSON array message, re-encoded on its own."""
    try:
        return orjson.dumps(orjson.loads(payload)[index])
    except orjson.JSONDecodeError:  # NaN/Infinity literals: Python's json keeps them
        return json.dumps(json.loads(payload)[index]).encode()


def dead_letters(
    topic: str, dead_letter_topic: str, records: Sequence[Any], rejections: Sequence[Rejection]
) -> tuple[list[Send], list[str]]:
    """Dead-letter records for ``rejections`` of polled ``records``; also their reasons."""
    sends: list[Send] = []
    reasons: list[str] = []
    for r in rejections:
        rec = records[r.message]
        headers = [
            ("streamlstm.reason", r.reason.encode()),
            ("streamlstm.topic", topic.encode()),
            ("streamlstm.partition", str(rec.partition).encode()),
            ("streamlstm.offset", str(rec.offset).encode()),
            ("streamlstm.error", r.detail[:_MAX_ERROR_CHARS].encode()),
        ]
        if r.element is None:
            value = rec.value
            own = [(k, v) for k, v in rec.headers or () if isinstance(v, bytes)]
            headers = [*own, *headers]
        else:
            value = _element(rec.value, r.element)
            headers.append(("streamlstm.element", str(r.element).encode()))
        sends.append((dead_letter_topic, rec.key, value, headers))
        reasons.append(r.reason)
    return sends, reasons


def header(headers: Sequence[tuple[str, bytes]] | None, name: str) -> str | None:
    """The last value of header ``name`` as text, or None."""
    found = None
    for key, value in headers or ():
        if key == name:
            found = value.decode()
    return found
