"""Read event files (JSONL or CSV) into event batches, for replay, pretrain and produce.

JSONL: one message per line, exactly as it would be produced to Kafka (an object or
an array of objects). CSV: one event per row; the timestamp column (default: the
first), an optional key column (default: a constant key, the file's stem), and every
other column is a feature, in file order.

>>> import tempfile, pathlib
>>> path = pathlib.Path(tempfile.mkdtemp()) / "pump.csv"
>>> _ = path.write_text("time,a,b\\n2024-01-01 00:00:00,1,2\\n2024-01-01 01:00:00,3,4\\n")
>>> data = read_events(path)
>>> data.batch.keys, data.batch.values.tolist(), data.columns
(['pump', 'pump'], [[1.0, 2.0], [3.0, 4.0]], ['a', 'b'])
"""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson

from streamlstm.events import Decoder, EventBatch, Rejection
from streamlstm.validation import InvalidEvent, parse_ts


@dataclass
class FileEvents:
    """Every good event of a file, in file order, and what was rejected."""

    batch: EventBatch
    rejected: Counter[str] = field(default_factory=Counter)
    rejections: list[Rejection] = field(default_factory=list)  # CSV: message = line number
    columns: list[str] | None = None  # CSV feature names


def detect_format(path: Path) -> str:
    """``csv`` or ``jsonl`` from the suffix (``.json``/``.ndjson`` count as JSONL)."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in {".jsonl", ".ndjson", ".json"}:
        return "jsonl"
    raise ValueError(f"{path}: unknown format {suffix!r}; use a .csv or .jsonl file")


def read_events(
    path: str | Path,
    width: int | None = None,
    ts_column: str | None = None,
    key_column: str | None = None,
    key: str | None = None,
    max_message_bytes: int = 1_048_576,
) -> FileEvents:
    """Read a JSONL or CSV file; ``width`` None means: take it from the file."""
    path = Path(path)
    if detect_format(path) == "csv":
        return _read_csv(path, width, ts_column, key_column, key)
    return _read_jsonl(path, width, max_message_bytes)


def _infer_width(lines: list[bytes]) -> int:
    for line in lines:
        try:
            doc = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        for obj in doc if isinstance(doc, list) else [doc]:
            if isinstance(obj, dict) and isinstance(obj.get("values"), list):
                return len(obj["values"])
    raise ValueError("no event with a `values` list in the file: cannot infer model.input_size")


def _read_jsonl(path: Path, width: int | None, max_message_bytes: int) -> FileEvents:
    lines = [line for line in path.read_bytes().splitlines() if line.strip()]
    decoder = Decoder(width or _infer_width(lines), max_message_bytes)
    batch, rejections = decoder.decode(lines)
    return FileEvents(batch, decoder.rejected, rejections)


def _read_csv(
    path: Path,
    width: int | None,
    ts_column: str | None,
    key_column: str | None,
    key: str | None,
) -> FileEvents:
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        raise ValueError(f"{path}: empty CSV file")
    header, body = rows[0], rows[1:]
    ts_col = ts_column if ts_column is not None else header[0]
    for name, given in (("--ts-column", ts_col), ("--key-column", key_column)):
        if given is not None and given not in header:
            raise ValueError(f"{path}: {name} {given!r} is not a column; columns: {header}")
    feature_names = [c for c in header if c not in (ts_col, key_column)]
    if width is not None and width != len(feature_names):
        raise ValueError(
            f"{path}: {len(feature_names)} feature columns but model.input_size is {width}"
        )
    ts_at, key_at = header.index(ts_col), header.index(key_column) if key_column else None
    feature_at = [header.index(c) for c in feature_names]
    constant_key = key or path.stem

    keys: list[str] = []
    ts: list[float] = []
    values: list[list[float]] = []
    line_numbers: list[int] = []
    rejections: list[Rejection] = []
    for line_no, row in enumerate(body, start=2):
        try:
            if len(row) != len(header):
                raise InvalidEvent("wrong_width", f"{len(row)} cells, header has {len(header)}")
            t = _parse_csv_ts(row[ts_at])
            vals = [_parse_number(row[i], header[i]) for i in feature_at]
            k = row[key_at] if key_at is not None else constant_key
            if not k:
                raise InvalidEvent("bad_type", "empty key")
        except InvalidEvent as bad:
            rejections.append(Rejection(line_no, None, bad.reason, bad.detail))
            continue
        keys.append(k)
        ts.append(t)
        values.append(vals)
        line_numbers.append(line_no)
    batch = EventBatch.from_arrays(keys, np.array(ts), np.array(values).reshape(len(keys), -1))
    finite = np.isfinite(batch.values).all(axis=1)
    if not finite.all():
        for i in np.flatnonzero(~finite):
            rejections.append(Rejection(line_numbers[i], None, "non_finite", "non-finite number"))
        batch = batch.take(np.flatnonzero(finite))
    return FileEvents(batch, Counter(r.reason for r in rejections), rejections, feature_names)


def _parse_csv_ts(cell: str) -> float:
    try:
        return float(cell)
    except ValueError:
        return parse_ts(cell.strip())


def _parse_number(cell: str, column: str) -> float:
    try:
        return float(cell)
    except ValueError:
        raise InvalidEvent(
            "bad_type", f"column {column!r}: {cell[:20]!r} is not a number"
        ) from None
