"""Log lines made for journald, with the execute_key as a correlation field and personal
data kept out (promise 7).

- Under systemd, stderr is a journald stream and ``JOURNAL_STREAM`` is set: each line
  starts with the sd-daemon priority prefix (``<3>`` error, ``<4>`` warning, ...;
  sd-daemon(3)), which journald turns into the entry's PRIORITY, so
  ``journalctl -p warning`` works; no timestamp (journald stamps every entry).
  Elsewhere: the human format with a timestamp.
- A line about an execution ends with ``execute_key=KEY``: the key given in
  ``extra={"execute_key": ...}``, else the one bound with :func:`bind_execute_key`,
  else the first argument of the gateway's ``"execution %s ..."`` messages.
- :func:`redact` runs over every formatted line, tracebacks included: e-mail
  addresses, phone numbers, card-like digit runs, CPFs and capitalised full names
  become placeholders. It is the net under the rule that the code logs identifiers
  and codes, never free text from a customer.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import re
import sys
from collections.abc import Iterator

__all__ = [
    "JournaldFormatter",
    "HumanFormatter",
    "bind_execute_key",
    "execute_key_of",
    "redact",
    "setup_logging",
    "syslog_priority",
]

_execute_key: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "metalav_execute_key", default=None
)

# sd-daemon(3) / syslog(3) priorities.
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))

_REDACTIONS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+"), "<email>"),
    # 13-19 digits, possibly grouped by spaces or dashes: a payment card number.
    (re.compile(r"(?<![\w-])\d(?:[ -]?\d){12,18}(?![\w-])"), "<card>"),
    (re.compile(r"\b\d{3}\.\d{3}\.\d{3}-\d{2}\b"), "<cpf>"),
    # Phone numbers: +55 (11) 98765-4321, (11) 8765-4321, 98765-4321. The groups must
    # be separated: eight bare digits may be a board's boot id.
    (
        re.compile(
            r"(?<![\w.:-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,3}\)[ .-]?|\d{2,3}[ .-])?"
            r"\d{4,5}[ .-]\d{4}(?![\w.:-])"
        ),
        "<phone>",
    ),
    # A Brazilian mobile written without separators: 11987654321, +5511987654321.
    (re.compile(r"(?<![\w.:-])(?:\+?55)?\d{2}9\d{8}(?![\w.:-])"), "<phone>"),
    # Two or more capitalised words ("Maria da Silva"): a person's name. The gateway's
    # own messages are lower case; codes and identifiers have no spaces.
    (
        re.compile(r"\b[A-ZÀ-Ý][a-zà-ÿ]+(?:\s+(?:(?:d[aeo]s?|e)\s+)?[A-ZÀ-Ý][a-zà-ÿ]+)+\b"),
        "<name>",
    ),
)


def redact(text: str) -> str:
    for pattern, placeholder in _REDACTIONS:
        text = pattern.sub(placeholder, text)
    return text


def syslog_priority(levelno: int) -> int:
    for threshold, priority in _PRIORITIES:
        if levelno >= threshold:
            return priority
    return 7


@contextlib.contextmanager
def bind_execute_key(key: str | None) -> Iterator[None]:
    """Lines logged inside (in this task) carry ``execute_key=key``."""
    token = _execute_key.set(key)
    try:
        yield
    finally:
        _execute_key.reset(token)


def execute_key_of(record: logging.LogRecord) -> str | None:
    key = getattr(record, "execute_key", None) or _execute_key.get()
    if key:
        return str(key)
    msg = record.msg
    if isinstance(msg, str) and msg.startswith("execution %s") and record.args:
        args = record.args if isinstance(record.args, tuple) else (record.args,)
        if args and isinstance(args[0], str):
            return args[0]
    return None


class _Base(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        key = execute_key_of(record)
        if key is not None:
            line = f"{line} execute_key={key}"
        return redact(line)


class JournaldFormatter(_Base):
    """``<priority>logger: message``; journald adds the time and the unit."""

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        # Every physical line of a traceback gets the prefix too: journald reads the
        # stream line by line.
        return "\n".join(prefix + part for part in super().format(record).split("\n"))


class HumanFormatter(_Base):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")


def under_journald() -> bool:
    """stderr is the journald stream named by ``JOURNAL_STREAM`` ("DEV:INODE")."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in stream.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JournaldFormatter() if under_journald() else HumanFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Libraries below us log payloads at DEBUG; keep them quiet (promise 7, no PII).
    for noisy in ("aiomqtt", "paho", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
