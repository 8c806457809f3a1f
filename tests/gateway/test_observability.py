"""Issue 11 against a real daemon: /metrics after a scripted session, /health, the
retained heartbeat, a dead event, metalavctl status exit codes, clock trouble."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from jsonschema import Draft202012Validator
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client.parser import text_string_to_metric_families

from cloud_sync.signing import generate_demo_keypair, sign_command
from devtools.broker import LocalBroker
from tests.cloud_sync.cloud_server import CloudServer
from tests.test_mqtt_contract import SCHEMAS

from .conftest import Store, ctl, make_store, wait_until
from .test_machines import FAST, start, washer


def _get(store: Store, path: str) -> tuple[int, bytes]:
    assert store.daemon.health_url is not None
    try:
        with urllib.request.urlopen(store.daemon.health_url + path, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


def scrape(store: Store) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, parsed by the Prometheus text parser."""
    status, body = _get(store, "/metrics")
    assert status == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def sample(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)




class StatusSubscriber:
    """A fleet monitor subscribing to P/status after the fact: retained messages only."""

    def __init__(self, broker: LocalBroker, gateway_id: str) -> None:
        self.messages: list[tuple[bool, dict[str, Any]]] = []
        self._cond = threading.Condition()
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"fleet-{uuid.uuid4()}")
        self._client.on_message = self._on_message
        self._client.connect(broker.host, broker.port)
        self._client.subscribe(f"metalav/v1/gateways/{gateway_id}/status", 1)
        self._client.loop_start()

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append((bool(msg.retain), json.loads(msg.payload)))
            self._cond.notify_all()

    def wait(self, predicate: Any, timeout: float = 15.0) -> tuple[bool, dict[str, Any]]:
        with self._cond:
            found = self._cond.wait_for(
                lambda: [m for m in self.messages if predicate(m)], timeout=timeout
            )
            assert found, f"no matching heartbeat: {self.messages[-3:]}"
            return found[0]

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()


OBSERVE_FAST = {"clock": {"check_every_s": 0.2}, "health": {"heartbeat_s": 1.0}}


def test_metrics_count_a_scripted_session_and_health_and_heartbeat_report_it(
    store_factory: Any, mqtt_broker: LocalBroker
) -> None:
    store: Store = start(
        store_factory(
            "--machine",
            "channel=3,input=3,never_starts",
            machines=[
                {"id": "W1", "kind": "washer", "channel": 1, "cycles": {"normal": {"pulses": 1}}},
                {"id": "W2", "kind": "washer", "channel": 2, "cycles": {"normal": {"pulses": 1}}},
                washer("W3", 3, window=0.3),
            ],
            board=FAST,
            sections=OBSERVE_FAST,
        )
    )
    cloud = store.cloud
    # Two releases, and the first one again (a duplicate).
    k1, k2 = store.new_key(), store.new_key()
    t1 = cloud.sign(k1, machine_id="W1")
    cloud.publish(t1)
    cloud.publish(cloud.sign(k2, machine_id="W2"))
    cloud.wait_for(k1, state="released")
    cloud.wait_for(k2, state="released")
    cloud.publish(t1)
    cloud.wait_for(k1, state="released", count=2)
    # Forged commands (another key: three of them is a possible key rotation problem),
    # and one whose iat is an hour ahead (time-related).
    forger, _ = generate_demo_keypair()
    for _ in range(3):
        forged = store.new_key()
        cloud.publish(
            sign_command(
                forger,
                execute_key=forged,
                audience=store.gateway_id,
                payment_id="pay-x",
                machine_id="W1",
                cycle="normal",
            )
        )
        cloud.wait_for(forged, state="rejected", final=False)
    rotation = cloud.wait_event("alerts", code="command_signature_failures")
    assert "key rotation" in rotation["detail"]
    future = store.new_key()
    cloud.publish(cloud.sign(future, machine_id="W2", now=time.time() + 3600))
    cloud.wait_for(future, state="rejected", final=False)
    # An expired one, and one whose machine never starts.
    expired, never = store.new_key(), store.new_key()
    cloud.publish(cloud.sign(expired, machine_id="W1", now=time.time() - 1000, ttl_s=300))
    cloud.wait_for(expired, state="expired")
    cloud.publish(cloud.sign(never, machine_id="W3"))
    cloud.wait_for(never, state="not_started")

    m = wait_until(
        lambda: (
            (s := scrape(store))
            and sample(s, "metalav_executions_total", state="not_started") == 1
            and s
        ),
        what="not_started counted",
    )
    assert sample(m, "metalav_executions_total", state="accepted") == 3
    assert sample(m, "metalav_executions_total", state="released") == 3
    assert sample(m, "metalav_executions_total", state="expired") == 1
    assert sample(m, "metalav_executions_total", state="needs_review") == 0
    assert sample(m, "metalav_duplicate_commands_total") == 1
    assert (
        sample(m, "metalav_command_rejections_total", reason="bad_signature", kind="signature") == 3
    )
    assert sample(m, "metalav_command_rejections_total", reason="not_yet_valid", kind="time") == 1
    assert sample(m, "metalav_board_unexpected_executions_total") == 0
    assert sample(m, "metalav_release_latency_seconds_count") == 3
    assert sample(m, "metalav_alerts_total", code="not_started", severity="critical") == 1
    assert sample(m, "metalav_board_link_up") == 1
    assert sample(m, "metalav_broker_link_up") == 1
    assert sample(m, "metalav_dlq_events") == 0
    assert sample(m, "metalav_circuit_breaker_state", breaker="mqtt", state="closed") == 1
    assert sample(m, "metalav_journal_size_bytes") > 0
    assert sample(m, "metalav_journal_commit_seconds_count") > 0
    build = [k for k in m if k[0] == "metalav_build_info"]
    assert len(build) == 1 and dict(build[0][1])["gateway_id"] == store.gateway_id
    # Only the three releases ever reached the board.
    assert len(store.actuations()) == 3

    # Liveness and the detailed checks, each with a value and a level.
    status, body = _get(store, "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, body = _get(store, "/health/detailed")
    detailed = json.loads(body)
    assert set(detailed["checks"]) == {
        "journal",
        "board_link",
        "broker_link",
        "https",
        "outbox_depth",
        "outbox_oldest_age_s",
        "dlq",
        "breakers",
        "clock",
        "disk_free_mb",
    }
    assert detailed["checks"]["board_link"] == {
        "value": True,
        "level": "normal",
        "detail": "",
        "detail_template": "",
        "detail_params": {},
    }
    journal_check = detailed["checks"]["journal"]
    assert journal_check["detail"] == "ms, median of the latest writes"
    assert journal_check["detail_template"] == journal_check["detail"]
    assert detailed["checks"]["https"]["value"] == "not_configured"

    # The heartbeat, retained: a monitor subscribing now gets it at once.
    fleet = StatusSubscriber(mqtt_broker, store.gateway_id)
    try:
        retained, beat = fleet.wait(lambda m: m[0])
    finally:
        fleet.close()
    schema = Draft202012Validator(SCHEMAS["heartbeat"])
    assert not list(schema.iter_errors(beat))
    assert set(beat) == set(SCHEMAS["heartbeat"]["required"])
    assert beat["gateway_id"] == store.gateway_id
    assert beat["links"] == {"broker": True, "board": True}
    assert beat["config_version"] == detailed["config_version"]


@pytest.fixture
def refusing_cloud() -> Iterator[CloudServer]:
    with CloudServer() as server:
        server.mode = 422  # every event the cloud gets over HTTPS is refused: dead at once
        yield server


def test_a_dead_event_raises_an_alert_and_shows_in_the_heartbeat(
    store_factory: Any, mqtt_broker: LocalBroker, refusing_cloud: CloudServer
) -> None:
    store: Store = start(
        store_factory(
            sections={
                **OBSERVE_FAST,
                "cloud": {"base_url": refusing_cloud.base_url, "token": "t0k3n"},
                "outbox": {"backoff_base_s": 0.05, "backoff_max_s": 0.2},
            }
        )
    )
    # A paid command for a machine the store does not have: rejected and compensated;
    # the compensation endpoint refuses it (422), so that event goes dead.
    key = store.new_key()
    store.cloud.publish(store.cloud.sign(key, machine_id="W9"))
    store.cloud.wait_for(key, state="rejected")
    alert = store.cloud.wait_event("alerts", code="outbox_event_dead", timeout=15)
    assert alert["severity"] == "critical" and "dlq" in alert["detail"]

    fleet = StatusSubscriber(mqtt_broker, store.gateway_id)
    try:
        _, beat = fleet.wait(lambda m: m[1]["dlq"]["size"] >= 1)
    finally:
        fleet.close()
    assert beat["dlq"]["last_dead_at"] is not None
    assert sample(scrape(store), "metalav_dlq_events") >= 1


# Disk and fsync speed of a shared test machine are not what these tests are about.
LENIENT = {
    **OBSERVE_FAST,
    "health": {
        **OBSERVE_FAST["health"],
        "disk_free_alert_mb": 0,
        "disk_free_critical_mb": 0,
        "journal_latency_alert_ms": 60_000,
        "journal_latency_critical_ms": 60_000,
    },
}


def test_status_exit_code_is_the_health_level_and_a_change_of_level_sends_a_heartbeat(
    store_factory: Any, mqtt_broker: LocalBroker
) -> None:
    # A heartbeat period far longer than the test: only a change of level sends one.
    sections = {**LENIENT, "health": {**LENIENT["health"], "heartbeat_s": 3600}}
    store: Store = start(store_factory(sections=sections))
    ok = ctl(store, "status")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "saúde: normal" in ok.stdout

    fleet = StatusSubscriber(mqtt_broker, store.gateway_id)
    try:
        fleet.wait(lambda m: m[1]["level"] == "normal")
        store.sim.stop()  # the board goes away: no release can be made
        _, beat = fleet.wait(lambda m: m[1]["level"] == "critical")
    finally:
        fleet.close()
    assert beat["links"]["board"] is False and beat["checks"]["board_link"] == "critical"
    wait_until(lambda: ctl(store, "status").returncode == 2, what="critical")
    critical = ctl(store, "status")
    assert "saúde: CRÍTICO" in critical.stdout and "placa" in critical.stdout
    as_json = json.loads(ctl(store, "status", "--json").stdout)
    assert as_json["health"]["checks"]["board_link"]["level"] == "critical"
    status, _ = _get(store, "/health/detailed")
    assert status == 503


def test_status_exit_code_is_one_on_alert_and_three_when_unreachable(
    tmp_path: Path, fresh_broker: LocalBroker
) -> None:
    store = make_store(tmp_path, fresh_broker, sections=LENIENT)
    try:
        start(store)
        assert ctl(store, "status").returncode == 0
        fresh_broker.stop()  # the broker goes away: store and forward, an alert
        wait_until(lambda: ctl(store, "status").returncode == 1, what="alert")
        alert = ctl(store, "status")
        assert "saúde: ALERTA" in alert.stdout and "broker" in alert.stdout
    finally:
        store.daemon.stop()
        store.sim.stop()
        store.cloud.close()

    gone = ctl(store, "status")  # the daemon is stopped: unknown, as monitoring says
    assert gone.returncode == 3, gone.stderr
