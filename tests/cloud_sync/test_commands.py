"""Promise 4: expired, forged, replayed or misaddressed commands never release.

The verifier is the gate: anything it does not return is never executed, and each
rejection carries a stable reason code (and the jti when it could be read)."""

from __future__ import annotations

import base64
import json
import os
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from cloud_sync.commands import CommandRejected, CommandVerifier, ExecuteCommand
from cloud_sync.signing import generate_demo_keypair, sign_command

GW = "gw-loja-042"
NOW = 1_800_000_000


@pytest.fixture(scope="module")
def ed_keys() -> tuple[str, str]:
    return generate_demo_keypair()


@pytest.fixture(scope="module")
def es_keys() -> tuple[str, str]:
    private = ec.generate_private_key(ec.SECP256R1())
    return (
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode(),
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode(),
    )


@pytest.fixture(scope="module")
def verifier(ed_keys: tuple[str, str], es_keys: tuple[str, str]) -> CommandVerifier:
    return CommandVerifier([ed_keys[1], es_keys[1]], GW)


def _sign(private_pem: str, **overrides: Any) -> bytes:
    fields: dict[str, Any] = {
        "execute_key": "exec-0001",
        "audience": GW,
        "payment_id": "pay_123",
        "machine_id": "W01",
        "cycle": "normal",
        "now": NOW,
    }
    fields.update(overrides)
    return sign_command(private_pem, **fields)


def _claims(**overrides: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "jti": "exec-0001",
        "aud": GW,
        "iat": NOW,
        "exp": NOW + 300,
        "payment_id": "pay_123",
        "machine_id": "W01",
        "cycle": "normal",
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def _encode(claims: dict[str, Any], private_pem: str, alg: str = "EdDSA") -> bytes:
    key = serialization.load_pem_private_key(private_pem.encode(), password=None)
    return jwt.encode(claims, key, algorithm=alg).encode()  # type: ignore[arg-type]


def _rejected(verifier: CommandVerifier, token: bytes) -> CommandRejected:
    with pytest.raises(CommandRejected) as info:
        verifier.verify(token, now=NOW)
    return info.value


def _b64(obj: Any) -> bytes:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=")


def test_valid_eddsa_command_is_accepted(verifier: CommandVerifier, ed_keys: tuple[str, str]):
    token = _sign(
        ed_keys[0],
        amount_cents=1500,
        provider_ref="stone:abc",
        idempotency_key="idem-1",
        store_id="loja-042",
    )
    command = verifier.verify(token, now=NOW + 1)
    assert command == ExecuteCommand(
        execute_key="exec-0001",
        payment_id="pay_123",
        machine_id="W01",
        cycle="normal",
        issued_at=NOW,
        expires_at=NOW + 300,
        provider_ref="stone:abc",
        idempotency_key="idem-1",
        amount_cents=1500,
        store_id="loja-042",
    )
    assert not command.is_expired(NOW + 299)
    assert command.is_expired(NOW + 300)


def test_valid_es256_command_is_accepted(verifier: CommandVerifier, es_keys: tuple[str, str]):
    token = _sign(es_keys[0], execute_key="es:key.1")
    assert jwt.get_unverified_header(token)["alg"] == "ES256"
    assert verifier.verify(token, now=NOW).execute_key == "es:key.1"


def test_key_rotation_accepts_any_configured_key(ed_keys: tuple[str, str]):
    old_private, old_public = generate_demo_keypair()
    verifier = CommandVerifier([ed_keys[1], old_public], GW)
    assert verifier.verify(_sign(old_private), now=NOW).execute_key == "exec-0001"


def test_expired_command_is_returned_not_rejected_so_it_can_be_journaled(
    verifier: CommandVerifier, ed_keys: tuple[str, str]
):
    token = _sign(ed_keys[0], ttl_s=60)
    command = verifier.verify(token, now=NOW + 3600)
    assert command.is_expired(NOW + 3600)


def test_tampered_signature_is_rejected(verifier: CommandVerifier, ed_keys: tuple[str, str]):
    header, payload, sig = _sign(ed_keys[0]).split(b".")
    forged_payload = _b64(_claims(machine_id="W02"))
    error = _rejected(verifier, b".".join([header, forged_payload, sig]))
    assert error.reason == "bad_signature"
    assert error.execute_key == "exec-0001"
    assert error.authentic is False


def test_command_signed_by_another_key_is_rejected(verifier: CommandVerifier):
    other_private, _ = generate_demo_keypair()
    error = _rejected(verifier, _sign(other_private))
    assert (error.reason, error.execute_key, error.authentic) == (
        "bad_signature",
        "exec-0001",
        False,
    )


def test_alg_none_is_rejected(verifier: CommandVerifier):
    token = _b64({"alg": "none", "typ": "JWT"}) + b"." + _b64(_claims()) + b".c2ln"
    error = _rejected(verifier, token)
    assert (error.reason, error.execute_key, error.authentic) == (
        "unsupported_algorithm",
        "exec-0001",
        False,
    )
    # Also the unsigned form with an empty signature segment never passes.
    unsigned = _b64({"alg": "none"}) + b"." + _b64(_claims()) + b"."
    assert _rejected(verifier, unsigned).reason in {"malformed", "unsupported_algorithm"}


def test_hs256_with_public_key_as_secret_is_rejected(
    verifier: CommandVerifier, ed_keys: tuple[str, str]
):
    # The classic key-confusion attack: HMAC keyed with the (public) verification key.
    import hashlib
    import hmac

    signing_input = _b64({"alg": "HS256", "typ": "JWT"}) + b"." + _b64(_claims())
    mac = hmac.new(ed_keys[1].encode(), signing_input, hashlib.sha256).digest()
    token = signing_input + b"." + base64.urlsafe_b64encode(mac).rstrip(b"=")
    error = _rejected(verifier, token)
    assert error.reason == "unsupported_algorithm"
    assert error.execute_key == "exec-0001"


def test_algorithm_not_enabled_is_rejected(ed_keys: tuple[str, str], es_keys: tuple[str, str]):
    only_ed = CommandVerifier([ed_keys[1]], GW, algorithms=("EdDSA",))
    assert _rejected(only_ed, _sign(es_keys[0])).reason == "unsupported_algorithm"


def test_command_for_another_gateway_is_rejected(
    verifier: CommandVerifier, ed_keys: tuple[str, str]
):
    error = _rejected(verifier, _sign(ed_keys[0], audience="gw-loja-999"))
    assert (error.reason, error.execute_key, error.authentic) == (
        "wrong_audience",
        "exec-0001",
        False,
    )


def test_audience_list_is_not_accepted(verifier: CommandVerifier, ed_keys: tuple[str, str]):
    # One execute_key must address exactly one gateway.
    error = _rejected(verifier, _encode(_claims(aud=[GW, "gw-other"]), ed_keys[0]))
    assert error.reason == "invalid_claim"
    assert error.authentic is False


@pytest.mark.parametrize("claim", ["iat", "exp", "payment_id", "machine_id", "cycle"])
def test_missing_claim_is_rejected_and_named(
    verifier: CommandVerifier, ed_keys: tuple[str, str], claim: str
):
    claims = _claims()
    del claims[claim]
    error = _rejected(verifier, _encode(claims, ed_keys[0]))
    assert error.reason == "missing_claim"
    assert claim in error.detail
    assert (error.execute_key, error.authentic) == ("exec-0001", True)


def test_missing_jti_is_rejected_without_execute_key(
    verifier: CommandVerifier, ed_keys: tuple[str, str]
):
    claims = _claims()
    del claims["jti"]
    error = _rejected(verifier, _encode(claims, ed_keys[0]))
    assert (error.reason, error.execute_key, error.authentic) == ("missing_claim", None, False)
    assert "jti" in error.detail


def test_missing_audience_is_rejected(verifier: CommandVerifier, ed_keys: tuple[str, str]):
    claims = _claims()
    del claims["aud"]
    error = _rejected(verifier, _encode(claims, ed_keys[0]))
    assert (error.reason, error.authentic) == ("missing_claim", False)
    assert "aud" in error.detail


@pytest.mark.parametrize(
    ("claim", "value"),
    [
        ("jti", "has space"),
        ("jti", "x" * 129),
        ("jti", 42),
        ("iat", "1800000000"),
        ("exp", True),
        ("exp", NOW - 1),
        ("amount_cents", -1),
        ("amount_cents", 1.5),
        ("machine_id", ""),
        ("cycle", ["normal"]),
        ("provider_ref", 7),
    ],
)
def test_invalid_claim_is_rejected_and_named(
    verifier: CommandVerifier, ed_keys: tuple[str, str], claim: str, value: Any
):
    error = _rejected(verifier, _encode(_claims(**{claim: value}), ed_keys[0]))
    assert error.reason == "invalid_claim"
    assert claim in error.detail
    if claim == "jti":
        assert (error.execute_key, error.authentic) == (None, False)
    else:
        assert (error.execute_key, error.authentic) == ("exec-0001", True)


def test_command_issued_in_the_future_is_not_yet_valid(
    verifier: CommandVerifier, ed_keys: tuple[str, str]
):
    token = _sign(ed_keys[0], now=NOW + 31)
    error = _rejected(verifier, token)
    assert (error.reason, error.execute_key, error.authentic) == (
        "not_yet_valid",
        "exec-0001",
        True,
    )
    # Within the leeway (clock skew) it is accepted.
    assert verifier.verify(_sign(ed_keys[0], now=NOW + 29), now=NOW).execute_key == "exec-0001"


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"not a token",
        b"a.b",
        b"a.b.c.d",
        "eyJ\u00e9.x.y".encode(),
        b"\xff\xfe\x00garbage",
        b"!!!.@@@.###",
        _b64(["not", "an", "object"]) + b"." + _b64({}) + b".c2ln",
    ],
)
def test_malformed_payload_is_rejected(verifier: CommandVerifier, payload: bytes):
    error = _rejected(verifier, payload)
    assert (error.reason, error.authentic) == ("malformed", False)


def test_random_bytes_are_rejected_as_malformed(verifier: CommandVerifier):
    for _ in range(200):
        error = _rejected(verifier, os.urandom(64))
        assert error.reason == "malformed"


def test_huge_payload_is_rejected_before_parsing(
    verifier: CommandVerifier, ed_keys: tuple[str, str]
):
    token = _sign(ed_keys[0], provider_ref="x" * 5000)
    error = _rejected(verifier, token)
    assert error.reason == "malformed"
    assert "4096" in error.detail


def test_rejection_detail_never_contains_the_token(
    verifier: CommandVerifier, ed_keys: tuple[str, str]
):
    token = _sign(ed_keys[0], audience="elsewhere", payment_id="pay_secret_999")
    error = _rejected(verifier, token)
    assert token.decode() not in str(error)
    assert "pay_secret_999" not in str(error)


def test_unusable_keys_raise_value_error(es_keys: tuple[str, str]):
    with pytest.raises(ValueError, match="PEM"):
        CommandVerifier(["not a pem"], GW)
    with pytest.raises(ValueError, match="at least one"):
        CommandVerifier([], GW)
    rsa_pem = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    with pytest.raises(ValueError, match="Ed25519 or EC P-256"):
        CommandVerifier([rsa_pem], GW)
    p384 = (
        ec.generate_private_key(ec.SECP384R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    with pytest.raises(ValueError, match="P-256"):
        CommandVerifier([p384], GW)
    with pytest.raises(ValueError, match="unsupported algorithms"):
        CommandVerifier([es_keys[1]], GW, algorithms=("HS256",))


def test_default_clock_is_wall_time(verifier: CommandVerifier, ed_keys: tuple[str, str]):
    command = verifier.verify(_sign(ed_keys[0], now=time.time()))
    assert not command.is_expired(time.time())


def test_an_integer_claim_too_large_to_store_is_rejected_not_raised() -> None:
    private, public = generate_demo_keypair()
    verifier = CommandVerifier([public], "gw")
    token = sign_command(
        private,
        execute_key="k-big",
        audience="gw",
        payment_id="p",
        machine_id="W1",
        cycle="normal",
        amount_cents=2**63,
    )
    with pytest.raises(CommandRejected) as err:
        verifier.verify(token)
    assert (err.value.reason, err.value.execute_key) == ("invalid_claim", "k-big")


def test_a_token_expired_beyond_the_gateways_memory_is_stale_not_expired() -> None:
    private, public = generate_demo_keypair()
    verifier = CommandVerifier([public], "gw", max_age_s=30 * 86400)
    old = sign_command(private, execute_key="k-old", audience="gw", payment_id="p",
                       machine_id="W1", cycle="normal", ttl_s=60, now=time.time() - 31 * 86400)
    with pytest.raises(CommandRejected) as err:
        verifier.verify(old)
    assert (err.value.reason, err.value.execute_key) == ("stale_command", "k-old")
    recent = sign_command(private, execute_key="k-new", audience="gw", payment_id="p",
                          machine_id="W1", cycle="normal", ttl_s=60, now=time.time() - 86400)
    assert verifier.verify(recent).is_expired(time.time())  # expired, still ours to answer
