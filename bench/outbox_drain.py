"""Benchmark: drain a backlog of outbox events once the link is back.

The store is the real journal (SQLite, WAL) holding N events (default 100,000) spread
over many streams, as after a long outage; the dispatcher drains it
    - over MQTT to a local mosquitto (QoS 1, pipelined), and
    - over HTTPS batches to a local HTTP server (plain HTTP on loopback: TLS cost is
      not measured here).
Prints one JSON document with events/s for each path.

    python bench/outbox_drain.py [--n 100000] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

# devtools/ (the harness) is not installed with the package: take it from this checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cloud_sync.dispatcher import OutboxDispatcher  # noqa: E402
from cloud_sync.https_client import CloudHttpClient  # noqa: E402
from cloud_sync.mqtt_session import MqttSession, MqttSettings  # noqa: E402
from devtools.broker import LocalBroker, free_port  # noqa: E402
from gateway.journal import Journal, iso_utc  # noqa: E402
from gateway.journal.outbox import append_payload  # noqa: E402

STREAMS = 500


class _NoCommands:
    async def handle_command(self, payload: bytes) -> None:
        raise AssertionError("no commands in this benchmark")


def _fill(journal: Journal, n: int) -> None:
    at = iso_utc(time.time())
    with journal._tx() as c:  # noqa: SLF001 - bulk load, as the core would over days
        for i in range(n):
            event_id = str(uuid.uuid4())
            payload = json.dumps(
                {
                    "event_id": event_id,
                    "type": "execution.result",
                    "n": i,
                    "state": "released",
                    "at": at,
                }
            )
            append_payload(c, event_id, f"exec-{i % STREAMS}", "results", payload, at)


async def _drain(dispatcher: OutboxDispatcher, journal: Journal, n: int) -> float:
    started = time.perf_counter()
    while journal.depth()["sent"] < n:
        if await dispatcher.run_once() == 0:
            await asyncio.sleep(0.01)
    return time.perf_counter() - started


async def _mqtt(n: int, workdir: Path) -> dict[str, object]:
    journal = Journal(workdir / "mqtt.db", "bench-gw")
    _fill(journal, n)
    with LocalBroker() as broker:
        up = asyncio.Event()
        session = MqttSession(
            MqttSettings(host=broker.host, port=broker.port),
            _NoCommands(),
            gateway_id="bench-gw",
            on_link_change=lambda connected: up.set() if connected else None,
        )
        task = asyncio.create_task(session.run())
        await asyncio.wait_for(up.wait(), 10)
        dispatcher = OutboxDispatcher(
            journal,
            mqtt=session,
            https=None,
            breakers={},
            batch_size=2000,
            https_bulk_threshold=None,
        )
        elapsed = await _drain(dispatcher, journal, n)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return {"n": n, "seconds": round(elapsed, 2), "events_per_s": round(n / elapsed)}


class _Cloud(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    received = 0

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Cloud.received += len(body.get("events", [body]))
        data = b'{"accepted": 1}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


async def _https(n: int, workdir: Path) -> dict[str, object]:
    journal = Journal(workdir / "https.db", "bench-gw")
    _fill(journal, n)
    port = free_port()
    server = ThreadingHTTPServer(("127.0.0.1", port), _Cloud)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    http = CloudHttpClient(f"http://127.0.0.1:{port}", "bench-gw", token="bench")
    offline = MqttSession(
        MqttSettings(host="127.0.0.1", port=free_port()), _NoCommands(), gateway_id="x"
    )  # never connected: HTTPS is the only path
    dispatcher = OutboxDispatcher(journal, mqtt=offline, https=http, breakers={}, batch_size=500)
    try:
        elapsed = await _drain(dispatcher, journal, n)
    finally:
        await http.aclose()
        server.shutdown()
    return {
        "n": n,
        "batch": 500,
        "seconds": round(elapsed, 2),
        "events_per_s": round(n / elapsed),
        "received": _Cloud.received,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="metalav-drain-") as tmp:
        mqtt = asyncio.run(_mqtt(args.n, Path(tmp)))
        https = asyncio.run(_https(args.n, Path(tmp)))
    report = {
        "benchmark": "outbox_drain",
        "store": "sqlite journal (WAL)",
        "streams": STREAMS,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "mqtt_mosquitto": mqtt,
        "https_batches": https,
        "target": "100k over MQTT in under 30 s",
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
