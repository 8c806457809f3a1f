"""A store per test: the simulated board on a real pty, the daemon as a real process
with its own SQLite journal, and the cloud stand-in on the session's real broker."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from devtools.broker import LocalBroker
from devtools.stack import CloudStandIn, DaemonProcess, SimulatorProcess, demo_config

# metalavctl speaks the technician's language (gateway/i18n.py): the tests read what a
# store's technician reads. tests/gateway/test_i18n.py checks English as well.
os.environ["LANGUAGE"] = "pt_BR"


def wait_until(predicate: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something true (and return it). Polling is
    the honest way to watch state owned by another process."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def ctl(store: Store, *args: str) -> subprocess.CompletedProcess[str]:
    """``metalavctl ARGS`` against this store's daemon, as a separate process."""
    return subprocess.run(
        [sys.executable, "-m", "gateway.ctl", *args, "--socket", str(store.daemon.socket)],
        capture_output=True,
        text=True,
        timeout=30,
    )


@dataclass
class Store:
    workdir: Path
    broker: LocalBroker
    sim: SimulatorProcess
    daemon: DaemonProcess
    cloud: CloudStandIn
    gateway_id: str
    _keys: list[str] = field(default_factory=list)

    def new_key(self) -> str:
        key = f"exec-{uuid.uuid4().hex[:16]}"
        self._keys.append(key)
        return key

    def actuations(self) -> list[dict[str, object]]:
        return self.sim.actuation_records()


def make_store(
    tmp_path: Path,
    broker: LocalBroker,
    *sim_args: str,
    machines: list[dict[str, Any]] | None = None,
    board: dict[str, Any] | None = None,
    sections: dict[str, dict[str, Any]] | None = None,
    journal_path: Path | None = None,
) -> Store:
    gateway_id = f"gw-{uuid.uuid4().hex[:10]}"
    cloud = CloudStandIn(broker.host, broker.port, gateway_id)
    sim = SimulatorProcess(tmp_path, *sim_args)
    sim.start()
    config = tmp_path / "gateway.toml"
    config.write_text(
        demo_config(
            tmp_path,
            gateway_id=gateway_id,
            mqtt_port=broker.port,
            public_key_pem=cloud.public_key_pem,
            board_port=sim.link,
            machines=machines,
            board=board,
            sections=sections,
            journal_path=journal_path,
        )
    )
    daemon = DaemonProcess(tmp_path, config)
    return Store(tmp_path, broker, sim, daemon, cloud, gateway_id)


@pytest.fixture
def store_factory(tmp_path: Path, mqtt_broker: LocalBroker) -> Iterator[object]:
    made: list[Store] = []

    def factory(*sim_args: str, **config: Any) -> Store:
        s = make_store(tmp_path, mqtt_broker, *sim_args, **config)
        made.append(s)
        return s

    yield factory
    for s in made:
        s.daemon.stop()
        s.sim.stop()
        s.cloud.close()


@pytest.fixture
def store(store_factory) -> Store:  # type: ignore[no-untyped-def]
    """A running store: daemon up with both links connected."""
    s: Store = store_factory()
    s.daemon.start()
    s.daemon.wait_ready()
    return s
