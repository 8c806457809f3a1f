"""gateway.reload (what a SIGHUP applies live) and gateway.credentials (secrets from
systemd's LoadCredential=), on real config files."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloud_sync.signing import generate_demo_keypair
from devtools.stack import demo_config
from gateway.config import ConfigError, load_config
from gateway.reload import LIVE_KEYS, plan_reload

_, PUBLIC_KEY = generate_demo_keypair()


def _config(tmp_path: Path, name: str, **sections: dict[str, object]) -> Path:
    # One health port for every file here: demo_config picks a free one per file.
    sections.setdefault("health", {"port": 19464})
    path = tmp_path / name
    path.write_text(
        demo_config(
            tmp_path,
            gateway_id="gw-1",
            mqtt_port=1883,
            public_key_pem=PUBLIC_KEY,
            board_port=tmp_path / "board",
            sections=sections,
        )
    )
    return path


def test_live_keys_are_applied_and_the_rest_named_for_a_restart(tmp_path: Path) -> None:
    running = load_config(_config(tmp_path, "a.toml"))
    new = load_config(
        _config(
            tmp_path,
            "b.toml",
            outbox={"warn_depth": 50, "backoff_max_s": 5.0},
            breakers={"failure_threshold": 9},
            logging={"level": "DEBUG"},
            cloud={"token": "s3cret"},
        )
    )
    plan = plan_reload(running, new)
    assert plan.live == {
        "breakers.failure_threshold": (running.breakers.failure_threshold, 9),
        "logging.level": (None, "DEBUG"),
        "outbox.warn_depth": (100, 50),
    }
    # Named, never valued (the token is a secret), and not applied.
    assert plan.restart == ["cloud.token", "outbox.backoff_max_s"]
    assert plan.config.outbox.warn_depth == 50 and plan.config.breakers.failure_threshold == 9
    assert plan.config.outbox.backoff_max_s == running.outbox.backoff_max_s
    assert plan.config.cloud.token is None
    assert set(plan.live) <= LIVE_KEYS


def test_an_unchanged_file_plans_nothing(tmp_path: Path) -> None:
    config = load_config(_config(tmp_path, "a.toml"))
    plan = plan_reload(config, load_config(_config(tmp_path, "b.toml")))
    assert not plan.live and not plan.restart and plan.config is config


def test_credentials_directory_supplies_the_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt-password").write_text("s3cret\n")
    (creds / "mqtt-client-key").write_text("\n")  # the unit's blank default: not set
    (creds / "cloud-token").write_text("tok")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    config = load_config(_config(tmp_path, "a.toml", cloud={"token": "from-the-file"}))
    assert config.mqtt.password == "s3cret"
    assert config.mqtt.tls_key_file is None
    assert config.cloud.token == "tok"  # the credential wins over the file
    (creds / "mqtt-client-key").write_text("-----BEGIN PRIVATE KEY-----\n")
    # The key comes from the credential, the certificate from the config (a key alone
    # is a config error: tests/gateway/test_check_config_files.py).
    monkeypatch.setenv("METALAV_MQTT__TLS_CERT_FILE", str(tmp_path / "gateway.crt"))
    with_key = load_config(_config(tmp_path, "b.toml"))
    assert with_key.mqtt.tls_key_file == creds / "mqtt-client-key"


def test_an_unreadable_credential_is_a_config_error_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt-password").mkdir()  # not a file: cannot be read
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    with pytest.raises(ConfigError) as exc:
        load_config(_config(tmp_path, "a.toml"))
    assert exc.value.lines == [
        f"credential mqtt-password (mqtt.password): cannot read {creds / 'mqtt-password'}:"
        " Is a directory"
    ]
