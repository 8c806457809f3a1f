"""Session-wide real parts: one MQTT broker (mosquitto, or amqtt where mosquitto is
missing) on a free loopback port, started by the test session itself."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from gateway.localbroker import LocalBroker


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
