"""Signed, expiring bearer tokens naming a subject and a role (JWT, EdDSA over Ed25519).

    <auth dir>/token-keys/<kid>.key    a signing key (0600; only `mint` reads it)
    <auth dir>/token-keys/<kid>.pub    its public key (what every server verifies with)
    <auth dir>/token-keys/current      the kid that signs new tokens

Rotation without downtime: `python -m services.auth rotate-key` adds a key and makes
it current. Servers accept a token signed by any public key in the folder; they read
the folder again when a token names a kid they do not know (at most once per
UNKNOWN_KEY_RELOAD_SECONDS, so garbage kids cannot make them scan it on every call) and
every KEYRING_RELOAD_SECONDS anyway, so a new key is accepted at once and no server
restarts. Once every token of the old key has
expired (TOKEN_TTL_SECONDS_MAX after the rotation at most), `retire-key KID`
deletes it, and servers stop accepting it at their next reload.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import re
import secrets
import time

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from services.auth.pki import PRIVATE_DIR_MODE, write_private, write_public
from services.ledger import errors, ids
from services.ledger.access import Caller, Role

ALGORITHM = "EdDSA"
ISSUER = "corebank"
AUDIENCE = "corebank.v1"
TOKEN_KEYS_DIR = "token-keys"
CURRENT_KEY_FILE = "current"
TOKEN_TTL_SECONDS_DEFAULT = 3600
# The longest a token may live: the admin token in cluster.json is minted by every `make up`
# with this; an old signing key may be retired this long after its rotation.
TOKEN_TTL_SECONDS_MAX = 7 * 24 * 3600
# Clocks of the minting and the verifying machine may differ this much (NTP keeps hosts well
# within it). Small on purpose: a token is refused at most this long after its exp.
CLOCK_SKEW_SECONDS = 1
KEYRING_RELOAD_SECONDS = 10.0
UNKNOWN_KEY_RELOAD_SECONDS = 1.0
# Verified tokens remembered per process, so that a token's signature is checked once, not
# on every call (its expiry is checked every time). Past it the memory starts afresh.
VERIFIED_TOKENS_MAX = 100_000
# A bearer token longer than this is refused before it is parsed.
TOKEN_CHARS_MAX = 4096
BEARER_PREFIX = "Bearer "
ROLE_CLAIM = "role"
KEY_ID_BYTES = 8
# What _new_key_id makes: a date, then random hex.
KEY_ID_PATTERN = re.compile(r"\d{8}-[0-9a-f]{%d}" % (2 * KEY_ID_BYTES))


log = logging.getLogger(__name__)


def keys_dir(auth_dir: pathlib.Path) -> pathlib.Path:
    return pathlib.Path(auth_dir) / TOKEN_KEYS_DIR


def _new_key_id() -> str:
    return time.strftime("%Y%m%d") + "-" + secrets.token_hex(KEY_ID_BYTES)


def rotate_key(auth_dir: pathlib.Path) -> str:
    """A new signing key, made current; the kid. Old public keys stay until retired."""
    folder = keys_dir(auth_dir)
    folder.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
    kid = _new_key_id()
    key = ed25519.Ed25519PrivateKey.generate()
    write_private(folder / f"{kid}.key", key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ))
    write_public(folder / f"{kid}.pub", key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ))
    write_public(folder / CURRENT_KEY_FILE, kid.encode())
    return kid


def ensure_signing_key(auth_dir: pathlib.Path) -> str:
    """The current kid, making the first key when there is none."""
    current = keys_dir(auth_dir) / CURRENT_KEY_FILE
    if current.exists():
        kid = current.read_text().strip()
        if (keys_dir(auth_dir) / f"{kid}.key").exists():
            return kid
    return rotate_key(auth_dir)


def retire_key(auth_dir: pathlib.Path, kid: str) -> None:
    folder = keys_dir(auth_dir)
    if not KEY_ID_PATTERN.fullmatch(kid) or not (folder / f"{kid}.pub").exists():
        raise ValueError(f"no token key {kid!r} in {folder}")
    if (folder / CURRENT_KEY_FILE).read_text().strip() == kid:
        raise ValueError(f"{kid} signs new tokens; rotate first")
    for suffix in (".key", ".pub"):
        (folder / f"{kid}{suffix}").unlink(missing_ok=True)


def role_of(value: str) -> Role:
    try:
        return Role(value)
    except ValueError:
        raise ValueError(f"unknown role {value!r}; one of {', '.join(r.value for r in Role)}") from None


def mint(auth_dir: pathlib.Path, role: Role, subject: str, ttl_seconds: int = TOKEN_TTL_SECONDS_DEFAULT) -> str:
    """A token for `subject` acting as `role`, valid for ttl_seconds from now."""
    if not 0 < ttl_seconds <= TOKEN_TTL_SECONDS_MAX:
        raise ValueError(f"ttl must be 1..{TOKEN_TTL_SECONDS_MAX} seconds")
    ids.validate_id(subject, "subject")
    kid = ensure_signing_key(auth_dir)
    key = serialization.load_pem_private_key((keys_dir(auth_dir) / f"{kid}.key").read_bytes(), password=None)
    now = int(time.time())
    claims = {
        "iss": ISSUER, "aud": AUDIENCE, "sub": subject, ROLE_CLAIM: role.value,
        "iat": now, "nbf": now, "exp": now + ttl_seconds, "jti": secrets.token_hex(KEY_ID_BYTES),
    }
    return jwt.encode(claims, key, algorithm=ALGORITHM, headers={"kid": kid})


@dataclasses.dataclass(frozen=True)
class _Verified:
    caller: Caller
    expires_at: float


class TokenVerifier:
    """Turns an `authorization` header into a Caller, or raises TokenMissing/TokenInvalid/TokenExpired."""

    def __init__(self, auth_dir: pathlib.Path, clock=time.time) -> None:
        self._folder = keys_dir(auth_dir)
        self._clock = clock
        self._keys: dict[str, ed25519.Ed25519PublicKey] = {}
        self._loaded_at = float("-inf")
        self._verified: dict[str, _Verified] = {}
        self._reload()
        if not self._keys:
            raise FileNotFoundError(f"no token public keys in {self._folder}")

    def _reload(self) -> None:
        """Read the public keys again. A file that is not a key (half copied, stray, retired while
        read) is skipped and logged: it must not fail the calls of every other key."""
        keys = {}
        for path in self._folder.glob("*.pub"):
            try:
                key = serialization.load_pem_public_key(path.read_bytes())
            except (ValueError, OSError) as error:
                log.warning("token key %s skipped: %s", path.name, type(error).__name__)
                continue
            if isinstance(key, ed25519.Ed25519PublicKey):
                keys[path.stem] = key
        if keys.keys() != self._keys.keys():
            self._verified.clear()  # a retired key's tokens must not live on in the memory
        self._keys = keys
        self._loaded_at = self._clock()

    def _key(self, kid: str) -> ed25519.Ed25519PublicKey | None:
        if kid not in self._keys and self._clock() - self._loaded_at >= UNKNOWN_KEY_RELOAD_SECONDS:
            self._reload()
        return self._keys.get(kid)

    def verify(self, authorization: str | None) -> Caller:
        now = self._clock()
        if now - self._loaded_at >= KEYRING_RELOAD_SECONDS:
            self._reload()
        if not authorization:
            raise errors.TokenMissing("the call carries no `authorization: Bearer <token>` metadata")
        if authorization[:len(BEARER_PREFIX)].lower() != BEARER_PREFIX.lower():  # the scheme is case-insensitive
            raise errors.TokenMissing("the authorization metadata is not `Bearer <token>`")
        token = authorization[len(BEARER_PREFIX):].strip()
        known = self._verified.get(token)
        if known is not None:
            if now >= known.expires_at + CLOCK_SKEW_SECONDS:
                raise errors.TokenExpired("the token has expired; get a new one")
            return known.caller
        verified = self._verify_signed(token)
        if len(self._verified) >= VERIFIED_TOKENS_MAX:
            self._verified.clear()
        self._verified[token] = verified
        return verified.caller

    def _verify_signed(self, token: str) -> _Verified:
        if len(token) > TOKEN_CHARS_MAX:
            raise errors.TokenInvalid(f"the token is longer than {TOKEN_CHARS_MAX} characters")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise errors.TokenInvalid("the token is not a well-formed JWT") from None
        kid = header.get("kid")
        key = self._key(kid) if isinstance(kid, str) else None
        if key is None:
            raise errors.TokenInvalid("the token is not signed by a key this service knows")
        try:
            claims = jwt.decode(
                token, key, algorithms=[ALGORITHM], audience=AUDIENCE, issuer=ISSUER, leeway=CLOCK_SKEW_SECONDS,
                options={"require": ["exp", "iat", "nbf", "sub", "iss", "aud", ROLE_CLAIM]},
            )
        except (jwt.ExpiredSignatureError, jwt.ImmatureSignatureError):
            raise errors.TokenExpired("the token has expired or is not valid yet; get a new one") from None
        except jwt.InvalidTokenError:
            raise errors.TokenInvalid("the token's signature, issuer, audience or claims are not valid") from None
        try:
            role = Role(claims[ROLE_CLAIM])
            subject = ids.validate_id(claims["sub"], "sub") if isinstance(claims["sub"], str) else None
        except (ValueError, errors.LedgerError):
            raise errors.TokenInvalid("the token names an unknown role or a malformed subject") from None
        if subject is None:
            raise errors.TokenInvalid("the token names a malformed subject")
        return _Verified(Caller(subject, role), float(claims["exp"]))
