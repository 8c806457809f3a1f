"""Gateway configuration: a TOML file, overridable by ``METALAV_*`` environment variables.

Every key has an embedded default except the ones that are the store's own (its
gateway id, the cloud's public key and the machine catalog); ``config.example.toml``
documents each key. Nested keys are overridden with a double underscore, e.g.
``METALAV_MQTT__HOST=broker.example``. Secrets come from systemd's credentials
(``LoadCredential=``, ``gateway/credentials.py``), not from the TOML file.

An invalid configuration is reported as one line per problem, naming the key, and the
daemon stops before it touches the journal, the board or the network.

What a component owns is written there once and only used here: the ``[mqtt]`` section
is the session's own model (``cloud_sync.mqtt_session.MqttSettings``), and the other
sections take their defaults and limits from the drivers, the dispatcher, the breakers
and the verifier, and ask the drivers' own checks, so ``check-config`` refuses what the
daemon would.
"""

from __future__ import annotations

import hashlib
import os
import re
import ssl
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from cloud_sync import breaker, dispatcher, https_client
from cloud_sync.commands import LEEWAY_S, SUPPORTED_ALGORITHMS, Algorithm, CommandVerifier
from cloud_sync.mqtt_session import MqttSettings
from cloud_sync.mqtt_tls import MqttTlsError, client_tls_context
from firmware_bridge import modbus_limits, serial_board
from firmware_bridge.driver import (
    MAX_CHANNELS,
    MAX_EDGE_MS,
    MAX_HOLD_MS,
    MAX_INPUTS,
    MAX_PULSES,
    MIN_EDGE_MS,
    MIN_HOLD_MS,
    LevelHold,
    PulseTrain,
)
from firmware_bridge.gpio_board import check_lines
from firmware_bridge.host_timed import check_channels

from .credentials import CredentialError, apply_credentials
from .profiles import DEFAULT_GROUPS, Profile

__all__ = [
    "ConfigError",
    "GatewayConfig",
    "config_from_dict",
    "config_version",
    "file_problems",
    "file_warnings",
    "load_config",
]

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ConfigError(Exception):
    """The configuration cannot be used; ``lines`` holds one message per problem."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


def _identifier(v: str) -> str:
    if not _ID.match(v):
        raise ValueError("must be 1-64 characters of letters, digits, '.', '_' or '-'")
    return v


# Gateway and machine ids travel in MQTT topics and in commands: keep them plain.
Identifier = Annotated[str, AfterValidator(_identifier)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GatewaySection(_Section):
    id: Identifier = Field(
        description="this gateway's id: the MQTT client id and the commands' audience"
    )
    store_id: str = Field(default="", description="condominio_id of the store (Loja)")


class JournalSection(_Section):
    path: Path = Path("/var/lib/metalav/journal.db")
    # The audit log (operation records) and refused commands, pruned daily by age;
    # an operation record not yet delivered to the cloud is kept.
    records_retention_days: int = Field(default=365, ge=1, le=3650)


class CommandsSection(_Section):
    public_keys: list[str] = Field(min_length=1, description="PEM public keys of the cloud signer")
    algorithms: list[Algorithm] = list(SUPPORTED_ALGORITHMS)
    leeway_s: int = Field(default=LEEWAY_S, ge=0, le=600)

    @model_validator(mode="after")
    def _keys_usable(self) -> CommandsSection:
        # The verifier's own checks: a key the daemon could not use is a config error
        # now, not a crash at start-up.
        CommandVerifier(self.public_keys, "config-check", algorithms=self.algorithms)
        return self


class ModbusSettings(_Section):
    unit_id: int = Field(default=1, ge=1, le=modbus_limits.MAX_UNIT_ID)
    channels: int = Field(default=8, ge=1, le=MAX_CHANNELS)
    inputs: int = Field(default=8, ge=0, le=MAX_INPUTS)
    coil_offset: int = Field(default=0, ge=0)
    input_offset: int = Field(default=0, ge=0)
    relay_sense_offset: int | None = Field(default=None, ge=0)
    timeout_s: float = Field(default=modbus_limits.TIMEOUT_S, gt=0, le=10)


class GpioSettings(_Section):
    chip: str = "/dev/gpiochip0"
    outputs: dict[int, int] = Field(default_factory=dict, description="relay channel -> line")
    inputs: dict[int, int] = Field(default_factory=dict, description="input number -> line")


class BoardSection(_Section):
    driver: Literal["serial", "modbus", "gpio"] = "serial"
    port: str = "/dev/ttyACM0"
    baudrate: int = Field(default=115200, gt=0)
    # The serial board's defaults are its protocol's (docs/firmware-protocol.md).
    ack_timeout_s: float = Field(default=serial_board.ACK_TIMEOUT, gt=0, le=10)
    max_retries: int = Field(default=serial_board.MAX_RETRIES, ge=0, le=20)
    reconnect_s: float = Field(default=2.0, gt=0)
    # Inputs (busy signals, sensed relay contacts) are sampled this often.
    poll_ms: int = Field(default=100, ge=20, le=5000)
    health_ping_s: float = Field(default=5.0, gt=0)
    modbus: ModbusSettings = ModbusSettings()
    gpio: GpioSettings = GpioSettings()


class CloudSection(_Section):
    """The cloud's HTTPS API: the fallback and bulk path for events, and the
    compensation endpoint. Without base_url, events go over MQTT only."""

    base_url: str | None = None
    # Bearer token of this gateway; set it through METALAV_CLOUD__TOKEN.
    token: str | None = None
    timeout_s: float = Field(default=https_client.TIMEOUT_S, gt=0, le=120)
    ca_file: Path | None = None

    @field_validator("base_url")
    @classmethod
    def _https(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("https://", "http://127.0.0.1", "http://localhost")):
            raise ValueError("must be an https:// URL (plain http only to localhost)")
        return v


class OutboxSection(_Section):
    # The dispatcher's defaults (cloud_sync.dispatcher says what each one is).
    max_attempts: int = Field(default=dispatcher.MAX_ATTEMPTS, ge=1, le=1000)
    sending_timeout_s: float = Field(default=dispatcher.SENDING_TIMEOUT_S, gt=0)
    batch_size: int = Field(default=dispatcher.BATCH_SIZE, ge=1, le=10_000)
    backoff_base_s: float = Field(default=dispatcher.BACKOFF_BASE_S, gt=0)
    backoff_max_s: float = Field(default=dispatcher.BACKOFF_MAX_S, gt=0)
    https_bulk_threshold: int = Field(default=dispatcher.HTTPS_BULK_THRESHOLD, ge=1)
    # The integrations runbook: pending under 100 normal, 100-500 alert, over 500 critical.
    warn_depth: int = Field(default=100, ge=1)
    critical_depth: int = Field(default=500, ge=1)
    # Sent events and finished executions older than this are pruned daily.
    retention_days: int = Field(default=30, ge=1, le=3650)
    # DLQ items a technician archived (metalavctl dlq archive), pruned daily by age
    # (the integrations runbook keeps them 90 days). Dead items are never pruned.
    archived_retention_days: int = Field(default=90, ge=1, le=3650)


class BreakerSection(_Section):
    failure_threshold: int = Field(default=breaker.FAILURE_THRESHOLD, ge=1, le=1000)
    reset_timeout_s: float = Field(default=breaker.RESET_TIMEOUT_S, gt=0)


class LoggingSection(_Section):
    # Unset: METALAV_LOG_LEVEL, else INFO. Changes live on SIGHUP (gateway/reload.py).
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] | None = None


class ApiSection(_Section):
    socket: Path = Path("/run/metalav/metalav.sock")


_GROUP = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")


def _group_name(v: str) -> str:
    if not _GROUP.match(v):
        raise ValueError("must be a Linux group name (lowercase letters, digits, '_', '-')")
    return v


GroupName = Annotated[str, AfterValidator(_group_name)]


class ProfilesSection(_Section):
    """OS groups that give each permission profile of metalavctl (gateway/profiles.py);
    root is always Gestor."""

    read_group: GroupName = DEFAULT_GROUPS[Profile.LEITURA]
    operation_group: GroupName = DEFAULT_GROUPS[Profile.OPERACAO]
    manager_group: GroupName = DEFAULT_GROUPS[Profile.GESTOR]


class BackupSection(_Section):
    """The daemon's daily journal backup (gateway/backup.py)."""

    enabled: bool = True
    # Default: a "backups" folder beside the journal.
    dir: Path | None = None
    # How many daily backups are kept; older ones are deleted.
    keep: int = Field(default=7, ge=1, le=365)
    interval_h: float = Field(default=24.0, ge=1, le=24 * 7)
class HealthSection(_Section):
    """``/health``, ``/health/detailed`` and ``/metrics`` on loopback (gateway/health.py),
    and the retained heartbeat. Thresholds: the integrations runbook's SLA table (outbox
    depth: ``[outbox]`` warn_depth / critical_depth)."""

    host: str = "127.0.0.1"
    # 0 turns the health and metrics site off.
    port: int = Field(default=9464, ge=0, le=65535)
    heartbeat_s: float = Field(default=60.0, ge=1, le=3600)
    dlq_alert: int = Field(default=10, ge=1)
    dlq_critical: int = Field(default=50, ge=1)
    oldest_alert_s: float = Field(default=30.0, gt=0)
    oldest_critical_s: float = Field(default=60.0, gt=0)
    journal_latency_alert_ms: float = Field(default=50.0, gt=0)
    journal_latency_critical_ms: float = Field(default=100.0, gt=0)
    disk_free_alert_mb: float = Field(default=512.0, ge=0)
    disk_free_critical_mb: float = Field(default=128.0, ge=0)
    # Signature failures in a row within the window: "possible key rotation problem".
    signature_failures_alert: int = Field(default=3, ge=1)
    signature_window_s: float = Field(default=600.0, gt=0)

    @model_validator(mode="after")
    def _alert_before_critical(self) -> HealthSection:
        for alert, critical, worse in (
            ("dlq_alert", "dlq_critical", "above"),
            ("oldest_alert_s", "oldest_critical_s", "above"),
            ("journal_latency_alert_ms", "journal_latency_critical_ms", "above"),
            ("disk_free_alert_mb", "disk_free_critical_mb", "below"),
        ):
            a, c = getattr(self, alert), getattr(self, critical)
            if (a > c) if worse == "above" else (a < c):
                raise _error_at(
                    (alert,),
                    f"must be {'at most' if worse == 'above' else 'at least'} {critical} ({c})",
                )
        return self


class ClockSection(_Section):
    """Clock sanity (gateway/clock.py). ``kernel``: ask adjtimex(2) whether NTP
    synchronised the clock, and read token times leniently while it has not; ``off``:
    trust the clock (a box with a real-time clock, a development machine)."""

    sync_check: Literal["kernel", "off"] = "kernel"
    jump_threshold_s: float = Field(default=5.0, gt=0)
    unsynced_alert_after_s: float = Field(default=300.0, ge=0)
    check_every_s: float = Field(default=5.0, gt=0, le=300)


# The limits are the drivers' (firmware_bridge.driver, the board's bad_params): a
# program the config accepts is one every driver runs.
class PulseProgram(_Section):
    """Coin emulation: ``pulses`` closures (Alliance controls count 15-130 ms as a coin)."""

    type: Literal["pulses"] = "pulses"
    pulses: int = Field(ge=1, le=MAX_PULSES)
    on_ms: int = Field(default=100, ge=MIN_EDGE_MS, le=MAX_EDGE_MS)
    off_ms: int = Field(default=100, ge=MIN_EDGE_MS, le=MAX_EDGE_MS)

    def train(self) -> PulseTrain:
        return PulseTrain(self.pulses, self.on_ms, self.off_ms)


class LevelProgram(_Section):
    """An "enable start" input held closed for ``hold_ms``."""

    type: Literal["level"]
    hold_ms: int = Field(ge=MIN_HOLD_MS, le=MAX_HOLD_MS)

    def train(self) -> LevelHold:
        return LevelHold(self.hold_ms)


class DryerTimeProgram(_Section):
    """Dryer time credit: ``minutes`` bought, ``minutes_per_pulse`` per coin pulse,
    at least ``min_pulses``; ``top_up`` lets it be bought again while the dryer runs."""

    type: Literal["dryer_time"]
    minutes: int = Field(ge=1, le=240)
    minutes_per_pulse: int = Field(ge=1, le=60)
    min_pulses: int = Field(default=1, ge=1, le=MAX_PULSES)
    on_ms: int = Field(default=100, ge=MIN_EDGE_MS, le=MAX_EDGE_MS)
    off_ms: int = Field(default=100, ge=MIN_EDGE_MS, le=MAX_EDGE_MS)
    top_up: bool = False

    @property
    def pulses(self) -> int:
        return max(self.min_pulses, -(-self.minutes // self.minutes_per_pulse))

    def train(self) -> PulseTrain:
        return PulseTrain(self.pulses, self.on_ms, self.off_ms)

    @model_validator(mode="after")
    def _fits(self) -> DryerTimeProgram:
        if self.pulses > MAX_PULSES:
            raise ValueError(f"{self.pulses} pulses needed, at most {MAX_PULSES} in one train")
        return self


def _program_type(value: Any) -> str:
    # "type" may be left out for the common case, a coin-pulse train.
    if isinstance(value, dict):
        return str(value.get("type", "pulses"))
    return str(getattr(value, "type", "pulses"))


CycleProgram = Annotated[
    Annotated[PulseProgram, Tag("pulses")]
    | Annotated[LevelProgram, Tag("level")]
    | Annotated[DryerTimeProgram, Tag("dryer_time")],
    Discriminator(_program_type),
]


class BusyInput(_Section):
    """The machine's "running" signal wired to a board input."""

    input: int = Field(ge=1, le=MAX_INPUTS)
    active: Literal["high", "low"] = "high"
    debounce_ms: int = Field(default=200, ge=0, le=10_000)


class Machine(_Section):
    id: Identifier
    label: str = ""
    kind: Literal["washer", "dryer"]
    channel: int = Field(ge=1, le=MAX_CHANNELS)
    polarity: Literal["active_high", "active_low"] = "active_high"
    busy_input: BusyInput | None = None
    # After the release, the machine must report busy within this window, else
    # not_started (alert + compensation event). Only with a busy_input.
    confirm_window_s: float = Field(default=60.0, gt=0, le=3600)
    # A start seen this long after the window still corrects not_started -> started.
    late_start_grace_s: float = Field(default=600.0, ge=0, le=86400)
    cycles: dict[str, CycleProgram] = Field(min_length=1)


class GatewayConfig(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="METALAV_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    gateway: GatewaySection
    journal: JournalSection = JournalSection()
    # The session's own model (cloud_sync), so check-config refuses what it would.
    mqtt: MqttSettings = MqttSettings()
    commands: CommandsSection
    board: BoardSection = BoardSection()
    cloud: CloudSection = CloudSection()
    outbox: OutboxSection = OutboxSection()
    breakers: BreakerSection = BreakerSection()
    api: ApiSection = ApiSection()
    logging: LoggingSection = LoggingSection()
    profiles: ProfilesSection = ProfilesSection()
    backup: BackupSection = BackupSection()
    health: HealthSection = HealthSection()
    clock: ClockSection = ClockSection()
    machines: list[Machine] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_machines(self) -> GatewayConfig:
        seen_ids: set[str] = set()
        seen_channels: set[int] = set()
        for m in self.machines:
            if m.id in seen_ids:
                raise ValueError(f"machine id {m.id!r} is used twice")
            if m.channel in seen_channels:
                raise ValueError(f"relay channel {m.channel} is used by two machines")
            seen_ids.add(m.id)
            seen_channels.add(m.channel)
        inputs = [m.busy_input.input for m in self.machines if m.busy_input]
        if len(inputs) != len(set(inputs)):
            raise ValueError("a busy input is used by two machines")
        if self.board.driver == "gpio":
            gpio = self.board.gpio
            for m in self.machines:
                if m.channel not in gpio.outputs:
                    raise ValueError(
                        f"machine {m.id}: channel {m.channel} has no board.gpio.outputs line"
                    )
                if m.busy_input and m.busy_input.input not in gpio.inputs:
                    raise ValueError(
                        f"machine {m.id}: input {m.busy_input.input} has no board.gpio.inputs line"
                    )
        return self

    @model_validator(mode="after")
    def _board_takes_the_wiring(self) -> GatewayConfig:
        # The driver's own checks, which it would make at start-up: asked here too, so
        # that check-config refuses what the daemon would, under the key at fault.
        board = self.board
        try:
            if board.driver == "gpio":
                key: tuple[str, ...] = ("board", "gpio")
                check_lines(board.gpio.outputs, board.gpio.inputs)
                check_channels(len(board.gpio.outputs), self.active_low_channels)
            elif board.driver == "modbus":
                key = ("board", "modbus", "channels")
                check_channels(board.modbus.channels, self.active_low_channels)
        except ValueError as exc:
            raise _error_at(key, str(exc)) from None
        return self

    @property
    def active_low_channels(self) -> frozenset[int]:
        """Relay channels whose machine is wired active-low (the driver inverts them)."""
        return frozenset(m.channel for m in self.machines if m.polarity == "active_low")

    def machine(self, machine_id: str) -> Machine | None:
        return next((m for m in self.machines if m.id == machine_id), None)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment wins over the file, so a deployment can override one key
        # (or inject a secret) without editing the TOML.
        return (env_settings, init_settings)


def _error_at(loc: tuple[str, ...], message: str) -> ValidationError:
    """A validation error under ``loc`` (a model validator's own errors would name only
    the model), so that the line names the key at fault."""
    return ValidationError.from_exception_data(
        "GatewayConfig",
        [InitErrorDetails(type=PydanticCustomError("value_error", message), loc=loc, input=None)],
    )


def _format_errors(exc: ValidationError) -> list[str]:
    lines = []
    for err in exc.errors():
        key = ""
        for part in err["loc"]:
            key += f"[{part}]" if isinstance(part, int) else f".{part}" if key else str(part)
        key = key or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{key}: {msg}")
    return lines


def config_from_dict(data: dict[str, Any]) -> GatewayConfig:
    try:
        return GatewayConfig(**data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc)) from None


def load_config(path: Path) -> GatewayConfig:
    """Read and validate the config file; raise ConfigError with one line per problem."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read config file: {exc.strerror}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: config file is not UTF-8 text"]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None
    # Relative paths in the file are relative to the file, not to the daemon's cwd.
    for section, key in (("journal", "path"), ("api", "socket"), ("backup", "dir")):
        value = data.get(section, {}).get(key) if isinstance(data.get(section), dict) else None
        if isinstance(value, str) and not Path(value).is_absolute():
            data[section][key] = str(path.parent / value)
    # Secrets systemd hands over (LoadCredential=, gateway/credentials.py).
    try:
        apply_credentials(data, os.environ.get("CREDENTIALS_DIRECTORY"))
    except CredentialError as exc:
        raise ConfigError([str(exc)]) from None
    return config_from_dict(data)


def config_version(config: GatewayConfig) -> str:
    """The version of the config a gateway runs under, for the operation record and
    the heartbeat: a digest of the effective settings (file, defaults and environment
    overrides alike), so two gateways with the same settings report the same version."""
    digest = hashlib.sha256(config.model_dump_json().encode()).hexdigest()
    return f"sha256:{digest[:16]}"
def file_problems(config: GatewayConfig, *, read_once_only: bool = False) -> list[str]:
    """The files the config names that cannot be used, one line per problem naming the
    key: ``metalav-gateway check-config`` refuses them (exit 2). Checked as the user
    who runs the check, so run it as the service's user to check the permissions too.

    Values from systemd's credentials are already in ``config`` (``load_config``), so a
    credential handed over as a file is checked like any other path.

    ``read_once_only``: only the files the daemon reads once, at start, and cannot run
    without (``cloud.ca_file``): ``run`` refuses those rather than die on them. The
    MQTT TLS files are read again at every connect (a renewed certificate is picked
    up), so ``run`` names them at each failed attempt and keeps trying; the journal's
    folder is created by the daemon itself."""
    problems: list[str] = []
    cloud_ca = config.cloud.ca_file
    if cloud_ca is not None:
        try:
            cloud_ca.read_bytes()
            ssl.create_default_context(cafile=str(cloud_ca))
        except ssl.SSLError:
            problems.append(f"cloud.ca_file: no PEM CA certificate in {cloud_ca}")
        except OSError as exc:
            problems.append(f"cloud.ca_file: cannot read {cloud_ca}: {exc.strerror or exc}")
    if read_once_only:
        return problems
    mqtt = config.mqtt
    if mqtt.tls_ca_file or mqtt.tls_cert_file:
        # The session's own loader: check-config refuses exactly what it would.
        try:
            client_tls_context(mqtt.tls_ca_file, mqtt.tls_cert_file, mqtt.tls_key_file)
        except MqttTlsError as exc:
            problems.append(str(exc))
    problem = _journal_problem(config.journal.path)
    if problem:
        problems.append(f"journal.path: {problem}")
    return problems


def file_warnings(config: GatewayConfig) -> list[str]:
    """What ``check-config`` mentions without refusing: a serial port that is not there
    now. The board may be plugged in after the install, and the daemon reopens the port
    every ``board.reconnect_s`` until it is; a typo in the path shows here too."""
    board = config.board
    if board.driver == "gpio" or os.path.exists(board.port):
        return []
    return [
        f"board.port: {board.port} does not exist now (board unplugged?); the daemon waits for it"
    ]


def _journal_problem(path: Path) -> str | None:
    if path.exists():
        if not path.is_file():
            return f"{path} is not a file"
        if not os.access(path, os.R_OK | os.W_OK):
            return f"cannot read and write {path}"
    folder = path.parent
    while not folder.exists():  # the daemon creates the missing folders
        folder = folder.parent
    if not folder.is_dir():
        return f"{folder} is not a folder"
    if not os.access(folder, os.W_OK | os.X_OK):
        # SQLite writes its -wal and -shm files beside the journal.
        return f"cannot create files in {folder} (for {path.name} and its WAL)"
    return None
