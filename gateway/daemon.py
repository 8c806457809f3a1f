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
from .alerting import DeadLetterWatch, SignatureWatch
from .api import LocalApi
from .backup import BackupSchedule, backup_dir
from .boards import build_driver
from .clock import ClockWatch, TimePolicy, kernel_clock_synchronized, test_clock_from_env
from .config import ConfigError, GatewayConfig, file_problems, file_warnings, load_config
from .core import build_core
from .health import HealthMonitor, HealthServer, Links
from .heartbeat import Heartbeat
from .journal import (
    Alert,
    Journal,
    JournalError,
    JournalFault,
    alert_event,
    iso_utc,
)
from .logs import setup_logging
from .metrics import GatewayMetrics
from .profiles import ProfileGroups
from .reload import plan_reload
from .supervision import Notifier, Progress, Watchdog, run_stall_hook, watchdog_timeout
from .sync import CloudSync

__all__ = ["Daemon", "main"]

log = logging.getLogger("gateway")

EXIT_ALREADY_RUNNING = 3

# READY=1 waits this long at most for the first try of each link (a broker whose
# address does not answer can take the TCP connect timeout); TimeoutStartSec is 90.
READY_WAIT_S = 30.0
# How often systemd's one-line STATUS is refreshed (sent only when it changed).
STATUS_EVERY_S = 5.0


class Daemon:
    """Owns every part of a running gateway; ``run`` returns when asked to stop."""

    def __init__(self, config: GatewayConfig, config_path: Path | None = None) -> None:
        self.config = config
        self.config_path = config_path
        # systemd (a no-op when not run by it): READY, WATCHDOG, STATUS, STOPPING.
        self.notifier = Notifier.from_environ()
        self.started_at = time.time()
        self.broker_connected = False
        self.broker_since: float | None = None

        # The journal first: every part below records into it.
        self.journal = Journal(config.journal.path, config.gateway.id)
        self._journal_fault: JournalFault | None = None
        self.journal.on_fault_change = self._on_journal_fault

        # What the daemon counts (gateway/metrics.py) and whether its clock can be
        # trusted (gateway/clock.py); both feed the core's intake and outcomes.
        self.metrics = GatewayMetrics(process=True)
        self.journal.on_commit = self.metrics.commit
        test_clock = test_clock_from_env()  # tests only: a simulated bad clock
        wall = test_clock[0] if test_clock else time.time
        probe = test_clock[1] if test_clock else kernel_clock_synchronized
        self.clock_watch = ClockWatch(
            probe=None if config.clock.sync_check == "off" else probe,
            wall=wall,
            jump_threshold_s=config.clock.jump_threshold_s,
            unsynced_alert_after_s=config.clock.unsynced_alert_after_s,
        )

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
            clock=wall,
            metrics=self.metrics,
            time_policy=TimePolicy(lambda: self.clock_watch.trusted),
        )

        # Seen from afar (issue 11): health checks, /metrics, the retained heartbeat,
        # and the alerts that need a memory (dead events, signature failures).
        self.signatures = SignatureWatch(
            self.core.outcomes.raise_alert,
            threshold=config.health.signature_failures_alert,
            window_s=config.health.signature_window_s,
        )
        self.metrics.on_refused = self.signatures.refused
        self.dead_letters = DeadLetterWatch(self.journal.dlq_size, self.core.outcomes.raise_alert)
        self.health = HealthMonitor(
            config,
            self.journal,
            self.metrics,
            self.clock_watch,
            Links(
                board_up=lambda: self.core.link.connected,
                broker_up=lambda: self.broker_connected,
                journal_fault=self._journal_fault_reason,
                breakers=lambda: {b["name"]: b["state"] for b in self.sync.breaker_status()},
                https_configured=self.sync.http is not None,
            ),
            started_at=self.started_at,
        )
        self.health_server = (
            HealthServer(self.health, self.metrics, config.health.host, config.health.port)
            if config.health.port
            else None
        )
        self.heartbeat = Heartbeat(
            self.health,
            partial(self.session.publish_best_effort, retain=True),
            self.dead_letters,
            gateway_id=config.gateway.id,
            store_id=config.gateway.store_id,
            every_s=config.health.heartbeat_s,
        )
        self._observe_wake = asyncio.Event()

        # The technicians' side.
        self.api = LocalApi(
            config.api.socket,
            status=self.status,
            journal=self.journal,
            operator=self.core.operator,
            sync=self.sync,
            profiles=ProfileGroups(**config.profiles.model_dump()),
        )
        # The daily journal backup with its retention count (gateway/backup.py).
        self.backups = BackupSchedule(
            config.journal.path,
            backup_dir(config.journal.path, config.backup.dir),
            config.gateway.id,
            keep=config.backup.keep,
            interval_s=config.backup.interval_h * 3600,
            on_failure=self.core.outcomes.raise_alert,
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

    def _journal_fault_reason(self) -> str | None:
        fault = self.journal.fault
        return None if fault is None else fault.reason

    def _broker_link(self, up: bool) -> None:
        self.broker_connected = up
        self.broker_since = time.time()
        if up:
            # A fresh heartbeat right after every (re)connect.
            self.heartbeat.due = True
            self._observe_wake.set()
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
            # metalavctl store pause|resume, and the config version (issue 12)
            "store": self.core.operator.store_status(),
            "rejections_by_reason": self.journal.rejection_counts(),
            # Fresh: a technician (or a monitoring check) asks now, rarely.
            "health": self.health.snapshot(fresh=True).as_dict(),
        }

    def status_line(self) -> str:
        """One line for ``systemctl status`` (technicians read it: Portuguese)."""
        gw = self.config.gateway
        board = "placa conectada" if self.core.link.connected else "placa DESCONECTADA"
        broker = "broker conectado" if self.broker_connected else "broker DESCONECTADO"
        journal = "diário gravável" if self.journal.fault is None else "diário NÃO GRAVÁVEL"
        return f"Loja {gw.store_id or '?'} ({gw.id}): {board}, {broker}, {journal}"

    async def _supervise(self) -> None:
        """READY=1 once the journal is open (it is, since __init__) and both links
        have been tried; then the watchdog and the STATUS line."""
        try:
            async with asyncio.timeout(READY_WAIT_S):
                await self.core.link.tried.wait()
                await self.session.tried.wait()
        except TimeoutError:
            log.warning("links not all tried after %.0f s: ready anyway", READY_WAIT_S)
        line = self.status_line()
        self.notifier.notify("READY=1", f"STATUS={line}")
        log.info("ready: %s", line)
        timeout = watchdog_timeout()
        async with asyncio.TaskGroup() as tg:
            if timeout is not None:
                link = self.core.link
                progress = Progress(
                    journal_commit_since=self.journal.stalled_since,
                    board_ticked_at=lambda: link.ticked_at,
                    board_allowance_s=link.tick_allowance_s,
                )
                log.info("systemd watchdog: %.1f s", timeout)
                tg.create_task(Watchdog(self.notifier, timeout, progress).run(), name="watchdog")
            tg.create_task(self._refresh_status(line), name="status-line")

    async def _refresh_status(self, line: str) -> None:
        while True:
            await asyncio.sleep(STATUS_EVERY_S)
            if (new := self.status_line()) != line:
                line = new
                self.notifier.notify(f"STATUS={line}")

    def _stop_wait(self, seconds: float) -> None:
        # Relay programs still running as the daemon stops: ask systemd for that long
        # beyond TimeoutStopSec's clock (sd_notify EXTEND_TIMEOUT_USEC).
        usec = int((seconds + 5.0) * 1_000_000)
        self.notifier.notify(f"EXTEND_TIMEOUT_USEC={usec}")

    def reload(self) -> None:
        """SIGHUP: re-read the config file, apply what can change live (gateway/reload.py),
        log what needs a restart. An invalid file changes nothing."""
        path = self.config_path
        if path is None:
            log.warning("config reload: no config file to re-read")
            return
        self.notifier.notify("RELOADING=1")
        try:
            try:
                new = load_config(path)
            except ConfigError as exc:
                for line in exc.lines:
                    log.error("config reload refused: %s", line)
                log.error("config reload: %s is invalid; nothing changed, still running on"
                          " the config loaded before", path)
                self._audit_reload("refused:invalid_config", after={"errors": len(exc.lines)})
                return
            plan = plan_reload(self.config, new)
            if plan.live:
                log.info("config reload: applied %s", ", ".join(
                    f"{k} {b!r} -> {a!r}" for k, (b, a) in plan.live.items()
                ))
                self.config = plan.config
                self.sync.apply_limits(plan.config)
                _apply_log_level(plan.config)  # last: the line above shows at either level
            if plan.restart:
                # Names only: some of these keys are secrets.
                log.warning("config reload: needs a restart to take effect"
                            " (systemctl restart metalav-gateway): %s", ", ".join(plan.restart))
            if not plan.live and not plan.restart:
                log.info("config reload: nothing changed")
            self._audit_reload(
                "applied" if plan.live else "restart_needed" if plan.restart else "no_change",
                before={k: b for k, (b, _) in plan.live.items()},
                after={
                    **{k: a for k, (_, a) in plan.live.items()},
                    "restart_needed": plan.restart,
                },
            )
        finally:
            self.notifier.notify("READY=1", f"STATUS={self.status_line()}")

    def _audit_reload(
        self, outcome: str, *, before: dict[str, Any] | None = None,
        after: dict[str, Any] | None = None,
    ) -> None:
        try:
            self.journal.audit(
                action="config.reload",
                target=str(self.config_path),
                # A signal does not say who sent it.
                actor="systemd",
                os_user="unknown",
                reason="SIGHUP (systemctl reload)",
                outcome=outcome,
                now=time.time(),
                before=before,
                after=after,
            )
        except JournalError as exc:
            log.error("config reload: could not be audited: %s", exc)

    async def _observe(self) -> None:
        """Clock checks, dead events, the heartbeat: every ``clock.check_every_s``, and
        at once after a reconnect. Never on the release path; never fatal."""
        while True:
            try:
                for alert in self.clock_watch.check():
                    if alert.code == "clock_jump":
                        self.metrics.clock_jumps.inc()
                    self.core.outcomes.raise_alert(alert)
                self.dead_letters.check()
                self.heartbeat.tick()
            except Exception:
                log.exception("health observation failed")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.clock.check_every_s):
                    await self._observe_wake.wait()
            self._observe_wake.clear()

    async def run(self, stop: asyncio.Event) -> None:
        await self.api.start()
        if self.health_server is not None:
            await self.health_server.start()
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
                    tg.create_task(self._supervise(), name="supervision"),
                    tg.create_task(run_stall_hook(), name="test-stall-hook"),
                    tg.create_task(self._observe(), name="observe"),
                ]
                if self.config.backup.enabled:
                    tasks.append(tg.create_task(self.backups.run(), name="backup"))
                await stop.wait()
                log.info("stopping")
                self.notifier.notify("STOPPING=1", "STATUS=parando")
                # Let the release on its way finish and be journaled first, and the
                # relay programs running on the board end.
                await self.core.drain(on_wait=self._stop_wait)
                for task in tasks:
                    task.cancel()
        finally:
            if self.health_server is not None:
                await self.health_server.stop()
            await self.api.stop()
            await self.core.link.driver.close()
            self.journal.close()
            self.notifier.close()
            log.info("stopped")


async def _serve(config: GatewayConfig, config_path: Path) -> None:
    daemon = Daemon(config, config_path)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, daemon.reload)
    await daemon.run(stop)


def _log_level(config: GatewayConfig) -> str:
    return config.logging.level or os.environ.get("METALAV_LOG_LEVEL", "INFO").upper()


def _apply_log_level(config: GatewayConfig) -> None:
    logging.getLogger().setLevel(_log_level(config))


def _setup_logging(config: GatewayConfig) -> None:
    # journald's priorities and no timestamp under systemd; PII redacted (gateway/logs.py).
    setup_logging(_log_level(config))


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
            _setup_logging(config)
            asyncio.run(_serve(config, args.config))
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
