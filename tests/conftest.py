"""Session-wide real parts: one MQTT broker (mosquitto, or amqtt where mosquitto is
missing) on a free loopback port, started by the test session itself."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from devtools.broker import LocalBroker, local_broker_kind


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The pure-Python fallback broker (amqtt) does not keep the queued and unacked QoS 1
    # messages of a persistent session across reconnects, and routes wills and retained
    # messages differently, so the tests of that broker contract only run against
    # mosquitto; say so instead of failing.
    if local_broker_kind() == "mosquitto":
        return
    skip = pytest.mark.skip(reason="needs mosquitto's persistent sessions (amqtt fallback)")
    for item in items:
        if "broker_semantics" in item.keywords:
            item.add_marker(skip)


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
