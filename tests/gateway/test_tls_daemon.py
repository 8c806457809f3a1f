"""The real daemon over TLS with a client certificate and the shipped ACL: a TLS file
that is missing is named in one log line, again at each retry, the daemon stays up,
and once the file is there it connects with verification on and releases a command."""

from __future__ import annotations

import shutil
import ssl
import uuid
from pathlib import Path

import pytest

from devtools.broker import LocalBroker
from devtools.stack import CloudStandIn, DaemonProcess, SimulatorProcess, demo_config
from tests.conftest import FleetPki
from tests.gateway.conftest import wait_until


@pytest.mark.broker_tls
def test_daemon_names_a_missing_tls_file_keeps_retrying_and_serves_once_it_appears(
    tmp_path: Path, fleet_pki: FleetPki, tls_broker: LocalBroker
) -> None:
    gateway_id = f"gw-{uuid.uuid4().hex[:10]}"
    gateway_cert = fleet_pki.ca.issue(gateway_id)
    cloud_tls = ssl.create_default_context(cafile=str(fleet_pki.ca.ca_file))
    cloud_tls.load_cert_chain(str(fleet_pki.cloud.cert_file), str(fleet_pki.cloud.key_file))
    cloud = CloudStandIn(tls_broker.host, tls_broker.port, gateway_id, tls=cloud_tls)
    sim = SimulatorProcess(tmp_path)
    ca_file = tmp_path / "etc" / "ca.pem"  # not there yet: the installer forgot it
    config = tmp_path / "gateway.toml"
    config.write_text(
        demo_config(
            tmp_path,
            gateway_id=gateway_id,
            mqtt_port=tls_broker.port,
            public_key_pem=cloud.public_key_pem,
            board_port=sim.link,
        )
    )
    daemon = DaemonProcess(
        tmp_path,
        config,
        env={
            "METALAV_MQTT__TLS_CA_FILE": str(ca_file),
            "METALAV_MQTT__TLS_CERT_FILE": str(gateway_cert.cert_file),
            "METALAV_MQTT__TLS_KEY_FILE": str(gateway_cert.key_file),
        },
    )
    line = f"mqtt.tls_ca_file: cannot read {ca_file}: No such file or directory"
    try:
        sim.start()
        daemon.start()
        wait_until(
            lambda: daemon.log_tail(200).count(line) >= 2, what="the missing file, named twice"
        )
        status = daemon.status()
        assert status is not None and not status["broker"]["connected"]
        assert "Traceback" not in daemon.log_tail(200)

        ca_file.parent.mkdir()
        shutil.copy(fleet_pki.ca.ca_file, ca_file)
        daemon.wait_ready()
        key = f"exec-{uuid.uuid4().hex[:16]}"
        cloud.publish(cloud.sign(key))
        assert cloud.wait_for(key, state="released")[-1]["machine_id"] == "W1"
        assert len(sim.actuation_records()) == 1
    finally:
        daemon.stop()
        sim.stop()
        cloud.close()
