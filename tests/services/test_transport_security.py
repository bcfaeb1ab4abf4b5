"""Nobody reaches the API without a certificate of the cluster's CA and a valid token.

Real TLS against the real cluster: plaintext, no client certificate and a certificate
of another CA cannot even connect; with a good certificate, every corebank.v1 method
refuses a call without a token, with an expired, forged or foreign one, each with its
ErrorInfo reason; health checks need the certificate but no token; the token CLI and
key rotation work against the running servers.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys
import time

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from grpc_health.v1 import health_pb2, health_pb2_grpc

from corebank.v1 import accounts_pb2, accounts_pb2_grpc, clearing_pb2, payments_pb2
from services.auth import auth_dir, client, pki, tokens
from tests.fixtures.cluster import mint
from tests.fixtures.ledger import failure

CONNECT_TIMEOUT_SECONDS = 5
CALL_TIMEOUT_SECONDS = 10
SERVICES = [
    accounts_pb2.DESCRIPTOR.services_by_name["Accounts"],
    payments_pb2.DESCRIPTOR.services_by_name["Payments"],
    clearing_pb2.DESCRIPTOR.services_by_name["Clearing"],
]
METHODS = [f"/{service.full_name}/{method.name}" for service in SERVICES for method in service.methods]


def _connects(channel: grpc.Channel) -> bool:
    try:
        grpc.channel_ready_future(channel).result(timeout=CONNECT_TIMEOUT_SECONDS)
        return True
    except grpc.FutureTimeoutError:
        return False


def _get_account(channel: grpc.Channel):
    return accounts_pb2_grpc.AccountsStub(channel).GetAccount(
        accounts_pb2.GetAccountRequest(account_id="acc_does-not-exist"), timeout=CALL_TIMEOUT_SECONDS
    )


def test_a_plaintext_client_cannot_connect(cluster):
    with grpc.insecure_channel(cluster["grpc_endpoint"]) as channel:
        with pytest.raises(grpc.RpcError) as raised:
            _get_account(channel)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_client_without_a_certificate_cannot_connect(cluster):
    tls = client.ClientTls.of_cluster(cluster)
    credentials = grpc.ssl_channel_credentials(root_certificates=tls.ca_cert)
    with grpc.secure_channel(cluster["grpc_endpoint"], credentials) as channel:
        assert not _connects(channel)


def test_a_certificate_of_another_ca_cannot_connect(cluster, tmp_path):
    stranger = pki.CertificateAuthority(tmp_path / "stranger")
    paths = stranger.issue("admin")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=client.ClientTls.of_cluster(cluster).ca_cert,
        private_key=paths.key.read_bytes(), certificate_chain=paths.cert.read_bytes(),
    )
    with grpc.secure_channel(cluster["grpc_endpoint"], credentials) as channel:
        assert not _connects(channel)


def test_a_server_of_another_ca_is_not_trusted_by_our_clients(cluster, tmp_path):
    """The client side checks too: our client refuses a server whose certificate our CA did not sign."""
    stranger = pki.CertificateAuthority(tmp_path / "stranger")
    stranger.ensure()
    tls = client.ClientTls.of_cluster(cluster)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=stranger.cert_path.read_bytes(),
        private_key=tls.client_key, certificate_chain=tls.client_cert,
    )
    with grpc.secure_channel(cluster["grpc_endpoint"], credentials) as channel:
        assert not _connects(channel)


def test_health_needs_the_certificate_but_no_token(cluster):
    with client.channel(cluster, token=None) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=CALL_TIMEOUT_SECONDS)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


def _call_raw(channel: grpc.Channel, method: str, metadata=()) -> grpc.RpcError:
    call = channel.unary_unary(method, request_serializer=lambda raw: raw, response_deserializer=lambda raw: raw)
    with pytest.raises(grpc.RpcError) as raised:
        call(b"", timeout=CALL_TIMEOUT_SECONDS, metadata=metadata)
    return raised.value


def _signing_key(cluster) -> tuple[str, object]:
    folder = auth_dir(cluster["state_dir"]) / tokens.TOKEN_KEYS_DIR
    kid = (folder / tokens.CURRENT_KEY_FILE).read_text().strip()
    return kid, serialization.load_pem_private_key((folder / f"{kid}.key").read_bytes(), password=None)


def _token(cluster, key=None, **overrides) -> str:
    kid, current = _signing_key(cluster)
    now = int(time.time())
    claims = {"iss": tokens.ISSUER, "aud": tokens.AUDIENCE, "sub": "mallory", "role": "admin", "iat": now, "nbf": now, "exp": now + 600}
    claims.update(overrides)
    return jwt.encode(claims, key or current, algorithm=tokens.ALGORITHM, headers={"kid": kid})


BAD_TOKENS = {
    "missing": (lambda cluster: None, "TOKEN_MISSING"),
    "not bearer": (lambda cluster: "Basic YWRtaW46YWRtaW4=", "TOKEN_MISSING"),
    "garbage": (lambda cluster: "Bearer not-a-token", "TOKEN_INVALID"),
    "forged signature": (lambda cluster: "Bearer " + _token(cluster, key=ed25519.Ed25519PrivateKey.generate()), "TOKEN_INVALID"),
    "expired": (lambda cluster: "Bearer " + _token(cluster, iat=int(time.time()) - 7200, nbf=int(time.time()) - 7200, exp=int(time.time()) - 3600), "TOKEN_EXPIRED"),
    "wrong audience": (lambda cluster: "Bearer " + _token(cluster, aud="someone.else"), "TOKEN_INVALID"),
    "unknown role": (lambda cluster: "Bearer " + _token(cluster, role="root"), "TOKEN_INVALID"),
}


@pytest.mark.parametrize("case", list(BAD_TOKENS))
def test_every_method_refuses_a_call_without_a_valid_token(cluster, case):
    make, reason = BAD_TOKENS[case]
    header = make(cluster)
    metadata = () if header is None else (("authorization", header),)
    with client.channel(cluster, token=None) as channel:
        for method in METHODS:
            error = _call_raw(channel, method, metadata)
            code, got_reason, _ = failure(error)
            assert (method, code, got_reason) == (method, grpc.StatusCode.UNAUTHENTICATED, reason)
            assert "Traceback" not in (error.details() or "")


def test_a_token_minted_by_the_cli_is_accepted(cluster):
    minted = subprocess.run(
        [sys.executable, "-m", "services.auth", "--state-dir", cluster["state_dir"], "mint", "--role", "operator", "--subject", "olga", "--ttl-seconds", "120"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    assert jwt.decode(minted, options={"verify_signature": False})["role"] == "operator"
    with client.channel(cluster, token=minted) as channel:
        with pytest.raises(grpc.RpcError) as raised:
            _get_account(channel)
    assert failure(raised.value)[:2] == (grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND")


def test_a_rotated_key_signs_tokens_the_running_servers_accept_at_once_and_old_tokens_stay_valid(cluster):
    before = mint(cluster, "operator", "olga")
    subprocess.run([sys.executable, "-m", "services.auth", "--state-dir", cluster["state_dir"], "rotate-key"], check=True, capture_output=True)
    after = mint(cluster, "operator", "olga")
    assert jwt.get_unverified_header(after)["kid"] != jwt.get_unverified_header(before)["kid"]
    time.sleep(tokens.UNKNOWN_KEY_RELOAD_SECONDS)
    for token in (after, before, cluster["auth"]["admin_token"]):
        with client.channel(cluster, token=token) as channel:
            with pytest.raises(grpc.RpcError) as raised:
                _get_account(channel)
        assert failure(raised.value)[:2] == (grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND")


def test_cluster_json_and_private_keys_are_readable_by_their_owner_only(cluster):
    paths = [pathlib.Path(cluster["state_dir"]) / "cluster.json", pathlib.Path(cluster["auth"]["client_key"])]
    paths += list((auth_dir(cluster["state_dir"])).rglob("*.key"))
    for path in paths:
        assert path.stat().st_mode & 0o077 == 0, path
    assert auth_dir(cluster["state_dir"]).stat().st_mode & 0o077 == 0


def test_a_token_minted_for_one_second_is_refused_two_seconds_later(cluster):
    token = mint(cluster, "customer", "short-lived", ttl_seconds=1)
    time.sleep(2 + tokens.CLOCK_SKEW_SECONDS)
    with client.channel(cluster, token=token) as channel:
        with pytest.raises(grpc.RpcError) as raised:
            _get_account(channel)
    assert failure(raised.value)[:2] == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_EXPIRED")


def test_a_call_with_two_authorization_headers_is_refused(cluster):
    """Which identity acts must not depend on the order of two tokens (found by a red-team run)."""
    admin, customer = cluster["auth"]["admin_token"], mint(cluster, "customer", "two-headers")
    for first, second in ((admin, customer), (customer, admin)):
        metadata = (("authorization", f"Bearer {first}"), ("authorization", f"Bearer {second}"))
        with client.channel(cluster, token=None) as channel:
            error = _call_raw(channel, METHODS[0], metadata)
        assert failure(error)[:2] == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_INVALID")
