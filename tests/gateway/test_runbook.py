"""docs/runbook.md is a contract with the technician: every ``metalavctl`` line in its
command blocks is a command ``metalavctl`` accepts as written (the placeholders
filled in). A line it would refuse (a required ``--reason`` left out, a renamed flag)
leaves a technician stuck at 9 pm with the runbook open."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from gateway.ctl import CtlError, _build_parser

RUNBOOK = Path(__file__).resolve().parents[2] / "docs" / "runbook.md"

# The runbook's placeholders, as a technician would fill them in.
PLACEHOLDERS = {
    "EXECUTE_KEY": "exec-7f3a9c2e01b84d55",
    "PAYMENT_ID": "pay-123",
    "ARQUIVO": "/tmp/backup.db",
}


def _commands() -> list[str]:
    text = RUNBOOK.read_text()
    blocks = re.findall(r"```(?:sh|bash)?\n(.*?)```", text, flags=re.S)
    lines: list[str] = []
    for block in blocks:
        for line in block.splitlines():
            line = line.strip()
            if line.startswith("metalavctl "):
                lines.append(line)
    return lines


def test_the_runbook_has_commands_to_check() -> None:
    assert len(_commands()) >= 20


@pytest.mark.parametrize("line", _commands())
def test_every_runbook_command_is_accepted_as_written(line: str) -> None:
    for name, value in PLACEHOLDERS.items():
        line = line.replace(name, value)
    line = re.sub(r"\$\([^)]*\)", "2026-11-27", line)  # the shell's $(date ...)
    words = shlex.split(line, comments=True)
    # Output redirections are the shell's, not metalavctl's.
    words = words[: next((i for i, w in enumerate(words) if w.startswith(">")), len(words))]
    try:
        _build_parser().parse_args(words[1:])
    except CtlError as exc:
        pytest.fail(f"docs/runbook.md: `{line}` is refused: {exc}")
