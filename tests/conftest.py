"""Shared fixtures: a Kafka-protocol broker for integration tests, unique topic names."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """Bootstrap address of the test broker.

    ``STREAMLSTM_TEST_BOOTSTRAP`` (e.g. an Apache Kafka cluster) when set, else an
    embedded Tansu broker started for the session.
    """
    external = os.environ.get("STREAMLSTM_TEST_BOOTSTRAP")
    if external:
        yield external
        return
    from streamlstm.broker import EmbeddedBroker

    with EmbeddedBroker() as broker:
        yield broker.bootstrap


@pytest.fixture
def unique_topic() -> str:
    """A fresh topic name prefix for one test, e.g. ``t-3f9c...``; append suffixes to it."""
    return f"t-{uuid.uuid4().hex[:12]}"
