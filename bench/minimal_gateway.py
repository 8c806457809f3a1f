"""The floor: a minimal durable gateway, to measure the daemon against in the same run.

Same store config, broker, command topic and board as the daemon; per command: one
SQLite WAL ``synchronous=FULL`` commit of the raw token keyed by its jti (read without
verification), one RELEASE frame to the board, then the PUBACK (manual ack after the
commit, like the daemon). A known jti is not released again: it gets a one-line answer
on the results topic. Nothing else: no signature check, no state machine, no outbox.

    python bench/minimal_gateway.py --config gateway.toml --db ref.db   # prints READY
"""

import argparse
import base64
import hashlib
import json
import socket
import sqlite3
import threading
import tomllib

import paho.mqtt.client as mqtt
import serial  # type: ignore[import-untyped]
from paho.mqtt.enums import CallbackAPIVersion

from firmware_bridge.frames import Release, encode

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--config", required=True)
parser.add_argument("--db", required=True)
args = parser.parse_args()
with open(args.config, "rb") as f:
    config = tomllib.load(f)
channel = {m["id"]: m["channel"] for m in config["machines"]}
base = f"metalav/v1/gateways/{config['gateway']['id']}"
db = sqlite3.connect(args.db, isolation_level=None, check_same_thread=False)  # autocommit
db.execute("PRAGMA journal_mode=WAL")
db.execute("PRAGMA synchronous=FULL")
db.execute("CREATE TABLE IF NOT EXISTS commands (jti TEXT PRIMARY KEY, token BLOB)")
board = serial.Serial(config["board"]["port"], 115200, timeout=1)
seq = 0


def drain_board() -> None:  # the board's RELEASE_ACKs are read and dropped
    while True:
        board.read(256)


def on_message(client: mqtt.Client, _: object, msg: mqtt.MQTTMessage) -> None:
    global seq
    body = msg.payload.split(b".")[1]
    claims = json.loads(base64.urlsafe_b64decode(body + b"=" * (-len(body) % 4)))
    jti = claims["jti"]
    if db.execute("INSERT OR IGNORE INTO commands VALUES (?, ?)", (jti, msg.payload)).rowcount:
        command_id = int.from_bytes(hashlib.sha256(jti.encode()).digest()[:8], "big")
        seq = (seq + 1) % 256
        board.write(encode(Release(command_id, channel[claims["machine_id"]], 1, 100, 100), seq))
    else:
        answer = {"execute_key": jti, "state": "duplicate", "final": True}
        client.publish(f"{base}/results", json.dumps(answer), qos=1)
    client.ack(msg.mid, msg.qos)


def on_connect(client: mqtt.Client, *_: object) -> None:
    sock = client.socket()
    if isinstance(sock, socket.socket):  # as the daemon does (Nagle + delayed ACK)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client.subscribe(f"{base}/commands/execute", qos=1)


client = mqtt.Client(
    CallbackAPIVersion.VERSION2, client_id="minimal-gateway", clean_session=False, manual_ack=True
)
client.on_connect = on_connect
client.on_message = on_message
client.on_subscribe = lambda *_: print("READY", flush=True)
threading.Thread(target=drain_board, daemon=True).start()
client.connect(config["mqtt"]["host"], config["mqtt"]["port"], keepalive=60)
client.loop_forever()
