"""The bytes the cloud receives do not change when the code around them does: each
event body below is pinned as sent (tests/test_mqtt_contract.py checks the schema)."""

from __future__ import annotations

from gateway.events import (
    Alert,
    alert_event,
    compensation_event,
    cycle_event,
    encode,
    iso_utc,
    result_payload,
)
from gateway.lifecycle import ExecutionState

AT = "2027-01-15T08:00:00.500Z"


def test_timestamps_are_utc_with_milliseconds() -> None:
    assert iso_utc(1_800_000_000.5) == AT


def test_result_event_bytes() -> None:
    payload = result_payload(
        gateway_id="gw-1",
        execute_key="exec-1",
        payment_id="pay-1",
        machine_id="W1",
        state=ExecutionState.RELEASED,
        reason=None,
        at=AT,
        seq=2,
        event_id="e-1",
        awaits_start=True,
        payment={"provider_ref": "stone-1", "amount_cents": 1500},
    )
    assert payload == (
        '{"event_id":"e-1","type":"execution.result","gateway_id":"gw-1",'
        '"execute_key":"exec-1","payment_id":"pay-1","provider_ref":"stone-1",'
        '"idempotency_key":null,"amount_cents":1500,"machine_id":"W1","state":"released",'
        '"reason":null,"final":false,"compensation":false,"authentic":true,'
        '"at":"2027-01-15T08:00:00.500Z","seq":2}'
    )


def test_compensation_event_bytes() -> None:
    body = compensation_event(
        gateway_id="gw-1",
        execute_key="paym-l",
        payment_id="pay-paym-l",
        machine_id="W1",
        payment={"provider_ref": "stone-1", "idempotency_key": "idem", "amount_cents": 1500},
        reason="no_start",
        at=AT,
    )
    assert encode("e-9", body) == (
        '{"event_id":"e-9","type":"payment.compensation","gateway_id":"gw-1",'
        '"execute_key":"paym-l","payment_id":"pay-paym-l","provider_ref":"stone-1",'
        '"idempotency_key":"idem","amount_cents":1500,"machine_id":"W1","reason":"no_start",'
        '"at":"2027-01-15T08:00:00.500Z"}'
    )


def test_cycle_event_bytes() -> None:
    body = cycle_event(
        gateway_id="gw-1",
        state=ExecutionState.COMPLETED,
        execute_key="paym-s",
        at=AT,
        details={"machine_id": "W1", "cycle": "normal", "duration_s": 12.5},
    )
    assert encode("e-5", body) == (
        '{"event_id":"e-5","type":"cycle.completed","gateway_id":"gw-1",'
        '"execute_key":"paym-s","at":"2027-01-15T08:00:00.500Z","machine_id":"W1",'
        '"cycle":"normal","duration_s":12.5}'
    )


def test_alert_event_bytes() -> None:
    body = alert_event("gw-1", Alert("stuck_relay", "critical", "W1", detail="channel 1"), "T")
    assert encode("e-2", body) == (
        '{"event_id":"e-2","type":"alert","gateway_id":"gw-1","code":"stuck_relay",'
        '"severity":"critical","machine_id":"W1","execute_key":null,"detail":"channel 1",'
        '"at":"T"}'
    )
