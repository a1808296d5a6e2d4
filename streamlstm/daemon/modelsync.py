"""One trainer, weights for all: the trainer role and the model topic on one member.

Exactly one member of the group fine-tunes: the owner of input partition 0. Kafka's group
protocol elects it, and moves the role with the partition when that member leaves, dies
or the group rebalances; streamlstm adds no coordination of its own. The trainer starts
when partition 0 arrives (from the weights the group serves) and stops when it goes.

Weights the trainer's validation gate adopts are served by its own engine at once and
published to the model topic (``training.model_topic``: compacted, one partition, key
``model``) as checkpoint bytes with the same integrity and architecture checks as a file.
Every member follows that topic outside the group: at start-up it reads it from the
beginning and serves the newest valid record; afterwards it polls it between batches
(never waiting) and swaps newer weights in at the next batch. A record that fails its
checks is logged and counted, never served; one not newer than the served version (the
trainer's own echo, an older one) is skipped.

Two threads meet here: the loop's (start, turns, records in, close) and the trainer's
receiver (records out). Both offer weights to the engine, which keeps the newest offered;
one lock here covers the newest version and the publisher (created under it, and never
after close()).

With ``training.enabled = false`` no member trains, but every member still follows the
topic, so a group can serve weights published by a trainer elsewhere.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from streamlstm.config import Settings
from streamlstm.daemon.delivery import short
from streamlstm.engine import Engine
from streamlstm.io.admin import ensure_model_topic
from streamlstm.io.modeltopic import ModelFollower, ModelPublisher
from streamlstm.learning.checkpoint import (
    CheckpointError,
    architecture,
    decode_checkpoint,
    encode_checkpoint,
)
from streamlstm.metrics import Metrics

if TYPE_CHECKING:
    from streamlstm.learning.background import BackgroundTrainer
    from streamlstm.learning.gate import RunOutcome

log = logging.getLogger(__name__)

#: The partition whose owner trains.
TRAINER_PARTITION = 0
#: How often the model topic is polled (with a zero timeout) between batches. Each read
#: is a client poll on the loop's thread, and every event in flight waits for it:
#: kafka-python's hands over to its I/O thread twice, 2.6 ms on a quiet machine, 5-37 ms
#: on a loaded one (7% of the loop's time at 20 reads a second). Weights change at most
#: once per fine-tuning run, and members serve them within a second of publication
#: (tests/daemon/test_trainer_role_broker.py): four reads a second keep that.
FOLLOW_SECONDS = 0.25
#: How long a member that was given the role waits to have read the model topic to its
#: end before it starts training anyway (it must not train from weights older than the
#: newest published, or two different weights would carry one version).
CATCH_UP_SECONDS = 10.0
#: Start-up: longest read of the model topic before the first batch.
START_READ_SECONDS = 15.0
#: After the model topic could not be reached, try again after this long (the attempt
#: itself may take a few seconds of the loop's time).
RETRY_SECONDS = 30.0
RESULTS = ("published", "adopted", "rejected", "stale")


class ModelSync:
    """The member's side of the model topic, and its trainer while it holds the role."""

    def __init__(self, engine: Engine, settings: Settings, metrics: Metrics) -> None:
        self.engine = engine
        self.settings = settings
        self.metrics = metrics
        self.topic = settings.model_topic
        self.expect = architecture(engine.model, settings)
        self.follower: ModelFollower | None = None
        self.publisher: ModelPublisher | None = None
        self.trainer: BackgroundTrainer | None = None
        self.role = False  # this member owns input partition 0 (set by rebalance callbacks)
        self.version = engine.model_version  # newest weights served or offered
        self._lock = threading.Lock()  # version, publisher, _closed
        self._closed = False
        self._role_since = 0.0
        self._next_follow = 0.0
        self._retry_at = 0.0
        self._no_trainer = False  # training.enabled but no trainer can be built
        self.started = False  # start() was called: the daemon is connected
        for result in RESULTS:
            metrics.model_records.labels(result=result)
        metrics.trainer_role.set(0)

    # -- start-up and shutdown -----------------------------------------------------------

    def start(self, stop: threading.Event | None = None) -> bool:
        """Create the topic if asked, read it from the beginning, serve its newest valid
        record from the first batch. False (and retried by :meth:`turn`) if unreachable."""
        self.started = True
        k = self.settings.kafka
        if k.create_topics:
            try:
                ensure_model_topic(k, self.topic)
            except Exception as exc:  # e.g. no permission to create: it may exist anyway
                self._unreachable("create", exc)
        try:
            self.follower = ModelFollower(self.settings, self.topic)
        except Exception as exc:
            self._unreachable("start", exc)
            return False
        newest = self.follower.read_to_end(START_READ_SECONDS, stop.is_set if stop else None)
        if self._offer(newest):
            self.engine.adopt_offered()
            log.info("serving weights v%d from model topic %s", self.version, self.topic)
        return True

    def close(self, timeout_s: float = 2.0) -> None:
        """Stop the trainer (if any), close the clients. A trainer that did not stop in
        time may still hand over an adoption: it is not published (no publisher is made
        after this), and one made before this is closed here."""
        self._stop_trainer(timeout_s)
        with self._lock:
            self._closed = True
            clients = (self.follower, self.publisher)
            self.follower = self.publisher = None
        for client in clients:
            if client is not None:
                try:
                    client.close()
                except Exception as exc:
                    log.debug("closing a model-topic client: %s", exc)

    # -- rebalance callbacks (kafka-python's I/O thread): only a flag ----------------------

    def owned(self, partitions: set[int]) -> None:
        """The member's input partitions now; the role follows partition 0."""
        role = TRAINER_PARTITION in partitions
        if role and not self.role:
            self._role_since = time.monotonic()
        self.role = role

    # -- between batches -------------------------------------------------------------------

    def turn(self, now: float) -> None:
        """Adopt newer weights from the topic; start or stop the trainer with the role."""
        if not self.started or now < self._next_follow:
            return
        self._next_follow = now + FOLLOW_SECONDS
        if self.follower is None:
            if now >= self._retry_at:
                self.start()
        else:
            try:
                self._offer(self.follower.poll(0))
            except Exception as exc:
                self._unreachable("poll", exc)
        self._reconcile(now)

    def _reconcile(self, now: float) -> None:
        want = self.role and self.settings.training.enabled and not self._no_trainer
        if want and self.trainer is None:
            caught_up = self.follower is not None and self.follower.caught_up()
            if not caught_up and now - self._role_since < CATCH_UP_SECONDS:
                return  # first read what the last trainer published
            if not caught_up:
                log.warning(
                    "model topic %s not read to its end after %.0fs: training anyway, from v%d",
                    *(self.topic, CATCH_UP_SECONDS, self.version),
                )
            self._start_trainer()
        elif not want and self.trainer is not None:
            log.info("trainer role moved away (input partition 0 gone): stopping fine-tuning")
            self._stop_trainer(2.0)
        self.metrics.trainer_role.set(1 if self.trainer is not None else 0)

    def _start_trainer(self) -> None:
        try:
            from streamlstm.learning.background import BackgroundTrainer
        except ImportError as exc:
            log.warning("training.enabled, but no trainer is available (%s): not fine-tuning", exc)
            self._no_trainer = True
            return
        self.engine.adopt_offered()  # train from the newest weights, not the ones before
        trainer = BackgroundTrainer(self.engine, self.settings, self.metrics)
        trainer.on_adopted = self._publish
        self.trainer = trainer.start()
        log.info(
            "trainer role: this member owns input partition 0 and fine-tunes from v%d",
            self.engine.model_version,
        )

    def _stop_trainer(self, timeout_s: float) -> None:
        trainer, self.trainer = self.trainer, None
        if trainer is None:
            return
        try:
            trainer.stop(timeout=timeout_s)
        except Exception:
            log.exception("stopping the trainer")
        self.engine.attach_learner(None)  # the replay buffer goes with the trainer
        self.metrics.trainer_role.set(0)

    # -- records in --------------------------------------------------------------------------

    def _offer(self, values: list[bytes]) -> bool:
        """Offer the newest valid record newer than the served weights; True if one was."""
        for i, value in enumerate(reversed(values)):
            try:
                ckpt = decode_checkpoint(
                    value,
                    self.expect,
                    where=f"model topic {self.topic} record",
                    hint="the trainer runs other model settings than this member",
                )
            except CheckpointError as exc:
                log.error("not adopted: %s", exc)
                self.metrics.model_records.labels(result="rejected").inc()
                continue
            with self._lock:  # the trainer's receiver publishes (and moves version) too
                stale = ckpt.version <= self.version
                if not stale:
                    self.engine.offer_weights(ckpt.state_dict, ckpt.version)
                    self.version = ckpt.version
            if stale:
                self.metrics.model_records.labels(result="stale").inc(len(values) - i)
                return False
            self.metrics.model_records.labels(result="adopted").inc()
            log.info("adopting weights v%d from the model topic", ckpt.version)
            return True
        return False

    # -- records out (the trainer's supervisor thread) -------------------------------------

    def _publish(self, outcome: RunOutcome) -> None:
        """Publish weights the trainer adopted (and already offered to the engine)."""
        with self._lock:
            self.version = max(self.version, outcome.version)
            if self._closed:
                log.warning("weights v%d not published: the daemon is closing", outcome.version)
                return
            if self.publisher is None:
                try:
                    self.publisher = ModelPublisher(self.settings, self.topic)
                except Exception as exc:
                    self.metrics.broker_errors.labels("model_publish").inc()
                    log.error("weights v%d not published: %s", outcome.version, short(exc))
                    return
            publisher = self.publisher
        value = encode_checkpoint(
            outcome.state_dict(),
            self.expect,
            outcome.version,
            config=self.settings.model_dump(mode="json"),
            metrics={"train_loss": outcome.train_loss, "validation_loss": outcome.validation_loss},
        )
        version = outcome.version

        def done(error: BaseException | None) -> None:
            if error is None:
                self.metrics.model_records.labels(result="published").inc()
                log.info("published weights v%d to %s (%d bytes)", version, self.topic, len(value))
            else:
                self.metrics.broker_errors.labels("model_publish").inc()
                log.error(
                    "weights v%d could not be published to %s (%s): only this member serves "
                    "them until the next adoption is published",
                    version,
                    self.topic,
                    short(error),
                )

        publisher.publish(value, version, done)

    def _unreachable(self, what: str, exc: BaseException) -> None:
        self.metrics.broker_errors.labels("model_topic").inc()
        now = time.monotonic()
        if now >= self._retry_at:  # once per retry period, not every turn
            log.warning(
                "model topic %s: %s failed (%s); retrying in %.0fs",
                *(self.topic, what, short(exc), RETRY_SECONDS),
            )
            self._retry_at = now + RETRY_SECONDS
