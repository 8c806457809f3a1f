"""Promise 6 for configuration: a bad config is a clear list of errors, exit 2, no
traceback, and nothing touched."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, TypeAdapter

from cloud_sync.mqtt_session import MqttSettings
from cloud_sync.signing import generate_demo_keypair
from firmware_bridge.driver import (
    MAX_EDGE_MS,
    MAX_HOLD_MS,
    MAX_PULSES,
    MIN_EDGE_MS,
    MIN_HOLD_MS,
    LevelHold,
    PulseTrain,
)
from firmware_bridge.host_timed import validate_program
from gateway.config import ConfigError, GatewayConfig, config_from_dict, load_config

KEY = generate_demo_keypair()[1].replace("\n", "\\n")
GOOD = """
[gateway]
id = "loja-1"
[journal]
path = "journal.db"
[commands]
public_keys = ["KEY"]
[[machines]]
id = "W1"
kind = "washer"
channel = 1
cycles = { normal = { pulses = 1 } }
""".replace("KEY", KEY)


def _daemon(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.daemon", *args], capture_output=True, text=True, timeout=30
    )


def test_invalid_config_stops_with_one_line_per_error_and_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        GOOD.replace('id = "loja-1"', 'id = "loja 1!"')
        .replace("channel = 1", "channel = 0")
        .replace("[journal]", "[journal]\ncolour = 'red'")
        + "[[machines]]\nid = 'W1'\nkind = 'toaster'\nchannel = 1\ncycles = {}\n"
    )
    result = _daemon("run", "--config", str(bad))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert all(line.startswith("config error: ") for line in lines)
    keys = {line.removeprefix("config error: ").split(":")[0] for line in lines}
    assert {
        "gateway.id",
        "journal.colour",
        "machines[0].channel",
        "machines[1].kind",
        "machines[1].cycles",
    } <= keys
    assert not (tmp_path / "journal.db").exists(), "an invalid config must touch nothing"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[gateway\nid=", "not valid TOML"),
        ("", "gateway: Field required"),
    ],
)
def test_unusable_config_file_is_one_clear_line(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    result = _daemon("check-config", "--config", str(path))
    assert result.returncode == 2
    assert expected in result.stderr and "Traceback" not in result.stderr


def test_missing_config_file_is_reported_not_raised(tmp_path: Path) -> None:
    result = _daemon("run", "--config", str(tmp_path / "nope.toml"))
    assert result.returncode == 2
    assert "cannot read config file" in result.stderr and "Traceback" not in result.stderr


def test_environment_overrides_a_key_and_relative_paths_follow_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "c.toml"
    path.write_text(GOOD)
    monkeypatch.setenv("METALAV_MQTT__PORT", "8883")
    monkeypatch.setenv("METALAV_MQTT__PASSWORD", "s3cret")
    config = load_config(path)
    assert config.mqtt.port == 8883 and config.mqtt.password == "s3cret"
    assert config.journal.path == tmp_path / "journal.db"

    monkeypatch.setenv("METALAV_MQTT__PORT", "not-a-port")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.lines == [
        "mqtt.port: Input should be a valid integer, unable to parse string as an integer"
    ]


def test_two_machines_on_one_relay_channel_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        GOOD + "[[machines]]\nid='W2'\nkind='washer'\nchannel=1\ncycles={normal={pulses=1}}\n"
    )
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "relay channel 1 is used by two machines" in err.value.lines[0]


def test_example_config_is_valid() -> None:
    config = load_config(Path(__file__).parents[2] / "config.example.toml")
    assert [m.id for m in config.machines] == ["W1", "W2", "W3", "W4", "D1", "D2", "D3", "D4"]


def test_example_config_spells_the_defaults_the_code_has() -> None:
    # The example restates each default for the people who install stores; it must
    # not drift from the one source. These keys show a store's own values instead.
    store_values = {
        "gateway.id",
        "gateway.store_id",
        "mqtt.host",
        "mqtt.port",
        "mqtt.username",
        "mqtt.tls_ca_file",
        "commands.public_keys",
        "cloud.base_url",
    }
    example = tomllib.loads((Path(__file__).parents[2] / "config.example.toml").read_text())
    example.pop("machines")  # the store's own catalog
    checked = 0

    def compare(model: type[BaseModel], values: dict[str, Any], prefix: str) -> None:
        nonlocal checked
        for key, value in values.items():
            field = model.model_fields[key]
            section = field.annotation
            if isinstance(section, type) and issubclass(section, BaseModel):
                compare(section, value, f"{prefix}{key}.")
            elif f"{prefix}{key}" not in store_values:
                default = TypeAdapter(field.annotation).dump_python(field.default, mode="json")
                assert default == value, f"{prefix}{key}: example {value!r}, default {default!r}"
                checked += 1

    compare(GatewayConfig, example, "")
    assert checked > 20  # not vacuous


def test_unusable_public_key_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        GOOD.replace(KEY, "-----BEGIN PUBLIC KEY-----\\nAAAA\\n-----END PUBLIC KEY-----")
    )
    result = _daemon("check-config", "--config", str(path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("config error: commands: ")


@pytest.mark.parametrize("command", ["check-config", "run"])
def test_check_config_refuses_what_the_mqtt_session_would_refuse(
    tmp_path: Path, command: str
) -> None:
    # Once check-config said OK here and `run` died with a traceback and exit 1, which
    # systemd restarts forever: the [mqtt] section is now the session's own model.
    path = tmp_path / "c.toml"
    path.write_text(GOOD + "[mqtt]\nreconnect_min_s = 90.0\nreconnect_max_s = 60.0\n")
    result = _daemon(command, "--config", str(path))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "config error: mqtt.reconnect_min_s: must not exceed reconnect_max_s"
    ]
    assert not (tmp_path / "journal.db").exists(), "an invalid config must touch nothing"


def test_mqtt_section_keys_reach_the_session_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        GOOD + '[mqtt]\nhost = "broker.example"\nport = 8883\nkeepalive_s = 45\n'
        'tls_ca_file = "/etc/metalav/ca.pem"\nreconnect_min_s = 2.0\nreconnect_max_s = 2.0\n'
    )
    mqtt = load_config(path).mqtt
    assert isinstance(mqtt, MqttSettings)
    assert (mqtt.host, mqtt.port, mqtt.keepalive_s) == ("broker.example", 8883, 45)
    assert mqtt.tls_ca_file == Path("/etc/metalav/ca.pem")
    assert mqtt.reconnect_min_s == mqtt.reconnect_max_s == 2.0


def _with_cycle(program: dict[str, object]) -> dict[str, object]:
    return {
        "gateway": {"id": "loja-1"},
        "commands": {"public_keys": [generate_demo_keypair()[1]]},
        "machines": [{"id": "W1", "kind": "washer", "channel": 1, "cycles": {"c": program}}],
    }


@pytest.mark.parametrize(
    "program",
    [
        {"pulses": n, "on_ms": on, "off_ms": off}
        for n in (0, 1, MAX_PULSES, MAX_PULSES + 1)
        for on, off in ((MIN_EDGE_MS - 1, 100), (MIN_EDGE_MS, MAX_EDGE_MS), (100, MAX_EDGE_MS + 1))
    ]
    + [{"type": "level", "hold_ms": ms} for ms in (MIN_HOLD_MS - 1, MIN_HOLD_MS, MAX_HOLD_MS + 1)]
    + [
        {"type": "dryer_time", "minutes": 60, "minutes_per_pulse": per}
        for per in (1, -(-60 // MAX_PULSES), 60)
    ],
)
def test_the_config_takes_exactly_the_cycles_every_driver_runs(program: dict[str, Any]) -> None:
    # The train each program asks for, judged by the drivers' own check.
    if program.get("type") == "level":
        train: LevelHold | PulseTrain = LevelHold(program["hold_ms"])
    elif program.get("type") == "dryer_time":
        train = PulseTrain(-(-program["minutes"] // program["minutes_per_pulse"]), 100, 100)
    else:
        train = PulseTrain(program["pulses"], program["on_ms"], program["off_ms"])
    try:
        config_from_dict(_with_cycle(program))
    except ConfigError:
        accepted = False
    else:
        accepted = True
    assert accepted == (validate_program(train) is None)


@pytest.mark.parametrize(
    ("board", "line"),
    [
        (
            '[board]\ndriver = "gpio"\n[board.gpio]\noutputs = {1 = 5, 3 = 6}\n',
            "config error: board.gpio: output channels must be 1..2, got [1, 3]",
        ),
        (
            '[board]\ndriver = "gpio"\n[board.gpio]\noutputs = {1 = 5, 2 = 6, 3 = 5}\n',
            "config error: board.gpio: a line offset is used twice",
        ),
        (
            '[board]\ndriver = "modbus"\n[board.modbus]\nchannels = 1\n',
            "config error: board.modbus.channels: active_low channels [3] not in 1..1",
        ),
    ],
)
@pytest.mark.parametrize("command", ["check-config", "run"])
def test_check_config_refuses_wiring_the_board_driver_would_refuse(
    tmp_path: Path, command: str, board: str, line: str
) -> None:
    # The drivers refuse these in their constructors: once check-config said OK and
    # `run` died with a traceback and exit 1, after creating the journal.
    path = tmp_path / "c.toml"
    w3 = "[[machines]]\nid = 'W3'\nkind = 'washer'\nchannel = 3\npolarity = 'active_low'\n"
    path.write_text(GOOD + w3 + "cycles = { normal = { pulses = 1 } }\n" + board)
    result = _daemon(command, "--config", str(path))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [line]
    assert not (tmp_path / "journal.db").exists(), "an invalid config must touch nothing"
