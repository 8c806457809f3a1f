"""metalavctl in the technician's language (issue 12, item 8): gettext catalogs, the
daemon's answers in the language asked for, argparse included, local dates, and
errors as JSON with --json, against a running daemon over its real socket; the
toolbox commands (doctor, backup, restore) and the API's permission refusals too."""

from __future__ import annotations

import ast
import gettext
import json
import os
import re
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from gateway import i18n

from .conftest import Store

ROOT = Path(__file__).resolve().parents[2]
PO = i18n.LOCALE_DIR / "pt_BR" / "LC_MESSAGES" / f"{i18n.DOMAIN}.po"
TRANSLATED_SOURCES = (
    "gateway/ctl.py",
    "gateway/api.py",
    "gateway/operator.py",
    "gateway/ctl_kit.py",
    "gateway/doctor.py",
    "gateway/backup.py",
    "gateway/profiles.py",
)
LANGS = {
    "en": {"LANG": "C.UTF-8"},
    "pt": {"LANG": "pt_BR.UTF-8"},
}


def _po_entries() -> dict[str, str]:
    """msgid -> msgstr of the .po (single-line entries, as the catalog is written)."""
    text = PO.read_text()

    def unquote(s: str) -> str:
        return str(ast.literal_eval(f'"{s}"'))

    pairs = re.findall(r'^msgid "(.*)"\nmsgstr "(.*)"$', text, re.M)
    return {unquote(k): unquote(v) for k, v in pairs if k}


def _messages_in_code() -> set[str]:
    found = set()
    for name in TRANSLATED_SOURCES:
        for node in ast.walk(ast.parse((ROOT / name).read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("_", "N_")
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                found.add(node.args[0].value)
    return found


def test_every_message_of_the_code_is_in_the_catalog_and_the_mo_is_current() -> None:
    entries = _po_entries()
    missing = _messages_in_code() - set(entries)
    assert not missing, f"not in {PO.name} (see scripts/compile-catalogs.sh): {missing}"
    assert all(entries.values()), [k for k, v in entries.items() if not v]
    compiled = gettext.translation(i18n.DOMAIN, str(i18n.LOCALE_DIR), languages=["pt_BR"])
    stale = {k for k, v in entries.items() if compiled.gettext(k) != v}
    assert not stale, f"the .mo is older than the .po: run scripts/compile-catalogs.sh: {stale}"
    # The fields of each message survive translation (a {name} lost is a crash later).
    for msgid, msgstr in entries.items():
        fields = set(re.findall(r"\{[a-z_]+(?:![rs])?\}", msgid))
        assert fields == set(re.findall(r"\{[a-z_]+(?:![rs])?\}", msgstr)), msgid


def ctl(
    store: Store | None, lang: str, *args: str, tz: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LANGUAGE", "LC_ALL", "LC_MESSAGES")}
    env.update(LANGS[lang])
    if tz:
        env["TZ"] = tz
    sock = ["--socket", str(store.daemon.socket)] if store is not None else []
    return subprocess.run(
        [sys.executable, "-m", "gateway.ctl", *args, *sock],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )


ZONE = "America/Manaus"  # UTC-4 all year: local time and UTC never look alike


@pytest.mark.parametrize(
    ("lang", "words", "time_format"),
    [
        (
            "en",
            ("Store ", "released", "executions by state", "payment pay-i18n"),
            "%Y-%m-%d %H:%M",
        ),
        (
            "pt",
            ("Loja ", "liberada", "execuções por estado", "pagamento pay-i18n"),
            "%d/%m/%Y %H:%M",
        ),
    ],
)
def test_each_command_speaks_the_technicians_language_and_json_stays_the_contract(
    store: Store, lang: str, words: tuple[str, ...], time_format: str
) -> None:
    key = store.new_key()
    store.cloud.publish(store.cloud.sign(key, payment_id="pay-i18n"))
    store.cloud.wait_for(key, state="released")
    store_word, released, by_state, payment = words

    status = ctl(store, lang, "status")
    assert status.returncode == 0, status.stderr
    assert store_word in status.stdout and by_state in status.stdout
    # --json is the same in every language: codes and states of the contract.
    data = json.loads(ctl(store, lang, "executions", "--json").stdout)
    row = data["executions"][0]
    assert row["state"] == "released"

    # Dates in local time, in the language's layout, everywhere.
    local = datetime.fromisoformat(row["received_at"]).astimezone(ZoneInfo(ZONE))
    for args in (("executions",), ("execution", key), ("machines",)):
        out = ctl(store, lang, *args, tz=ZONE).stdout
        assert local.strftime(time_format)[:-3] in out, (args, out)  # date and local hour
        assert row["received_at"][:16].replace("T", " ") not in out, "raw UTC shown"
        if args == ("executions",):
            assert released in out and payment in out
    # A date typed without a zone is the technician's local time too (taken as UTC,
    # this one would end four hours before the command arrived).
    until = (local + timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M")
    found = ctl(store, lang, "executions", "--until", until, "--json", tz=ZONE)
    assert key in [e["execute_key"] for e in json.loads(found.stdout)["executions"]]

    # The daemon's refusals, argparse's errors and the help: one line, the same
    # language, the same code in JSON.
    missing = ctl(store, lang, "reprocess", "nope", "--reason", "x")
    assert missing.returncode == 1
    assert ("not found" if lang == "en" else "não encontrada") in missing.stderr
    bad = ctl(store, lang, "executions", "--since", "amanhã", "--json")
    assert bad.returncode == 2 and json.loads(bad.stdout)["error"] == "bad_date"
    assert ("invalid date" if lang == "en" else "data inválida") in bad.stderr
    usage = ctl(store, lang, "resolve", key, "--reason", "x", "--json")
    assert usage.returncode == 2 and json.loads(usage.stdout)["error"] == "usage"
    required = "the following arguments are required" if lang == "en" else "obrigatórios"
    assert required in usage.stderr and len(usage.stderr.strip().splitlines()) == 1
    helped = ctl(None, lang, "resolve", "--help")
    assert helped.returncode == 0
    heading = "what the technician saw" if lang == "en" else "o que o técnico viu na máquina"
    assert heading in helped.stdout
    assert ("usage:" if lang == "en" else "uso:") in helped.stdout
    assert "Traceback" not in missing.stderr + bad.stderr + usage.stderr


@pytest.mark.parametrize(
    ("lang", "words", "other_language"),
    [
        (
            "en",
            {
                "help": "say what to fix",
                "usage": "usage:",
                "titles": ("Journal (integrity)", "Clock", "Gateway service"),
                "journal": "intact",
                "summary": "all good",
                "refusal": ("stop the service", "nothing was changed"),
            },
            ("Diário", "Relógio", "íntegro", "tudo certo", "pare o serviço", "nada foi"),
        ),
        (
            "pt",
            {
                "help": "diz o que corrigir",
                "usage": "uso:",
                "titles": ("Diário (integridade)", "Relógio", "Serviço do gateway"),
                "journal": "íntegro",
                "summary": "tudo certo",
                "refusal": ("pare o serviço", "nada foi alterado"),
            },
            ("Journal (", "Clock", "intact", "all good", "stop the service", "was changed"),
        ),
    ],
)
def test_doctor_and_restore_speak_the_technicians_language(
    store: Store, lang: str, words: dict[str, Any], other_language: tuple[str, ...]
) -> None:
    config = str(store.daemon.config_path)
    helped = ctl(None, lang, "doctor", "--help")
    assert helped.returncode == 0, helped.stderr
    assert words["usage"] in helped.stdout
    assert words["help"] in " ".join(helped.stdout.split())  # argparse wraps it

    # A healthy store: every check by its name, in the language; nothing failed.
    run = ctl(None, lang, "doctor", "--config", config)
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stdout + run.stderr
    for title in words["titles"]:
        assert title in run.stdout, run.stdout
    assert words["journal"] in run.stdout
    assert run.stdout.strip().splitlines()[-1].startswith(words["summary"]), run.stdout
    # --json keeps the stable codes for scripts; its text for people follows LANG.
    data = json.loads(ctl(None, lang, "doctor", "--config", config, "--json").stdout)
    checks = {c["name"]: c for c in data["checks"]}
    assert checks["journal"]["status"] == "ok" and words["journal"] in checks["journal"]["detail"]

    # A refusal: the daemon holds the journal, so restore changes nothing.
    refused = ctl(None, lang, "restore", str(store.workdir / "x.db"), "--reason", "x",
                  "--config", config)  # fmt: skip
    assert refused.returncode == 4, refused.stderr
    assert all(w in refused.stderr for w in words["refusal"]), refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1

    everything = helped.stdout + run.stdout + refused.stderr
    assert not [w for w in other_language if w in everything], everything
