"""Benchmark: what a store sees — the daemon as shipped beside a minimal durable gateway.

One run measures two gateways on the same broker, the same simulated board (a fresh
``python -m firmware_bridge.simulator`` on a pty for each) and the same signed commands:

- the daemon AS SHIPPED: ``python -m gateway.daemon run``, its default INFO log level
  written to a file (as systemd would capture it), 64 machines, its journal flushed
  (``fdatasync``, as ``synchronous=FULL`` would) before anything depends on a write;
- the floor, ``bench/minimal_gateway.py``: one SQLite WAL ``synchronous=FULL`` commit,
  one RELEASE frame, then the PUBACK, per command.

Latency is cloud MQTT publish -> first byte of the RELEASE frame at the board: the
simulator stamps the read holding that byte with time.monotonic() (system-wide on
Linux) in its actuation log, which this script follows with inotify. Modes, in order,
after a few warm-up commands: isolated (one command, wait for its release frame, pause),
back to back (the next command as soon as the previous release frame reached the
board, not waiting for its result), a burst of 64 commands to 64 machines (first
publish -> last release frame), the same 64 tokens again as duplicates (first publish
-> every duplicate answered to the cloud; no extra actuation allowed). Per mode, the
process's CPU (utime+stime from /proc/<pid>/stat) and its fsync/fdatasync calls
(kernel tracepoints counted by ``perf stat``, no ptrace stop, so they are counted
during the timed modes) are divided by the commands. Then the process's RSS (VmRSS)
and its idle CPU; time to READY is process start -> both links up (the daemon's local
API status; the reference prints READY after its SUBACK). ``--big-journal`` also starts
the daemon on a journal pre-filled with 1,000,000 executions rows (READY, a burst, RSS,
idle CPU); the outbox drain of bench/outbox_drain.py runs once per repetition.

Every figure is measured ``--repeat`` times (the order of the two gateways alternates)
and reported as median and min-max; ratios are daemon median / reference median.

    python bench/store_view.py --quick                      # seconds: a development check
    python bench/store_view.py --big-journal --out FILE     # full size (see docs/performance.md)

Prints one JSON document. Needs ``perf`` (linux-perf) for the fsync counts; without it
those figures are null and ``method.fsyncs`` says why.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import platform
import select
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# devtools/ (the harness) is not installed with the package: take it from this checkout.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import outbox_drain  # noqa: E402
import paho.mqtt.client as mqtt  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from devtools.broker import LocalBroker  # noqa: E402
from devtools.stack import CloudStandIn, DaemonProcess, SimulatorProcess, demo_config  # noqa: E402
from gateway.dispatch import command_id_for  # noqa: E402
from gateway.events import result_payload  # noqa: E402
from gateway.journal import Journal, iso_utc  # noqa: E402

MACHINES = 64
GATEWAY_ID = "bench-gw"
BIG_ISOLATED = 64  # isolated commands on the big journal: a slow sweep shows as stalls
WARMUP = 8  # commands before the clock runs: imports and caches, once per process life
SETTLE_S = 0.2  # after a mode's last answer: PUBACKs, outbox bookkeeping land in its window
TIMEOUT_S = 60.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
FSYNC_EVENTS = "syscalls:sys_enter_fsync,syscalls:sys_enter_fdatasync"
FULL: dict[str, Any] = {
    "isolated": 200,
    "b2b": 500,
    "drain_n": 10_000,
    "idle_s": 60.0,
    "repeat": 3,
    "big_rows": 1_000_000,
}
QUICK: dict[str, Any] = {
    "isolated": 10,
    "b2b": 20,
    "drain_n": 1_000,
    "idle_s": 1.0,
    "repeat": 1,
    "big_rows": 10_000,
}

Token = tuple[str, bytes]  # (execute_key, signed command)


def _machines() -> list[dict[str, object]]:
    return [
        {"id": f"M{i}", "kind": "washer", "channel": i, "cycles": {"normal": {"pulses": 1}}}
        for i in range(1, MACHINES + 1)
    ]


def _cid(key: str) -> str:
    return f"{command_id_for(key):016x}"


def _percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def _latency_figures(prefix: str, latencies: list[float]) -> dict[str, float]:
    return {
        f"{prefix}_p50_ms": round(statistics.median(latencies), 3),
        f"{prefix}_p90_ms": round(_percentile(latencies, 90), 3),
        f"{prefix}_p99_ms": round(_percentile(latencies, 99), 3),
        f"{prefix}_max_ms": round(max(latencies), 3),
    }


# --- what the kernel says about a process -------------------------------------------


def cpu_s(pid: int) -> float:
    """utime + stime of the whole process (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f"no VmRSS for {pid}")


def perf_problem() -> str | None:
    """None when ``perf stat`` can count the fsync tracepoints here, else why not."""
    if shutil.which("perf") is None:
        return "perf not installed (apt-get install linux-perf)"
    probe = subprocess.run(
        ["perf", "stat", "-x,", "-e", FSYNC_EVENTS, "--", "true"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if probe.returncode != 0 or "sys_enter_fsync" not in probe.stderr:
        return f"perf cannot count syscall tracepoints: {probe.stderr.strip()[-300:]}"
    return None


class FsyncCounter:
    """fsync + fdatasync calls of one process (every thread), counted in the kernel."""

    def __init__(self, pid: int, out: Path) -> None:
        self._out = out
        self._proc = subprocess.Popen(
            ["perf", "stat", "-x,", "-e", FSYNC_EVENTS, "-p", str(pid), "-o", str(out)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # Attached once its counters exist (one per event and thread, opened together).
        deadline = time.monotonic() + 5
        while not self._counters() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)

    def _counters(self) -> bool:
        fds = Path(f"/proc/{self._proc.pid}/fd")
        with contextlib.suppress(OSError):
            return any("perf_event" in os.readlink(fd) for fd in fds.iterdir())
        return False

    def stop(self) -> int | None:
        self._proc.send_signal(signal.SIGINT)
        self._proc.wait(timeout=10)
        total = 0
        for line in self._out.read_text().splitlines():
            fields = line.split(",")
            if line.startswith("#") or len(fields) < 3 or "sys_enter" not in fields[2]:
                continue
            if not fields[0].strip().isdigit():
                return None  # "<not counted>"
            total += int(fields[0])
        return total


class ActuationTail:
    """The simulator's actuation log, followed with inotify: command id -> rx_monotonic."""

    IN_MODIFY = 0x2

    def __init__(self, path: Path) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self._fd < 0 or libc.inotify_add_watch(self._fd, bytes(path), self.IN_MODIFY) < 0:
            raise OSError(ctypes.get_errno(), f"inotify on {path}")
        self._file = open(path, "rb")  # noqa: SIM115 - closed by close()
        self._partial = b""
        self.rx: dict[str, float] = {}
        self.count: dict[str, int] = {}
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._closed:
            if select.select([self._fd], [], [], 0.2)[0]:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._fd, 4096)
            data = self._file.read()
            if not data:
                continue
            lines = (self._partial + data).split(b"\n")
            self._partial = lines.pop()
            with self._cond:
                for line in filter(None, lines):
                    record = json.loads(line)
                    cid = record["command_id"]
                    self.rx.setdefault(cid, record["rx_monotonic"])
                    self.count[cid] = self.count.get(cid, 0) + 1
                self._cond.notify_all()

    def wait(self, cids: list[str], timeout: float = TIMEOUT_S) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: all(c in self.rx for c in cids), timeout):
                missing = [c for c in cids if c not in self.rx]
                raise TimeoutError(
                    f"{len(missing)} of {len(cids)} releases never reached the board"
                )

    def total(self) -> int:
        with self._cond:
            return sum(self.count.values())

    def close(self) -> None:
        self._closed = True
        self._thread.join()
        os.close(self._fd)
        self._file.close()


# --- the two gateways ----------------------------------------------------------------


def forget_session(broker: LocalBroker, client_id: str) -> None:
    """Drop the broker's persistent session of ``client_id``: otherwise the broker keeps
    queueing the commands of the other gateway's turn for it and delivers them all when
    it connects again."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
    client.connect(broker.host, broker.port)
    deadline = time.monotonic() + 10
    while not client.is_connected() and time.monotonic() < deadline:
        client.loop(0.05)
    client.disconnect()
    client.loop(0.05)


class Gateway:
    """One gateway under test, started on its own fresh simulated board."""

    name = ""
    client_id = ""

    def __init__(
        self, work: Path, broker: LocalBroker, cloud: CloudStandIn, journal: Path | None = None
    ) -> None:
        self.work = work
        self.broker = broker
        work.mkdir(parents=True)
        self.cloud = cloud
        self.sim = SimulatorProcess(work, "--channels", str(MACHINES))
        self.config = work / "gateway.toml"
        self.config.write_text(
            demo_config(
                work,
                gateway_id=GATEWAY_ID,
                mqtt_port=broker.port,
                public_key_pem=cloud.public_key_pem,
                board_port=self.sim.link,
                machines=_machines(),
                journal_path=journal,
            )
        )
        self.tail: ActuationTail | None = None
        self.pid = 0

    def start(self) -> float:
        """Start board and gateway; seconds from the gateway's process start to READY."""
        forget_session(self.broker, self.client_id)
        self.sim.actuations.touch()  # so the tail can watch it from the first release
        self.sim.start()
        self.tail = ActuationTail(self.sim.actuations)
        return self._start()

    def _start(self) -> float:
        raise NotImplementedError

    def settle(self, mark: int, keys: list[str]) -> dict[str, int]:
        """Wait until the cloud saw every outcome it will see; outcomes by label."""
        time.sleep(SETTLE_S)
        return {}

    def stop(self) -> None:
        if self.tail is not None:
            self.tail.close()
        self.sim.stop()
        forget_session(self.broker, self.client_id)

    def log_tail(self) -> str:
        return ""


class Daemon(Gateway):
    name = "daemon"
    client_id = GATEWAY_ID  # cloud_sync.mqtt_session: the gateway id

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        # As shipped: INFO (the default), stated so a caller's environment cannot change it.
        self.proc = DaemonProcess(self.work, self.config, env={"METALAV_LOG_LEVEL": "INFO"})

    def _start(self) -> float:
        t0 = time.monotonic()
        self.proc.start()
        assert self.proc.proc is not None
        self.pid = self.proc.proc.pid
        while time.monotonic() - t0 < TIMEOUT_S:
            if self.proc.proc.poll() is not None:
                raise RuntimeError(f"daemon exited:\n{self.proc.log_tail()}")
            s = self.proc.status()
            if s and s["broker"]["connected"] and s["board"]["connected"]:
                return time.monotonic() - t0
            time.sleep(0.01)
        raise TimeoutError(f"daemon not ready\n{self.proc.log_tail()}")

    def settle(self, mark: int, keys: list[str]) -> dict[str, int]:
        final = _wait_answers(self.cloud, mark, keys, lambda r: bool(r.get("final")))
        time.sleep(SETTLE_S)
        outcomes: dict[str, int] = {}
        for r in final.values():
            label = r["state"] + (f":{r['reason']}" if r.get("reason") else "")
            outcomes[label] = outcomes.get(label, 0) + 1
        return outcomes

    def stop(self) -> None:
        self.proc.stop()
        super().stop()

    def log_tail(self) -> str:
        return self.proc.log_tail()


class Reference(Gateway):
    name = "reference"
    client_id = "minimal-gateway"

    def _start(self) -> float:
        t0 = time.monotonic()
        script = ROOT / "bench" / "minimal_gateway.py"
        db = self.work / "reference.db"
        with open(self.work / "reference.log", "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(script), "--config", str(self.config), "--db", str(db)],
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                start_new_session=True,
            )
        self.pid = self.proc.pid
        assert self.proc.stdout is not None
        ready = select.select([self.proc.stdout], [], [], TIMEOUT_S)[0]
        if not ready or self.proc.stdout.readline().strip() != "READY":
            raise RuntimeError(f"reference did not start:\n{self.log_tail()}")
        return time.monotonic() - t0

    def stop(self) -> None:
        proc: subprocess.Popen[str] | None = getattr(self, "proc", None)
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=10)
            if proc.stdout is not None:
                proc.stdout.close()
        super().stop()

    def log_tail(self) -> str:
        return (self.work / "reference.log").read_text(errors="replace")[-3000:]


def _wait_answers(
    cloud: CloudStandIn, mark: int, keys: list[str], accept: Callable[[dict[str, Any]], bool]
) -> dict[str, dict[str, Any]]:
    """Per key, the first result the cloud received since ``mark`` that ``accept``s."""
    wanted = set(keys)
    found: dict[str, dict[str, Any]] = {}
    seen = mark

    def complete() -> bool:
        nonlocal seen
        for r in cloud.results[seen:]:
            key = r.get("execute_key")
            if key in wanted and key not in found and accept(r):
                found[key] = r
        seen = len(cloud.results)
        return len(found) == len(wanted)

    with cloud._cond:  # noqa: SLF001 - the stand-in's own lock over its results
        if not cloud._cond.wait_for(complete, TIMEOUT_S):  # noqa: SLF001
            raise TimeoutError(f"answers for {len(found)} of {len(wanted)} commands")
    return found


# --- the modes -------------------------------------------------------------------------


class Window:
    """CPU seconds and fsync calls of one process over a stretch of the run."""

    def __init__(self, pid: int, out: Path | None) -> None:
        self._pid = pid
        self._fsyncs = FsyncCounter(pid, out) if out is not None else None
        self._cpu = cpu_s(pid)

    def close(self) -> tuple[float, int | None]:
        cpu = cpu_s(self._pid) - self._cpu
        return cpu, (self._fsyncs.stop() if self._fsyncs is not None else None)


class Profiler:
    """py-spy attached to the daemon (``--profile``): collapsed stacks, all threads,
    idle frames left out, written when stopped."""

    def __init__(self, pid: int, out: Path) -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        self._proc = subprocess.Popen(
            ["py-spy", "record", "--pid", str(pid), "--rate", "500", "--gil", "--format", "raw",
             "--output", str(out), "--nonblocking"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.5)  # attached before the first timed command

    def stop(self) -> None:
        self._proc.send_signal(signal.SIGINT)
        self._proc.wait(timeout=30)


def _publish(cloud: CloudStandIn, token: bytes) -> float:
    t = time.monotonic()
    cloud._client.publish(cloud.command_topic, token, qos=1)  # noqa: SLF001 - no wait
    return t


def _one_by_one(gw: Gateway, batch: list[Token], pause_s: float) -> list[float]:
    """Each command once the previous one's release frame reached the board (+ pause)."""
    assert gw.tail is not None
    latencies = []
    for key, token in batch:
        t = _publish(gw.cloud, token)
        gw.tail.wait([_cid(key)])
        latencies.append((gw.tail.rx[_cid(key)] - t) * 1000)
        if pause_s:
            time.sleep(pause_s)
    return latencies


def _burst(prefix: str, gw: Gateway, batch: list[Token]) -> dict[str, float]:
    """All of ``batch`` back to back: first publish -> last release frame at the board."""
    assert gw.tail is not None
    sent = [(key, _publish(gw.cloud, token)) for key, token in batch]
    gw.tail.wait([_cid(k) for k, _ in batch])
    last = max(gw.tail.rx[_cid(k)] for k, _ in batch)
    elapsed = last - sent[0][1]
    latencies = [(gw.tail.rx[_cid(k)] - t) * 1000 for k, t in sent]
    return {
        f"{prefix}_seconds": round(elapsed, 4),
        f"{prefix}_releases_per_s": round(len(batch) / elapsed, 1),
        **_latency_figures(prefix, latencies),
    }


def measure(
    gw: Gateway,
    tokens: dict[str, list[Token]],
    *,
    pause_s: float,
    count_fsyncs: bool,
    idle_s: float,
) -> dict[str, Any]:
    assert gw.tail is not None
    tail, cloud = gw.tail, gw.cloud
    figures: dict[str, Any] = {}
    checks: dict[str, Any] = {}
    perf_n = 0

    def window() -> Window:
        nonlocal perf_n
        perf_n += 1
        return Window(gw.pid, gw.work / f"perf-{perf_n}.txt" if count_fsyncs else None)

    def per(value: float | int | None, n: int, scale: float = 1.0) -> float | None:
        return None if value is None else round(value * scale / n, 3)

    def run_mode(name: str, batch: list[Token], send: Callable[[], dict[str, float]]) -> None:
        mark = len(cloud.results)
        w = window()
        figures.update(send())
        checks[f"{name}_outcomes"] = gw.settle(mark, [k for k, _ in batch])
        cpu, fsyncs = w.close()
        figures[f"cpu_ms_per_command_{name}"] = per(cpu, len(batch), 1000)
        figures[f"fsyncs_per_release_{name}"] = per(fsyncs, len(batch))

    mark = len(cloud.results)
    _one_by_one(gw, tokens["warmup"], 0.0)
    gw.settle(mark, [k for k, _ in tokens["warmup"]])
    iso, b2b, burst = tokens["isolated"], tokens["b2b"], tokens["burst"]
    run_mode("isolated", iso, lambda: _latency_figures("isolated", _one_by_one(gw, iso, pause_s)))
    run_mode("b2b", b2b, lambda: _latency_figures("b2b", _one_by_one(gw, b2b, 0.0)))
    run_mode("burst", burst, lambda: _burst("burst", gw, burst))
    released = tail.total()

    # Duplicates: the burst's 64 tokens again; the answer is any result since the mark.
    dup = tokens["burst"]
    mark = len(cloud.results)
    w = window()
    t0 = _publish(cloud, dup[0][1])
    for _key, token in dup[1:]:
        _publish(cloud, token)
    _wait_answers(cloud, mark, [k for k, _ in dup], lambda r: True)
    elapsed = time.monotonic() - t0
    time.sleep(SETTLE_S)
    cpu, fsyncs = w.close()
    figures["duplicate_decisions_per_s"] = round(len(dup) / elapsed, 1)
    figures["cpu_ms_per_command_duplicates"] = per(cpu, len(dup), 1000)
    figures["fsyncs_per_duplicate"] = per(fsyncs, len(dup))
    time.sleep(0.3)  # a wrongly released duplicate would have reached the board by now
    checks["extra_actuations_from_duplicates"] = tail.total() - released
    expected = [
        _cid(k) for group in ("warmup", "isolated", "b2b", "burst") for k, _ in tokens[group]
    ]
    checks["released_each_command_once"] = sorted(tail.count) == sorted(expected) and set(
        tail.count.values()
    ) == {1}
    figures["rss_mb_after_run"] = rss_mb(gw.pid)
    c0 = cpu_s(gw.pid)
    time.sleep(idle_s)
    figures["idle_cpu_pct_of_core"] = round((cpu_s(gw.pid) - c0) / idle_s * 100, 3)
    return {"figures": figures, "checks": checks}


def big_journal_run(gw: Daemon, tokens: dict[str, list[Token]], idle_s: float) -> dict[str, Any]:
    """The daemon on a journal of a million executions: READY, a burst, isolated
    commands, RSS, idle CPU. A daemon that cannot keep up gives None figures and the
    reason in the checks, not an aborted run: RSS and idle CPU are measured anyway."""
    figures: dict[str, Any] = {"big_journal_ready_s": round(gw.start(), 3)}
    figures.update(dict.fromkeys(_latency_figures("big_journal_burst", [0.0]), None))
    figures.update(big_journal_burst_seconds=None, big_journal_burst_releases_per_s=None)
    figures.update(dict.fromkeys(_latency_figures("big_journal_isolated", [0.0]), None))
    checks: dict[str, Any] = {}
    try:
        for mode in ("burst", "isolated"):
            batch = tokens[mode]
            mark = len(gw.cloud.results)
            if mode == "burst":
                figures.update(_burst("big_journal_burst", gw, batch))
            else:
                latencies = _one_by_one(gw, batch, 0.05)
                figures.update(_latency_figures("big_journal_isolated", latencies))
            checks[f"big_journal_{mode}_outcomes"] = gw.settle(mark, [k for k, _ in batch])
    except TimeoutError as exc:
        checks["big_journal_error"] = f"{exc} within {TIMEOUT_S:g} s"
    figures["big_journal_rss_mb"] = rss_mb(gw.pid)
    c0 = cpu_s(gw.pid)
    time.sleep(idle_s)
    figures["big_journal_idle_cpu_pct_of_core"] = round((cpu_s(gw.pid) - c0) / idle_s * 100, 3)
    return {"figures": figures, "checks": checks}


def fill_big_journal(path: Path, rows: int, state: str) -> None:
    """A journal as after a long life: ``rows`` finished executions, written directly.

    ``completed`` is where a paid cycle ends on a machine with a busy input (every
    machine of config.example.toml); ``released`` is where it ends without one."""
    Journal(path, GATEWAY_ID).close()  # the schema, by the daemon's own migrations
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA synchronous=OFF")  # a bulk load; not part of any measurement
    start = time.time() - 30 * 86400  # spread over the retention window (30 days)
    step = 30 * 86400 / rows

    started = state == "completed"

    def row(i: int) -> dict[str, Any]:
        at = start + i * step
        key = f"hist-{i:07d}"
        machine = f"M{i % MACHINES + 1}"
        last_result = result_payload(
            gateway_id=GATEWAY_ID,
            execute_key=key,
            payment_id=f"pay-{key}",
            machine_id=machine,
            state=state,
            reason=None,
            at=iso_utc(at + 1800 if started else at + 0.05),
            seq=4 if started else 3,
            event_id=f"00000000-0000-4000-8000-{i:012d}",
            awaits_start=started,
        )
        return {
            "execute_key": key,
            "command_id": _cid(key),
            "payment_id": f"pay-{key}",
            "machine_id": machine,
            "cycle": "normal",
            "issued_at": int(at),
            "expires_at": int(at) + 300,
            "state": state,
            "dispatch_boot_id": 1,
            "board_boot_id": 1,
            "received_at": iso_utc(at),
            "updated_at": iso_utc(at + 1800 if started else at + 0.05),
            "result_seq": 4 if started else 3,
            "last_result": last_result,
            "kind": "payment",
            "awaits_start": int(started),
            "released_at": at + 0.05,
            "started_at": at + 5 if started else None,
            "completed_at": at + 1800 if started else None,
            "dispatch_seq": i + 1,
            "dispatch_exec_count": i,
            "board_exec_count": i + 1,
            "in_doubt": 0,
        }

    columns = list(row(0))
    with conn:
        conn.executemany(
            f"INSERT INTO executions({', '.join(columns)})"
            f" VALUES ({', '.join(':' + c for c in columns)})",
            (row(i) for i in range(rows)),
        )
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


# --- the run -------------------------------------------------------------------------


def _spread(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in runs[0]:
        values = [r[key] for r in runs]
        if any(v is None for v in values):
            out[key] = {"median": None, "min": None, "max": None, "runs": values}
            continue
        out[key] = {
            "median": round(statistics.median(values), 3),
            "min": min(values),
            "max": max(values),
            "runs": values,
        }
    return out


def _targets(d: dict[str, Any], ratios: dict[str, float | None]) -> list[dict[str, Any]]:
    def med(key: str) -> float | None:
        return d[key]["median"] if key in d else None

    rss_key = "big_journal_rss_mb" if "big_journal_rss_mb" in d else "rss_mb_after_run"
    rows = [
        ("isolated p50 <= 1.5x reference", ratios.get("isolated_p50_ms"), "<=", 1.5),
        ("isolated p99 <= 2.5x reference", ratios.get("isolated_p99_ms"), "<=", 2.5),
        ("back-to-back p99 <= 3x reference", ratios.get("b2b_p99_ms"), "<=", 3.0),
        (
            "burst >= 60% of the reference's releases/s",
            ratios.get("burst_releases_per_s"),
            ">=",
            0.6,
        ),
        ("duplicates >= 5,000 decisions/s", med("duplicate_decisions_per_s"), ">=", 5000),
        ("CPU <= 1 ms/command (back to back)", med("cpu_ms_per_command_b2b"), "<=", 1.0),
        ("<= 1.2 fsyncs/release (back to back)", med("fsyncs_per_release_b2b"), "<=", 1.2),
        (f"RSS <= 45 MB ({rss_key})", med(rss_key), "<=", 45.0),
        ("idle CPU <= 0.5% of a core", med("idle_cpu_pct_of_core"), "<=", 0.5),
        ("READY <= 1 s", med("ready_s"), "<=", 1.0),
    ]
    return [
        {
            "target": name,
            "measured": value,
            "met": None if value is None else (value <= limit if op == "<=" else value >= limit),
        }
        for name, value, op, limit in rows
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a check in seconds")
    parser.add_argument("--isolated", type=int, help="isolated commands (200; quick 10)")
    parser.add_argument("--b2b", type=int, help="back-to-back commands (500; quick 20)")
    parser.add_argument("--pause-ms", type=float, default=50.0, help="isolated pause (50)")
    parser.add_argument("--repeat", type=int, help="repetitions (3; quick 1)")
    parser.add_argument("--idle-s", type=float, help="idle CPU window (60; quick 1)")
    parser.add_argument(
        "--drain-n",
        type=int,
        help="outbox drain events (10000; quick 1000); 100000 is the issue's size",
    )
    parser.add_argument(
        "--big-journal",
        action="store_true",
        help="also run the daemon on a journal of --big-journal-rows rows",
    )
    parser.add_argument("--big-journal-rows", type=int, help="(1000000; quick 10000)")
    parser.add_argument(
        "--big-journal-state",
        choices=("completed", "released"),
        default="completed",
        help="final state of the history rows: completed (machines with a busy input, as "
        "in config.example.toml; the default) or released (machines without one)",
    )
    parser.add_argument("--workdir", type=Path, help="where journals live (default: $TMPDIR)")
    parser.add_argument("--keep", action="store_true", help="keep the working folder (logs)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument(
        "--profile",
        type=Path,
        help="record the daemon with py-spy (collapsed stacks, one file per repetition) into"
        " this folder; py-spy's sampling costs CPU, so the figures of such a run are not quoted",
    )
    args = parser.parse_args(argv)
    base = QUICK if args.quick else FULL
    size = {
        k: (getattr(args, a) if getattr(args, a) is not None else base[k])
        for k, a in (
            ("isolated", "isolated"),
            ("b2b", "b2b"),
            ("drain_n", "drain_n"),
            ("idle_s", "idle_s"),
            ("repeat", "repeat"),
            ("big_rows", "big_journal_rows"),
        )
    }
    fsync_problem = perf_problem()
    load_before = os.getloadavg()

    runs: dict[str, list[dict[str, Any]]] = {"daemon": [], "reference": []}
    checks: dict[str, list[dict[str, Any]]] = {"daemon": [], "reference": []}
    drains: list[dict[str, Any]] = []
    with (
        tempfile.TemporaryDirectory(prefix="metalav-store-view-", dir=args.workdir) as tmp,
        LocalBroker() as broker,
    ):
        work = Path(tmp)
        if args.keep:
            work = Path(tempfile.mkdtemp(prefix="metalav-store-view-", dir=args.workdir))
            print(f"working folder kept: {work}", file=sys.stderr)
        cloud = CloudStandIn(broker.host, broker.port, GATEWAY_ID)
        try:
            # Signing is the cloud's cost, not the gateway's: done before the clock runs.
            def sign(prefix: str, n: int) -> list[Token]:
                return [
                    (
                        f"{prefix}-{i}",
                        cloud.sign(
                            f"{prefix}-{i}", ttl_s=6 * 3600, machine_id=f"M{i % MACHINES + 1}"
                        ),
                    )
                    for i in range(n)
                ]

            tokens = {
                "warmup": sign("warm", WARMUP),
                "isolated": sign("iso", size["isolated"]),
                "b2b": sign("b2b", size["b2b"]),
                "burst": sign("burst", MACHINES),
            }
            big = work / "big-journal.db"
            if args.big_journal:
                t = time.monotonic()
                fill_big_journal(big, size["big_rows"], args.big_journal_state)
                print(
                    f"big journal: {size['big_rows']} rows in {time.monotonic() - t:.0f} s",
                    file=sys.stderr,
                )
            for rep in range(size["repeat"]):
                order: list[type[Gateway]] = (
                    [Daemon, Reference] if rep % 2 == 0 else [Reference, Daemon]
                )
                for kind in order:
                    gw = kind(work / f"{rep}-{kind.name}", broker, cloud)
                    spy: Profiler | None = None
                    try:
                        ready = gw.start()
                        if args.profile is not None and kind is Daemon:
                            spy = Profiler(gw.pid, args.profile / f"daemon-{rep}.txt")
                        result = measure(
                            gw,
                            tokens,
                            pause_s=args.pause_ms / 1000,
                            count_fsyncs=fsync_problem is None,
                            idle_s=size["idle_s"],
                        )
                    except Exception:
                        print(gw.log_tail(), file=sys.stderr)
                        raise
                    finally:
                        if spy is not None:
                            spy.stop()
                        gw.stop()
                    runs[kind.name].append({"ready_s": round(ready, 3), **result["figures"]})
                    checks[kind.name].append(result["checks"])
                    print(f"repetition {rep + 1}: {kind.name} done", file=sys.stderr)
                if args.big_journal:
                    gw = Daemon(work / f"{rep}-daemon-big", broker, cloud, journal=big)
                    try:
                        big_tokens = {
                            "burst": sign(f"big{rep}-burst", MACHINES),
                            "isolated": sign(f"big{rep}-iso", min(BIG_ISOLATED, size["isolated"])),
                        }
                        result = big_journal_run(gw, big_tokens, size["idle_s"])
                    except Exception:
                        print(gw.log_tail(), file=sys.stderr)
                        raise
                    finally:
                        gw.stop()
                    runs["daemon"][-1].update(result["figures"])
                    checks["daemon"][-1].update(result["checks"])
                (work / f"{rep}-drain").mkdir()
                drains.append(
                    asyncio.run(
                        outbox_drain._mqtt(
                            size["drain_n"],  # noqa: SLF001
                            work / f"{rep}-drain",
                        )
                    )
                )
        finally:
            cloud.close()

    daemon, reference = _spread(runs["daemon"]), _spread(runs["reference"])
    ratios: dict[str, float | None] = {}
    for key, fig in daemon.items():
        ref = reference.get(key, {}).get("median")
        ratios[key] = round(fig["median"] / ref, 3) if fig["median"] is not None and ref else None
    ratios = {k: v for k, v in ratios.items() if k in reference}
    report = {
        "benchmark": "store_view",
        "what": "cloud MQTT publish -> first byte of RELEASE at the simulated board; the "
        "daemon as shipped (INFO logs to a file, 64 machines, journal WAL, each write "
        "flushed before anything depends on it) and bench/minimal_gateway.py, same broker, "
        "board, commands",
        "method": {
            "latency": "publish time.monotonic() in the cloud stand-in -> rx_monotonic of the "
            "board's read holding the RELEASE frame's first byte",
            "cpu": "utime+stime of /proc/<pid>/stat over the mode until its last answer "
            f"+ {SETTLE_S} s, divided by the mode's commands (tick {1000 / CLK_TCK:g} ms)",
            "fsyncs": fsync_problem
            or "perf stat -e "
            + FSYNC_EVENTS
            + " -p <pid> over each mode (kernel tracepoint counts, every thread, no ptrace stop)",
            "rss": "VmRSS of /proc/<pid>/status after the run and the idle window",
            "ready": "process start -> local API status broker and board connected "
            "(reference: READY after its SUBACK, board open)",
            "warmup_commands": WARMUP,
            "isolated_pause_ms": args.pause_ms,
        },
        "sizes": {
            **size,
            "machines": MACHINES,
            "burst": MACHINES,
            "duplicates": MACHINES,
            "big_journal": args.big_journal,
            "big_journal_state": args.big_journal_state,
        },
        "environment": {
            "python": platform.python_version(),
            "machine": platform.machine(),
            "kernel": platform.release(),
            "cpus": os.cpu_count(),
            "broker": broker.kind,
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        },
        "daemon": daemon,
        "reference": reference,
        "ratios_daemon_over_reference": ratios,
        "outbox_drain_mqtt": _spread(
            [{"events_per_s": d["events_per_s"], "seconds": d["seconds"]} for d in drains]
        )
        | {"n": size["drain_n"]},
        "targets": _targets(daemon, ratios),
        "checks": checks,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
