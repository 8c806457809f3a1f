"""The simulated board as a real process on a real pty."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest


class SimulatorProcess:
    def __init__(self, tmp_path: Path, *args: str) -> None:
        self.actuation_file = tmp_path / f"actuations-{os.urandom(4).hex()}.jsonl"
        self.link = tmp_path / f"board-{os.urandom(4).hex()}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "firmware_bridge.simulator",
             "--actuations", str(self.actuation_file), "--link", str(self.link), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
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
