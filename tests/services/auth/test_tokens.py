"""Bearer tokens: every way a token can be wrong is refused with its reason; rotation keeps old tokens valid."""

from __future__ import annotations

import base64
import json
import pathlib
import time

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from services.auth import tokens
from services.ledger import errors
from services.ledger.access import Caller, Role


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def auth_dir(tmp_path) -> pathlib.Path:
    folder = tmp_path / "auth"
    tokens.ensure_signing_key(folder)
    return folder


def bearer(token: str) -> str:
    return f"Bearer {token}"


def test_a_minted_token_names_its_subject_and_role(auth_dir):
    token = tokens.mint(auth_dir, Role.CUSTOMER, "alice", 60)
    assert tokens.TokenVerifier(auth_dir).verify(bearer(token)) == Caller("alice", Role.CUSTOMER)
    assert tokens.TokenVerifier(auth_dir).verify(f"bearer {token}") == Caller("alice", Role.CUSTOMER)  # the scheme's case is free


def test_a_stray_file_among_the_keys_fails_no_call(auth_dir):
    token = tokens.mint(auth_dir, Role.CUSTOMER, "alice", 60)
    (auth_dir / tokens.TOKEN_KEYS_DIR / "half-copied.pub").write_text("-----BEGIN PUBLIC KEY-----\nnot a key")
    verifier = tokens.TokenVerifier(auth_dir)
    assert verifier.verify(bearer(token)) == Caller("alice", Role.CUSTOMER)


@pytest.mark.parametrize("kid", ["../ca", "no-such-key", "20260101-0123456789abcdef"])
def test_retire_key_takes_only_a_token_key_that_exists(auth_dir, kid):
    (auth_dir / "ca.key").write_text("the CA's key")
    with pytest.raises(ValueError):
        tokens.retire_key(auth_dir, kid)
    assert (auth_dir / "ca.key").exists()


@pytest.mark.parametrize("header", [None, "", "Basic abc", "Bear x", "Token x"])
def test_no_bearer_token_is_token_missing(auth_dir, header):
    with pytest.raises(errors.TokenMissing):
        tokens.TokenVerifier(auth_dir).verify(header)


def test_an_expired_token_is_refused_even_once_remembered(auth_dir):
    clock = Clock()
    verifier = tokens.TokenVerifier(auth_dir, clock=clock)
    token = tokens.mint(auth_dir, Role.SERVICE, "gateway", 60)
    assert verifier.verify(bearer(token)).role is Role.SERVICE
    clock.now += 60 + tokens.CLOCK_SKEW_SECONDS + 1
    with pytest.raises(errors.TokenExpired):
        verifier.verify(bearer(token))
    with pytest.raises(errors.TokenExpired):
        tokens.TokenVerifier(auth_dir).verify(bearer(_signed(auth_dir, exp=int(time.time()) - 3600)))


def _current_key(auth_dir) -> tuple[str, object]:
    from cryptography.hazmat.primitives import serialization

    kid = (auth_dir / tokens.TOKEN_KEYS_DIR / tokens.CURRENT_KEY_FILE).read_text().strip()
    key = serialization.load_pem_private_key((auth_dir / tokens.TOKEN_KEYS_DIR / f"{kid}.key").read_bytes(), password=None)
    return kid, key


def _signed(auth_dir, key=None, kid=None, algorithm=tokens.ALGORITHM, **overrides) -> str:
    current_kid, current_key = _current_key(auth_dir)
    now = int(time.time())
    claims = {"iss": tokens.ISSUER, "aud": tokens.AUDIENCE, "sub": "mallory", "role": "admin", "iat": now, "nbf": now, "exp": now + 60}
    claims.update(overrides)
    claims = {name: value for name, value in claims.items() if value is not None}
    return jwt.encode(claims, key or current_key, algorithm=algorithm, headers={"kid": kid or current_kid})


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda d: _signed(d, key=ed25519.Ed25519PrivateKey.generate()), id="forged signature, known kid"),
        pytest.param(lambda d: _signed(d, kid="no-such-key"), id="unknown kid"),
        pytest.param(lambda d: _signed(d, iss="someone-else"), id="wrong issuer"),
        pytest.param(lambda d: _signed(d, aud="another.api"), id="wrong audience"),
        pytest.param(lambda d: _signed(d, role="superuser"), id="unknown role"),
        pytest.param(lambda d: _signed(d, role=None), id="no role"),
        pytest.param(lambda d: _signed(d, sub="a b/../c"), id="malformed subject"),
        pytest.param(lambda d: _signed(d, sub=None), id="no subject"),
        pytest.param(lambda d: _signed(d, exp=None), id="no expiry"),
        pytest.param(lambda d: _signed(d, key="a-guessed-shared-secret-of-32-bytes!", algorithm="HS256"), id="HMAC with a guessed secret"),
        pytest.param(lambda d: _unsigned(d), id="alg none"),
        pytest.param(lambda d: "a.b.c", id="garbage"),
        pytest.param(lambda d: "x" * (tokens.TOKEN_CHARS_MAX + 1), id="too long"),
    ],
)
def test_a_token_that_is_not_ours_is_token_invalid(auth_dir, make):
    with pytest.raises(errors.TokenInvalid):
        tokens.TokenVerifier(auth_dir).verify(bearer(make(auth_dir)))


def _unsigned(auth_dir) -> str:
    def encode(part: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(part).encode()).rstrip(b"=").decode()

    kid, _ = _current_key(auth_dir)
    now = int(time.time())
    claims = {"iss": tokens.ISSUER, "aud": tokens.AUDIENCE, "sub": "mallory", "role": "admin", "iat": now, "nbf": now, "exp": now + 60}
    return f"{encode({'alg': 'none', 'kid': kid})}.{encode(claims)}."


def test_a_token_not_valid_yet_is_refused(auth_dir):
    with pytest.raises(errors.TokenExpired):
        tokens.TokenVerifier(auth_dir).verify(bearer(_signed(auth_dir, nbf=int(time.time()) + 3600)))


def test_rotation_keeps_old_tokens_valid_and_new_ones_are_accepted_at_once(auth_dir):
    clock = Clock()
    verifier = tokens.TokenVerifier(auth_dir, clock=clock)
    old = tokens.mint(auth_dir, Role.OPERATOR, "olga", 600)
    assert verifier.verify(bearer(old)).subject == "olga"
    old_kid = jwt.get_unverified_header(old)["kid"]
    new_kid = tokens.rotate_key(auth_dir)
    new = tokens.mint(auth_dir, Role.OPERATOR, "olga", 600)
    assert jwt.get_unverified_header(new)["kid"] == new_kid != old_kid
    clock.now += tokens.UNKNOWN_KEY_RELOAD_SECONDS
    assert verifier.verify(bearer(new)).subject == "olga"  # an unknown kid makes it read the folder again
    assert verifier.verify(bearer(old)).subject == "olga"
    tokens.retire_key(auth_dir, old_kid)
    clock.now += tokens.KEYRING_RELOAD_SECONDS
    with pytest.raises(errors.TokenInvalid):
        verifier.verify(bearer(old))  # remembered before, forgotten with its key
    assert verifier.verify(bearer(new)).subject == "olga"


def test_the_current_key_cannot_be_retired(auth_dir):
    kid, _ = _current_key(auth_dir)
    with pytest.raises(ValueError):
        tokens.retire_key(auth_dir, kid)


@pytest.mark.parametrize("ttl", [0, -1, tokens.TOKEN_TTL_SECONDS_MAX + 1])
def test_mint_refuses_a_lifetime_out_of_bounds(auth_dir, ttl):
    with pytest.raises(ValueError):
        tokens.mint(auth_dir, Role.CUSTOMER, "alice", ttl)


def test_signing_keys_are_readable_by_their_owner_only(auth_dir):
    folder = auth_dir / tokens.TOKEN_KEYS_DIR
    assert folder.stat().st_mode & 0o777 == 0o700
    for key in folder.glob("*.key"):
        assert key.stat().st_mode & 0o777 == 0o600
