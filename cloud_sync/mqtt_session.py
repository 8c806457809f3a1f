"""The gateway's MQTT session: commands in, results/events out, presence (promises 3, 5).

Topics, with ``P = {topic_prefix}/gateways/{gateway_id}`` (docs/mqtt-contract.md):

- ``P/commands/execute``  in, QoS 1, persistent session (clean_session=False), so
  commands published while the gateway is offline arrive when it returns.
- ``P/<topic>``           out, QoS 1: :meth:`MqttSession.publish_many` (the outbox
  dispatcher, cloud_sync/dispatcher.py) and :meth:`MqttSession.publish_best_effort`.
- ``P/presence``          retained ``online`` after each connect; the last will
  publishes ``offline`` retained when the link dies uncleanly.

The PUBACK of a command is sent only after :meth:`CommandSink.handle_command` returned,
i.e. after the journal commit is durable (promise 3). aiomqtt does not expose manual
acks (aiomqtt issue 345), so the session turns them on in the wrapped paho client.

aiomqtt does not reconnect by itself; :meth:`MqttSession.run` is the supervised loop
of aiomqtt's docs/reconnection.md, with full-jitter exponential backoff so that a
fleet of gateways does not stampede the broker after an outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, Self

import aiomqtt
import paho.mqtt.client as paho
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from cloud_sync.backoff import Backoff
from cloud_sync.mqtt_tls import MqttTlsError, client_tls_context, explain_tls_failure

__all__ = [
    "ALERTS_TOPIC",
    "OPERATIONS_TOPIC",
    "COMMANDS_TOPIC",
    "COMPENSATION_TOPIC",
    "CYCLES_TOPIC",
    "EVENT_TOPICS",
    "PRESENCE_TOPIC",
    "RESULTS_TOPIC",
    "STATUS_TOPIC",
    "TOPIC_PREFIX",
    "CommandSink",
    "MqttLinkDown",
    "MqttTlsError",
    "MqttSettings",
    "MqttSession",
    "base_topic",
]

log = logging.getLogger(__name__)
# aiomqtt's and paho's own lines (paho logs packets at DEBUG, socket errors at ERROR).
_client_log = log.getChild("client")

# The contract's topics, under P = base_topic(...) (docs/mqtt-contract.md "Topics");
# the core publishes its events under these names.
TOPIC_PREFIX = "metalav/v1"  # the default; configurable
COMMANDS_TOPIC = "commands/execute"
PRESENCE_TOPIC = "presence"
#: The retained heartbeat (gateway/heartbeat.py), beside presence.
STATUS_TOPIC = "status"
RESULTS_TOPIC = "results"
CYCLES_TOPIC = "cycles"
COMPENSATION_TOPIC = "compensation"
ALERTS_TOPIC = "alerts"
#: Every topic an outbox item may have (OutboxItem.topic).
OPERATIONS_TOPIC = "operations"  # technicians' operation records (issue 12)
EVENT_TOPICS = (RESULTS_TOPIC, CYCLES_TOPIC, COMPENSATION_TOPIC, ALERTS_TOPIC, OPERATIONS_TOPIC)

#: A connection that lasted this long resets the reconnect backoff.
STABLE_CONNECTION_S = 30.0
#: How long a QoS 1 publish of :meth:`MqttSession.publish_many` waits for its PUBACK.
PUBLISH_TIMEOUT_S = 10.0
#: aiomqtt warns above this many calls awaiting the broker (its default is 10).
PENDING_CALLS_WARNING = 10_000
#: How long a connect waits for the broker's CONNACK before it tries again.
CONNACK_TIMEOUT_S = 30.0
#: How long giving up a silent broker waits for paho to close the socket.
CLOSE_TIMEOUT_S = 2.0
#: How long a clean stop waits for the broker to take the "offline" presence.
OFFLINE_PUBLISH_TIMEOUT_S = 2.0
#: QoS 1 messages awaiting their PUBACK at once (mosquitto's default cap).
MAX_INFLIGHT = 100
#: Back-off between offers of a command the sink could not make durable: doubling,
#: no jitter (one message of this gateway waits; nothing is sent to the broker).
NOT_DURABLE_RETRY = Backoff(0.5, 30.0, jitter=False)
#: Commands handed to the sink and not yet acknowledged, at most (then the session
#: stops reading the socket until the oldest is acknowledged).
COMMAND_PIPELINE = 64


class CommandSink(Protocol):
    async def handle_command(self, payload: bytes) -> None:
        """Return only once the command's outcome is durable (journal commit).

        Raising means "not durable" (e.g. the disk is full): the message is not
        acknowledged, and the session offers the same message again after a back-off;
        no later message is acknowledged before it.

        Calls overlap: the next command is handed over while this one awaits its
        durability, so the synchronous part of a handler runs in arrival order and
        its await is where commands that arrived together share one flush."""
        ...


class MqttLinkDown(Exception):
    """A publish could not complete because the link is (or went) down."""


class _Acks:
    """PUBACK bookkeeping for one publish_many batch."""

    def __init__(self, n: int) -> None:
        self._results: list[BaseException | None | bool] = [False] * n  # False: waiting
        self._waiting = n
        self.all_done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if n == 0:
            self.all_done.set_result(None)

    def slot(self, index: int) -> _AckSlot:
        return _AckSlot(self, index)

    def fail(self, index: int, error: BaseException) -> None:
        self._settle(index, error)

    def _settle(self, index: int, outcome: BaseException | None) -> None:
        if self._results[index] is not False:
            return
        self._results[index] = outcome
        self._waiting -= 1
        if self._waiting == 0 and not self.all_done.done():
            self.all_done.set_result(None)

    def result(self, index: int, unsettled: BaseException) -> BaseException | None:
        outcome = self._results[index]
        return unsettled if outcome is False else outcome  # type: ignore[return-value]


class _AckSlot:
    """Stands in aiomqtt's _pending_publishes where it expects an asyncio.Event: its
    on_publish callback calls ``set()`` when the PUBACK arrives."""

    __slots__ = ("_acks", "_index")

    def __init__(self, acks: _Acks, index: int) -> None:
        self._acks, self._index = acks, index

    def set(self) -> None:
        self._acks._settle(self._index, None)  # noqa: SLF001


class MqttSettings(BaseModel):
    """How to reach the broker: the ``[mqtt]`` section of the gateway's config file
    (config.example.toml documents each key). The one model of these settings, so
    that ``metalav-gateway check-config`` refuses exactly what the session would.

    The gateway id (client id and topic level) is not here: it is the gateway's own,
    ``[gateway] id``, handed to :class:`MqttSession` on its own."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = "localhost"
    port: int = Field(default=1883, ge=1, le=65535)
    username: str | None = None
    password: str | None = None
    # Seconds between pings; the broker declares the gateway gone after 1.5x this.
    keepalive_s: int = Field(default=30, ge=5, le=3600)
    topic_prefix: str = TOPIC_PREFIX
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    # Reconnect backoff: full jitter between these bounds (docs/mqtt-contract.md).
    reconnect_min_s: float = Field(default=1.0, gt=0)
    reconnect_max_s: float = Field(default=60.0, gt=0)

    @field_validator("topic_prefix")
    @classmethod
    def _plain_prefix(cls, v: str) -> str:
        # The prefix is a literal part of every topic and of the broker's ACL patterns:
        # a wildcard would subscribe the gateway to other stores' commands (where the
        # ACL lets it) and can never be published to.
        if any(c in v for c in "+#\0"):
            raise ValueError("must not contain the MQTT wildcards '+' or '#' (nor NUL)")
        if not v or v.startswith("/") or v.endswith("/") or "//" in v:
            raise ValueError("must be topic levels separated by single '/', e.g. metalav/v1")
        return v

    @model_validator(mode="after")
    def _reconnect_bounds(self) -> Self:
        if self.reconnect_min_s > self.reconnect_max_s:
            # A ValidationError rather than a ValueError, so that the error names the
            # key (mqtt.reconnect_min_s) and not only the section.
            raise _error_at(self, "reconnect_min_s", "must not exceed reconnect_max_s")
        if self.tls_key_file is not None and self.tls_cert_file is None:
            raise _error_at(self, "tls_key_file", "is set without tls_cert_file")
        return self


def _error_at(model: BaseModel, key: str, message: str) -> ValidationError:
    return ValidationError.from_exception_data(
        type(model).__name__,
        [
            InitErrorDetails(
                type=PydanticCustomError("value_error", message),
                loc=(key,),
                input=getattr(model, key),
            )
        ],
    )


def base_topic(topic_prefix: str, gateway_id: str) -> str:
    """``P``, the level every topic of one gateway lives under."""
    return f"{topic_prefix}/gateways/{gateway_id}"


def _presence(state: str, gateway_id: str) -> bytes:
    at = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    return json.dumps({"state": state, "gateway_id": gateway_id, "at": at}).encode()


def _as_bytes(payload: object) -> bytes:
    if isinstance(payload, bytes | bytearray):
        return bytes(payload)
    if isinstance(payload, str):
        return payload.encode()
    return b"" if payload is None else str(payload).encode()


class MqttSession:
    def __init__(
        self,
        settings: MqttSettings,
        sink: CommandSink | None = None,
        *,
        gateway_id: str,
        on_link_change: Callable[[bool], None] | None = None,
        publish_timeout_s: float = PUBLISH_TIMEOUT_S,
    ) -> None:
        if not gateway_id or any(c in gateway_id for c in "/+#"):
            raise ValueError("gateway_id must be non-empty and contain no '/', '+' or '#'")
        self._settings = settings
        self.gateway_id = gateway_id
        self._sink = sink
        self._on_link_change = on_link_change
        self._publish_timeout_s = publish_timeout_s
        # Full jitter, floored at reconnect_min_s so one gateway never hammers the
        # broker either.
        self._reconnect = Backoff(
            settings.reconnect_min_s, settings.reconnect_max_s, floor_s=settings.reconnect_min_s
        )
        self._client: aiomqtt.Client | None = None
        self._connected = False
        self._link_down = asyncio.Event()
        self._link_down.set()
        #: Set once the first connection was tried, whatever came of it (the daemon's
        #: READY=1 to systemd waits for it).
        self.tried = asyncio.Event()
        self.base_topic = base_topic(settings.topic_prefix, gateway_id)
        self.command_topic = f"{self.base_topic}/{COMMANDS_TOPIC}"
        self.presence_topic = f"{self.base_topic}/{PRESENCE_TOPIC}"

    @property
    def connected(self) -> bool:
        return self._connected

    async def publish_many(self, items: Sequence[tuple[str, bytes]]) -> list[BaseException | None]:
        """QoS 1 publish of each ``(topic suffix, payload)`` under ``P/``, pipelined.

        All PUBLISHes are handed to paho first, in order, in one go (so the wire order
        is the order of ``items``), then the PUBACKs are awaited together; per item the
        result is ``None`` (PUBACK received) or the error: :class:`MqttLinkDown` when the
        link is or went down before its PUBACK, ``TimeoutError`` after the timeout."""
        client = self._client
        if client is None or not self._connected:
            return [MqttLinkDown("not connected") for _ in items]
        base = self.base_topic
        paho_client = self._paho(client)
        acks = _Acks(len(items))
        # aiomqtt's own publish() costs a task, a future and a timeout per message,
        # which caps a backlog drain at ~2,000 events/s. Here paho gets every PUBLISH
        # directly and aiomqtt's on_publish callback, which sets whatever waits in
        # _pending_publishes under the message id, reports each PUBACK to one counter.
        # The PUBACK cannot arrive before the registration: paho reads the socket only
        # when this loop runs its reader callback, after this synchronous block.
        pending = client._pending_publishes  # noqa: SLF001
        mids: list[int] = []
        down: asyncio.Future[Any] = asyncio.ensure_future(self._link_down.wait())
        try:
            # Registration inside the try: should paho raise mid-batch (a ValueError
            # for a bad topic or payload...), the ids registered so far do not leak.
            for index, (topic, payload) in enumerate(items):
                info = paho_client.publish(f"{base}/{topic}", payload, qos=1)
                if info.rc != paho.MQTT_ERR_SUCCESS:
                    acks.fail(index, MqttLinkDown(f"publish refused: {paho.error_string(info.rc)}"))
                    continue
                pending[info.mid] = acks.slot(index)  # type: ignore[assignment]
                mids.append(info.mid)
            await asyncio.wait(
                {acks.all_done, down},
                timeout=self._publish_timeout_s,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            down.cancel()
            for mid in mids:
                pending.pop(mid, None)  # unacked: nobody waits for them any more
        link_lost = down.done() and not down.cancelled()
        return [
            acks.result(
                i,
                MqttLinkDown("link lost before PUBACK")
                if link_lost or not self._connected
                else TimeoutError("no PUBACK in time"),
            )
            for i in range(len(items))
        ]

    def publish_best_effort(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """QoS 1 publish of ``P/<topic>`` if connected, silently dropped otherwise.
        ``retain``: the broker keeps it for later subscribers (the heartbeat).

        Used to re-publish a stored result for a duplicate command; the cloud keeps
        re-sending the command until a result arrives, so a loss here is harmless."""
        client = self._client
        if client is None or not self._connected:
            return
        # paho's publish only queues the packet (no await needed); aiomqtt's
        # on_publish callback ignores mids it is not waiting for.
        info = self._paho(client).publish(
            f"{self.base_topic}/{topic}", payload, qos=1, retain=retain
        )
        if info.rc != paho.MQTT_ERR_SUCCESS:
            log.debug("best-effort publish to %s dropped (rc=%s)", topic, info.rc)

    async def run(self, sink: CommandSink | None = None) -> None:
        """Connect, hand every command to ``sink`` (else the one given at construction:
        the daemon builds its command sink after the session it publishes through),
        reconnect forever. Cancel the task to stop (clean stop publishes ``offline``)."""
        sink = sink or self._sink
        if sink is None:
            raise ValueError("MqttSession.run needs a command sink")
        attempt = 0
        while True:
            started = time.monotonic()
            try:
                await self._connect_and_serve(sink)
            except* MqttTlsError as group:
                # A file or a certificate to fix: one line naming it, then the usual
                # back-off (a renewed certificate is picked up at the next attempt).
                log.error("%s", "; ".join(map(str, group.exceptions)))
            except* aiomqtt.MqttError as group:
                log.warning("MQTT link lost: %s", "; ".join(map(str, group.exceptions)))
            except* Exception as group:
                # Never let a bug in a collaborator (e.g. the outbox store) end the
                # session for good; log the types only (messages may carry PII).
                log.error(
                    "MQTT session error: %s",
                    ", ".join(type(e).__name__ for e in group.exceptions),
                )
            finally:
                self._client = None
                self._set_link(False)
                self.tried.set()
            if time.monotonic() - started >= STABLE_CONNECTION_S:
                attempt = 0
            delay = self._backoff(attempt)
            attempt += 1
            await asyncio.sleep(delay)

    def _backoff(self, attempt: int) -> float:
        """The delay after ``attempt`` reconnects in a row (0 for the first)."""
        return self._reconnect.delay(attempt + 1)

    def _make_client(self) -> aiomqtt.Client:
        s = self._settings
        tls = None
        if s.tls_ca_file or s.tls_cert_file:
            # Built here, at every attempt, rather than by paho: its errors name no
            # file, and a file fixed meanwhile is read again.
            tls = client_tls_context(s.tls_ca_file, s.tls_cert_file, s.tls_key_file)
        client = aiomqtt.Client(
            s.host,
            s.port,
            username=s.username,
            password=s.password,
            # Fixed, the gateway id: the persistent session is found by it.
            identifier=self.gateway_id,
            clean_session=False,
            keepalive=s.keepalive_s,
            tls_context=tls,
            # paho's default window is 20 unacked QoS 1 messages; publish_many's
            # pipeline needs a wider one (brokers cap it with their receive maximum).
            max_inflight_messages=MAX_INFLIGHT,
            logger=_client_log,
            will=aiomqtt.Will(
                self.presence_topic, _presence("offline", self.gateway_id), qos=1, retain=True
            ),
        )
        # Before CONNACK: a persistent session's queued commands flow right after it,
        # and paho would PUBACK each one as soon as on_message returned.
        self._paho(client).manual_ack_set(True)
        # publish_many pipelines a whole outbox batch: aiomqtt would log a warning for
        # every publish beyond its default of 10 pending calls.
        client.pending_calls_threshold = PENDING_CALLS_WARNING
        return client

    @staticmethod
    def _paho(client: aiomqtt.Client) -> paho.Client:
        # aiomqtt 2.5 wraps a paho client without exposing manual acks (issue 345).
        return client._client

    async def _connect(self, client: aiomqtt.Client) -> None:
        """``client.__aenter__`` (CONNECT .. CONNACK), failing as soon as the link drops
        before the CONNACK, with a TLS failure told by :func:`explain_tls_failure`.

        aiomqtt 2.5 ignores a disconnect before the CONNACK and would wait forever: a
        TLS 1.3 broker that refuses the client certificate does just that (the alert
        arrives on the first read, after the handshake; paho logs it and drops the link)."""
        s = self._settings
        paho_client = self._paho(client)
        loop = asyncio.get_running_loop()
        lost: asyncio.Future[None] = loop.create_future()
        errors: list[str] = []
        aiomqtt_on_disconnect = paho_client.on_disconnect

        def on_log(_c: paho.Client, _u: object, level: int, text: str) -> None:
            if level == paho.MQTT_LOG_ERR:
                errors.append(text)

        def on_disconnect(*args: Any) -> None:
            if aiomqtt_on_disconnect is not None:
                aiomqtt_on_disconnect(*args)
            # paho calls this from the event loop's reader, or from connect's thread.
            loop.call_soon_threadsafe(_settle, lost)

        aiomqtt_register_write = paho_client.on_socket_register_write

        def on_register_write(c: paho.Client, userdata: Any, sock: Any) -> None:
            # paho queues the CONNECT from connect's thread, when the loop may already
            # have read the broker's refusal and closed the socket: aiomqtt would then
            # register a closed socket (a traceback in the log). Here the writer is
            # added in the loop, at once, only if the socket is still open; paho's
            # close removes it through aiomqtt's unregister callback.
            def write() -> None:
                try:
                    c.loop_write()
                except Exception as exc:  # like aiomqtt: the link is gone
                    errors.append(str(exc))
                    _settle(lost)

            def register() -> None:
                if sock.fileno() != -1:
                    loop.add_writer(sock, write)

            loop.call_soon_threadsafe(register)

        paho_client.on_log = on_log
        paho_client.on_disconnect = on_disconnect
        paho_client.on_socket_register_write = on_register_write
        # Until the CONNACK, paho's errors go to on_log only: the failure is logged
        # once, explained, by run().
        paho_client.disable_logger()
        enter: asyncio.Future[Any] = asyncio.ensure_future(client.__aenter__())
        try:
            await asyncio.wait(
                {enter, lost}, timeout=CONNACK_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
            )
            if not enter.done():
                dropped = lost.done()
                if not dropped:
                    # A silent broker: DISCONNECT. paho closes the socket right after
                    # writing it, then calls on_disconnect (which settles ``lost``).
                    paho_client.disconnect()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.shield(lost), CLOSE_TIMEOUT_S)
                # Only with the socket closed: once the CONNACK wait is cancelled,
                # aiomqtt's on_disconnect would raise in paho's callback.
                enter.cancel()
                with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                    await enter
                if errors:
                    reason = errors[-1]
                elif dropped:
                    reason = "the broker closed the connection before its CONNACK"
                else:
                    reason = f"no CONNACK in {CONNACK_TIMEOUT_S:g} s"
                raise _tls_or_link_error(reason, s)
        except asyncio.CancelledError:
            # Stopped mid-connect: the attempt's outcome no longer matters.
            enter.cancel()
            enter.add_done_callback(_retrieve)
            raise
        finally:
            lost.cancel()
            paho_client.enable_logger(_client_log)
            paho_client.on_log = None
            paho_client.on_socket_register_write = aiomqtt_register_write
            paho_client.on_disconnect = aiomqtt_on_disconnect
        try:
            enter.result()
        except aiomqtt.MqttError as exc:
            raise _tls_or_link_error(str(exc), s) from None

    async def _connect_and_serve(self, sink: CommandSink) -> None:
        client = self._make_client()
        await self._connect(client)
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_exit(client)
            self._client = client
            _no_delay(self._paho(client).socket())
            try:
                await client.publish(
                    self.presence_topic,
                    _presence("online", self.gateway_id),
                    qos=1,
                    retain=True,
                )
                await client.subscribe(self.command_topic, qos=1)
                # "Up" means serving: subscribed, so a command published now is ours.
                self._set_link(True)
                await self._serve_commands(client, sink)
            except asyncio.CancelledError:
                # Clean stop: a DISCONNECT suppresses the will, so say "offline" ourselves.
                with contextlib.suppress(aiomqtt.MqttError):
                    await client.publish(
                        self.presence_topic,
                        _presence("offline", self.gateway_id),
                        qos=1,
                        retain=True,
                        timeout=OFFLINE_PUBLISH_TIMEOUT_S,
                    )
                raise

    async def _serve_commands(self, client: aiomqtt.Client, sink: CommandSink) -> None:
        """Hand each command to the sink as it arrives, acknowledge in arrival order.

        A command is handed over without waiting for the one before it to be durable,
        so commands that arrive together share one flush of the journal (the sink's
        synchronous part runs in arrival order: each handler task starts in the order
        it was created). The PUBACKs go out in arrival order (MQTT 3.1.1, 4.6), each
        only once its own handle_command returned (promise 3)."""
        in_order: asyncio.Queue[tuple[asyncio.Task[None] | None, int, int]] = asyncio.Queue(
            maxsize=COMMAND_PIPELINE
        )
        async with asyncio.TaskGroup() as tg:
            acker = tg.create_task(self._ack_in_order(client, in_order), name="mqtt-acks")
            async for message in client.messages:
                task: asyncio.Task[None] | None = None
                if message.topic.matches(self.command_topic):
                    task = tg.create_task(
                        self._until_durable(sink, _as_bytes(message.payload), message.mid)
                    )
                else:
                    log.warning("ignoring message on unexpected topic %s", message.topic)
                await in_order.put((task, message.mid, message.qos))
            await in_order.join()
            acker.cancel()

    async def _ack_in_order(
        self,
        client: aiomqtt.Client,
        in_order: asyncio.Queue[tuple[asyncio.Task[None] | None, int, int]],
    ) -> None:
        while True:
            task, mid, qos = await in_order.get()
            if task is not None:
                await task  # returns once durable (it retries until then)
            if qos > 0:
                # The PUBACK must never precede the journal commit (promise 3): only
                # now, with handle_command returned, does the broker forget the command.
                self._paho(client).ack(mid, qos)
            in_order.task_done()

    async def _until_durable(self, sink: CommandSink, payload: bytes, mid: int) -> None:
        """Offer one command to the sink until it is durable. Unacknowledged meanwhile,
        it stays with the broker (redelivered after a reconnect or a crash); the
        acknowledgements of later commands wait behind it. No reconnect is forced: that
        only hammers the broker (a fleet with full disks would stampede it) and
        redelivers nothing new."""
        delays = NOT_DURABLE_RETRY.delays()
        while True:
            try:
                await sink.handle_command(payload)
                return
            except Exception as exc:
                delay = next(delays)
                # No payload and no exception text in the log: both may carry PII.
                log.error(
                    "command mid=%d not durable (%s); not acknowledged, offered again in %.1f s",
                    mid,
                    type(exc).__name__,
                    delay,
                )
            await asyncio.sleep(delay)

    def _set_link(self, up: bool) -> None:
        if up == self._connected:
            return
        self._connected = up
        if up:
            self.tried.set()
            self._link_down.clear()
        else:
            self._link_down.set()
        if self._on_link_change is not None:
            try:
                self._on_link_change(up)
            except Exception:
                log.exception("on_link_change callback failed")


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _tls_or_link_error(error: str, s: MqttSettings) -> Exception:
    explained = explain_tls_failure(
        error, ca_file=s.tls_ca_file, cert_file=s.tls_cert_file, port=s.port
    )
    return aiomqtt.MqttError(error) if explained is None else MqttTlsError(explained)


def _no_delay(sock: object) -> None:
    """Disable Nagle on the broker connection. paho leaves it on, and a PUBACK followed
    by a small publish then waits for the peer's delayed ACK (~40 ms on Linux): the
    release path and every result would pay that."""
    if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
