"""Text for technicians in their language: gettext catalogs, English in the code.

The messages in the code are English; ``gateway/locale/<lang>/LC_MESSAGES/metalav.po``
translates them (pt_BR for the store's technicians) and the compiled ``.mo`` next to it
ships in the wheel (``scripts/compile-catalogs.sh`` rebuilds it; a test checks the
two agree). ``metalavctl`` speaks the language of ``LANGUAGE`` / ``LC_ALL`` /
``LC_MESSAGES`` / ``LANG`` (pt_BR, else English) and asks the daemon for its answers
in that language (``Accept-Language``), so one daemon serves technicians of either.
"""

from __future__ import annotations

import functools
import gettext
from pathlib import Path

__all__ = [
    "DOMAIN",
    "LOCALE_DIR",
    "N_",
    "cli_translation",
    "for_accept_language",
    "language_of",
]

DOMAIN = "metalav"
LOCALE_DIR = Path(__file__).with_name("locale")
#: The languages a catalog exists for (besides English, the code's own).
LANGUAGES = ("pt_BR",)


def N_(message: str) -> str:  # noqa: N802  (the gettext convention)
    """Mark ``message`` for the catalog without translating it here (it is translated
    where the reader's language is known)."""
    return message


def cli_translation() -> gettext.NullTranslations:
    """The translation for this process's environment. It also becomes gettext's
    global domain, so argparse's own messages (usage, errors) follow it."""
    gettext.bindtextdomain(DOMAIN, str(LOCALE_DIR))
    gettext.textdomain(DOMAIN)
    return gettext.translation(DOMAIN, str(LOCALE_DIR), fallback=True)


def language_of(translation: gettext.NullTranslations) -> str:
    """The language tag of a translation: ``pt-BR``, or ``en`` for the code's own."""
    language = translation.info().get("language", "")
    return language.replace("_", "-") if language else "en"


@functools.cache
def for_accept_language(header: str | None) -> gettext.NullTranslations:
    """The translation for an HTTP ``Accept-Language`` (first language we have wins)."""
    for part in (header or "").split(","):
        tag = part.split(";")[0].strip().replace("-", "_")
        for language in LANGUAGES:
            if tag and (language == tag or language.split("_")[0] == tag.lower()):
                return gettext.translation(
                    DOMAIN, str(LOCALE_DIR), languages=[language], fallback=True
                )
    return gettext.NullTranslations()
