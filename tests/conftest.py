"""Session-wide real parts: one MQTT broker (mosquitto, or amqtt where mosquitto is
missing) on a free loopback port, started by the test session itself."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from devtools.broker import BrokerTls, LocalBroker, local_broker_kind
from devtools.certificates import CertificateAuthority, IssuedCertificate

#: The example ACL shipped to fleet operators; the TLS tests run against this very file.
BROKER_ACL = Path(__file__).resolve().parents[1] / "docs" / "brokers" / "acl"
#: The cloud's identity in that ACL.
CLOUD_IDENTITY = "metalav-cloud"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The pure-Python fallback broker (amqtt) does not keep the queued and unacked QoS 1
    # messages of a persistent session across reconnects, and routes wills and retained
    # messages differently, so the tests of that broker contract only run against
    # mosquitto; say so instead of failing.
    if local_broker_kind() == "mosquitto":
        return
    skip = pytest.mark.skip(reason="needs mosquitto's persistent sessions (amqtt fallback)")
    skip_tls = pytest.mark.skip(
        reason="needs mosquitto's TLS listener, client certificates and ACL file "
        "(the amqtt fallback has none)"
    )
    for item in items:
        if "broker_semantics" in item.keywords:
            item.add_marker(skip)
        if "broker_tls" in item.keywords:
            item.add_marker(skip_tls)


@pytest.fixture(scope="session")
def mqtt_broker() -> Iterator[LocalBroker]:
    """A broker shared by the whole session. Tests that stop or restart a broker
    must use ``fresh_broker`` instead."""
    with LocalBroker() as broker:
        yield broker


@pytest.fixture
def fresh_broker() -> Iterator[LocalBroker]:
    """A broker of this test's own, which the test may stop and start again."""
    with LocalBroker(persistence=True) as broker:
        yield broker


@dataclass(frozen=True)
class FleetPki:
    """The fleet's CA with the broker's and the cloud's certificates, and a second,
    unrelated CA; tests issue gateway certificates from either."""

    ca: CertificateAuthority
    other_ca: CertificateAuthority
    server: IssuedCertificate
    cloud: IssuedCertificate


@pytest.fixture(scope="session")
def fleet_pki(tmp_path_factory: pytest.TempPathFactory) -> FleetPki:
    folder = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority(folder, "Meta-Lav fleet CA")
    return FleetPki(
        ca=ca,
        other_ca=CertificateAuthority(folder, "Another CA"),
        server=ca.issue("broker", server=True),
        cloud=ca.issue(CLOUD_IDENTITY),
    )


@pytest.fixture(scope="session")
def tls_broker(fleet_pki: FleetPki) -> Iterator[LocalBroker]:
    """mosquitto with one TLS listener: client certificates of the fleet CA required,
    identity as user name and client id, docs/brokers/acl enforced (mark the test
    ``broker_tls``: skipped on the amqtt fallback)."""
    pki = fleet_pki
    tls = BrokerTls(pki.ca.ca_file, pki.server.cert_file, pki.server.key_file, BROKER_ACL)
    with LocalBroker(tls=tls) as broker:
        yield broker
