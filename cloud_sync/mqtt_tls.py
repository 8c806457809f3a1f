"""TLS towards the MQTT broker: the client context built from the ``[mqtt]`` files, and
failures told in words a technician can act on.

Two kinds of failure, both retried by the session with back-off (a certificate may be
renewed or a file put back while the daemon runs), both logged as one line that names
the config key and the file:

- the files: missing, unreadable, not PEM, a key that does not match its certificate
  (:func:`client_tls_context`, also what ``check-config`` runs);
- the handshake: the broker's certificate does not verify against ``tls_ca_file``, or
  the broker refuses the gateway's certificate (expired, from another CA)
  (:func:`explain_tls_failure`). With TLS 1.3 the broker refuses a client certificate
  only after the handshake, as an alert on the first read; the session reports it from
  paho's log line, since aiomqtt ignores a disconnect before the CONNACK.

Nothing here refuses the gateway's own certificate by the clock: a Raspberry Pi has no
RTC, and the broker, which checks the dates, is the judge; the local dates only explain
its refusal. (OpenSSL does check the broker's certificate against this clock: before
NTP has set it, the error says "certificate is not yet valid".)
"""

from __future__ import annotations

import datetime as dt
import re
import ssl
from pathlib import Path

from cryptography import x509

__all__ = ["MqttTlsError", "client_tls_context", "explain_tls_failure"]


class MqttTlsError(Exception):
    """TLS towards the broker cannot work until a person fixes a file or a certificate.
    The message names the ``mqtt.*`` key and the file; it carries no secret."""


class _ClosedOnFailedHandshake(ssl.SSLSocket):
    """paho leaves the socket of a failed handshake open (a file descriptor per attempt
    until the garbage collector finds it): close it here."""

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except BaseException:
            self.close()
            raise


def _read(key: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise MqttTlsError(f"mqtt.{key}: cannot read {path}: {exc.strerror or exc}") from None


def _no_password() -> bytes:
    # An encrypted key must fail here, never make OpenSSL prompt on a terminal.
    return b""


def client_tls_context(
    ca_file: Path | None, cert_file: Path | None, key_file: Path | None
) -> ssl.SSLContext:
    """The context for the broker connection: the broker's certificate verified (against
    ``ca_file``, else the system's CAs) with its host name checked; this gateway's
    certificate and key if given. Raises :class:`MqttTlsError` naming the key at fault."""
    if key_file is not None and cert_file is None:
        raise MqttTlsError("mqtt.tls_key_file is set without mqtt.tls_cert_file")
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.sslsocket_class = _ClosedOnFailedHandshake
    if ca_file is not None:
        _read("tls_ca_file", ca_file)
        try:
            ctx.load_verify_locations(cafile=str(ca_file))
        except ssl.SSLError:
            raise MqttTlsError(f"mqtt.tls_ca_file: no PEM CA certificate in {ca_file}") from None
    if cert_file is not None:
        pem = _read("tls_cert_file", cert_file)
        if key_file is not None:
            _read("tls_key_file", key_file)
        try:
            x509.load_pem_x509_certificate(pem)
        except ValueError:
            raise MqttTlsError(f"mqtt.tls_cert_file: no PEM certificate in {cert_file}") from None
        try:
            ctx.load_cert_chain(
                str(cert_file), str(key_file) if key_file else None, password=_no_password
            )
        except ssl.SSLError as exc:
            if exc.reason == "KEY_VALUES_MISMATCH":
                raise MqttTlsError(
                    f"mqtt.tls_key_file: {key_file} is not the key of "
                    f"mqtt.tls_cert_file {cert_file}"
                ) from None
            if key_file is None:
                raise MqttTlsError(
                    f"mqtt.tls_cert_file: no private key in {cert_file}, "
                    "and mqtt.tls_key_file is not set"
                ) from None
            raise MqttTlsError(
                f"mqtt.tls_key_file: no usable unencrypted PEM private key in {key_file}"
            ) from None
    return ctx


_SSL_CODE = re.compile(r"\[SSL: ([A-Z0-9_]+)\]")
_VERIFY_DETAIL = re.compile(r"certificate verify failed: (.+?)(?: \(_ssl\.c:\d+\))?$")

# Alerts a broker sends when it refuses the gateway's certificate (RFC 8446 section 6.2).
_REFUSALS = {
    "TLSV1_ALERT_UNKNOWN_CA": "it is not signed by a CA the broker trusts",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the broker says it has expired",
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "the broker says it is revoked",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the broker says it is bad",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "the broker does not support it",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "the broker could not accept it",
    "TLSV1_ALERT_ACCESS_DENIED": "the broker denies access to it",
}


def _validity(cert_file: Path) -> str:
    try:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    except (OSError, ValueError):
        return ""
    after = cert.not_valid_after_utc
    now = dt.datetime.now(dt.UTC)
    when = after.isoformat(timespec="seconds").replace("+00:00", "Z")
    past = ", in the past by this gateway's clock" if after < now else ""
    return f"; it is valid until {when}{past}"


def explain_tls_failure(
    error: str, *, ca_file: Path | None, cert_file: Path | None, port: int
) -> str | None:
    """One line saying what went wrong in a TLS handshake with the broker and which file
    to look at, from the error text (OpenSSL's, as Python and paho report it); ``None``
    when ``error`` is not a TLS failure."""
    found = _SSL_CODE.search(error)
    if found is None:
        return None
    code = found.group(1)
    if code == "CERTIFICATE_VERIFY_FAILED":
        detail = _VERIFY_DETAIL.search(error)
        why = detail.group(1) if detail else "certificate verify failed"
        against = (
            f"mqtt.tls_ca_file {ca_file}"
            if ca_file
            else "the system's CAs (mqtt.tls_ca_file is not set)"
        )
        return f"MQTT TLS: the broker's certificate does not verify against {against}: {why}"
    if code == "TLSV13_ALERT_CERTIFICATE_REQUIRED" and cert_file is None:
        return (
            "MQTT TLS: the broker requires a client certificate: "
            "set mqtt.tls_cert_file and mqtt.tls_key_file"
        )
    if code in _REFUSALS or code == "TLSV13_ALERT_CERTIFICATE_REQUIRED":
        reason = _REFUSALS.get(code, "the broker did not receive it")
        return (
            f"MQTT TLS: the broker refused this gateway's certificate mqtt.tls_cert_file "
            f"{cert_file}: {reason} ({code.lower()}){_validity(cert_file) if cert_file else ''}"
        )
    if code in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "UNEXPECTED_EOF_WHILE_READING"):
        return (
            f"MQTT TLS: the broker did not complete a TLS handshake on port {port} ({code.lower()})"
        )
    return f"MQTT TLS: handshake with the broker failed: {error}"
