"""Verification of execute-cycle commands pushed by the cloud (DESIGN.md promise 4).

The MQTT payload of a command is a compact JWS (a signed JWT) in ASCII, signed with
EdDSA (Ed25519) or ES256 by the cloud. :class:`CommandVerifier` turns those bytes into
an :class:`ExecuteCommand` or raises :class:`CommandRejected` with a stable reason code:

    CommandRejected(Exception)
      reason: malformed | unsupported_algorithm | bad_signature | wrong_audience
              | missing_claim | invalid_claim | not_yet_valid | stale_command

Expiry is deliberately *not* a rejection: an authentic, expired command is returned and
the caller journals it as ``expired`` (with a compensation event) via
:meth:`ExecuteCommand.is_expired`, so the cloud learns the outcome (promise 2).

Order of checks: shape -> algorithm -> signature -> audience -> claims -> iat/nbf.
Nothing read from an unverified token is trusted; the ``jti`` of a rejected token is
only echoed back so the cloud can correlate the rejection.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast, get_args

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

__all__ = [
    "ExecuteCommand",
    "CommandRejected",
    "CommandVerifier",
    "REJECT_REASONS",
    "EXECUTE_KEY_PATTERN",
    "Algorithm",
    "LEEWAY_S",
    "SUPPORTED_ALGORITHMS",
]

#: Stable machine-readable rejection codes (also published in rejected results).
REJECT_REASONS = frozenset(
    {
        "malformed",
        "unsupported_algorithm",
        "bad_signature",
        "wrong_audience",
        "missing_claim",
        "invalid_claim",
        "not_yet_valid",
        "stale_command",
    }
)

EXECUTE_KEY_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")
#: The JWS algorithms a command may be signed with (DESIGN.md promise 4).
Algorithm = Literal["EdDSA", "ES256"]
SUPPORTED_ALGORITHMS: tuple[Algorithm, ...] = get_args(Algorithm)
#: Seconds of clock difference tolerated on ``exp``, ``iat`` and ``nbf``.
LEEWAY_S = 30
MAX_TEXT_CLAIM_CHARS = 256

_B64URL = re.compile(rb"[A-Za-z0-9_-]*")


@dataclass(frozen=True)
class ExecuteCommand:
    """A verified execute-cycle command (signature and audience checked)."""

    execute_key: str
    payment_id: str
    machine_id: str
    cycle: str
    issued_at: int
    expires_at: int
    provider_ref: str | None = None
    idempotency_key: str | None = None
    amount_cents: int | None = None
    store_id: str | None = None

    def is_expired(self, now: float) -> bool:
        return now >= self.expires_at


class CommandRejected(Exception):
    """A command that must not be executed. ``detail`` never contains the token."""

    def __init__(
        self,
        reason: str,
        detail: str,
        *,
        execute_key: str | None = None,
        authentic: bool = False,
    ) -> None:
        assert reason in REJECT_REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.execute_key = execute_key
        self.authentic = authentic


class _Claims:
    """Typed reads from a claims mapping, raising the right rejection."""

    def __init__(self, claims: Mapping[str, Any], execute_key: str | None, authentic: bool):
        self._claims = claims
        self._key = execute_key
        self._authentic = authentic

    def _reject(self, reason: str, name: str, what: str) -> CommandRejected:
        return CommandRejected(
            reason, f"claim {name!r} {what}", execute_key=self._key, authentic=self._authentic
        )

    def text(self, name: str, *, required: bool) -> str | None:
        value = self._claims.get(name)
        if value is None:
            if required:
                raise self._reject("missing_claim", name, "is missing")
            return None
        if not isinstance(value, str) or not value or len(value) > MAX_TEXT_CLAIM_CHARS:
            raise self._reject(
                "invalid_claim", name, f"must be a string of 1..{MAX_TEXT_CLAIM_CHARS} chars"
            )
        return value

    def integer(self, name: str, *, required: bool) -> int | None:
        value = self._claims.get(name)
        if value is None:
            if required:
                raise self._reject("missing_claim", name, "is missing")
            return None
        # bool is an int in Python; a JSON true is not a number of seconds or cents.
        # The upper bound keeps every value storable (SQLite integers are 64-bit) and
        # exact in JSON consumers (2**53).
        if (
            not isinstance(value, int)
            or isinstance(value, bool)
            or not 0 <= value <= MAX_INTEGER_CLAIM
        ):
            raise self._reject(
                "invalid_claim", name, f"must be an integer from 0 to {MAX_INTEGER_CLAIM}"
            )
        return value


MAX_INTEGER_CLAIM = 2**53 - 1


def _b64url_decode(segment: bytes) -> bytes:
    if not _B64URL.fullmatch(segment):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(segment + b"=" * (-len(segment) % 4))


def _readable_jti(claims: Any) -> str | None:
    if isinstance(claims, dict):
        jti = claims.get("jti")
        if isinstance(jti, str) and EXECUTE_KEY_PATTERN.fullmatch(jti):
            return jti
    return None


def _load_public_key(pem: str) -> tuple[str, Any]:
    """Return (algorithm, key object) for one PEM public key."""
    try:
        key = serialization.load_pem_public_key(pem.encode("ascii"))
    except (ValueError, TypeError, UnicodeEncodeError) as exc:
        raise ValueError(f"unusable command public key: not a PEM public key ({exc})") from None
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "EdDSA", key
    if isinstance(key, ec.EllipticCurvePublicKey):
        if isinstance(key.curve, ec.SECP256R1):
            return "ES256", key
        raise ValueError(
            f"unusable command public key: EC curve {key.curve.name} (ES256 needs P-256)"
        )
    raise ValueError(
        f"unusable command public key: {type(key).__name__} (need Ed25519 or EC P-256)"
    )


class CommandVerifier:
    """Verify execute-cycle tokens for one gateway (``audience`` = its gateway id)."""

    def __init__(
        self,
        public_keys: Sequence[str],
        audience: str,
        *,
        algorithms: Sequence[str] = SUPPORTED_ALGORITHMS,
        leeway_s: int = LEEWAY_S,
        max_token_bytes: int = 4096,
        max_age_s: float | None = None,
    ) -> None:
        if isinstance(public_keys, str):
            raise ValueError("public_keys must be a sequence of PEM strings, not one string")
        if not public_keys:
            raise ValueError("at least one command public key is required")
        if not audience:
            raise ValueError("audience (the gateway id) must not be empty")
        unknown = [a for a in algorithms if a not in SUPPORTED_ALGORITHMS]
        if unknown or not algorithms:
            raise ValueError(
                f"unsupported algorithms {unknown!r}; choose from {SUPPORTED_ALGORITHMS}"
            )
        if leeway_s < 0 or max_token_bytes <= 0:
            raise ValueError("leeway_s must be >= 0 and max_token_bytes > 0")
        self._algorithms = tuple(algorithms)
        self._keys: list[tuple[str, Any]] = []
        for pem in public_keys:
            alg, key = _load_public_key(pem)
            if alg not in self._algorithms:
                raise ValueError(f"unusable command public key: {alg} key but {alg} not allowed")
            self._keys.append((alg, key))
        self._audience = audience
        self._leeway = leeway_s
        self._max_bytes = max_token_bytes
        # A token that expired longer ago than this is older than the gateway's memory
        # of executions (its journal retention): it may replay a cycle that ran, so it
        # is refused rather than returned as merely expired (which asks for a refund).
        self._max_age_s = max_age_s
        self._jws = jwt.PyJWS()

    def verify(
        self, payload: bytes, *, now: float | None = None, check_time: bool = True
    ) -> ExecuteCommand:
        """Return the verified command or raise :class:`CommandRejected`.

        An expired but otherwise valid command is returned (see module docstring).
        ``check_time=False`` skips the checks against the local clock (``iat``/``nbf``
        in the future, too old): for a caller that knows its clock is not synchronised.
        """
        header, claims, jti = self._parse(payload)
        token = bytes(payload)

        alg = header.get("alg")
        if not isinstance(alg, str) or alg.lower() == "none" or alg not in self._algorithms:
            raise CommandRejected(
                "unsupported_algorithm",
                f"alg {alg!r} is not accepted" if isinstance(alg, str) else "alg is missing",
                execute_key=jti,
            )
        if "crit" in header or header.get("b64", True) is not True:
            raise CommandRejected("malformed", "unsupported JWS header parameters", execute_key=jti)

        if not self._signature_ok(token, alg):
            raise CommandRejected(
                "bad_signature", "no configured key verifies the signature", execute_key=jti
            )
        if not isinstance(claims, dict):
            raise CommandRejected("malformed", "claims are not a JSON object", execute_key=jti)

        aud = claims.get("aud")
        if aud is None:
            raise CommandRejected("missing_claim", "claim 'aud' is missing", execute_key=jti)
        if not isinstance(aud, str):
            # A list audience could address several gateways with one execute_key.
            raise CommandRejected(
                "invalid_claim", "claim 'aud' must be a single string", execute_key=jti
            )
        if aud != self._audience:
            raise CommandRejected(
                "wrong_audience", "command is addressed to another gateway", execute_key=jti
            )

        # Signed and ours: from here a readable jti makes the rejection authentic.
        read = _Claims(claims, jti, authentic=jti is not None)
        if "jti" not in claims or claims["jti"] is None:
            raise CommandRejected("missing_claim", "claim 'jti' is missing")
        if jti is None:
            raise CommandRejected("invalid_claim", "claim 'jti' must match [A-Za-z0-9._:-]{1,128}")
        issued_at = cast(int, read.integer("iat", required=True))
        expires_at = cast(int, read.integer("exp", required=True))
        if expires_at <= issued_at:
            raise CommandRejected(
                "invalid_claim", "claim 'exp' must be after 'iat'", execute_key=jti, authentic=True
            )
        command = ExecuteCommand(
            execute_key=jti,
            payment_id=cast(str, read.text("payment_id", required=True)),
            machine_id=cast(str, read.text("machine_id", required=True)),
            cycle=cast(str, read.text("cycle", required=True)),
            issued_at=issued_at,
            expires_at=expires_at,
            provider_ref=read.text("provider_ref", required=False),
            idempotency_key=read.text("idempotency_key", required=False),
            amount_cents=read.integer("amount_cents", required=False),
            store_id=read.text("store_id", required=False),
        )
        not_before = read.integer("nbf", required=False)

        if not check_time:
            return command
        now = time.time() if now is None else now
        if issued_at > now + self._leeway:
            raise CommandRejected(
                "not_yet_valid", "'iat' is in the future", execute_key=jti, authentic=True
            )
        if not_before is not None and not_before > now + self._leeway:
            raise CommandRejected(
                "not_yet_valid", "'nbf' is in the future", execute_key=jti, authentic=True
            )
        if self._max_age_s is not None and now - expires_at > self._max_age_s:
            raise CommandRejected(
                "stale_command",
                "expired longer ago than the gateway remembers",
                execute_key=jti,
                authentic=True,
            )
        return command

    def _parse(self, payload: bytes) -> tuple[dict[str, Any], Any, str | None]:
        """Shape checks on the unverified token: (header, claims, readable jti)."""
        if not isinstance(payload, bytes | bytearray | memoryview):
            raise CommandRejected("malformed", "payload is not bytes")
        if len(payload) > self._max_bytes:
            raise CommandRejected("malformed", f"token larger than {self._max_bytes} bytes")
        data = bytes(payload).strip()
        if not data.isascii():
            raise CommandRejected("malformed", "token is not ASCII")
        parts = data.split(b".")
        if len(parts) != 3 or not all(parts):
            raise CommandRejected("malformed", "not a compact JWS (header.payload.signature)")
        try:
            claims: Any = json.loads(_b64url_decode(parts[1]))
        except (ValueError, binascii.Error, RecursionError):
            claims = None
        jti = _readable_jti(claims)
        try:
            header = json.loads(_b64url_decode(parts[0]))
            _b64url_decode(parts[2])
        except (ValueError, binascii.Error, RecursionError):
            raise CommandRejected(
                "malformed", "token segments are not base64url JSON", execute_key=jti
            ) from None
        if not isinstance(header, dict):
            raise CommandRejected("malformed", "JWS header is not an object", execute_key=jti)
        if claims is None:
            raise CommandRejected("malformed", "claims are not valid JSON", execute_key=None)
        return header, claims, jti

    def _signature_ok(self, token: bytes, alg: str) -> bool:
        for key_alg, key in self._keys:
            if key_alg != alg:
                continue
            try:
                self._jws.decode_complete(token.strip(), key=key, algorithms=[alg])
            except jwt.InvalidTokenError:
                continue
            return True
        return False
