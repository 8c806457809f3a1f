"""``check-config`` checks the files the config names, not only its syntax: a missing or
unreadable TLS file, CA bundle or journal folder is exit 2 with one line naming the key
(issue 10, item 4). ``run`` refuses only what it could not start without; the MQTT TLS
files it names at each connect attempt instead (tests/gateway/test_tls_daemon.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import FleetPki
from tests.gateway.test_config import GOOD, _daemon


def _config(tmp_path: Path, extra: str) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(GOOD + extra)
    return path


def _errors(stderr: str) -> list[str]:
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert all(line.startswith("config error: ") for line in lines), lines
    return [line.removeprefix("config error: ") for line in lines]


def test_check_config_refuses_missing_and_unreadable_files_naming_each_key(
    tmp_path: Path,
) -> None:
    missing = tmp_path / "etc" / "ca.pem"
    a_folder = tmp_path / "certs"
    a_folder.mkdir()
    a_file = tmp_path / "plain-file"
    a_file.write_text("x")
    path = _config(
        tmp_path,
        f'[mqtt]\ntls_ca_file = "{missing}"\n'
        f'[cloud]\nbase_url = "https://cloud.example.invalid"\nca_file = "{a_folder}"\n',
    )
    path.write_text(path.read_text().replace('path = "journal.db"', f'path = "{a_file}/j.db"'))
    result = _daemon("check-config", "--config", str(path))
    assert result.returncode == 2
    assert _errors(result.stderr) == [
        f"cloud.ca_file: cannot read {a_folder}: Is a directory",
        f"mqtt.tls_ca_file: cannot read {missing}: No such file or directory",
        f"journal.path: {a_file} is not a folder",
    ]


def test_check_config_refuses_a_client_certificate_without_its_key(
    tmp_path: Path, fleet_pki: FleetPki
) -> None:
    cert = fleet_pki.ca.issue("loja-1")
    other = fleet_pki.ca.issue("loja-2")
    path = _config(
        tmp_path,
        f'[mqtt]\ntls_ca_file = "{fleet_pki.ca.ca_file}"\n'
        f'tls_cert_file = "{cert.cert_file}"\ntls_key_file = "{other.key_file}"\n',
    )
    result = _daemon("check-config", "--config", str(path))
    assert result.returncode == 2
    assert _errors(result.stderr) == [
        f"mqtt.tls_key_file: {other.key_file} is not the key of mqtt.tls_cert_file {cert.cert_file}"
    ]


def test_check_config_accepts_usable_tls_files(tmp_path: Path, fleet_pki: FleetPki) -> None:
    cert = fleet_pki.ca.issue("loja-1")
    path = _config(
        tmp_path,
        f'[mqtt]\ntls_ca_file = "{fleet_pki.ca.ca_file}"\n'
        f'tls_cert_file = "{cert.cert_file}"\ntls_key_file = "{cert.key_file}"\n'
        f'[cloud]\nbase_url = "https://cloud.example.invalid"\n'
        f'ca_file = "{fleet_pki.ca.ca_file}"\n',
    )
    result = _daemon("check-config", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("config OK")
    assert not (tmp_path / "journal.db").exists(), "a check touches nothing"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file whatever its mode")
def test_check_config_refuses_a_key_the_user_cannot_read(
    tmp_path: Path, fleet_pki: FleetPki
) -> None:
    cert = fleet_pki.ca.issue("loja-1")
    cert.key_file.chmod(0o000)
    path = _config(
        tmp_path,
        f'[mqtt]\ntls_cert_file = "{cert.cert_file}"\ntls_key_file = "{cert.key_file}"\n',
    )
    result = _daemon("check-config", "--config", str(path))
    assert result.returncode == 2
    assert _errors(result.stderr) == [
        f"mqtt.tls_key_file: cannot read {cert.key_file}: Permission denied"
    ]


def test_run_refuses_an_unusable_cloud_ca_file_instead_of_crashing(tmp_path: Path) -> None:
    # It used to die in httpx with a traceback and exit 1, which systemd restarts
    # forever: a loop of "No such file or directory" that names no file.
    not_pem = tmp_path / "cloud-ca.pem"
    not_pem.write_text("not a certificate\n")
    path = _config(
        tmp_path,
        f'[cloud]\nbase_url = "https://cloud.example.invalid"\nca_file = "{not_pem}"\n',
    )
    result = _daemon("run", "--config", str(path))
    assert result.returncode == 2
    assert _errors(result.stderr) == [f"cloud.ca_file: no PEM CA certificate in {not_pem}"]
    assert not (tmp_path / "journal.db").exists(), "an invalid config must touch nothing"


@pytest.mark.parametrize(
    ("prefix", "message"),
    [
        ("metalav/+/v1", "must not contain the MQTT wildcards '+' or '#' (nor NUL)"),
        ("metalav/#", "must not contain the MQTT wildcards '+' or '#' (nor NUL)"),
        ("", "must be topic levels separated by single '/', e.g. metalav/v1"),
        ("/metalav/v1", "must be topic levels separated by single '/', e.g. metalav/v1"),
        ("metalav//v1", "must be topic levels separated by single '/', e.g. metalav/v1"),
    ],
)
def test_check_config_refuses_a_topic_prefix_with_wildcards_or_empty_levels(
    tmp_path: Path, prefix: str, message: str
) -> None:
    path = _config(tmp_path, f'[mqtt]\ntopic_prefix = "{prefix}"\n')
    result = _daemon("check-config", "--config", str(path))
    assert result.returncode == 2
    assert _errors(result.stderr) == [f"mqtt.topic_prefix: {message}"]


def test_check_config_refuses_a_client_key_without_a_certificate(tmp_path: Path) -> None:
    path = _config(tmp_path, '[mqtt]\ntls_key_file = "/etc/metalav/gw.key"\n')
    result = _daemon("check-config", "--config", str(path))
    assert result.returncode == 2
    assert _errors(result.stderr) == ["mqtt.tls_key_file: is set without tls_cert_file"]


def test_check_config_only_warns_about_a_serial_port_that_is_not_there_now(
    tmp_path: Path,
) -> None:
    # A board plugged in after the install is normal: the daemon waits for its port.
    port = tmp_path / "ttyACM9"
    result = _daemon(
        "check-config", "--config", str(_config(tmp_path, f'[board]\nport = "{port}"\n'))
    )
    assert result.returncode == 0
    assert result.stderr.splitlines() == [
        f"warning: board.port: {port} does not exist now (board unplugged?); "
        "the daemon waits for it"
    ]
    assert result.stdout.startswith("config OK")
