"""The simulated board as a real process on a real pty."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest


class SimulatorProcess:
    def __init__(self, tmp_path: Path, *args: str) -> None:
        self.actuation_file = tmp_path / f"actuations-{os.urandom(4).hex()}.jsonl"
        self.edge_file = tmp_path / f"edges-{os.urandom(4).hex()}.jsonl"
        self.stderr_file = tmp_path / f"stderr-{os.urandom(4).hex()}.txt"
        self.link = tmp_path / f"board-{os.urandom(4).hex()}"
        with open(self.stderr_file, "wb") as stderr:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "firmware_bridge.simulator",
                    "--actuations",
                    str(self.actuation_file),
                    "--link",
                    str(self.link),
                    "--edges",
                    str(self.edge_file),
                    *args,
                ],
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("PTY "), f"simulator printed {line!r}"
        self.path = line.split(" ", 1)[1].strip()

    def actuations(self) -> list[dict[str, Any]]:
        if not self.actuation_file.exists():
            return []
        return [json.loads(line) for line in self.actuation_file.read_text().splitlines()]

    def edges(self) -> list[dict[str, Any]]:
        if not self.edge_file.exists():
            return []
        return [json.loads(line) for line in self.edge_file.read_text().splitlines()]

    def wait_stderr(self, prefix: str, count: int = 1, timeout: float = 5.0) -> str:
        """The ``count``-th stderr line starting with ``prefix`` (waits for it)."""
        deadline = time.monotonic() + timeout
        while True:
            lines = [
                line
                for line in self.stderr_file.read_text().splitlines()
                if line.startswith(prefix)
            ]
            if len(lines) >= count:
                return lines[count - 1]
            assert time.monotonic() < deadline, f"no {prefix!r} line on stderr"
            time.sleep(0.01)

    def send_signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        assert self.proc.stdout is not None
        self.proc.stdout.close()


@pytest.fixture
def start_simulator(tmp_path: Path) -> Iterator[Callable[..., SimulatorProcess]]:
    started: list[SimulatorProcess] = []

    def start(*args: str) -> SimulatorProcess:
        sim = SimulatorProcess(tmp_path, *args)
        started.append(sim)
        return sim

    yield start
    for sim in started:
        sim.stop()
