"""``metalav-gateway demo``: one paid cycle, end to end, on this machine, in seconds.

It starts a local broker (mosquitto, or amqtt where mosquitto is missing), the
simulated relay board on a pty, and the real daemon on its embedded defaults; then
plays the cloud: signs one execute-cycle command with a freshly generated demo key,
publishes it twice, and shows that the machine was released once, what the cloud
received, and what a technician sees with ``metalavctl``. Everything is stopped and
removed at the end (``--keep`` keeps the working folder for a look at the journal).

Harness, not product: it needs a source checkout (see ``devtools/__init__.py``);
``gateway.daemon`` imports it only for the ``demo`` command.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from cloud_sync.signing import generate_demo_keypair

from .broker import LocalBroker
from .stack import CloudStandIn, DaemonProcess, SimulatorProcess, demo_config

__all__ = ["run_demo"]

GATEWAY_ID = "loja-demo-01"


def _say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def run_demo(*, keep: bool = False) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="metalav-demo-"))
    broker = LocalBroker()
    sim = SimulatorProcess(workdir)
    daemon: DaemonProcess | None = None
    cloud: CloudStandIn | None = None
    try:
        _say(f"Starting a local MQTT broker ({broker.kind}) on 127.0.0.1:{broker.port}")
        broker.start()
        _say("Starting the simulated relay board on a pty")
        sim.start()
        private_pem, public_pem = generate_demo_keypair()
        config_path = workdir / "gateway.toml"
        config_path.write_text(
            demo_config(
                workdir,
                gateway_id=GATEWAY_ID,
                mqtt_port=broker.port,
                public_key_pem=public_pem,
                board_port=sim.link,
            )
        )
        _say(f"Starting the gateway daemon (config {config_path})")
        daemon = DaemonProcess(workdir, config_path)
        daemon.start()
        status = daemon.wait_ready()
        print(f"   board boot id {status['board']['boot_id']}, broker connected")

        cloud = CloudStandIn(
            broker.host,
            broker.port,
            GATEWAY_ID,
            private_key_pem=private_pem,
            public_key_pem=public_pem,
        )
        key = f"exec-{uuid.uuid4().hex[:12]}"
        token = cloud.sign(key, machine_id="W1", cycle="normal", payment_id="pay-demo-0001")
        _say(f"Cloud: payment confirmed, publishing execute-cycle {key} for washer W1 - twice")
        cloud.publish(token)
        cloud.publish(token)
        cloud.wait_for(key, state="released", final=True, timeout=15)
        deadline = time.monotonic() + 5
        while len(cloud.results_for(key)) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)  # the duplicate's answer follows the first command's results
        for r in cloud.results_for(key):
            print(
                f"   cloud received: state={r['state']:<9} final={r['final']!s:<5} "
                f"seq={r['seq']} event={r['event_id'][:8]}"
            )

        records = sim.actuation_records()
        _say(f"Simulated board: {len(records)} relay actuation(s)")
        for rec in records:
            print(
                f"   channel {rec['channel']}: {rec['pulse_count']} pulse(s) of {rec['on_ms']} ms "
                f"(command id {rec['command_id']})"
            )

        _say("Technician: metalavctl status")
        sock = str(daemon.socket)
        subprocess.run(
            [sys.executable, "-m", "gateway.ctl", "status", "--socket", sock], check=False
        )
        _say(f"Technician: metalavctl execution {key}")
        subprocess.run(
            [sys.executable, "-m", "gateway.ctl", "execution", key, "--socket", sock], check=False
        )

        ok = len(records) == 1
        _say(
            "Result: "
            + (
                "one payment, one release - OK"
                if ok
                else f"expected exactly 1 release, saw {len(records)} - FAILED"
            )
        )
        return 0 if ok else 1
    except Exception as exc:  # the demo explains what broke instead of a traceback
        print(f"\ndemo failed: {exc}", file=sys.stderr)
        if daemon is not None:
            print(daemon.log_tail(), file=sys.stderr)
        return 1
    finally:
        if cloud is not None:
            cloud.close()
        if daemon is not None:
            daemon.stop()
        sim.stop()
        broker.stop()
        if keep:
            print(f"\nworking folder kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
