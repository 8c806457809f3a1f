"""The outbox dispatcher: store and forward over MQTT first, HTTPS second (issue 4).

One round (:meth:`OutboxDispatcher.run_once`):

1. ``requeue_stale``: items left in ``sending`` longer than ``sending_timeout_s`` (a
   dispatcher killed mid-send) go back to ``failed`` with ``sending_timeout`` (payments
   runbook, section 6).
2. Pick a channel *before* claiming, so nothing is claimed (and no attempt is spent)
   while every channel is down: HTTPS when the backlog is at least
   ``https_bulk_threshold`` (pending + failed) and its breaker allows; else MQTT when
   connected and its breaker allows; else HTTPS when its breaker allows; else nothing.
3. Claim up to ``batch_size`` items (per-stream order is the store's job) and send:

   - MQTT: every item is published QoS 1, pipelined: all PUBLISHes are issued in id
     order, then all PUBACKs awaited. An acked item is ``sent``. A failed one is
     released (not an attempt) when the link went down, else ``failed``. An item
     acked after an older one of its stream failed was still received after it: one
     TCP connection, and MQTT keeps the order of QoS 1 messages of one client.
   - HTTPS: one ``post_events`` request for the batch (all or nothing, in order).

   An item of the ``compensation`` topic is ``sent`` only when its event went out on
   the chosen channel *and* ``post_compensation`` succeeded (when an HTTPS client is
   configured): the payments team acts on that endpoint, so a failed alert re-sends
   the event too (the cloud de-duplicates by ``event_id``).
4. Outcomes: :class:`~cloud_sync.https_client.CloudUnreachable` or an MQTT link loss
   -> ``release`` (no attempt); a publish refused while the link is up, a compensation
   breaker that is open, or a :class:`~cloud_sync.https_client.CloudRejected` that
   blames the endpoint or the configuration (401/403/404/405/413, ``endpoint_fault``)
   -> ``release`` (no attempt) due after a backoff, and the endpoint's breaker records
   a failure; other retryable errors, and any unexpected exception of a send (a bug,
   an untranslated library error) -> ``mark_failed`` with ``next_attempt_at = now +
   full-jitter backoff(attempts)``; any other ``CloudRejected`` (400, 409, 422...) ->
   ``dead`` (DLQ) with its reason. Each remote endpoint's breaker records the call's
   outcome, so no half-open probe slot is ever left taken.

:meth:`~OutboxDispatcher.run_once` returns how many items made progress (``sent``,
``failed`` or ``dead``), not how many were claimed: a round that only released its
items (no channel after all, a breaker open) returns 0 and :meth:`~OutboxDispatcher.run`
waits instead of spinning.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from cloud_sync.backoff import Backoff
from cloud_sync.breaker import OPEN, CircuitBreaker
from cloud_sync.https_client import (
    CloudError,
    CloudHttpClient,
    CloudRejected,
    CloudUnreachable,
)
from cloud_sync.mqtt_session import COMPENSATION_TOPIC, MqttLinkDown
from cloud_sync.outbox import OutboxItem, OutboxStore

__all__ = [
    "BACKOFF_BASE_S",
    "BACKOFF_MAX_S",
    "BATCH_SIZE",
    "BREAKER_COMPENSATION",
    "BREAKER_EVENTS",
    "BREAKER_MQTT",
    "HTTPS_BULK_THRESHOLD",
    "MAX_ATTEMPTS",
    "SENDING_TIMEOUT_S",
    "MqttPublisher",
    "OutboxDispatcher",
]

log = logging.getLogger(__name__)

#: Breaker names (keys of ``breakers``), one per remote endpoint.
BREAKER_MQTT = "mqtt"
BREAKER_EVENTS = "https_events"
BREAKER_COMPENSATION = "https_compensation"
# Defaults, which the gateway's [outbox] config section takes as its own.
#: Attempts before an item goes to the dead-letter queue.
MAX_ATTEMPTS = 10
#: The payments runbook's rule: an item ``sending`` longer than this goes back to failed.
SENDING_TIMEOUT_S = 300.0
#: Items claimed and sent in one round.
BATCH_SIZE = 500
#: Retry backoff of a failed item (full jitter, Backoff).
BACKOFF_BASE_S = 1.0
BACKOFF_MAX_S = 300.0
#: A backlog (pending + failed) this deep goes over HTTPS batches even with MQTT up.
HTTPS_BULK_THRESHOLD = 1000
#: How long :meth:`OutboxDispatcher.run` sleeps when idle unless :meth:`notify` wakes it.
IDLE_POLL_S = 1.0
MAX_ERROR_CHARS = 200


class MqttPublisher(Protocol):
    @property
    def connected(self) -> bool: ...

    async def publish_many(self, items: Sequence[tuple[str, bytes]]) -> list[BaseException | None]:
        """QoS 1 publish of each ``(topic, payload)`` in order, pipelined; per item
        ``None`` once its PUBACK arrived, else the error."""
        ...


def _error_text(exc: BaseException) -> str:
    text = str(exc)
    return (f"{type(exc).__name__}: {text}" if text else type(exc).__name__)[:MAX_ERROR_CHARS]


class OutboxDispatcher:
    def __init__(
        self,
        store: OutboxStore,
        *,
        mqtt: MqttPublisher | None,
        https: CloudHttpClient | None,
        breakers: dict[str, CircuitBreaker],
        clock: Callable[[], float] = time.time,
        max_attempts: int = MAX_ATTEMPTS,
        sending_timeout_s: float = SENDING_TIMEOUT_S,
        batch_size: int = BATCH_SIZE,
        backoff_base_s: float = BACKOFF_BASE_S,
        backoff_max_s: float = BACKOFF_MAX_S,
        https_bulk_threshold: int | None = HTTPS_BULK_THRESHOLD,
        idle_poll_s: float = IDLE_POLL_S,
        before_send: Callable[[], Awaitable[None]] | None = None,
        coalesce_s: float = 0.0,
    ) -> None:
        if max_attempts < 1 or batch_size < 1:
            raise ValueError("need max_attempts >= 1 and batch_size >= 1")
        self._store = store
        self._mqtt = mqtt
        self._https = https
        self._breakers = breakers
        self._clock = clock
        self.max_attempts = max_attempts
        self.sending_timeout_s = sending_timeout_s
        self.batch_size = batch_size
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        # Full jitter: thousands of gateways back from one outage do not retry in step.
        self._backoff = Backoff(backoff_base_s, backoff_max_s)
        self.https_bulk_threshold = https_bulk_threshold
        self.idle_poll_s = idle_poll_s
        # Awaited between a claim and the send: a store that writes without flushing
        # (the gateway's journal) makes the claimed items durable there, so the cloud
        # never hears of something a power cut could take back. Raising skips the
        # round; the items return through requeue_stale.
        self._before_send = before_send
        # After a wake-up from idle, wait this long before claiming, so that the events
        # written together (a release's "accepted" and its outcome, a burst's results)
        # go in one round: one claim and one "sent" write for all of them.
        self.coalesce_s = coalesce_s
        # Delivered items whose "sent" the store could not write yet (ids, channel).
        self._unmarked: list[tuple[list[int], str]] = []
        self._wakeup = asyncio.Event()
        self._progress = 0

    def notify(self) -> None:
        """Something was added to the outbox (call from the event loop's thread)."""
        self._wakeup.set()

    async def run(self) -> None:
        """Dispatch forever. Cancel the task to stop: items caught in ``sending`` come
        back through ``requeue_stale`` after ``sending_timeout_s``."""
        while True:
            self._wakeup.clear()
            try:
                handled = await self.run_once()
            except Exception:
                # A store error (disk full, locked database) must not end the dispatcher.
                log.exception("outbox dispatch round failed")
                handled = 0
            if handled:  # something was sent, failed or dead: there may be more to do
                continue
            # asyncio.timeout, not wait_for: in Python 3.11 wait_for swallows a
            # cancellation that arrives as the event fires (gh-86296); the dispatcher
            # would then never stop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.idle_poll_s):
                    await self._wakeup.wait()
            if self._wakeup.is_set() and self.coalesce_s > 0:
                await asyncio.sleep(self.coalesce_s)

    async def run_once(self) -> int:
        """One round; returns how many items made progress: ``sent``, ``failed`` or
        ``dead`` (0: nothing to do, no channel, or every claimed item was released)."""
        self._progress = 0
        if not self._mark_delivered_earlier():
            return 0
        now = self._clock()
        requeued = self._store.requeue_stale(self.sending_timeout_s, now)
        if requeued:
            log.warning("outbox: %d item(s) stuck in sending requeued (sending_timeout)", requeued)
        channel = self._pick_channel()
        if channel is None:
            return 0
        items = self._store.claim(self.batch_size, now)
        if not items:
            # The breaker's allow() may have handed us a probe slot: give it back.
            self._breaker(BREAKER_MQTT if channel == "mqtt" else BREAKER_EVENTS).cancel()
            return 0
        if self._before_send is not None:
            try:
                await self._before_send()
            except Exception as exc:
                log.warning(
                    "outbox: %d claimed item(s) not sent, the store cannot make them"
                    " durable (%s); retried after the sending timeout",
                    len(items),
                    type(exc).__name__,
                )
                self._breaker(BREAKER_MQTT if channel == "mqtt" else BREAKER_EVENTS).cancel()
                return 0
        if channel == "mqtt":
            delivered = await self._send_mqtt(items)
        else:
            delivered = await self._send_https(items)
        if delivered:
            await self._finish(delivered, channel)
        return self._progress

    # -- channels -------------------------------------------------------------------

    def _pick_channel(self) -> str | None:
        mqtt_up = self._mqtt is not None and self._mqtt.connected
        if self._https is not None and self.https_bulk_threshold is not None:
            depth = self._store.depth()
            backlog = depth.get("pending", 0) + depth.get("failed", 0)
            if backlog >= self.https_bulk_threshold and self._breaker(BREAKER_EVENTS).allow():
                return "https"
        if mqtt_up and self._breaker(BREAKER_MQTT).allow():
            return "mqtt"
        if self._https is not None and self._breaker(BREAKER_EVENTS).allow():
            return "https"
        return None

    async def _send_mqtt(self, items: Sequence[OutboxItem]) -> list[OutboxItem]:
        assert self._mqtt is not None
        breaker = self._breaker(BREAKER_MQTT)
        try:
            results = await self._mqtt.publish_many([(item.topic, item.payload) for item in items])
        except Exception as exc:
            self._unexpected(items, exc, "mqtt", breaker)
            return []
        delivered: list[OutboxItem] = []
        link_down: list[int] = []
        refused: list[OutboxItem] = []
        any_failed = False
        connected = self._mqtt.connected
        for item, error in zip(items, results, strict=True):
            if error is None:
                delivered.append(item)
            elif not connected:
                link_down.append(item.id)
            elif isinstance(error, MqttLinkDown):
                # The link is up but paho refused the PUBLISH (or the link bounced):
                # due again only after a backoff, or the next round would spin on it.
                refused.append(item)
            else:
                any_failed = True
                self._fail(item, error, "mqtt")
        if link_down:
            now = self._clock()
            self._store.release(
                link_down, error="mqtt_link_down", channel="mqtt", now=now, next_attempt_at=now
            )
        if refused:
            first = next(e for e in results if isinstance(e, MqttLinkDown))
            self._release_later(refused, _error_text(first), "mqtt", breaker)
        if delivered:
            breaker.record_success()
        elif any_failed or refused:
            breaker.record_failure()
        else:
            breaker.cancel()  # the link went down: the session's reconnect loop's business
        return delivered

    async def _send_https(self, items: Sequence[OutboxItem]) -> list[OutboxItem]:
        assert self._https is not None
        breaker = self._breaker(BREAKER_EVENTS)
        sendable: list[OutboxItem] = []
        for item in items:
            if _is_json_object(item.payload):
                sendable.append(item)
            else:
                self._fail(item, CloudRejected(0, "malformed_payload"), "https")
        if not sendable:
            breaker.cancel()  # nothing was called
            return []
        try:
            await self._https.post_events(sendable)
        except CloudError as exc:
            self._cloud_error(sendable, exc, "https", breaker)
            return []
        except Exception as exc:
            self._unexpected(sendable, exc, "https", breaker)
            return []
        breaker.record_success()
        return sendable

    async def _finish(self, delivered: Sequence[OutboxItem], channel: str) -> None:
        """Compensation alerts for the delivered items, then ``mark_sent``."""
        done: list[int] = []
        for item in delivered:
            if item.topic != COMPENSATION_TOPIC or self._https is None:
                done.append(item.id)
                continue
            # Keep order: everything acked before this item is marked first.
            if done:
                self._mark_sent(done, channel)
                done = []
            breaker = self._breaker(BREAKER_COMPENSATION)
            if not breaker.allow():
                # Due again when the breaker may let a probe through, not right away:
                # released at ``now``, the next round would claim and re-send it at once.
                now = self._clock()
                self._store.release(
                    [item.id],
                    error="breaker_open:" + BREAKER_COMPENSATION,
                    channel="https",
                    now=now,
                    next_attempt_at=now + self._release_delay(breaker),
                )
                continue
            try:
                await self._https.post_compensation(item)
            except CloudError as exc:
                self._cloud_error([item], exc, "https", breaker)
                continue
            except Exception as exc:
                self._unexpected([item], exc, "https", breaker)
                continue
            breaker.record_success()
            done.append(item.id)
        if done:
            self._mark_sent(done, channel)

    def _mark_sent(self, ids: list[int], channel: str) -> None:
        self._progress += len(ids)
        try:
            self._store.mark_sent(ids, channel=channel, now=self._clock())
        except Exception as exc:
            # Delivered, but the store cannot write it down now (disk full): remember
            # it here and mark it first thing in the next rounds. Left in ``sending``
            # it would hold its stream back for sending_timeout_s.
            self._unmarked.append((ids, channel))
            log.warning(
                "outbox: %d delivered item(s) not marked sent yet (%s)",
                len(ids),
                type(exc).__name__,
            )

    def _mark_delivered_earlier(self) -> bool:
        """Mark what was delivered in rounds whose store write failed; False while the
        store still cannot write."""
        while self._unmarked:
            ids, channel = self._unmarked[0]
            try:
                self._store.mark_sent(ids, channel=channel, now=self._clock())
            except Exception:
                return False
            self._unmarked.pop(0)
        return True

    # -- outcomes -------------------------------------------------------------------

    def _cloud_error(
        self,
        items: Sequence[OutboxItem],
        exc: CloudError,
        channel: str,
        breaker: CircuitBreaker,
    ) -> None:
        """A call to the cloud API failed with ``exc``: the items' outcome and the
        endpoint breaker's."""
        if isinstance(exc, CloudRejected) and exc.endpoint_fault:
            # 401/403/404/405/413: the token, URL or batch size is wrong, not the events.
            breaker.record_failure()
            self._release_later(
                items, f"rejected:{exc.status}:{exc.reason}"[:MAX_ERROR_CHARS], channel, breaker
            )
            return
        self._fail_all(items, exc, channel)
        if isinstance(exc, CloudRejected):
            breaker.record_success()  # the endpoint works; the request was bad
        else:
            breaker.record_failure()

    def _unexpected(
        self,
        items: Sequence[OutboxItem],
        exc: Exception,
        channel: str,
        breaker: CircuitBreaker,
    ) -> None:
        """A send raised something other than a CloudError (a bug, an untranslated
        library error): never leave a probe slot taken nor the items in ``sending``."""
        log.exception("outbox: unexpected error sending %d item(s) over %s", len(items), channel)
        breaker.record_failure()
        for item in items:
            self._fail(item, exc, channel)

    def _release_later(
        self, items: Sequence[OutboxItem], error: str, channel: str, breaker: CircuitBreaker
    ) -> None:
        """Release (no attempt spent), due again after a backoff."""
        now = self._clock()
        self._store.release(
            [i.id for i in items],
            error=error,
            channel=channel,
            now=now,
            next_attempt_at=now + self._release_delay(breaker),
        )

    def _release_delay(self, breaker: CircuitBreaker) -> float:
        """How long released items wait: until the breaker may probe again when it is
        open (its own clock may differ from ours: its timeout is the upper bound), at
        least ``backoff_base_s``."""
        if breaker.state == OPEN:
            return max(self.backoff_base_s, breaker.reset_timeout_s)
        return self.backoff_base_s

    def _fail_all(self, items: Sequence[OutboxItem], exc: BaseException, channel: str) -> None:
        if isinstance(exc, CloudUnreachable):
            now = self._clock()
            self._store.release(
                [i.id for i in items],
                error=_error_text(exc),
                channel=channel,
                now=now,
                next_attempt_at=now,
            )
            return
        for item in items:
            self._fail(item, exc, channel)

    def _fail(self, item: OutboxItem, exc: BaseException, channel: str) -> None:
        now = self._clock()
        if isinstance(exc, CloudUnreachable):
            self._store.release(
                [item.id], error=_error_text(exc), channel=channel, now=now, next_attempt_at=now
            )
            return
        rejected = isinstance(exc, CloudRejected)
        error = f"rejected:{exc.status}:{exc.reason}" if isinstance(exc, CloudRejected) else None
        attempts = item.attempts + 1
        state = self._store.mark_failed(
            item.id,
            error=(error or _error_text(exc))[:MAX_ERROR_CHARS],
            retryable=not rejected,
            channel=channel,
            now=now,
            next_attempt_at=now + self._backoff.delay(attempts),
            max_attempts=self.max_attempts,
        )
        self._progress += 1
        if state == "dead":
            log.error("outbox item %d (%s) is dead: %s", item.id, item.topic, error or exc)

    def _breaker(self, name: str) -> CircuitBreaker:
        breaker = self._breakers.get(name)
        if breaker is None:
            # No breaker configured for this endpoint: one that never opens.
            breaker = CircuitBreaker(name, failure_threshold=2**31)
            self._breakers[name] = breaker
        return breaker


def _is_json_object(payload: bytes) -> bool:
    try:
        return isinstance(json.loads(payload), dict)
    except (ValueError, UnicodeDecodeError):
        return False
