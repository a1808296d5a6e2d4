"""Kafka input and output: consumer, producer, dead letters, the commit protocol.

Data flow: :class:`~streamlstm.io.source.Source` polls and flattens records,
:mod:`~streamlstm.io.deadletter` turns rejections into dead-letter records,
:class:`~streamlstm.io.sink.Sink` produces predictions and dead letters without waiting,
and :class:`~streamlstm.io.offsets.OffsetTracker` commits a partition's offset only up to
the records whose every output the broker acknowledged. No torch in here.
"""

from streamlstm.io.admin import ensure_topics
from streamlstm.io.client import PartitionReader, Source, TopicPartition, make_reader, make_source
from streamlstm.io.deadletter import DEAD_LETTER_HEADERS, dead_letters
from streamlstm.io.offsets import OffsetTracker, Ticket
from streamlstm.io.sink import Sink
from streamlstm.io.source import Polled

__all__ = [
    "DEAD_LETTER_HEADERS",
    "OffsetTracker",
    "PartitionReader",
    "Polled",
    "Sink",
    "Source",
    "Ticket",
    "TopicPartition",
    "dead_letters",
    "ensure_topics",
    "make_reader",
    "make_source",
]
