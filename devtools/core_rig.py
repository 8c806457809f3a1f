"""An in-process store: the real gateway core on an in-memory board, a hand-moved clock.

The same ``build_core`` as the daemon, over a real journal file and the real serial
driver, talking to the simulated board through ``MemoryLink``: no broker, no pty, no
process. Time for the core (expiry, confirm windows, the doubt grace) is a
:class:`ManualClock` the test moves; the board and the driver's timeouts run on the
event loop's own clock, kept short. A "crash" drops every in-memory object of the
core and keeps what a crash keeps: the journal file and the board.

    rig = CoreRig(tmp_path)
    await rig.start()
    await rig.command(rig.sign("exec-1", machine_id="W1"))
    await rig.settle()
    assert rig.state("exec-1") == "released" and rig.pulses("exec-1") == 1
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cloud_sync.signing import generate_demo_keypair, sign_command
from firmware_bridge.serial_board import SerialBoard
from firmware_bridge.simulator import MemoryLink, SimulatedBoard
from gateway.config import GatewayConfig, load_config
from gateway.core import Core, build_core
from gateway.dispatch import command_id_for
from gateway.journal import Journal

from .stack import DEMO_MACHINES, demo_config

__all__ = ["CoreRig", "ManualClock"]

# The driver's wait for a reply on the in-memory link: replies come within a loop turn.
ACK_TIMEOUT_S = 0.01


class ManualClock:
    """Wall-clock time for the core, moved only by the test."""

    def __init__(self, start: float | None = None) -> None:
        self.now = time.time() if start is None else start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class CoreRig:
    def __init__(
        self,
        workdir: Path,
        *,
        board: SimulatedBoard | None = None,
        machines: list[dict[str, Any]] | None = None,
        clock: ManualClock | None = None,
    ) -> None:
        self.workdir = workdir
        self.clock = clock or ManualClock()
        self.link = MemoryLink(board or SimulatedBoard(channels=8))
        self._private_pem, public_pem = generate_demo_keypair()
        self.gateway_id = f"gw-{uuid.uuid4().hex[:8]}"
        path = workdir / "gateway.toml"
        path.write_text(
            demo_config(
                workdir,
                gateway_id=self.gateway_id,
                mqtt_port=1,
                public_key_pem=public_pem,
                board_port=workdir / "no-port",
                machines=machines or DEMO_MACHINES,
                board={
                    "reconnect_s": 0.02,
                    "poll_ms": 20,
                    "health_ping_s": 0.05,
                    "ack_timeout_s": ACK_TIMEOUT_S,
                },
            )
        )
        self.config: GatewayConfig = load_config(path)
        #: What the core published best effort (stored results re-sent to duplicates).
        self.published: list[tuple[str, bytes]] = []
        self.core: Core | None = None
        self._task: asyncio.Task[None] | None = None

    # -- the gateway's life ----------------------------------------------------------

    async def start(self) -> Core:
        """Build the core on the journal file and run its loops on this event loop."""
        journal = Journal(self.config.journal.path, self.gateway_id)
        self.core = build_core(
            self.config,
            journal,
            lambda on_fault: SerialBoard(
                "memory", connect=self.link.connect, ack_timeout=ACK_TIMEOUT_S
            ),
            outbox_changed=lambda: None,
            publish_best_effort=lambda topic, payload: self.published.append((topic, payload)),
            clock=self.clock,
        )
        self._task = asyncio.get_running_loop().create_task(self.core.run(), name="core")
        return self.core

    async def crash(self) -> None:
        """Like SIGKILL: every in-memory object of the core is gone, nothing is flushed;
        the journal file and the board remain."""
        assert self.core is not None and self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self.core.link.driver.close()
        self.core.journal.close()
        self.core, self._task = None, None

    async def stop(self) -> None:
        if self.core is not None:
            await self.crash()

    # -- the cloud's side ---------------------------------------------------------------

    def sign(
        self, execute_key: str, *, machine_id: str = "W1", cycle: str = "normal", **kw: Any
    ) -> bytes:
        now = kw.pop("now", self.clock())
        return sign_command(
            self._private_pem,
            execute_key=execute_key,
            audience=self.gateway_id,
            payment_id=kw.pop("payment_id", f"pay-{execute_key}"),
            machine_id=machine_id,
            cycle=cycle,
            now=now,
            **kw,
        )

    async def command(self, token: bytes) -> None:
        """The session's part: hand the message over; returning means acknowledged."""
        assert self.core is not None
        await self.core.intake.handle_command(token)

    # -- what happened ------------------------------------------------------------------

    async def settle(self, until: Callable[[], bool] | None = None) -> None:
        """Let the core work until nothing is left in flight (or ``until`` holds);
        TimeoutError after 5 s."""
        done = until or self.quiet
        async with asyncio.timeout(5.0):
            while True:
                await asyncio.sleep(0.005)
                if done():
                    return

    def quiet(self) -> bool:
        core = self.core
        return core is not None and core.dispatch.idle and core.link.connected

    def state(self, execute_key: str) -> str | None:
        row = self._read("SELECT state FROM executions WHERE execute_key = ?", execute_key)
        return None if row is None else str(row[0])

    def reason(self, execute_key: str) -> str | None:
        row = self._read("SELECT reason FROM executions WHERE execute_key = ?", execute_key)
        return None if row is None else row[0]

    def pulses(self, execute_key: str) -> int:
        command_id = command_id_for(execute_key)
        return sum(a.command_id == command_id for a in self.link.actuations)

    def _read(self, sql: str, *args: object) -> Any:
        # A connection of its own: it sees only what was committed.
        with contextlib.closing(sqlite3.connect(self.config.journal.path)) as conn:
            return conn.execute(sql, args).fetchone()
