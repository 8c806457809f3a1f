"""A throwaway MQTT broker on a loopback port, for the demo, the tests and the benchmarks.

mosquitto is used where it is installed (the product's reference broker). Where it is
not, a pure-Python broker (amqtt, the ``fallback-broker`` extra) runs in a child
process instead, so the demo works on any machine. Not shipped: production gateways
connect to the fleet's broker named in the config.
"""

from __future__ import annotations

import getpass
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["BrokerTls", "LocalBroker", "BrokerStartError", "free_port", "local_broker_kind"]


class BrokerStartError(RuntimeError):
    """The local broker could not be started."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_MOSQUITTO_CONF = """\
# mosquitto started as root drops to user "mosquitto", which could not write the
# persistence folder we own: stay the user who started it.
user {user}
listener {port} 127.0.0.1
allow_anonymous true
persistence {persistence}
persistence_location {workdir}/
max_inflight_messages 100
# Without it, Nagle plus delayed ACKs stall small MQTT packets for ~40 ms.
set_tcp_nodelay true
max_queued_messages 200000
log_dest stderr
log_type error
log_type warning
"""

# The TLS listener of a store's broker (docs/brokers/mosquitto.conf is the commented
# production version): every client shows a certificate of the CA, its common name is
# its user name (the ACL's %u) and its client id, so a gateway can neither read another
# store's topics nor take over its persistent session.
_MOSQUITTO_TLS = """\
cafile {ca_file}
certfile {cert_file}
keyfile {key_file}
require_certificate true
use_identity_as_username true
use_username_as_clientid true
allow_anonymous false
"""


@dataclass(frozen=True)
class BrokerTls:
    """A TLS listener: the broker's own certificate and key, the CA its clients'
    certificates must chain to, and optionally a mosquitto ACL file."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    acl_file: Path | None = None


_AMQTT_RUNNER = """\
import asyncio, sys
from amqtt.broker import Broker

async def main(port):
    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }
    broker = Broker(config)
    await broker.start()
    await asyncio.Event().wait()

asyncio.run(main(int(sys.argv[1])))
"""


def mosquitto_path() -> str | None:
    found = shutil.which("mosquitto")
    if found:
        return found
    # Debian installs it in /usr/sbin, which is not on every user's PATH.
    for candidate in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def _mosquitto_to_use() -> str | None:
    # METALAV_LOCAL_BROKER=amqtt forces the fallback (to test it where mosquitto exists).
    return None if os.environ.get("METALAV_LOCAL_BROKER") == "amqtt" else mosquitto_path()


def local_broker_kind() -> str:
    """Which broker LocalBroker starts here: "mosquitto" or "amqtt"."""
    return "mosquitto" if _mosquitto_to_use() else "amqtt"


class LocalBroker:
    """Start/stop a broker on ``127.0.0.1:port``; it can be stopped and started again
    on the same port (tests use that to cut the link). With ``persistence=True``
    (mosquitto only) queued messages of persistent sessions survive a restart. With
    ``tls`` (mosquitto only) the one listener is TLS with client certificates
    required, and the ACL file, if any, applies."""

    def __init__(
        self,
        port: int | None = None,
        *,
        persistence: bool = False,
        tls: BrokerTls | None = None,
    ) -> None:
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.persistence = persistence
        self.tls = tls
        self._workdir = Path(tempfile.mkdtemp(prefix="metalav-broker-"))
        self._proc: subprocess.Popen[bytes] | None = None
        self._exe = _mosquitto_to_use()
        self.kind = local_broker_kind()

    def start(self, timeout: float = 10.0) -> None:
        if self._proc is not None and self._proc.poll() is None:
            return
        if self.tls is not None and not self._exe:
            raise BrokerStartError("a TLS listener needs mosquitto (the amqtt fallback has none)")
        log = open(self._workdir / "broker.log", "ab")  # noqa: SIM115 - owned by the child
        if self._exe:
            conf = self._workdir / "mosquitto.conf"
            text = _MOSQUITTO_CONF.format(
                port=self.port,
                user=getpass.getuser(),
                workdir=self._workdir,
                persistence="true" if self.persistence else "false",
            )
            if self.tls is not None:
                text = text.replace("allow_anonymous true\n", "")
                text += _MOSQUITTO_TLS.format(
                    ca_file=self.tls.ca_file,
                    cert_file=self.tls.cert_file,
                    key_file=self.tls.key_file,
                )
                if self.tls.acl_file is not None:
                    text += f"acl_file {self.tls.acl_file}\n"
            conf.write_text(text)
            cmd = [self._exe, "-c", str(conf)]
        else:
            if importlib.util.find_spec("amqtt") is None:
                raise BrokerStartError(
                    "neither mosquitto nor amqtt is installed: "
                    "apt-get install mosquitto, or pip install 'metalav-gateway[fallback-broker]'"
                )
            cmd = [sys.executable, "-c", _AMQTT_RUNNER, str(self.port)]
        self._proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise BrokerStartError(
                    f"{self.kind} exited with {self._proc.returncode}: "
                    + (self._workdir / "broker.log").read_text(errors="replace")[-2000:]
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise BrokerStartError(f"{self.kind} did not listen on port {self.port} in {timeout}s")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> LocalBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        shutil.rmtree(self._workdir, ignore_errors=True)
