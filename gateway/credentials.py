"""Secrets from systemd's credentials (``LoadCredential=``), never from the environment.

systemd copies each credential of the unit into ``$CREDENTIALS_DIRECTORY`` (readable by
the service only, gone when it stops). The file names are the unit's credential ids:

=================  ==========================  ======================================
credential         config key                  how it is used
=================  ==========================  ======================================
mqtt-password      ``[mqtt] password``         its text (one trailing newline dropped)
mqtt-client-key    ``[mqtt] tls_key_file``     its path (the PEM key of the client
                                               certificate, handed to TLS as a file)
cloud-token        ``[cloud] token``           its text (one trailing newline dropped)
=================  ==========================  ======================================

A credential overrides the config file; a ``METALAV_*`` variable still overrides both
(the config's own order). A blank credential is "not set": the unit gives each one a
blank default so that a store without, say, a broker password needs no file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["CREDENTIALS", "CredentialError", "apply_credentials"]

#: credential id -> (config section, key, whether the value is the file's path)
CREDENTIALS: dict[str, tuple[str, str, bool]] = {
    "mqtt-password": ("mqtt", "password", False),
    "mqtt-client-key": ("mqtt", "tls_key_file", True),
    "cloud-token": ("cloud", "token", False),
}


class CredentialError(Exception):
    """A credential file exists but cannot be read."""


def apply_credentials(data: dict[str, Any], directory: str | None) -> list[str]:
    """Put the credentials found in ``directory`` into the parsed config ``data``;
    return the ids applied (never their values)."""
    if not directory:
        return []
    applied = []
    for cred_id, (section, key, as_path) in CREDENTIALS.items():
        path = Path(directory) / cred_id
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            continue
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise CredentialError(
                f"credential {cred_id} ({section}.{key}): cannot read {path}: {reason}"
            ) from None
        if not text.strip():
            continue
        target = data.setdefault(section, {})
        if not isinstance(target, dict):
            continue  # the config's own validation names the bad section
        target[key] = str(path) if as_path else text.removesuffix("\n")
        applied.append(cred_id)
    return applied
