"""Dead letters: every rejected record goes to ``kafka.dead_letter_topic`` with its reason.

A message that failed as a whole is copied (key, value and its own headers). When one
element of a JSON-array message failed, only that element is sent (as JSON, written back
from the decoder's parse: the message is not parsed again), with ``streamlstm.element``
naming its index; the good elements were predicted. Headers (values are UTF-8 text):

==========================  ====================================================
``streamlstm.reason``       reason code (see :data:`streamlstm.events.REASONS`)
``streamlstm.topic``        source topic
``streamlstm.partition``    source partition
``streamlstm.offset``       source offset
``streamlstm.error``        short human-readable message
``streamlstm.element``      index in the source JSON array (element failures only)
``streamlstm.size``         original size of the value in bytes, when the value was
                            truncated to fit (``too_large`` records)
==========================  ====================================================

A dead letter always fits in ``max_bytes`` (key, value and headers; Kafka's framing has
room beside it): a record larger than that, typically a ``too_large`` one, is sent as a
truncated copy, its first bytes, with ``streamlstm.size``. Otherwise the producer would
refuse it and the daemon would stop on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from streamlstm.events import Rejection
from streamlstm.io.offsets import Send

DEAD_LETTER_HEADERS = (
    "streamlstm.reason",
    "streamlstm.topic",
    "streamlstm.partition",
    "streamlstm.offset",
    "streamlstm.error",
    "streamlstm.element",
    "streamlstm.size",
)
# The producer's max_request_size is max(1 MiB, engine.max_message_bytes) + 64 KiB (see
# io/sink.py) and a broker's default message.max.bytes is 1 MiB + 12 bytes: a dead letter
# of at most 1 MiB, less the framing below, fits both.
DEFAULT_MAX_BYTES = 1_048_576
_FRAMING = 512  # record batch header (61 bytes), record varints, per-header varints
_HEADER_OVERHEAD = 8  # varints of one header's key and value lengths, counted generously
_MAX_ERROR_CHARS = 200


def dead_letters(
    topic: str,
    dead_letter_topic: str,
    records: Sequence[Any],
    rejections: Sequence[Rejection],
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> tuple[list[Send], list[str]]:
    """Dead-letter records for ``rejections`` of polled ``records``; also their reasons.

    Every record returned holds at most ``max_bytes - 512`` bytes of key, value and headers.
    """
    sends: list[Send] = []
    reasons: list[str] = []
    for r in rejections:
        rec = records[r.message]
        headers = [
            ("streamlstm.reason", r.reason.encode()),
            ("streamlstm.topic", _text(topic)),
            ("streamlstm.partition", str(rec.partition).encode()),
            ("streamlstm.offset", str(rec.offset).encode()),
            ("streamlstm.error", _text(r.detail[:_MAX_ERROR_CHARS])),
        ]
        own: list[tuple[str, bytes]] = []
        if r.element is not None:
            headers.append(("streamlstm.element", str(r.element).encode()))
        if r.element is None or r.payload is None:
            # The whole message (an element that could not be written back stands in it).
            value = rec.value
            own = [(k, v) for k, v in rec.headers or () if type(k) is str and type(v) is bytes]
        else:
            value = r.payload
        key, value, headers = _fit(rec.key, value, own, headers, max_bytes)
        sends.append((dead_letter_topic, key, value, headers))
        reasons.append(r.reason)
    return sends, reasons


def _text(text: str) -> bytes:
    return text.encode("utf-8", "backslashreplace")


def _size(headers: Sequence[tuple[str, bytes]]) -> int:
    return sum(len(k.encode()) + len(v) + _HEADER_OVERHEAD for k, v in headers)


def _fit(
    key: bytes | None,
    value: bytes | None,
    own: list[tuple[str, bytes]],
    ours: list[tuple[str, bytes]],
    max_bytes: int,
) -> tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]:
    """Key, value and headers cut down to ``max_bytes`` less framing, value first."""
    budget = max(max_bytes - _FRAMING, 256)
    ours_size = _size(ours) + _size([("streamlstm.size", b"9" * 20)])
    half = budget // 2
    if key is not None and len(key) + ours_size > half:  # a key this large: keep its start
        key = key[: max(half - ours_size, 0)]
    key_size = len(key or b"")
    if key_size + ours_size + _size(own) > half:  # the record's own headers do not fit
        own = []
    room = budget - key_size - ours_size - _size(own)
    if value is not None and len(value) > room:
        ours = [*ours, ("streamlstm.size", str(len(value)).encode())]
        value = value[: max(room, 0)]
    return key, value, [*own, *ours]


def header(headers: Sequence[tuple[str, bytes]] | None, name: str) -> str | None:
    """The last value of header ``name`` as text, or None."""
    found = None
    for key, value in headers or ():
        if key == name:
            found = value.decode()
    return found
