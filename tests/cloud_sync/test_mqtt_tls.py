"""Transport security over a real mosquitto with TLS (issue 10, item 4): client
certificates required, the certificate's name is the identity, and the ACL shipped in
docs/brokers/acl keeps each gateway inside its own topics, in both directions. A
certificate or file that cannot work gives one line naming the key and the file, and
the session keeps trying with back-off."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiomqtt
import pytest

from cloud_sync import mqtt_session
from cloud_sync.mqtt_session import MqttSession, MqttSettings
from cloud_sync.mqtt_tls import MqttTlsError, client_tls_context, explain_tls_failure
from devtools.broker import _MOSQUITTO_TLS, LocalBroker
from devtools.certificates import IssuedCertificate
from tests.cloud_sync.test_mqtt_session import RecordingSink, new_gateway_id, run, wait_until
from tests.conftest import FleetPki

PREFIX = "metalav/v1/gateways"


def tls_settings(
    broker: LocalBroker,
    cert: IssuedCertificate | None,
    ca_file: Path,
) -> MqttSettings:
    return MqttSettings(
        host=broker.host,
        port=broker.port,
        keepalive_s=5,
        reconnect_min_s=0.05,
        reconnect_max_s=0.3,
        tls_ca_file=ca_file,
        tls_cert_file=cert.cert_file if cert else None,
        tls_key_file=cert.key_file if cert else None,
    )


@asynccontextmanager
async def client_as(
    pki: FleetPki, broker: LocalBroker, cert: IssuedCertificate
) -> AsyncIterator[aiomqtt.Client]:
    """A raw MQTT client holding ``cert``: what anyone with that certificate can do,
    whatever the gateway's own code would or would not send."""
    ctx = ssl.create_default_context(cafile=str(pki.ca.ca_file))
    ctx.load_cert_chain(str(cert.cert_file), str(cert.key_file))
    async with aiomqtt.Client(
        broker.host, broker.port, identifier=cert.common_name, tls_context=ctx
    ) as client:
        yield client


async def payloads_until(client: aiomqtt.Client, marker: bytes) -> list[tuple[str, bytes]]:
    """Every message ``client`` receives up to and including ``marker``. A message the
    broker let through before the marker, from the same publisher, would arrive first
    (MQTT keeps one publisher's QoS 1 order): no waiting for something not to happen."""
    seen: list[tuple[str, bytes]] = []
    async for message in client.messages:
        payload = message.payload
        assert isinstance(payload, bytes)
        seen.append((str(message.topic), payload))
        if payload == marker:
            return seen
    raise AssertionError("message stream ended")


@pytest.mark.broker_tls
def test_gateway_verifies_the_broker_and_serves_its_commands_over_tls(
    fleet_pki: FleetPki, tls_broker: LocalBroker
) -> None:
    gateway_id = new_gateway_id()
    cert = fleet_pki.ca.issue(gateway_id)

    async def main() -> None:
        sink = RecordingSink()
        session = MqttSession(
            tls_settings(tls_broker, cert, fleet_pki.ca.ca_file), sink, gateway_id=gateway_id
        )
        task = asyncio.create_task(session.run())
        try:
            await wait_until(lambda: session.connected)
            async with client_as(fleet_pki, tls_broker, fleet_pki.cloud) as cloud:
                await cloud.subscribe(f"{PREFIX}/{gateway_id}/results", qos=1)
                await cloud.publish(session.command_topic, b"signed-token", qos=1)
                assert await sink.arrived.get() == b"signed-token"
                assert await session.publish_many([("results", b"result-1")]) == [None]
                assert (await payloads_until(cloud, b"result-1"))[-1] == (
                    f"{PREFIX}/{gateway_id}/results",
                    b"result-1",
                )
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    run(main())


@pytest.mark.broker_tls
def test_a_gateway_certificate_cannot_publish_into_another_stores_topics(
    fleet_pki: FleetPki, tls_broker: LocalBroker
) -> None:
    intruder, victim = new_gateway_id(), new_gateway_id()
    intruder_cert = fleet_pki.ca.issue(intruder)

    async def main() -> None:
        async with (
            client_as(fleet_pki, tls_broker, fleet_pki.cloud) as cloud,
            client_as(fleet_pki, tls_broker, intruder_cert) as client,
        ):
            for topic in (f"{PREFIX}/{victim}/#", "metalav/v1/anything", f"{PREFIX}/{intruder}/#"):
                await cloud.subscribe(topic, qos=1)
            # A forged command for the other store, a forged result in its name, and
            # something outside the gateways' tree: the broker drops all three.
            await client.publish(f"{PREFIX}/{victim}/commands/execute", b"forged", qos=1)
            await client.publish(f"{PREFIX}/{victim}/results", b"forged", qos=1)
            await client.publish("metalav/v1/anything", b"forged", qos=1)
            await client.publish(f"{PREFIX}/{intruder}/results", b"marker", qos=1)
            seen = await payloads_until(cloud, b"marker")
        assert seen == [(f"{PREFIX}/{intruder}/results", b"marker")]

    run(main())


@pytest.mark.broker_tls
def test_a_gateway_certificate_cannot_read_another_stores_topics(
    fleet_pki: FleetPki, tls_broker: LocalBroker
) -> None:
    intruder, victim = new_gateway_id(), new_gateway_id()
    intruder_cert = fleet_pki.ca.issue(intruder)

    async def main() -> None:
        async with (
            client_as(fleet_pki, tls_broker, fleet_pki.cloud) as cloud,
            client_as(fleet_pki, tls_broker, intruder_cert) as client,
        ):
            for topic in (
                f"{PREFIX}/{victim}/commands/execute",
                f"{PREFIX}/{victim}/#",
                f"{PREFIX}/+/commands/execute",
                "#",
                f"{PREFIX}/{intruder}/commands/execute",
            ):
                await client.subscribe(topic, qos=1)
            await cloud.publish(f"{PREFIX}/{victim}/commands/execute", b"theirs", qos=1)
            await cloud.publish(f"{PREFIX}/{victim}/results", b"theirs", qos=1)
            await cloud.publish(f"{PREFIX}/{intruder}/commands/execute", b"marker", qos=1)
            seen = await payloads_until(client, b"marker")
        assert {payload for _, payload in seen} == {b"marker"}

    run(main())


@pytest.mark.broker_tls
def test_a_gateway_certificate_cannot_take_over_another_stores_session(
    fleet_pki: FleetPki, tls_broker: LocalBroker
) -> None:
    # The persistent session (and the commands queued in it) belongs to the client id.
    # The broker replaces the asked-for id by the certificate's name, so connecting
    # "as" another gateway does not push that gateway off its session.
    victim, intruder = new_gateway_id(), new_gateway_id()
    victim_cert = fleet_pki.ca.issue(victim)
    intruder_cert = fleet_pki.ca.issue(intruder)

    async def main() -> None:
        links: list[bool] = []
        session = MqttSession(
            tls_settings(tls_broker, victim_cert, fleet_pki.ca.ca_file),
            RecordingSink(),
            gateway_id=victim,
            on_link_change=links.append,
        )
        task = asyncio.create_task(session.run())
        try:
            await wait_until(lambda: session.connected)
            ctx = ssl.create_default_context(cafile=str(fleet_pki.ca.ca_file))
            ctx.load_cert_chain(str(intruder_cert.cert_file), str(intruder_cert.key_file))
            async with aiomqtt.Client(
                tls_broker.host, tls_broker.port, identifier=victim, tls_context=ctx
            ):
                # A takeover would have closed the victim's connection before this
                # CONNACK; a PUBACK on it now proves it is still the same one.
                assert await session.publish_many([("results", b"still-here")]) == [None]
            assert links == [True]
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    run(main())


def _tls_errors(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [
        r for r in caplog.records if r.name == "cloud_sync.mqtt_session" and text in r.getMessage()
    ]


@pytest.mark.broker_tls
@pytest.mark.parametrize(
    "case", ["wrong_ca", "expired_cert", "cert_of_another_ca", "missing_ca_file"]
)
def test_a_certificate_that_cannot_work_is_named_and_retried_with_backoff(
    case: str, fleet_pki: FleetPki, tls_broker: LocalBroker, caplog: pytest.LogCaptureFixture
) -> None:
    gateway_id = new_gateway_id()
    ca_file = fleet_pki.ca.ca_file
    cert = fleet_pki.ca.issue(gateway_id)
    if case == "wrong_ca":
        ca_file = fleet_pki.other_ca.ca_file
        expected = (
            f"the broker's certificate does not verify against mqtt.tls_ca_file {ca_file}: "
            "self-signed certificate in certificate chain"
        )
    elif case == "expired_cert":
        cert = fleet_pki.ca.issue(
            gateway_id, not_after=dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
        )
        expected = (
            f"the broker refused this gateway's certificate mqtt.tls_cert_file "
            f"{cert.cert_file}: the broker says it has expired"
        )
    elif case == "cert_of_another_ca":
        cert = fleet_pki.other_ca.issue(gateway_id)
        expected = (
            f"the broker refused this gateway's certificate mqtt.tls_cert_file "
            f"{cert.cert_file}: it is not signed by a CA the broker trusts"
        )
    else:
        ca_file = ca_file.parent / "missing-ca.pem"
        expected = f"mqtt.tls_ca_file: cannot read {ca_file}: No such file or directory"

    async def main() -> None:
        links: list[bool] = []
        session = MqttSession(
            tls_settings(tls_broker, cert, ca_file),
            RecordingSink(),
            gateway_id=gateway_id,
            on_link_change=links.append,
        )
        task = asyncio.create_task(session.run())
        try:
            # Twice: the session survived the first failure and tried again.
            await wait_until(lambda: len(_tls_errors(caplog, expected)) >= 2)
            assert not task.done()
            assert links == []
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    with caplog.at_level(logging.WARNING, logger="cloud_sync.mqtt_session"):
        run(main())
    for record in _tls_errors(caplog, expected):
        assert record.levelno == logging.ERROR
        assert "\n" not in record.getMessage() and record.exc_info is None


def test_tls_files_that_cannot_be_used_are_named_with_their_key(
    fleet_pki: FleetPki, tmp_path: Path
) -> None:
    good = fleet_pki.ca.issue("gw-files")
    other = fleet_pki.ca.issue("gw-other")
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello\n")
    ca = fleet_pki.ca.ca_file
    cases: list[tuple[tuple[Path | None, Path | None, Path | None], str]] = [
        ((not_pem, None, None), f"mqtt.tls_ca_file: no PEM CA certificate in {not_pem}"),
        ((tmp_path, None, None), f"mqtt.tls_ca_file: cannot read {tmp_path}: Is a directory"),
        ((ca, not_pem, good.key_file), f"mqtt.tls_cert_file: no PEM certificate in {not_pem}"),
        (
            (ca, good.cert_file, tmp_path / "gone.key"),
            f"mqtt.tls_key_file: cannot read {tmp_path / 'gone.key'}: No such file or directory",
        ),
        (
            (ca, good.cert_file, other.key_file),
            f"mqtt.tls_key_file: {other.key_file} is not the key of mqtt.tls_cert_file "
            f"{good.cert_file}",
        ),
        (
            (ca, good.cert_file, not_pem),
            f"mqtt.tls_key_file: no usable unencrypted PEM private key in {not_pem}",
        ),
        (
            (ca, good.cert_file, None),
            f"mqtt.tls_cert_file: no private key in {good.cert_file}, "
            "and mqtt.tls_key_file is not set",
        ),
    ]
    for files, message in cases:
        with pytest.raises(MqttTlsError) as err:
            client_tls_context(*files)
        assert str(err.value) == message
    assert client_tls_context(ca, good.cert_file, good.key_file).verify_mode == ssl.CERT_REQUIRED


def test_the_shipped_mosquitto_conf_has_the_tls_settings_the_tests_run_with() -> None:
    # docs/brokers/mosquitto.conf is what fleet operators copy; the tests' broker
    # (devtools/broker.py) must run with the same identity and TLS settings, only on
    # test files and a free port.
    shipped = (Path(__file__).parents[2] / "docs" / "brokers" / "mosquitto.conf").read_text()
    shipped_lines = {line.split()[0]: line for line in shipped.splitlines() if line[:1].isalpha()}
    for line in _MOSQUITTO_TLS.splitlines():
        name, value = line.split(maxsplit=1)
        assert name in shipped_lines, name
        if "{" not in value:  # file paths differ
            assert shipped_lines[name] == line
    assert "acl_file" in shipped_lines


def test_a_broker_that_never_sends_its_connack_is_given_up_and_tried_again(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # aiomqtt alone waits for the CONNACK forever: the session would hang, never retry.
    monkeypatch.setattr(mqtt_session, "CONNACK_TIMEOUT_S", 0.2)
    connections: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        await reader.read()  # takes the CONNECT, answers nothing
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        settings = MqttSettings(
            host="127.0.0.1", port=port, reconnect_min_s=0.05, reconnect_max_s=0.1
        )
        session = MqttSession(settings, RecordingSink(), gateway_id=new_gateway_id())
        task = asyncio.create_task(session.run())
        try:
            await wait_until(lambda: len(_tls_errors(caplog, "no CONNACK in 0.2 s")) >= 2)
            # The session gave up each silent connection itself.
            await wait_until(lambda: all(w.is_closing() for w in connections[:-1]))
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            server.close()
            await server.wait_closed()

    with caplog.at_level(logging.WARNING, logger="cloud_sync.mqtt_session"):
        run(main())


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (
            "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: Hostname mismatch, "
            "certificate is not valid for 'mqtt.example'. (_ssl.c:1006)",
            "MQTT TLS: the broker's certificate does not verify against mqtt.tls_ca_file "
            "/etc/metalav/ca.pem: Hostname mismatch, certificate is not valid for "
            "'mqtt.example'.",
        ),
        (
            "[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1006)",
            "MQTT TLS: the broker did not complete a TLS handshake on port 8883 "
            "(wrong_version_number)",
        ),
        (
            "failed to receive on socket: [SSL: SSLV3_ALERT_CERTIFICATE_REVOKED] sslv3 alert "
            "certificate revoked (_ssl.c:2580)",
            "MQTT TLS: the broker refused this gateway's certificate mqtt.tls_cert_file "
            "/nonexistent/gw.pem: the broker says it is revoked "
            "(sslv3_alert_certificate_revoked)",
        ),
        ("[Errno 111] Connection refused", None),
        ("Connection refused: Not authorized", None),
    ],
)
def test_tls_failures_are_told_in_words_and_other_errors_left_alone(
    error: str, expected: str | None
) -> None:
    explained = explain_tls_failure(
        error,
        ca_file=Path("/etc/metalav/ca.pem"),
        cert_file=Path("/nonexistent/gw.pem"),
        port=8883,
    )
    assert explained == expected
