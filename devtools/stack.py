"""A whole store on one machine, from real processes: the simulated board on a pty, the
daemon, and a stand-in for the cloud that signs commands and collects results.

The demo, the end-to-end tests and the benchmarks all build on this, so each of them
exercises the daemon exactly as it runs in a store (separate process, real serial
pty, real MQTT broker, real SQLite file).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import tomllib
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from cloud_sync.signing import generate_demo_keypair, sign_command

from .broker import free_port

__all__ = [
    "CloudStandIn",
    "DaemonProcess",
    "SimulatorProcess",
    "demo_config",
    "DEMO_MACHINES",
]

DEMO_MACHINES = [
    {
        "id": "W1",
        "label": "Lavadora 1",
        "kind": "washer",
        "channel": 1,
        "cycles": {"normal": {"pulses": 1}, "pesado": {"pulses": 2}},
    },
    {
        "id": "W2",
        "label": "Lavadora 2",
        "kind": "washer",
        "channel": 2,
        "cycles": {"normal": {"pulses": 1}, "pesado": {"pulses": 2}},
    },
    {
        "id": "D1",
        "label": "Secadora 1",
        "kind": "dryer",
        "channel": 3,
        "cycles": {"normal": {"pulses": 3}},
    },
    {
        "id": "D2",
        "label": "Secadora 2",
        "kind": "dryer",
        "channel": 4,
        "cycles": {"normal": {"pulses": 3}},
    },
]


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    return json.dumps(str(v))  # a JSON string is a valid TOML basic string


def demo_config(
    workdir: Path,
    *,
    gateway_id: str,
    mqtt_port: int,
    public_key_pem: str,
    board_port: Path,
    machines: list[dict[str, Any]] | None = None,
    board: dict[str, Any] | None = None,
    sections: dict[str, dict[str, Any]] | None = None,
    journal_path: Path | None = None,
) -> str:
    """The smallest config a store needs: everything else is the embedded defaults."""
    lines = [
        "[gateway]",
        f"id = {_toml_value(gateway_id)}",
        'store_id = "loja-demo"',
        "[journal]",
        f"path = {_toml_value(journal_path or workdir / 'journal.db')}",
        "[mqtt]",
        'host = "127.0.0.1"',
        f"port = {mqtt_port}",
        "reconnect_min_s = 0.2",
        "reconnect_max_s = 2.0",
        "[commands]",
        f"public_keys = [{_toml_value(public_key_pem)}]",
        "[board]",
        f"port = {_toml_value(board_port)}",
        *(f"{k} = {_toml_value(v)}" for k, v in {"reconnect_s": 0.3, **(board or {})}.items()),
        "[api]",
        f"socket = {_toml_value(workdir / 'metalav.sock')}",
    ]
    sections = dict(sections or {})
    # A free loopback port for /health and /metrics (several daemons run at once), and a
    # trusted clock: a development machine's kernel may say "not synchronised".
    sections["health"] = {"port": free_port(), **sections.get("health", {})}
    sections["clock"] = {"sync_check": "off", **sections.get("clock", {})}
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    for m in machines or DEMO_MACHINES:
        lines.append("[[machines]]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in m.items()]
    return "\n".join(lines) + "\n"


class SimulatorProcess:
    """``python -m firmware_bridge.simulator`` with a stable symlink to its pty."""

    def __init__(self, workdir: Path, *extra_args: str) -> None:
        self.link = workdir / "board"
        self.actuations = workdir / "actuations.jsonl"
        self.stderr_path = workdir / "simulator.log"
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        with open(self.stderr_path, "a") as err:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "firmware_bridge.simulator",
                    "--actuations",
                    str(self.actuations),
                    "--link",
                    str(self.link),
                    *self.extra_args,
                ],
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                start_new_session=True,
            )
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline()
        if not first.startswith("PTY "):
            self.stop()
            raise RuntimeError(f"simulator did not start: {first!r}; see {self.stderr_path}")

    def reboot(self) -> None:
        """A board reset: new boot id, de-duplication ring cleared."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)
        time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def actuation_records(self) -> list[dict[str, Any]]:
        if not self.actuations.exists():
            return []
        return [json.loads(line) for line in self.actuations.read_text().splitlines() if line]


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("gateway", timeout=2.0)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class DaemonProcess:
    """``metalav-gateway run`` as a child process, with its local API at hand."""

    def __init__(self, workdir: Path, config_path: Path, env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.config_path = config_path
        self.socket = workdir / "metalav.sock"
        self.log_path = workdir / "daemon.log"
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        health = tomllib.loads(config_path.read_text()).get("health", {})
        #: Where /health, /health/detailed and /metrics answer (None: turned off).
        self.health_url = (
            f"http://127.0.0.1:{health['port']}" if health.get("port") else None
        )

    def start(self, **extra_env: str) -> None:
        env = {**os.environ, **self.env, **extra_env}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway.daemon", "run", "--config", str(self.config_path)],
                stdout=log,
                stderr=log,
                env=env,
                start_new_session=True,
            )

    def _get(self, path: str) -> tuple[int, Any]:
        # http.client rather than httpx here: httpcore leaks the socket when a unix
        # connection is refused (a killed daemon's stale socket), and the tests run
        # with ResourceWarning as an error.
        conn = _UnixHTTPConnection(str(self.socket))
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read())
        finally:
            conn.close()

    def status(self) -> dict[str, Any] | None:
        try:
            return self._get("/v1/status")[1]  # type: ignore[no-any-return]
        except (OSError, ValueError, http.client.HTTPException):
            return None

    def execution(self, key: str) -> dict[str, Any] | None:
        code, body = self._get(f"/v1/executions/{quote(key, safe='')}")
        return None if code == 404 else body

    def wait_ready(self, timeout: float = 15.0) -> dict[str, Any]:
        """Until the daemon reports both links up."""
        deadline = time.monotonic() + timeout
        s: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log_tail()}")
            s = self.status()
            if s and s["broker"]["connected"] and s["board"]["connected"]:
                return s
            time.sleep(0.05)
        raise TimeoutError(f"daemon not ready: {s}\n{self.log_tail()}")

    def wait_exit(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def send_signal(self, sig: int) -> None:
        """E.g. ``signal.SIGHUP`` (what ``systemctl reload`` sends) or ``SIGTERM``."""
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.terminate()
        try:
            return self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


class CloudStandIn:
    """The payments app's side of MQTT: signs and publishes execute-cycle commands,
    and collects the gateway's result events."""

    def __init__(
        self,
        host: str,
        port: int,
        gateway_id: str,
        *,
        topic_prefix: str = "metalav/v1",
        private_key_pem: str | None = None,
        public_key_pem: str | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        if private_key_pem is None:
            private_key_pem, public_key_pem = generate_demo_keypair()
        self.private_key_pem = private_key_pem
        self.public_key_pem = public_key_pem or ""
        self.gateway_id = gateway_id
        base = f"{topic_prefix}/gateways/{gateway_id}"
        self.command_topic = f"{base}/commands/execute"
        self.results_topic = f"{base}/results"
        self.presence_topic = f"{base}/presence"
        self.results: list[dict[str, Any]] = []
        self.presence: list[dict[str, Any]] = []
        # Every other event stream by topic suffix: alerts, compensation, cycles.
        self.events: dict[str, list[dict[str, Any]]] = {}
        self._base = base
        self._cond = threading.Condition()
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"cloud-standin-{uuid.uuid4().hex[:8]}"
        )
        self._client.on_message = self._on_message
        if tls is not None:  # the cloud's own client certificate, on a TLS broker
            self._client.tls_set_context(tls)
        self._client.connect(host, port, keepalive=30)
        sock = self._client.socket()
        if isinstance(sock, socket.socket):  # see cloud_sync.mqtt_session._no_delay
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # One level below the gateway: results, presence, alerts, compensation, cycles
        # (commands/execute is two levels down, so the cloud's own commands stay out).
        self._client.subscribe(f"{base}/+", 1)
        self._client.loop_start()

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        try:
            data = json.loads(msg.payload)
        except ValueError:
            return
        suffix = msg.topic.removeprefix(self._base + "/")
        with self._cond:
            if suffix == "results":
                self.results.append(data)
            elif suffix == "presence":
                self.presence.append(data)
            else:
                self.events.setdefault(suffix, []).append(data)
            self._cond.notify_all()

    def events_of(self, stream: str, **match: Any) -> list[dict[str, Any]]:
        with self._cond:
            return [
                e
                for e in self.events.get(stream, [])
                if all(e.get(k) == v for k, v in match.items())
            ]

    def wait_event(self, stream: str, timeout: float = 10.0, **match: Any) -> dict[str, Any]:
        """The first event on ``stream`` (alerts, compensation, cycles) matching ``match``."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.events_of(stream, **match), timeout):
                raise TimeoutError(f"no {stream} event {match}: {self.events.get(stream)}")
            return self.events_of(stream, **match)[0]

    def sign(
        self,
        execute_key: str,
        *,
        machine_id: str = "W1",
        cycle: str = "normal",
        payment_id: str | None = None,
        ttl_s: int = 300,
        audience: str | None = None,
        now: float | None = None,
        **extra: Any,
    ) -> bytes:
        return sign_command(
            self.private_key_pem,
            execute_key=execute_key,
            audience=audience or self.gateway_id,
            payment_id=payment_id or f"pay-{execute_key}",
            machine_id=machine_id,
            cycle=cycle,
            ttl_s=ttl_s,
            now=now,
            **extra,
        )

    def publish(self, token: bytes, qos: int = 1) -> None:
        self._client.publish(self.command_topic, token, qos=qos).wait_for_publish(5)

    def results_for(self, key: str) -> list[dict[str, Any]]:
        with self._cond:
            return [r for r in self.results if r.get("execute_key") == key]

    def wait_for(
        self,
        key: str,
        *,
        state: str | None = None,
        final: bool = True,
        count: int = 1,
        timeout: float = 10.0,
    ) -> list[dict[str, Any]]:
        """Wait until ``count`` results for ``key`` match; return all results for it."""

        def matching() -> list[dict[str, Any]]:
            return [
                r
                for r in self.results
                if r.get("execute_key") == key
                and (state is None or r["state"] == state)
                and (not final or r["final"])
            ]

        with self._cond:
            if not self._cond.wait_for(lambda: len(matching()) >= count, timeout):
                raise TimeoutError(
                    f"no {state or 'final'} result for {key}: "
                    f"{[r for r in self.results if r.get('execute_key') == key]}"
                )
            return [r for r in self.results if r.get("execute_key") == key]

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()
