"""Promises 3 and 5 over a real mosquitto: a command's PUBACK never precedes its durable
handling, a persistent session keeps commands for an offline gateway, presence and the
last will tell the truth. (Outbox delivery over the session: test_dispatcher.py.)"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import aiomqtt
import pytest

from cloud_sync.mqtt_session import MqttSession, MqttSettings
from devtools.broker import LocalBroker

T = TypeVar("T")
TEST_TIMEOUT_S = 20.0


def run(coro: Awaitable[T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, TEST_TIMEOUT_S)

    return asyncio.run(bounded())


class RecordingSink:
    """Records every delivery; can fail the first N calls or block forever."""

    def __init__(self, *, fail_first: int = 0, block: bool = False) -> None:
        self.fail_first = fail_first
        self.block = block
        self.calls: list[bytes] = []
        self.durable: list[bytes] = []
        self.arrived = asyncio.Queue[bytes]()

    async def handle_command(self, payload: bytes) -> None:
        self.calls.append(payload)
        self.arrived.put_nowait(payload)
        if len(self.calls) <= self.fail_first:
            raise RuntimeError("journal commit failed (disk I/O error)")
        if self.block:
            await asyncio.Event().wait()
        self.durable.append(payload)


def settings_for(broker: LocalBroker) -> MqttSettings:
    return MqttSettings(
        host=broker.host,
        port=broker.port,
        keepalive_s=5,
        reconnect_min_s=0.05,
        reconnect_max_s=0.3,
    )


def session_for(
    broker: LocalBroker, gateway_id: str, sink: RecordingSink, **kwargs: Any
) -> MqttSession:
    return MqttSession(settings_for(broker), sink, gateway_id=gateway_id, **kwargs)


def new_gateway_id() -> str:
    return f"gw-test-{uuid.uuid4().hex[:10]}"


async def wait_until(predicate: Callable[[], bool], within: float = 10.0) -> None:
    # Polling is the honest way to watch state owned by another task or process.
    async with asyncio.timeout(within):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.02)


@asynccontextmanager
async def running(session: MqttSession) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(session.run(), name="session-under-test")
    try:
        yield task
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def publish_command(broker: LocalBroker, topic: str, payload: bytes) -> None:
    async with aiomqtt.Client(broker.host, broker.port) as cloud:
        await cloud.publish(topic, payload, qos=1)


async def retained(broker: LocalBroker, topic: str) -> dict[str, Any]:
    async with aiomqtt.Client(broker.host, broker.port) as reader:
        await reader.subscribe(topic, qos=1)
        async with asyncio.timeout(5):
            async for message in reader.messages:
                assert message.retain
                assert isinstance(message.payload, bytes)
                return json.loads(message.payload)  # type: ignore[no-any-return]
    raise AssertionError("no retained message")


async def connected_session(
    broker: LocalBroker, gateway_id: str, sink: RecordingSink
) -> MqttSession:
    return session_for(broker, gateway_id, sink)


def test_command_reaches_the_sink_once_and_is_acked_after_handling(mqtt_broker: LocalBroker):
    async def scenario() -> None:
        sink = RecordingSink()
        links: list[bool] = []
        session = session_for(mqtt_broker, new_gateway_id(), sink, on_link_change=links.append)
        async with running(session):
            await wait_until(lambda: session.connected)
            await publish_command(mqtt_broker, session.command_topic, b"token-1")
            assert await asyncio.wait_for(sink.arrived.get(), 5) == b"token-1"
            await asyncio.sleep(0.5)  # an unacked message would not come back anyway...
        # ...but on a new connection it would: the acked one must not.
        async with running(session):
            await wait_until(lambda: session.connected)
            await asyncio.sleep(0.5)
        assert sink.calls == [b"token-1"]
        assert links == [True, False, True, False]

    run(scenario())


def test_sink_failure_means_no_puback_and_the_same_command_is_offered_again(
    mqtt_broker: LocalBroker,
):
    async def scenario() -> None:
        sink = RecordingSink(fail_first=2)
        links: list[bool] = []
        session = session_for(mqtt_broker, new_gateway_id(), sink, on_link_change=links.append)
        async with running(session):
            await wait_until(lambda: session.connected)
            await publish_command(mqtt_broker, session.command_topic, b"token-A")
            await publish_command(mqtt_broker, session.command_topic, b"token-B")
            await wait_until(lambda: len(sink.durable) == 2)
            await asyncio.sleep(0.3)
        # Both handed over as they arrived (token-B did not wait for token-A to be
        # durable: commands arriving together share a flush), both failed; not durable
        # -> not acked -> each offered again in place after a back-off. No reconnect
        # was forced to get a redelivery.
        assert sink.calls == [b"token-A", b"token-B", b"token-A", b"token-B"]
        assert sink.durable == [b"token-A", b"token-B"]
        assert links == [True, False]

    run(scenario())


class FailsOne:
    """A sink whose journal never takes one particular command."""

    def __init__(self, bad: bytes) -> None:
        self.bad = bad
        self.durable: list[bytes] = []

    async def handle_command(self, payload: bytes) -> None:
        if payload == self.bad:
            raise RuntimeError("journal commit failed")
        self.durable.append(payload)


@pytest.mark.broker_semantics
def test_no_command_is_acknowledged_before_an_earlier_one(mqtt_broker: LocalBroker):
    """PUBACKs go out in arrival order (MQTT 3.1.1, 4.6): token-B, durable, is not
    acknowledged while token-A before it is not, so the broker still has both."""

    async def scenario() -> None:
        gateway_id = new_gateway_id()
        stuck = FailsOne(b"token-A")
        session = session_for(mqtt_broker, gateway_id, stuck)
        async with running(session):
            await wait_until(lambda: session.connected)
            await publish_command(mqtt_broker, session.command_topic, b"token-A")
            await publish_command(mqtt_broker, session.command_topic, b"token-B")
            await wait_until(lambda: stuck.durable == [b"token-B"])
            await asyncio.sleep(0.3)
        healthy = RecordingSink()
        async with running(session_for(mqtt_broker, gateway_id, healthy)):
            await wait_until(lambda: len(healthy.durable) == 2)
        assert healthy.durable == [b"token-A", b"token-B"]

    run(scenario())


@pytest.mark.broker_semantics
def test_a_command_never_made_durable_stays_with_the_broker(mqtt_broker: LocalBroker):
    async def scenario() -> None:
        gateway_id = new_gateway_id()
        failing = RecordingSink(fail_first=1000)
        session = session_for(mqtt_broker, gateway_id, failing)
        async with running(session):
            await wait_until(lambda: session.connected)
            await publish_command(mqtt_broker, session.command_topic, b"token-A")
            await wait_until(lambda: len(failing.calls) >= 2)
            # Backed off: a few offers in a second, not a hot loop.
            await asyncio.sleep(1.0)
            assert len(failing.calls) <= 4
        assert failing.durable == []
        # The journal works again after a restart: the broker still had the command.
        healthy = RecordingSink()
        async with running(session_for(mqtt_broker, gateway_id, healthy)):
            await wait_until(lambda: healthy.durable == [b"token-A"])

    run(scenario())


@pytest.mark.broker_semantics
def test_command_in_flight_when_session_is_cancelled_is_redelivered(mqtt_broker: LocalBroker):
    async def scenario() -> None:
        gateway_id = new_gateway_id()
        blocked = RecordingSink(block=True)
        first = await connected_session(mqtt_broker, gateway_id, blocked)
        async with running(first):
            await wait_until(lambda: first.connected)
            await publish_command(mqtt_broker, first.command_topic, b"token-X")
            await asyncio.wait_for(blocked.arrived.get(), 5)
        # The journal never committed: a new session with the same client id gets it.
        sink = RecordingSink()
        second = await connected_session(mqtt_broker, gateway_id, sink)
        async with running(second):
            assert await asyncio.wait_for(sink.arrived.get(), 5) == b"token-X"
            await wait_until(lambda: sink.durable == [b"token-X"])

    run(scenario())


@pytest.mark.broker_semantics
def test_command_published_while_gateway_offline_is_delivered_on_return(
    mqtt_broker: LocalBroker,
):
    async def scenario() -> None:
        gateway_id = new_gateway_id()
        sink = RecordingSink()
        session = await connected_session(mqtt_broker, gateway_id, sink)
        async with running(session):  # first contact creates the persistent session
            await wait_until(lambda: session.connected)
        assert not session.connected
        await publish_command(mqtt_broker, session.command_topic, b"token-offline")
        async with running(session):
            assert await asyncio.wait_for(sink.arrived.get(), 5) == b"token-offline"
            await wait_until(lambda: sink.durable == [b"token-offline"])

    run(scenario())


def test_presence_is_retained_online_and_offline_after_clean_stop(mqtt_broker: LocalBroker):
    async def scenario() -> None:
        gateway_id = new_gateway_id()
        session = await connected_session(mqtt_broker, gateway_id, RecordingSink())
        async with running(session):
            await wait_until(lambda: session.connected)
            await asyncio.sleep(0.1)
            online = await retained(mqtt_broker, session.presence_topic)
            assert (online["state"], online["gateway_id"]) == ("online", gateway_id)
            assert online["at"].endswith("Z")
        offline = await retained(mqtt_broker, session.presence_topic)
        assert offline["state"] == "offline"

    run(scenario())


_SESSION_PROCESS = """
import asyncio, sys
from cloud_sync.mqtt_session import MqttSession, MqttSettings

class BlockingSink:
    async def handle_command(self, payload):
        print("RECEIVED", flush=True)
        await asyncio.Event().wait()   # the journal commit never happens

def on_link(up):
    print("UP" if up else "DOWN", flush=True)

settings = MqttSettings(host=sys.argv[1], port=int(sys.argv[2]),
                        keepalive_s=5, reconnect_min_s=0.05, reconnect_max_s=0.3)
asyncio.run(MqttSession(settings, BlockingSink(), gateway_id=sys.argv[3],
                        on_link_change=on_link).run())
"""


@pytest.mark.broker_semantics
def test_killed_gateway_gets_last_will_offline_and_its_unacked_command_back(
    mqtt_broker: LocalBroker,
):
    async def scenario() -> None:
        gateway_id = new_gateway_id()
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _SESSION_PROCESS,
            mqtt_broker.host,
            str(mqtt_broker.port),
            gateway_id,
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            assert proc.stdout is not None
            assert await asyncio.wait_for(proc.stdout.readline(), 10) == b"UP\n"
            probe = session_for(mqtt_broker, gateway_id, RecordingSink())
            await publish_command(mqtt_broker, probe.command_topic, b"token-K")
            assert await asyncio.wait_for(proc.stdout.readline(), 10) == b"RECEIVED\n"
            online = await retained(mqtt_broker, probe.presence_topic)
            assert online["state"] == "online"
            os.kill(proc.pid, signal.SIGKILL)  # power loss mid-commit
            await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

        async def state() -> str:
            return str((await retained(mqtt_broker, probe.presence_topic))["state"])

        async with asyncio.timeout(5):
            while await state() != "offline":  # noqa: ASYNC110
                await asyncio.sleep(0.05)

        sink = RecordingSink()
        async with running(session_for(mqtt_broker, gateway_id, sink)):
            assert await asyncio.wait_for(sink.arrived.get(), 5) == b"token-K"

    run(scenario())


def test_reconnect_backoff_is_jittered_within_bounds() -> None:
    async def scenario() -> None:
        session = MqttSession(
            MqttSettings(host="127.0.0.1", reconnect_min_s=1.0, reconnect_max_s=60.0),
            RecordingSink(),
            gateway_id="gw-x",
        )
        first = {session._backoff(0) for _ in range(50)}  # noqa: SLF001
        assert first == {1.0}
        later = [session._backoff(10) for _ in range(200)]  # noqa: SLF001
        assert all(1.0 <= d <= 60.0 for d in later)
        assert len(set(later)) > 150  # spread out, not a fleet-wide stampede
        assert max(session._backoff(100) for _ in range(50)) <= 60.0  # noqa: SLF001

    run(scenario())


def test_settings_reject_wildcards_in_gateway_id() -> None:
    with pytest.raises(ValueError):
        MqttSession(MqttSettings(host="h"), RecordingSink(), gateway_id="gw/+")
    with pytest.raises(ValueError, match="reconnect_min_s"):
        MqttSettings(host="h", reconnect_min_s=5, reconnect_max_s=1)


@pytest.mark.broker_semantics
def test_best_effort_publish_goes_out_when_connected_and_is_dropped_when_not(
    mqtt_broker: LocalBroker,
) -> None:
    async def scenario() -> None:
        session = session_for(mqtt_broker, new_gateway_id(), RecordingSink())
        session.publish_best_effort("results", b"dropped")  # not connected: no error
        base = session.command_topic.rsplit("/commands/", 1)[0]
        async with aiomqtt.Client(mqtt_broker.host, mqtt_broker.port) as cloud:
            await cloud.subscribe(f"{base}/results", qos=1)
            async with running(session):
                await wait_until(lambda: session.connected)
                session.publish_best_effort("results", b"stored-result")
                async with asyncio.timeout(5):
                    async for message in cloud.messages:
                        assert message.payload == b"stored-result"
                        assert message.qos == 1
                        break

    run(scenario())
