"""Cloud link of the gateway: command verification, the MQTT session, the signer.

Never imports ``gateway`` nor ``firmware_bridge`` (DESIGN.md, layout); the core hands
in a :class:`~cloud_sync.mqtt_session.CommandSink` and an
:class:`~cloud_sync.mqtt_session.OutboxSource`.

Exceptions::

    CommandRejected(Exception)   a command that must not run; .reason is a stable code
"""

from cloud_sync.commands import CommandRejected, CommandVerifier, ExecuteCommand
from cloud_sync.mqtt_session import (
    CommandSink,
    MqttSession,
    MqttSettings,
    OutboxItem,
    OutboxSource,
)

__all__ = [
    "CommandRejected",
    "CommandSink",
    "CommandVerifier",
    "ExecuteCommand",
    "MqttSession",
    "MqttSettings",
    "OutboxItem",
    "OutboxSource",
]
