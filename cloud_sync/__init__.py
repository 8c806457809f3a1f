"""Cloud link of the gateway: commands in, events out, and what keeps them flowing.

Cloud link of the gateway: command verification, the MQTT session, the signer, the
outbox dispatcher with its HTTPS client and circuit breakers, and their retry backoff.

Never imports ``gateway`` nor ``firmware_bridge`` (DESIGN.md, layout); the core hands
in a :class:`~cloud_sync.mqtt_session.CommandSink` and an
:class:`~cloud_sync.outbox.OutboxStore`.

Exceptions::

    CommandRejected(Exception)   a command that must not run; .reason is a stable code
    MqttLinkDown(Exception)      a publish_many item that the link lost before its PUBACK
    CloudError(Exception)        the HTTPS client's tree, see cloud_sync/https_client.py
"""

from cloud_sync.backoff import Backoff
from cloud_sync.breaker import CircuitBreaker
from cloud_sync.commands import CommandRejected, CommandVerifier, ExecuteCommand
from cloud_sync.dispatcher import MqttPublisher, OutboxDispatcher
from cloud_sync.https_client import (
    CloudError,
    CloudHttpClient,
    CloudRejected,
    CloudRetryable,
    CloudServerError,
    CloudUnreachable,
)
from cloud_sync.mqtt_session import CommandSink, MqttLinkDown, MqttSession, MqttSettings
from cloud_sync.outbox import DispatchRecord, MemoryOutboxStore, OutboxItem, OutboxStore

__all__ = [
    "Backoff",
    "CircuitBreaker",
    "CloudError",
    "CloudHttpClient",
    "CloudRejected",
    "CloudRetryable",
    "CloudServerError",
    "CloudUnreachable",
    "CommandRejected",
    "CommandSink",
    "CommandVerifier",
    "DispatchRecord",
    "ExecuteCommand",
    "MemoryOutboxStore",
    "MqttLinkDown",
    "MqttPublisher",
    "MqttSession",
    "MqttSettings",
    "OutboxDispatcher",
    "OutboxItem",
    "OutboxStore",
]
