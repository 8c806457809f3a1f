"""``metalavctl doctor`` (issue 12, item 4) on a real store: daemon, pty board, broker,
SQLite journal; and on the same store broken the ways a technician finds it."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import re
import socket
import ssl
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cloud_sync.signing import generate_demo_keypair
from gateway.config import config_from_dict
from gateway.doctor import check_broker, check_clock

from .conftest import Store

ALWAYS = {"config", "daemon", "serial_port", "board", "broker", "clock", "disk", "journal"}


def doctor(store: Store, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.ctl", "doctor", "--config", str(store.daemon.config_path),
         *extra],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip


def checks_of(result: subprocess.CompletedProcess[str]) -> dict[str, dict[str, Any]]:
    data = json.loads(result.stdout)
    checks = {c["name"]: c for c in data["checks"]}
    assert data["ok"] == (result.returncode == 0)
    assert result.returncode == (1 if any(c["status"] == "fail" for c in checks.values()) else 0)
    return checks


def test_a_healthy_store_passes_every_check_that_can_fail(store: Store) -> None:
    result = doctor(store, "--json")
    checks = checks_of(result)
    assert ALWAYS <= set(checks)
    for name in ("config", "daemon", "serial_port", "board", "broker", "journal"):
        assert checks[name]["status"] == "ok", checks[name]
    assert "íntegro" in checks["journal"]["detail"]
    assert "conectado" in checks["broker"]["detail"]
    assert checks["clock"]["status"] in ("ok", "warn")  # an unsynced clock is no failure

    text = doctor(store)
    assert "Relógio" in text.stdout and "Diário (integridade)" in text.stdout
    assert text.returncode == result.returncode


def test_a_broken_store_says_what_failed_and_what_to_do(store: Store) -> None:
    store.daemon.stop()
    # Daemon stopped, board there: doctor asks the board itself.
    checks = checks_of(doctor(store, "--json"))
    assert checks["daemon"]["status"] == "fail" and "systemctl start" in checks["daemon"]["fix"]
    assert checks["board"]["status"] == "ok" and "boot id" in checks["board"]["detail"]

    # Board unplugged, journal damaged, broker gone.
    store.sim.stop()
    journal = store.workdir / "journal.db"
    data = bytearray(journal.read_bytes())
    data[4096:8192] = b"\xa5" * 4096
    journal.write_bytes(bytes(data))
    config = store.daemon.config_path
    config.write_text(config.read_text().replace(f"port = {store.broker.port}", "port = 1"))

    result = doctor(store, "--json")
    assert result.returncode == 1
    checks = checks_of(result)
    assert checks["serial_port"]["status"] == "fail"
    assert "/dev/serial/by-id" in checks["serial_port"]["fix"]
    assert checks["board"]["status"] == "fail"
    assert checks["broker"]["status"] == "fail" and "internet" in checks["broker"]["fix"]
    assert checks["journal"]["status"] == "fail"
    assert "metalavctl restore" in checks["journal"]["fix"]

    text = doctor(store)
    assert text.returncode == 1 and "Traceback" not in text.stderr
    assert "FALHA" in text.stdout and "o que fazer:" in text.stdout


def test_an_invalid_config_is_one_failed_check(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text("[gateway\n")
    result = subprocess.run(
        [sys.executable, "-m", "gateway.ctl", "doctor", "--config", str(config), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert [c["name"] for c in json.loads(result.stdout)["checks"]] == ["config"]
    assert "check-config" in json.loads(result.stdout)["checks"][0]["fix"]


def test_an_unsynchronized_clock_is_a_warning_with_what_to_do() -> None:
    # The kernel's clock state cannot be changed from a test: the probe is the seam.
    assert check_clock(lambda: True).status == "ok"
    unsynced = check_clock(lambda: False)
    assert unsynced.status == "warn" and "timedatectl" in unsynced.fix
    assert check_clock(lambda: None).status == "warn"


def _certificate(
    name: str, days: int, issuer: tuple[Any, Any] | None = None
) -> tuple[Any, Any, bytes, bytes]:
    """(cert, key, cert PEM, key PEM) valid until ``days`` from now (negative: expired),
    signed by ``issuer`` (cert, key), else self-signed as a CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer[0].subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=400))
        .not_valid_after(now + timedelta(days=days))
    )
    if issuer:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    else:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
    cert = builder.sign(issuer[1] if issuer else key, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert, key, cert.public_bytes(serialization.Encoding.PEM), key_pem


def test_broker_certificates_near_expiry_warn_and_expired_ones_fail(tmp_path: Path) -> None:
    ca, ca_key, ca_pem, _ = _certificate("metalav test CA", 3650)
    _, _, server_pem, server_key_pem = _certificate("broker", 10, (ca, ca_key))
    _, _, client_pem, client_key_pem = _certificate("gw-1", -1, (ca, ca_key))
    files = {
        "ca.pem": ca_pem,
        "server.pem": server_pem,
        "server.key": server_key_pem,
        "client.pem": client_pem,
        "client.key": client_key_pem,
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)

    # A real TLS listener on loopback presenting the server certificate.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "server.pem", tmp_path / "server.key")
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        for _ in range(2):
            conn, _ = listener.accept()
            with contextlib.suppress(OSError), context.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        _, public_pem = generate_demo_keypair()
        base: dict[str, Any] = {
            "gateway": {"id": "gw-1"},
            "commands": {"public_keys": [public_pem]},
            "machines": [
                {"id": "W1", "kind": "washer", "channel": 1, "cycles": {"n": {"pulses": 1}}}
            ],
        }
        mqtt = {"host": "127.0.0.1", "port": port, "tls_ca_file": str(tmp_path / "ca.pem")}
        near = check_broker(config_from_dict({**base, "mqtt": mqtt}), None)
        assert near.status == "warn", near
        assert re.search(r"vence em (9|10) dia", near.detail) and "renovação" in near.fix

        with_client = {
            **mqtt,
            "tls_cert_file": str(tmp_path / "client.pem"),
            "tls_key_file": str(tmp_path / "client.key"),
        }
        expired = check_broker(config_from_dict({**base, "mqtt": with_client}), None)
        assert expired.status == "fail" and "vencido" in expired.detail, expired
    finally:
        listener.close()
        server.join(timeout=5)
