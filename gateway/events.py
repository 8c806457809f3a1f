"""The events the gateway sends to the cloud (docs/mqtt-contract.md), as exact JSON.

The events the gateway sends to the cloud, as docs/mqtt-contract.md defines them:
their topics, their bodies and their exact JSON.

Pure: no storage, no I/O. The journal stores what these functions produce, in the same
transaction as the state change an event reports; the contract test
(tests/test_mqtt_contract.py) validates their output against the document.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cloud_sync.mqtt_session import (
    ALERTS_TOPIC,
    COMPENSATION_TOPIC,
    CYCLES_TOPIC,
    OPERATIONS_TOPIC,
    RESULTS_TOPIC,
)

from .lifecycle import COMPENSATED, is_final

__all__ = [
    "ALERTS_TOPIC",
    "COMPENSATION_TOPIC",
    "OPERATIONS_TOPIC",
    "CYCLES_TOPIC",
    "PAYMENT_FIELDS",
    "RESULTS_TOPIC",
    "Alert",
    "alert_event",
    "compensation_event",
    "cycle_event",
    "encode",
    "iso_utc",
    "new_event_id",
    "operation_event",
    "result_payload",
]

# The topic suffixes (docs/mqtt-contract.md, "Topics") are the session's, re-exported
# here beside the events they carry.

#: The payment fields of a command, carried by every result and compensation (issue 4).
PAYMENT_FIELDS = ("provider_ref", "idempotency_key", "amount_cents")


def iso_utc(ts: float) -> str:
    """An epoch as the contract's ``at``: RFC 3339, UTC, milliseconds, ``Z``."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_event_id() -> str:
    """The ``event_id`` the cloud de-duplicates deliveries by."""
    return str(uuid.uuid4())


def encode(event_id: str, body: Mapping[str, Any]) -> str:
    """An event as sent: compact JSON, ``event_id`` first."""
    return json.dumps({"event_id": event_id, **body}, separators=(",", ":"))


@dataclass(frozen=True)
class Alert:
    """Something a person must know: sent to the cloud (topic ``alerts``) and kept
    locally for ``metalavctl machines``. ``detail`` never carries PII."""

    code: str  # not_started, late_start, stuck_relay, board_link_lost, board_rebooted, ...
    severity: str  # info | warning | critical
    machine_id: str | None = None
    execute_key: str | None = None
    detail: str | None = None


def result_payload(
    *,
    gateway_id: str,
    execute_key: str | None,
    payment_id: str | None,
    machine_id: str | None,
    state: str,
    reason: str | None,
    at: str,
    seq: int,
    event_id: str | None = None,
    authentic: bool = True,
    paid: bool = True,
    awaits_start: bool = False,
    payment: Mapping[str, Any] | None = None,
) -> str:
    """The ``execution.result`` event of docs/mqtt-contract.md, as compact JSON.

    ``execute_key`` is None only for an unauthenticated rejection whose ``jti`` could
    not be read; ``paid`` is False for a technician's test turn."""
    return json.dumps(
        {
            "event_id": event_id or new_event_id(),
            "type": "execution.result",
            "gateway_id": gateway_id,
            "execute_key": execute_key,
            "payment_id": payment_id,
            # The payment fields of the command, synced with every result (issue 4):
            # provider_ref, idempotency_key, amount_cents (null when absent).
            **{k: (payment or {}).get(k) for k in PAYMENT_FIELDS},
            "machine_id": machine_id,
            "state": state,
            "reason": reason,
            # An unauthenticated rejection is never final for its (untrusted) key.
            "final": authentic and is_final(state, awaits_start=awaits_start),
            # Neither an unauthenticated message (no proof of payment) nor a
            # technician's test turn (never paid) is ever compensated.
            "compensation": authentic and paid and state in COMPENSATED,
            "authentic": authentic,
            "at": at,
            "seq": seq,
        },
        separators=(",", ":"),
    )


def compensation_event(
    *,
    gateway_id: str,
    execute_key: str,
    payment_id: str,
    machine_id: str,
    payment: Mapping[str, Any],
    reason: str | None,
    at: str,
) -> dict[str, Any]:
    """The runbook's ``payment.compensation`` event (without its event_id): the
    customer paid, the machine did not run."""
    return {
        "type": "payment.compensation",
        "gateway_id": gateway_id,
        "execute_key": execute_key,
        "payment_id": payment_id,
        **{k: payment.get(k) for k in PAYMENT_FIELDS},
        "machine_id": machine_id,
        "reason": reason,
        "at": at,
    }


def cycle_event(
    *, gateway_id: str, state: str, execute_key: str, at: str, details: Mapping[str, Any]
) -> dict[str, Any]:
    """A ``cycle.started`` / ``cycle.completed`` event (without its event_id);
    ``details`` adds machine_id, cycle and, when it ended, duration_s."""
    return {
        "type": f"cycle.{state}",
        "gateway_id": gateway_id,
        "execute_key": execute_key,
        "at": at,
        **details,
    }


def alert_event(gateway_id: str, alert: Alert, at: str) -> dict[str, Any]:
    """The ``alert`` event of docs/mqtt-contract.md (without its event_id)."""
    return {
        "type": "alert",
        "gateway_id": gateway_id,
        "code": alert.code,
        "severity": alert.severity,
        "machine_id": alert.machine_id,
        "execute_key": alert.execute_key,
        "detail": alert.detail,
        "at": at,
    }


def operation_event(
    *,
    gateway_id: str,
    record_id: int,
    at: str,
    actor: str,
    os_user: str,
    action: str,
    target: str,
    params: Mapping[str, Any] | None,
    config_version: str | None,
    before: Mapping[str, Any] | None,
    after: Mapping[str, Any] | None,
    reason: str,
    decision: str | None,
    outcome: str,
) -> dict[str, Any]:
    """The ``operation.record`` event (without its event_id): one line of the audit
    log, the runbook's "registro obrigatório de operação", for the cloud."""
    return {
        "type": "operation.record",
        "gateway_id": gateway_id,
        "record_id": record_id,
        "at": at,
        "actor": actor,
        "os_user": os_user,
        "action": action,
        "target": target,
        "params": params,
        "config_version": config_version,
        "before": before,
        "after": after,
        "reason": reason,
        "decision": decision,
        "outcome": outcome,
    }
