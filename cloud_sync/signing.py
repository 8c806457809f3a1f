"""Reference signer for execute-cycle commands.

The cloud team implements the same thing in their stack (docs/mqtt-contract.md);
the demo, the tests and the benchmark use this one. The algorithm follows the key:
Ed25519 -> EdDSA, EC P-256 -> ES256.
"""

from __future__ import annotations

import time
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

__all__ = ["generate_demo_keypair", "sign_command"]


def generate_demo_keypair() -> tuple[str, str]:
    """A fresh Ed25519 key pair as (private PEM, public PEM). Demo and tests only."""
    private = ed25519.Ed25519PrivateKey.generate()
    private_pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode("ascii")
    public_pem = (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode("ascii")
    )
    return private_pem, public_pem


def _algorithm_for(private_pem: str) -> tuple[str, Any]:
    key = serialization.load_pem_private_key(private_pem.encode("ascii"), password=None)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "EdDSA", key
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
        return "ES256", key
    raise ValueError("signing key must be Ed25519 (EdDSA) or EC P-256 (ES256)")


def sign_command(
    private_pem: str,
    *,
    execute_key: str,
    audience: str,
    payment_id: str,
    machine_id: str,
    cycle: str,
    ttl_s: int = 300,
    now: float | None = None,
    **extra: Any,
) -> bytes:
    """Sign an execute-cycle command; the result is the MQTT payload (ASCII bytes).

    ``extra`` adds claims (``amount_cents``, ``provider_ref``, ``idempotency_key``,
    ``store_id``) and may override the standard ones (tests use that).
    """
    alg, key = _algorithm_for(private_pem)
    issued_at = int(time.time() if now is None else now)
    claims: dict[str, Any] = {
        "jti": execute_key,
        "aud": audience,
        "iat": issued_at,
        "exp": issued_at + int(ttl_s),
        "payment_id": payment_id,
        "machine_id": machine_id,
        "cycle": cycle,
    }
    claims.update(extra)
    token = jwt.encode(claims, key, algorithm=alg, headers={"typ": "JWT"})
    return token.encode("ascii")
