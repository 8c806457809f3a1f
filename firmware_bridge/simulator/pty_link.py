"""The simulated board's end of a USB serial cable: a pty, served on an asyncio loop.

``serve`` reads what the host writes to the pty, feeds it to the ``SimulatedBoard``
and writes the replies back (optionally delayed), runs the board's timers, and
handles the signals of the simulator program: SIGHUP resets the board, SIGUSR1
unplugs the cable (the pty closes, the ``--link`` symlink disappears, the board
loses power), SIGUSR2 plugs it back (a new pty and boot id), SIGTERM/SIGINT stop.
A ``--control`` Unix socket takes ``input N high|low|auto`` lines (``control_command``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
import tty

from firmware_bridge.simulator.board import SimulatedBoard
from firmware_bridge.simulator.timer import BoardTimer

__all__ = ["PtyPort", "control_command", "serve"]

LOGGER = logging.getLogger(__name__)


def _replace_symlink(link: str, target: str) -> None:
    tmp = f"{link}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    os.symlink(target, tmp)
    os.replace(tmp, link)  # atomic: a client never sees the link missing


class PtyPort:
    """The board's end of the "USB cable": a pty pair that can be unplugged."""

    def __init__(self, link: str | None) -> None:
        self.link = link
        self.master = self.slave = -1
        self.path = ""

    @property
    def plugged(self) -> bool:
        return self.master >= 0

    def plug(self) -> None:
        self.master, self.slave = os.openpty()
        # Keep our own slave fd open while plugged: without it the master reads
        # EIO whenever the client closes the port, breaking reopen.
        tty.setraw(self.slave)
        os.set_blocking(self.master, False)
        self.path = os.ttyname(self.slave)
        if self.link:
            _replace_symlink(self.link, self.path)

    def unplug(self) -> None:
        if self.link and os.path.realpath(self.link) == self.path:
            os.unlink(self.link)
        # Closing both ends hangs up the host's open slave: its reads and
        # writes fail, like a USB serial adapter that vanished.
        for fd in (self.master, self.slave):
            if fd >= 0:
                os.close(fd)
        self.master = self.slave = -1


def control_command(board: SimulatedBoard, line: str) -> str:
    """One ``--control`` line applied to ``board``; the answer line."""
    words = line.split()
    levels = {"high": True, "1": True, "low": False, "0": False, "auto": None}
    if len(words) != 3 or words[0] != "input" or words[2].lower() not in levels:
        return "error expected: input N high|low|auto"
    try:
        board.force_input(int(words[1]), levels[words[2].lower()])
    except ValueError as exc:
        return f"error {exc}"
    return "ok"


async def serve(
    port: PtyPort, board: SimulatedBoard, delay_s: float, control: str | None = None
) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    timer = BoardTimer(board, loop)
    reschedule = timer.reschedule

    def write(master: int, reply: bytes) -> None:
        if master != port.master:
            return  # unplugged (and maybe replugged) since: the bytes are gone
        try:
            os.write(master, reply)
        except BlockingIOError:
            # Nobody reads the slave and its queue is full: like a UART
            # transmitting into a cut cable, the reply is lost.
            LOGGER.warning("reply dropped: pty output queue full")

    def on_readable() -> None:
        master = port.master
        try:
            data = os.read(master, 4096)
        except BlockingIOError:
            return
        except OSError as exc:  # cannot happen while we hold the slave open
            LOGGER.error("pty read failed: %s", exc)
            stop.set()
            return
        now = time.monotonic()  # as close to the read as possible (rx_monotonic)
        reply = board.feed(data, now)
        if reply:
            if delay_s > 0:
                loop.call_later(delay_s, write, master, reply)
            else:
                write(master, reply)
        board.advance(time.monotonic())
        reschedule()

    def on_hup() -> None:
        board.reboot(time.monotonic())  # prints REBOOT through on_reboot
        reschedule()

    def on_unplug() -> None:
        if not port.plugged:
            return
        loop.remove_reader(port.master)
        port.unplug()
        # The board loses power with its USB cable: outputs drop now.
        board.reboot(time.monotonic())
        reschedule()
        print("UNPLUG", file=sys.stderr, flush=True)

    def on_plug() -> None:
        if port.plugged:
            return
        port.plug()
        loop.add_reader(port.master, on_readable)
        print(f"PLUG {port.path} {board.boot_id:08x}", file=sys.stderr, flush=True)

    async def on_control(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                answer = control_command(board, line.decode("utf-8", "replace"))
                writer.write(answer.encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server: asyncio.AbstractServer | None = None
    if control is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(control)
        server = await asyncio.start_unix_server(on_control, path=control)
    loop.add_reader(port.master, on_readable)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    loop.add_signal_handler(signal.SIGUSR1, on_unplug)
    loop.add_signal_handler(signal.SIGUSR2, on_plug)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    try:
        await stop.wait()
    finally:
        if server is not None and control is not None:
            server.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(control)
        if port.plugged:
            loop.remove_reader(port.master)
        timer.cancel()

