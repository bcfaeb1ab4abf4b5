"""Database errors never reach a client in their own words: no SQL, no stack trace, no secret.

Shard errors are provoked through the API: a shard that is down (an outage, retried) and
a statement the database refuses with a message of its own (a fault, never retried),
made by a trigger that only this test's account meets. What the client sees (status
message, ErrorInfo, trailing metadata) is a fixed message naming the shard at most; the
database's words go to the service's log, and no password or token does.
"""

from __future__ import annotations

import pathlib
import re
import uuid

import grpc
import psycopg
import pytest
from grpc_status import rpc_status
from google.rpc import error_details_pb2

from corebank.v1 import accounts_pb2, payments_pb2
from tests.fixtures import faults

CALL_TIMEOUT_SECONDS = 5.0
# SQL as a statement would spell it (upper case: English words in messages are lower case).
SQL_TEXT = re.compile(
    r"\b(SELECT|INSERT|UPDATE|DELETE|TRUNCATE|ALTER|DROP|CREATE|FROM|WHERE|RETURNING|EXECUTE|PREPARE|BEGIN|COMMIT)\b"
)
INTERNALS = ("Traceback", 'File "', "psycopg", "pg_", "passfile", "password", "LINE 1", "CONTEXT", "PL/pgSQL")


def shard_entry(cluster: dict, shard_name: str) -> dict:
    return next(shard for shard in cluster["shards"] if shard["name"] == shard_name)


def secrets_of(cluster: dict) -> list[str]:
    """The database passwords (from the passfiles the DSNs name) and the admin token."""
    found = []
    for shard in cluster["shards"]:
        for key in ("dsn", "owner_dsn", "auditor_dsn"):
            passfile = psycopg.conninfo.conninfo_to_dict(shard[key]).get("passfile") if key in shard else None
            if passfile:
                found.append(pathlib.Path(passfile).read_text().strip().rsplit(":", 1)[1])
    token = cluster.get("auth", {}).get("admin_token")
    if token:
        found.append(token)
    assert found, "no secret to look for"
    return sorted(set(found))


def what_the_client_sees(error: grpc.RpcError) -> str:
    """Every text of a failed call: details, the google.rpc.Status and its ErrorInfo, trailing metadata."""
    texts = [error.details() or ""]
    status = rpc_status.from_call(error)
    if status is not None:
        texts.append(status.message)
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                texts += [info.reason, info.domain, *info.metadata.keys(), *info.metadata.values()]
            else:
                texts.append(detail.value.decode("latin-1"))
    for key, value in error.trailing_metadata() or ():
        texts += [key, value.decode("latin-1") if isinstance(value, bytes) else value]
    return "\n".join(texts)


def assert_safe(error: grpc.RpcError, secrets: list[str], canary: str | None = None) -> None:
    seen = what_the_client_sees(error)
    assert not SQL_TEXT.search(seen), seen
    assert not [word for word in INTERNALS if word in seen], seen
    assert not [secret for secret in secrets if secret in seen], "a secret reached the client"
    if canary is not None:
        assert canary not in seen, seen


@pytest.fixture
def refusing_trigger(cluster, ledger, shard_map):
    """(an account, the canary): every UPDATE of that account's row is refused by the
    database with a message full of SQL and the canary; dropped afterwards."""
    shard_name = shard_map.shards[0].name
    account = ledger.open(shard=shard_name)
    canary = f"leak-canary-{uuid.uuid4().hex}"
    owner_dsn = shard_entry(cluster, shard_name)["owner_dsn"]
    with psycopg.connect(owner_dsn, autocommit=True) as connection:
        connection.execute(f"""
            CREATE FUNCTION leak_probe() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.account_id = '{account.account_id}' THEN
                    RAISE EXCEPTION 'SELECT rolpassword FROM pg_authid WHERE rolname = %', '{canary}'
                        USING DETAIL = 'UPDATE accounts SET status = 4 -- {canary}', HINT = 'Traceback {canary}';
                END IF;
                RETURN NEW;
            END;
            $$""")
        connection.execute("CREATE TRIGGER leak_probe BEFORE UPDATE ON accounts FOR EACH ROW EXECUTE FUNCTION leak_probe()")
    try:
        yield account, canary
    finally:
        with psycopg.connect(owner_dsn, autocommit=True) as connection:
            connection.execute("DROP TRIGGER IF EXISTS leak_probe ON accounts")
            connection.execute("DROP FUNCTION IF EXISTS leak_probe()")


def test_a_database_refusal_reaches_the_client_as_a_fixed_message(cluster, ledger, refusing_trigger):
    account, canary = refusing_trigger
    with pytest.raises(grpc.RpcError) as raised:
        ledger.accounts.UpdateAccountStatus(
            accounts_pb2.UpdateAccountStatusRequest(account_id=account.account_id, status=accounts_pb2.FROZEN),
            timeout=CALL_TIMEOUT_SECONDS,
        )
    assert raised.value.code() == grpc.StatusCode.INTERNAL
    assert_safe(raised.value, secrets_of(cluster), canary)
    # The database's words went to the log, for whoever runs the service.
    logs = "".join(path.read_text(errors="replace") for path in (pathlib.Path(cluster["state_dir"]) / "logs").glob("grpc-*.log"))
    assert canary in logs


def test_a_shard_outage_reaches_the_client_as_a_fixed_message(cluster, cluster_control, ledger, shard_map):
    down = shard_map.shards[-1].name
    stranded = ledger.open(shard=down)
    secrets = secrets_of(cluster)
    with faults.shard_crashed(cluster_control, down):
        calls = [
            lambda: ledger.accounts.GetAccount(accounts_pb2.GetAccountRequest(account_id=stranded.account_id), timeout=CALL_TIMEOUT_SECONDS),
            lambda: ledger.payments.GetTransfer(
                payments_pb2.GetTransferRequest(transfer_id=ledger.unique_id("lost")), timeout=CALL_TIMEOUT_SECONDS
            ),
            lambda: ledger.accounts.UpdateAccountStatus(
                accounts_pb2.UpdateAccountStatusRequest(account_id=stranded.account_id, status=accounts_pb2.FROZEN),
                timeout=CALL_TIMEOUT_SECONDS,
            ),
        ]
        for call in calls:
            with pytest.raises(grpc.RpcError) as raised:
                call()
            assert raised.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
            assert_safe(raised.value, secrets)


def test_no_secret_reaches_the_logs(cluster):
    secrets = secrets_of(cluster)
    state_dir = pathlib.Path(cluster["state_dir"])
    # Every process's log, rotated ones included (NAME.log.N); JSON escapes none of the characters
    # of a password or a token ([A-Za-z0-9_.-]), so a secret in a JSON line is found as it is.
    logs = [*(state_dir / "logs").glob("*.log*"), *(state_dir / "shards").glob("*/postgres.log")]
    assert logs
    for path in logs:
        text = path.read_text(errors="replace")
        assert not [secret for secret in secrets if secret in text], f"a secret in {path}"
