"""``metalav-gateway``: the daemon's entry point and its wiring, top to bottom.

    metalav-gateway run --config PATH        the service (systemd runs this)
    metalav-gateway check-config --config PATH
    metalav-gateway demo                     a self-contained demo on embedded defaults

Exit status: 0 clean stop, 2 invalid configuration or usage, 3 another daemon already
runs on this journal (see ``instance_lock``), 1 anything else. The systemd unit does not
restart on 2 or 3: neither goes away by retrying.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
import uuid
from functools import partial
from importlib.metadata import version
from pathlib import Path
from typing import Any

from cloud_sync.mqtt_session import ALERTS_TOPIC, MqttSession

from . import instance_lock
from .api import LocalApi
from .boards import build_driver
from .config import ConfigError, GatewayConfig, file_problems, file_warnings, load_config
from .core import build_core
from .journal import (
    Alert,
    Journal,
    JournalError,
    JournalFault,
    alert_event,
    iso_utc,
)
from .sync import CloudSync

__all__ = ["Daemon", "main"]

log = logging.getLogger("gateway")

EXIT_ALREADY_RUNNING = 3


class Daemon:
    """Owns every part of a running gateway; ``run`` returns when asked to stop."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.started_at = time.time()
        self.broker_connected = False
        self.broker_since: float | None = None

        # The journal first: every part below records into it.
        self.journal = Journal(config.journal.path, config.gateway.id)
        self._journal_fault: JournalFault | None = None
        self.journal.on_fault_change = self._on_journal_fault

        # The cloud side: commands in (the session takes its command sink when it
        # runs), events out through the outbox dispatcher.
        self.session = MqttSession(
            config.mqtt,
            gateway_id=config.gateway.id,
            on_link_change=self._broker_link,
        )
        self.sync = CloudSync(config, self.journal, self.session)

        # The core: message -> intake -> dispatch -> board link (gateway/core.py).
        self.core = build_core(
            config,
            self.journal,
            partial(build_driver, config),
            outbox_changed=self.sync.notify,
            publish_best_effort=self.session.publish_best_effort,
            clock=time.time,
        )

        # The technicians' side.
        self.api = LocalApi(
            config.api.socket,
            status=self.status,
            journal=self.journal,
            operator=self.core.operator,
            sync=self.sync,
        )

    def _on_journal_fault(self, fault: JournalFault | None) -> None:
        """The journal started or stopped failing to commit (disk full, I/O error).

        While it fails, the core takes no command and sends nothing new to the board;
        people must know at once, and the alert cannot wait in the outbox (that is the
        journal): it goes to the broker directly, best effort, and is journaled once
        the journal writes again."""
        if fault is not None:
            self._journal_fault = fault
            log.critical(
                "journal not writable (%s): no command is taken and no release sent until"
                " it writes again",
                fault.reason,
            )
            event = alert_event(
                self.config.gateway.id,
                Alert("journal_unwritable", "critical", detail=fault.reason[:160]),
                iso_utc(fault.since),
            )
            payload = json.dumps({"event_id": str(uuid.uuid4()), **event})
            self.session.publish_best_effort(ALERTS_TOPIC, payload.encode())
            return
        previous, self._journal_fault = self._journal_fault, None
        if previous is None:
            return
        lasted = time.time() - previous.since
        log.warning("journal writable again after %.0f s", lasted)

        def record() -> None:
            # Outside the commit that noticed the recovery.
            self.core.outcomes.journal_writable_again()
            self.core.outcomes.raise_alert(
                Alert(
                    "journal_writable_again",
                    "warning",
                    detail=f"not writable for {lasted:.0f} s: {previous.reason}"[:160],
                )
            )

        asyncio.get_running_loop().call_soon(record)

    def _broker_link(self, up: bool) -> None:
        self.broker_connected = up
        self.broker_since = time.time()
        log.log(logging.INFO if up else logging.WARNING, "broker link %s", "up" if up else "down")

    def status(self) -> dict[str, Any]:
        link = self.core.link.state
        return {
            "daemon": {
                "up": True,
                "pid": os.getpid(),
                "version": version("metalav-gateway"),
                "started_at": self.started_at,
                "gateway_id": self.config.gateway.id,
                "store_id": self.config.gateway.store_id,
            },
            "broker": {
                "connected": self.broker_connected,
                "host": self.config.mqtt.host,
                "port": self.config.mqtt.port,
                "since": self.broker_since,
            },
            "board": {
                "connected": link.connected,
                "port": link.port,
                "boot_id": None if link.boot_id is None else f"{link.boot_id:08x}",
                "last_error": link.last_error,
                "since": link.since or None,
            },
            "journal": {
                "writable": (fault := self.journal.fault) is None,
                "error": None if fault is None else fault.reason,
                "since": None if fault is None else fault.since,
                "path": str(self.config.journal.path),
            },
            "executions": self.journal.counts_by_state(),
            "outbox_depth": (depth := self.journal.outbox_depth()),
            "outbox": {
                "by_state": self.journal.depth(),
                "level": self.sync.depth_level(depth),
                "dlq": len(self.journal.dlq()),
            },
            "breakers": self.sync.breaker_status(),
            "rejected_unauthenticated": self.journal.rejection_count(),
        }

    async def run(self, stop: asyncio.Event) -> None:
        await self.api.start()
        log.info(
            "gateway %s started (journal %s, board %s, broker %s:%d)",
            self.config.gateway.id,
            self.config.journal.path,
            self.config.board.port,
            self.config.mqtt.host,
            self.config.mqtt.port,
        )
        try:
            async with asyncio.TaskGroup() as tg:
                tasks = [
                    tg.create_task(self.core.run(), name="core"),
                    tg.create_task(self.session.run(self.core.intake), name="mqtt"),
                    tg.create_task(self.sync.run(), name="cloud-sync"),
                ]
                await stop.wait()
                log.info("stopping")
                # Let the release on its way finish and be journaled first.
                await self.core.drain()
                for task in tasks:
                    task.cancel()
        finally:
            await self.api.stop()
            await self.core.link.driver.close()
            self.journal.close()
            log.info("stopped")


async def _serve(config: GatewayConfig) -> None:
    daemon = Daemon(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await daemon.run(stop)


def _setup_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("METALAV_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # Libraries below us log payloads at DEBUG; keep them quiet (promise 7, no PII).
    for noisy in ("aiomqtt", "paho", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _load(path: Path) -> GatewayConfig | None:
    try:
        return load_config(path)
    except ConfigError as exc:
        for line in exc.lines:
            print(f"config error: {line}", file=sys.stderr)
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="metalav-gateway", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run_p = sub.add_parser("run", help="run the gateway daemon")
    run_p.add_argument("--config", type=Path, required=True)
    check_p = sub.add_parser("check-config", help="validate a config file and exit")
    check_p.add_argument("--config", type=Path, required=True)
    demo_p = sub.add_parser("demo", help="run a self-contained demo and exit")
    demo_p.add_argument("--keep", action="store_true", help="keep the demo's working folder")
    args = parser.parse_args(argv)

    if args.command == "demo":
        # The demo harness (devtools/) is not shipped: it lives beside gateway/ in a
        # source checkout, which the editable install does not put on sys.path.
        checkout = Path(__file__).resolve().parents[1]
        if (checkout / "devtools").is_dir() and str(checkout) not in sys.path:
            sys.path.insert(0, str(checkout))
        try:
            from devtools.demo import run_demo
        except ModuleNotFoundError as exc:
            if exc.name not in ("devtools", "devtools.demo"):
                raise
            print("error: the demo runs from a source checkout (./scripts/demo.sh); "
                  "this installation has no demo harness", file=sys.stderr)
            return 2
        return run_demo(keep=args.keep)

    config = _load(args.config)
    if config is None:
        return 2
    # check-config: every file the config names; run: those it could not start without.
    problems = file_problems(config, read_once_only=args.command == "run")
    for line in problems:
        print(f"config error: {line}", file=sys.stderr)
    if problems:
        return 2
    if args.command == "check-config":
        for line in file_warnings(config):
            print(f"warning: {line}", file=sys.stderr)
        print(f"config OK: gateway {config.gateway.id}, {len(config.machines)} machines")
        return 0

    try:
        # First, before the journal, the socket, the broker or the board are touched.
        with instance_lock.hold(config.journal.path):
            _setup_logging()
            asyncio.run(_serve(config))
    except instance_lock.AlreadyRunning as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ALREADY_RUNNING
    except instance_lock.InstanceLockError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except JournalError as exc:
        log.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
