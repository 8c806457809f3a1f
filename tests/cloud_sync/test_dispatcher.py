"""The outbox dispatcher over real parts: mosquitto (MqttSession.publish_many) and a
real HTTP server on loopback, with an injectable clock for the breakers and backoff."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import aiomqtt
import pytest

from cloud_sync.breaker import CircuitBreaker
from cloud_sync.dispatcher import (
    BREAKER_COMPENSATION,
    BREAKER_EVENTS,
    BREAKER_MQTT,
    OutboxDispatcher,
)
from cloud_sync.https_client import CloudHttpClient
from cloud_sync.mqtt_session import MqttLinkDown, MqttSession, MqttSettings
from cloud_sync.outbox import MemoryOutboxStore
from devtools.broker import LocalBroker, free_port
from tests.cloud_sync.cloud_server import CloudServer

T = TypeVar("T")


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class NullSink:
    async def handle_command(self, payload: bytes) -> None:
        pass


async def no_sleep(_: float) -> None:
    await asyncio.sleep(0)


def run(coro: Awaitable[T], within: float = 30.0) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, within)

    return asyncio.run(bounded())


def add_events(
    store: MemoryOutboxStore, count: int, streams: int, topic: str = "results", start: int = 0
) -> None:
    for n in range(start, start + count):
        event_id = str(uuid.uuid4())
        stream = f"exec-{n % streams}"
        body = {"event_id": event_id, "stream": stream, "n": n, "type": "execution.result"}
        store.add(event_id, stream, topic, json.dumps(body).encode())


def assert_in_order_once(events: list[dict[str, Any]], expected: int) -> None:
    """After dedupe by event_id: every event once, and per stream in id order."""
    first: dict[str, dict[str, Any]] = {}
    for e in events:
        first.setdefault(e["event_id"], e)
    assert len(first) == expected
    by_stream: dict[str, list[int]] = {}
    for e in first.values():
        by_stream.setdefault(e["stream"], []).append(e["n"])
    for ns in by_stream.values():
        assert ns == sorted(ns)


def session_for(broker: LocalBroker) -> MqttSession:
    settings = MqttSettings(
        host=broker.host,
        port=broker.port,
        keepalive_s=5,
        reconnect_min_s=0.05,
        reconnect_max_s=0.3,
    )
    return MqttSession(settings, NullSink(), gateway_id=f"gw-test-{uuid.uuid4().hex[:10]}")


async def wait_until(predicate: Callable[[], bool], within: float = 15.0) -> None:
    async with asyncio.timeout(within):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.02)


def https_client(base_url: str, **kw: Any) -> CloudHttpClient:
    kw.setdefault("retry_attempts", 2)
    return CloudHttpClient(
        base_url, "gw-1", token="t", timeout_s=kw.pop("timeout_s", 2.0), sleep=no_sleep, **kw
    )


# -- MQTT -------------------------------------------------------------------------------


@pytest.mark.broker_semantics
def test_broker_down_with_1000_queued_then_all_delivered_in_order_once(
    fresh_broker: LocalBroker,
) -> None:
    broker_down_with_1000_queued_then_delivered(MemoryOutboxStore(), fresh_broker)


def broker_down_with_1000_queued_then_delivered(store: Any, fresh_broker: LocalBroker) -> None:
    """Reused by the gateway's tests with the SQLite journal as the store."""

    async def scenario() -> None:
        session = session_for(fresh_broker)
        dispatcher = OutboxDispatcher(
            store, mqtt=session, https=None, breakers={}, batch_size=200, idle_poll_s=0.05
        )
        base = session.presence_topic.rsplit("/", 1)[0]
        observer = f"cloud-{uuid.uuid4().hex[:8]}"

        def cloud() -> aiomqtt.Client:
            return aiomqtt.Client(
                fresh_broker.host, fresh_broker.port, identifier=observer, clean_session=False
            )

        async with cloud() as c:
            await c.subscribe(f"{base}/results", qos=1)
        async with asyncio.TaskGroup() as tg:
            s_task = tg.create_task(session.run())
            d_task = tg.create_task(dispatcher.run())
            await wait_until(lambda: session.connected)
            fresh_broker.stop()
            await wait_until(lambda: not session.connected)
            add_events(store, 1000, streams=7)
            dispatcher.notify()
            await asyncio.sleep(0.5)
            assert store.depth()["sent"] == 0
            assert store.depth()["pending"] == 1000  # nothing claimed while no channel
            fresh_broker.start()
            await wait_until(lambda: store.depth()["sent"] == 1000)
            d_task.cancel()
            s_task.cancel()
        received: list[dict[str, Any]] = []
        async with cloud() as c:
            async with asyncio.timeout(10):
                async for message in c.messages:
                    assert isinstance(message.payload, bytes)
                    received.append(json.loads(message.payload))
                    if len({e["event_id"] for e in received}) == 1000:
                        break
        assert_in_order_once(received, 1000)
        assert store.depth()["dead"] == 0

    run(scenario(), 60)


def test_5000_items_pipelined_to_mosquitto_in_order(mqtt_broker: LocalBroker) -> None:
    async def scenario() -> None:
        store = MemoryOutboxStore()
        add_events(store, 5000, streams=1)
        session = session_for(mqtt_broker)
        dispatcher = OutboxDispatcher(store, mqtt=session, https=None, breakers={})
        base = session.presence_topic.rsplit("/", 1)[0]
        received: list[int] = []
        async with aiomqtt.Client(mqtt_broker.host, mqtt_broker.port) as cloud:
            await cloud.subscribe(f"{base}/results", qos=1)
            task = asyncio.create_task(session.run())
            try:
                await wait_until(lambda: session.connected)
                started = time.perf_counter()
                while store.depth()["sent"] < 5000:
                    assert await dispatcher.run_once() > 0
                elapsed = time.perf_counter() - started
                print(
                    f"\nMQTT pipelined drain: 5000 events in {elapsed:.2f}s "
                    f"= {5000 / elapsed:.0f} events/s"
                )
                async with asyncio.timeout(10):
                    async for message in cloud.messages:
                        assert isinstance(message.payload, bytes)
                        received.append(json.loads(message.payload)["n"])
                        if len(received) == 5000:
                            break
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        # One stream, pipelined: the wire order is the order of issue.
        assert received == list(range(5000))

    run(scenario(), 60)


def test_publish_many_when_not_connected_reports_link_down(mqtt_broker: LocalBroker) -> None:
    async def scenario() -> None:
        session = session_for(mqtt_broker)
        results = await session.publish_many([("results", b"{}"), ("alerts", b"{}")])
        assert [type(r) for r in results] == [MqttLinkDown, MqttLinkDown]

    run(scenario())


# -- HTTPS ------------------------------------------------------------------------------


def test_500s_open_the_breaker_without_a_request_storm_then_probe_and_close() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        store = MemoryOutboxStore()
        add_events(store, 50, streams=5)
        breaker = CircuitBreaker(
            BREAKER_EVENTS, failure_threshold=3, reset_timeout_s=30, clock=clock
        )
        with CloudServer() as server:
            server.mode = 500
            async with https_client(server.base_url) as http:
                d = OutboxDispatcher(
                    store,
                    mqtt=None,
                    https=http,
                    clock=clock,
                    breakers={BREAKER_EVENTS: breaker},
                    batch_size=20,
                    backoff_base_s=1,
                    backoff_max_s=5,
                )
                rounds = 0
                while breaker.status()["state"] != "open":
                    await d.run_once()
                    clock.now += 1
                    rounds += 1
                    assert rounds < 20
                # 3 consecutive failed rounds x 2 tries each, then open.
                assert server.count() == 6
                for _ in range(25):  # a busy loop of rounds, as after many notify()s
                    await d.run_once()
                    clock.now += 1
                assert server.count() == 6  # open: no request storm
                clock.now += 5
                assert breaker.state == "half_open"
                await d.run_once()  # one probe round (2 tries), fails: open again
                assert server.count() == 8
                assert breaker.status()["state"] == "open"
                await d.run_once()
                assert server.count() == 8
                server.mode = "ok"
                clock.now += 31
                await d.run_once()  # the probe succeeds and closes the breaker
                assert breaker.status()["state"] == "closed"
                for _ in range(20):
                    clock.now += 10
                    await d.run_once()
                assert store.depth()["sent"] == 50
        assert_in_order_once(server.events(), 50)

    run(scenario())


def test_timeouts_open_the_breaker_too() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        store = MemoryOutboxStore()
        add_events(store, 5, streams=1)
        breaker = CircuitBreaker(
            BREAKER_EVENTS, failure_threshold=2, reset_timeout_s=30, clock=clock
        )
        with CloudServer() as server:
            server.mode = "hang"
            async with https_client(server.base_url, timeout_s=0.2, retry_attempts=1) as http:
                d = OutboxDispatcher(
                    store,
                    mqtt=None,
                    https=http,
                    clock=clock,
                    breakers={BREAKER_EVENTS: breaker},
                    backoff_max_s=1,
                )
                for _ in range(6):
                    await d.run_once()
                    clock.now += 2
                assert server.count() == 2
                assert breaker.state == "open"
                assert all(
                    str(store.last_error(i)).startswith("CloudServerError: ReadTimeout")
                    for i in range(1, 6)
                )
                server.release.set()

    run(scenario())


def test_a_4xx_is_sent_once_and_goes_dead_with_its_reason() -> None:
    async def scenario() -> None:
        store = MemoryOutboxStore()
        add_events(store, 1, streams=1)
        with CloudServer() as server:
            server.mode = 422
            server.error_body = {"error": "invalid_event", "detail": "unknown machine"}
            async with https_client(server.base_url, retry_attempts=5) as http:
                d = OutboxDispatcher(store, mqtt=None, https=http, breakers={})
                await d.run_once()
                await d.run_once()
            assert server.count() == 1
        assert store.state(1) == "dead"
        assert store.last_error(1) == "rejected:422:invalid_event: unknown machine"
        assert [(r.outcome, r.channel) for r in store.dispatch_log()] == [("dead", "https")]

    run(scenario())


def test_compensation_goes_to_the_alert_endpoint_and_needs_both_to_succeed() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        store = MemoryOutboxStore()
        add_events(store, 1, streams=1, topic="compensation")
        with CloudServer() as server:
            async with https_client(server.base_url) as http:
                d = OutboxDispatcher(store, mqtt=None, https=http, breakers={}, clock=clock)
                server.mode = "ok"
                real_post = http.post_compensation

                async def failing_once(item: Any) -> None:
                    http.post_compensation = real_post  # type: ignore[method-assign]
                    server.mode = 500
                    try:
                        await real_post(item)
                    finally:
                        server.mode = "ok"

                http.post_compensation = failing_once  # type: ignore[method-assign]
                await d.run_once()
                assert store.state(1) == "failed"
                clock.now += 1000
                await d.run_once()
                assert store.state(1) == "sent"
            paths = [r.path.rsplit("/", 1)[-1] for r in server.requests]
        assert paths == ["events", "alert", "alert", "events", "alert"]

    run(scenario())


def test_dispatcher_killed_while_sending_requeues_by_timeout_and_resends() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        store = MemoryOutboxStore()
        add_events(store, 3, streams=1)
        with CloudServer() as server:
            server.mode = "hang"
            async with https_client(server.base_url, timeout_s=20) as http:
                first = OutboxDispatcher(store, mqtt=None, https=http, breakers={}, clock=clock)
                task = asyncio.create_task(first.run())
                await wait_until(lambda: server.count() == 1)
                task.cancel()  # killed mid-send
                await asyncio.gather(task, return_exceptions=True)
            assert store.depth()["sending"] == 3
            server.mode = "ok"
            server.release.set()
            async with https_client(server.base_url) as http:
                second = OutboxDispatcher(
                    store, mqtt=None, https=http, breakers={}, clock=clock, sending_timeout_s=300
                )
                clock.now += 299
                assert await second.run_once() == 0  # still within the timeout
                clock.now += 2
                assert await second.run_once() == 3
            assert store.depth()["sent"] == 3
            assert {store.attempts(i) for i in (1, 2, 3)} == {2}
        outcomes = [(r.item_id, r.outcome, r.error) for r in store.dispatch_log()]
        assert outcomes[:3] == [(i, "timeout", "sending_timeout") for i in (1, 2, 3)]
        assert outcomes[3:] == [(i, "sent", None) for i in (1, 2, 3)]
        assert_in_order_once(server.events(), 3)
        assert len(server.events()) == 6  # the hung batch reached the cloud too

    run(scenario())


def test_max_attempts_makes_items_dead() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        store = MemoryOutboxStore()
        add_events(store, 2, streams=2)
        with CloudServer() as server:
            server.mode = 500
            async with https_client(server.base_url, retry_attempts=1) as http:
                d = OutboxDispatcher(
                    store,
                    mqtt=None,
                    https=http,
                    breakers={},
                    clock=clock,
                    max_attempts=3,
                    backoff_base_s=1,
                    backoff_max_s=10,
                )
                for _ in range(10):
                    await d.run_once()
                    clock.now += 11
            assert server.count() == 3
        assert store.depth()["dead"] == 2
        assert [store.attempts(i) for i in (1, 2)] == [3, 3]
        assert [r.outcome for r in store.dispatch_log()] == ["failed"] * 4 + ["dead"] * 2

    run(scenario())


def test_72_hours_offline_then_drained_completely() -> None:
    seventy_two_hours_offline_then_drained(MemoryOutboxStore())


def seventy_two_hours_offline_then_drained(store: Any) -> None:
    """The cloud is unreachable for 72 h (simulated clock): events keep coming, nothing
    dies (an unreachable cloud is not an attempt), and all of it drains once it is back.
    Reused by the gateway's tests with the SQLite journal as the store."""

    async def scenario() -> None:
        clock = FakeClock()
        port = free_port()
        breaker = CircuitBreaker(
            BREAKER_EVENTS, failure_threshold=3, reset_timeout_s=60, clock=clock
        )
        mqtt_breaker = CircuitBreaker(BREAKER_MQTT, clock=clock)
        # The MQTT session exists but never connects (the store's internet is down).
        session = MqttSession(
            MqttSettings(host="127.0.0.1", port=free_port()), NullSink(), gateway_id="gw-offline"
        )
        async with https_client(f"http://127.0.0.1:{port}") as http:
            d = OutboxDispatcher(
                store,
                mqtt=session,
                https=http,
                clock=clock,
                breakers={BREAKER_EVENTS: breaker, BREAKER_MQTT: mqtt_breaker},
                max_attempts=5,
                batch_size=500,
                https_bulk_threshold=1000,
            )
            added = 0
            step_s = 900.0
            for _ in range(int(72 * 3600 / step_s)):
                add_events(store, 3, streams=40, start=added)
                added += 3
                await d.run_once()
                clock.now += step_s
            assert store.depth()["sent"] == 0
            assert store.depth()["dead"] == 0
            unreachable = sum(1 for r in store.dispatch_log() if r.outcome == "unreachable")
            assert unreachable > 0  # it did probe while offline
            with CloudServer(port) as server:
                clock.now += 60
                rounds = 0
                while store.depth()["sent"] < added:
                    await d.run_once()
                    clock.now += 1
                    rounds += 1
                    assert rounds < 100
                assert_in_order_once(server.events(), added)
        assert store.depth()["dead"] == 0
        print(f"\n72 h offline: {added} events drained in {rounds} rounds")

    run(scenario(), 60)


# -- review findings: endpoint 4xx, no hot loop, unexpected exceptions -------------------


@pytest.mark.parametrize("status", [401, 403, 404, 405, 413])
def test_an_endpoint_4xx_releases_the_batch_with_a_backoff_instead_of_killing_it(
    status: int,
) -> None:
    async def scenario() -> None:
        clock = FakeClock()
        store = MemoryOutboxStore()
        add_events(store, 5, streams=2)
        breaker = CircuitBreaker(
            BREAKER_EVENTS, failure_threshold=2, reset_timeout_s=30, clock=clock
        )
        with CloudServer() as server:
            server.mode = status
            server.error_body = {"error": "unauthorized"}
            async with https_client(server.base_url, retry_attempts=3) as http:
                d = OutboxDispatcher(
                    store,
                    mqtt=None,
                    https=http,
                    breakers={BREAKER_EVENTS: breaker},
                    clock=clock,
                    backoff_base_s=2,
                )
                assert await d.run_once() == 0  # released: no progress
                assert server.count() == 1
                assert store.depth()["dead"] == 0
                assert all(store.attempts(i) == 0 for i in range(1, 6))
                assert all(store.next_attempt_at(i) >= clock.now + 2 for i in range(1, 6))
                assert store.last_error(1) == f"rejected:{status}:unauthorized"
                assert await d.run_once() == 0  # not due yet: nothing re-sent
                assert server.count() == 1
                clock.now += 2
                await d.run_once()  # second endpoint failure: the breaker opens
                assert server.count() == 2
                assert breaker.state == "open"
                server.mode = "ok"  # the token was fixed
                clock.now += 31
                for _ in range(3):
                    await d.run_once()
                    clock.now += 31
        assert store.depth()["sent"] == 5
        assert_in_order_once(server.events(), 5)

    run(scenario())


def test_an_endpoint_4xx_on_the_compensation_alert_releases_the_item() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        store = MemoryOutboxStore()
        add_events(store, 1, streams=1, topic="compensation")
        breaker = CircuitBreaker(BREAKER_COMPENSATION, failure_threshold=5, clock=clock)
        with CloudServer() as server:
            async with https_client(server.base_url) as http:
                real_post = http.post_compensation

                async def forbidden(item: Any) -> None:
                    server.mode = 403
                    try:
                        await real_post(item)
                    finally:
                        server.mode = "ok"

                http.post_compensation = forbidden  # type: ignore[method-assign]
                d = OutboxDispatcher(
                    store,
                    mqtt=None,
                    https=http,
                    breakers={BREAKER_COMPENSATION: breaker},
                    clock=clock,
                    backoff_base_s=5,
                )
                assert await d.run_once() == 0
                assert store.state(1) == "failed"  # released, not dead
                assert store.attempts(1) == 0
                assert store.next_attempt_at(1) >= clock.now + 5
                assert breaker.status()["failures"] == 1
                http.post_compensation = real_post  # type: ignore[method-assign]
                clock.now += 5
                assert await d.run_once() == 1
        assert store.state(1) == "sent"

    run(scenario())


def test_an_open_compensation_breaker_does_not_make_run_spin() -> None:
    async def scenario() -> None:
        store = MemoryOutboxStore()
        add_events(store, 1, streams=1, topic="compensation")
        breaker = CircuitBreaker(BREAKER_COMPENSATION, failure_threshold=1, reset_timeout_s=3600)
        breaker.record_failure()
        assert breaker.state == "open"
        with CloudServer() as server:
            async with https_client(server.base_url) as http:
                d = OutboxDispatcher(
                    store,
                    mqtt=None,
                    https=http,
                    breakers={BREAKER_COMPENSATION: breaker},
                    idle_poll_s=0.05,
                )
                task = asyncio.create_task(d.run())
                await asyncio.sleep(0.5)
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            assert server.count("/events") == 1  # not re-sent in a loop
        assert store.state(1) == "failed"
        assert store.attempts(1) == 0
        assert store.next_attempt_at(1) >= time.time() + 3000
        assert len(store.dispatch_log()) == 1

    run(scenario())


class FakeMqtt:
    """An MqttPublisher whose publish_many answers as told."""

    def __init__(self, answer: Callable[[int], list[BaseException | None]]) -> None:
        self.connected = True
        self.calls = 0
        self._answer = answer

    async def publish_many(self, items: Sequence[tuple[str, bytes]]) -> list[BaseException | None]:
        self.calls += 1
        await asyncio.sleep(0)
        return self._answer(len(items))


def test_publishes_refused_while_connected_do_not_make_run_spin() -> None:
    async def scenario() -> None:
        store = MemoryOutboxStore()
        add_events(store, 3, streams=1)
        mqtt = FakeMqtt(lambda n: [MqttLinkDown("publish refused: queue full")] * n)
        breaker = CircuitBreaker(BREAKER_MQTT, failure_threshold=1000)
        d = OutboxDispatcher(
            store,
            mqtt=mqtt,
            https=None,
            breakers={BREAKER_MQTT: breaker},
            idle_poll_s=0.05,
            backoff_base_s=60,
        )
        task = asyncio.create_task(d.run())
        await asyncio.sleep(0.5)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert mqtt.calls == 1
        assert breaker.status()["failures"] == 1
        assert [store.attempts(i) for i in (1, 2, 3)] == [0, 0, 0]
        assert all(store.next_attempt_at(i) >= time.time() + 50 for i in (1, 2, 3))

    run(scenario())


def test_run_once_counts_progress_not_claims() -> None:
    async def scenario() -> None:
        store = MemoryOutboxStore()
        add_events(store, 4, streams=1)
        mqtt = FakeMqtt(lambda n: [None, None, TimeoutError("no PUBACK"), None][:n])
        d = OutboxDispatcher(store, mqtt=mqtt, https=None, breakers={})
        assert await d.run_once() == 4  # 3 sent + 1 failed
        store = MemoryOutboxStore()
        add_events(store, 2, streams=1)
        d = OutboxDispatcher(store, mqtt=mqtt, https=None, breakers={})

        def link_lost(n: int) -> list[BaseException | None]:
            mqtt.connected = False
            return [MqttLinkDown("link lost before PUBACK")] * n

        mqtt._answer = link_lost  # noqa: SLF001
        assert await d.run_once() == 0  # claimed 2, but only released them
        assert store.attempts(1) == 0
        assert await d.run_once() == 0  # no channel

    run(scenario())


def test_an_unexpected_exception_in_publish_frees_the_probe_slot_and_the_items() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        store = MemoryOutboxStore()
        add_events(store, 3, streams=1)

        def boom(n: int) -> list[BaseException | None]:
            raise ValueError("paho says no")

        mqtt = FakeMqtt(boom)
        breaker = CircuitBreaker(BREAKER_MQTT, failure_threshold=1, reset_timeout_s=10, clock=clock)
        breaker.record_failure()
        clock.now += 10
        assert breaker.state == "half_open"
        d = OutboxDispatcher(
            store,
            mqtt=mqtt,
            https=None,
            breakers={BREAKER_MQTT: breaker},
            clock=clock,
            backoff_base_s=1,
            backoff_max_s=1,
        )
        await d.run_once()  # the probe; must not raise nor keep the slot
        assert breaker.status()["state"] == "open"  # the probe failed: open again
        assert store.depth()["sending"] == 0
        assert [store.state(i) for i in (1, 2, 3)] == ["failed"] * 3
        assert store.last_error(1) == "ValueError: paho says no"
        clock.now += 10
        mqtt._answer = lambda n: [None] * n  # noqa: SLF001
        assert breaker.allow()  # the probe slot is free again
        breaker.cancel()
        await d.run_once()
        assert store.depth()["sent"] == 3

    run(scenario())


def test_an_unexpected_exception_in_post_events_or_compensation_frees_everything() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        store = MemoryOutboxStore()
        add_events(store, 2, streams=1)
        add_events(store, 1, streams=1, topic="compensation", start=2)
        events = CircuitBreaker(BREAKER_EVENTS, failure_threshold=5, clock=clock)
        comp = CircuitBreaker(BREAKER_COMPENSATION, failure_threshold=5, clock=clock)
        with CloudServer() as server:
            async with https_client(server.base_url) as http:
                real_events = http.post_events

                async def broken(items: Any) -> None:
                    raise RuntimeError("bug")

                http.post_events = broken  # type: ignore[method-assign]
                d = OutboxDispatcher(
                    store,
                    mqtt=None,
                    https=http,
                    breakers={BREAKER_EVENTS: events, BREAKER_COMPENSATION: comp},
                    clock=clock,
                    backoff_base_s=1,
                    backoff_max_s=1,
                )
                assert await d.run_once() == 3
                assert store.depth()["sending"] == 0
                assert events.status()["failures"] == 1
                http.post_events = real_events  # type: ignore[method-assign]
                http.post_compensation = broken  # type: ignore[method-assign]
                clock.now += 2
                assert await d.run_once() == 3  # 2 sent, the compensation failed
                assert store.state(3) == "failed"
                assert store.depth()["sending"] == 0
                assert comp.status()["failures"] == 1

    run(scenario())


def test_publish_many_does_not_leak_registered_ids_when_paho_raises(
    mqtt_broker: LocalBroker,
) -> None:
    async def scenario() -> None:
        session = session_for(mqtt_broker)
        task = asyncio.create_task(session.run())
        try:
            await wait_until(lambda: session.connected)
            client = session._client  # noqa: SLF001
            assert client is not None
            with pytest.raises(ValueError, match="wildcard"):
                # The second topic is refused by paho with a ValueError, after the
                # first PUBLISH was registered.
                await session.publish_many([("results", b"{}"), ("bad/#", b"{}")])
            assert client._pending_publishes == {}  # noqa: SLF001
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    run(scenario())


class DiskFullOnce(MemoryOutboxStore):
    """A store whose first ``mark_sent`` fails as on a full disk."""

    def __init__(self) -> None:
        super().__init__()
        self.full = True

    def mark_sent(self, ids: Sequence[int], *, channel: str, now: float) -> None:
        if self.full:
            raise OSError("database or disk is full")
        super().mark_sent(ids, channel=channel, now=now)


def test_delivered_items_whose_sent_mark_failed_are_marked_next_round_not_resent() -> None:
    """Delivered, then the store could not write "sent": the items must not sit in
    ``sending`` (holding their stream back for the sending timeout) nor be re-sent:
    they are marked first thing once the store writes again."""

    async def scenario() -> None:
        store = DiskFullOnce()
        add_events(store, 2, streams=1)
        mqtt = FakeMqtt(lambda n: [None] * n)
        d = OutboxDispatcher(store, mqtt=mqtt, https=None, breakers={})
        assert await d.run_once() == 2  # delivered; the mark failed
        assert await d.run_once() == 0  # still full: nothing claimed, nothing re-sent
        assert mqtt.calls == 1
        store.full = False
        add_events(store, 1, streams=1)
        assert await d.run_once() == 1  # marked the two, then sent the third
        assert mqtt.calls == 2
        assert [store.state(i) for i in (1, 2, 3)] == ["sent"] * 3
        assert [store.attempts(i) for i in (1, 2, 3)] == [1, 1, 1]

    run(scenario())
