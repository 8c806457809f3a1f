"""What cloud_sync/mqtt_session.py takes from aiomqtt's private side, checked on the
installed aiomqtt (pyproject.toml pins the minor series; scripts/check-floors.sh runs
this on its lowest version). If an aiomqtt release moves any of it, this fails first,
by name, instead of the session losing PUBACKs in a store.

- ``Client._client``: the wrapped paho client, for manual acks (aiomqtt issue 345),
  direct pipelined publishes and the socket (TCP_NODELAY);
- ``Client._pending_publishes``: mid -> object with ``set()``, which aiomqtt's
  ``_on_publish`` pops and sets on the PUBACK, ignoring mids nobody waits for;
- ``Client.pending_calls_threshold``: the warning threshold the session raises.
"""

from __future__ import annotations

import asyncio

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.reasoncodes import ReasonCode

from cloud_sync.mqtt_session import MqttSession


def _client() -> aiomqtt.Client:
    # Never connected: port 1 is only a placeholder.
    return aiomqtt.Client("127.0.0.1", 1, identifier="internals-check", clean_session=False)


def test_the_wrapped_paho_client_is_where_the_session_reaches_for_it() -> None:
    async def scenario() -> None:
        paho_client = MqttSession._paho(_client())  # noqa: SLF001
        assert isinstance(paho_client, paho.Client)
        paho_client.manual_ack_set(True)  # raises on a paho without manual acks
        assert callable(paho_client.ack)

    asyncio.run(scenario())


def test_a_puback_sets_what_waits_in_pending_publishes_and_ignores_strangers() -> None:
    async def scenario() -> None:
        client = _client()
        pending = client._pending_publishes  # noqa: SLF001
        assert isinstance(pending, dict)
        waiter = asyncio.Event()
        pending[7] = waiter
        puback = ReasonCode(paho.PacketTypes.PUBACK, "Success")
        client._on_publish(client._client, None, 7, puback, paho.Properties(3))  # noqa: SLF001
        assert waiter.is_set() and 7 not in pending
        # A best-effort publish: nobody waits for its mid, and nothing raises.
        client._on_publish(client._client, None, 8, puback, paho.Properties(3))  # noqa: SLF001

    asyncio.run(scenario())


def test_the_pending_calls_warning_threshold_is_a_public_knob() -> None:
    async def scenario() -> None:
        client = _client()
        client.pending_calls_threshold = 10_000
        assert client.pending_calls_threshold == 10_000

    asyncio.run(scenario())
