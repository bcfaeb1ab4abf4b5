"""Clearing on the hot path, against the real cluster: positions and window totals move with
cleared transfers (same-shard, between shards, to a collecting merchant) and never with transfers
within one participant; a net debit cap refuses exactly when the whole position would pass it,
wherever its headroom sits. Positions are read from the databases, not from the service.

Participants are registered and caps set directly (rows on the clearing home, then
PositionStore.rebalance), so these tests do not depend on the Clearing service's RPCs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time

import grpc
import psycopg
import pytest

from corebank.v1 import accounts_pb2, payments_pb2, transfers_pb2
from services import bootstrap
from services.ledger import clearing
from services.ledger.ids import account_id_for_request
from services.storage.positions import PositionStore
from sharding.router import ShardRouter
from tests.fixtures.ledger import OPEN_ON_SHARD_ATTEMPTS_MAX, failure

CURRENCY = "USD"
FUNDING_MINOR = 1_000_000


def _dsn(cluster: dict, shard: str) -> str:
    return next(s["dsn"] for s in cluster["shards"] if s["name"] == shard)


def _rows(cluster: dict, shard: str, statement: str, params=()) -> list[tuple]:
    with psycopg.connect(_dsn(cluster, shard), autocommit=True) as connection:
        cursor = connection.execute(statement, params)
        return cursor.fetchall() if cursor.description else []


class Participants:
    """Registers participants and opens their accounts; reads their positions from every shard."""

    def __init__(self, ledger, cluster: dict, shard_map) -> None:
        self.ledger, self.cluster, self.shard_map = ledger, cluster, shard_map
        self.shards = [shard.name for shard in shard_map.shards]
        self.home = shard_map.shard_name_for_key(clearing.CLEARING_HOME_KEY)
        self._banks: dict[tuple[str, str], str] = {}

    def register(self) -> str:
        participant_id = self.ledger.unique_id("p")[-32:]
        _rows(self.cluster, self.home, "INSERT INTO participants (participant_id, request_id, name) VALUES (%s, %s, %s)",
              [participant_id, self.ledger.unique_id("reg"), participant_id])
        _rows(self.cluster, self.home,
              "INSERT INTO participant_currencies (participant_id, currency, settlement_account_id) VALUES (%s, %s, %s)",
              [participant_id, CURRENCY, clearing.settlement_account_id(participant_id, CURRENCY)])
        return participant_id

    def open(self, participant_id: str, shard: str | None, kind=accounts_pb2.CUSTOMER, tier=2, collect=False) -> str:
        for _ in range(OPEN_ON_SHARD_ATTEMPTS_MAX):
            request_id = self.ledger.unique_id("open")
            if shard is None or self.ledger.shard_of(account_id_for_request(request_id, collect)) == shard:
                return self.ledger.accounts.OpenAccount(accounts_pb2.OpenAccountRequest(
                    request_id=request_id, owner_id="owner", currency=CURRENCY, kind=kind, tier=tier,
                    collect_on_every_shard=collect, participant_id=participant_id,
                )).account_id
        raise AssertionError(f"no request id landed on {shard}")

    def funded(self, participant_id: str, shard: str, amount_minor: int = FUNDING_MINOR) -> str:
        """A customer of the participant, funded from the participant's own SYSTEM account on its shard (not cleared)."""
        if (participant_id, shard) not in self._banks:
            self._banks[participant_id, shard] = self.open(participant_id, shard, kind=accounts_pb2.SYSTEM, tier=0)
        account_id = self.open(participant_id, shard, tier=3)
        self.ledger.transfer(self._banks[participant_id, shard], account_id, amount_minor)
        return account_id

    def shares(self, participant_id: str) -> dict[str, tuple[int, int, int | None]]:
        """(position, reserved, allotment) per shard, from the databases."""
        found = {}
        for shard in self.shards:
            rows = _rows(self.cluster, shard,
                         "SELECT position_minor, reserved_minor, allotment_minor FROM clearing_positions WHERE participant_id = %s AND currency = %s",
                         [participant_id, CURRENCY])
            found[shard] = rows[0] if rows else (0, 0, None)
        return found

    def position(self, participant_id: str) -> int:
        return sum(position + reserved for position, reserved, _ in self.shares(participant_id).values())

    def totals(self, participant_id: str) -> tuple[int, int, int]:
        """(debits, credits, transfers) over every window and shard."""
        sums = [0, 0, 0]
        for shard in self.shards:
            for row in _rows(self.cluster, shard,
                             "SELECT debits_minor, credits_minor, transfers FROM clearing_window_totals WHERE participant_id = %s AND currency = %s",
                             [participant_id, CURRENCY]):
                sums = [total + int(value) for total, value in zip(sums, row)]
        return tuple(sums)

    def set_cap(self, participant_id: str, cap_minor: int) -> dict:
        async def rebalance():
            router = ShardRouter(bootstrap.open_shard_store, bootstrap.close_shard_store)
            await router.apply(self.shard_map)
            try:
                return await PositionStore(router).rebalance(participant_id, CURRENCY, 10.0, cap_minor=cap_minor)
            finally:
                await router.close()

        return asyncio.run(rebalance())

    def wait_until(self, condition, timeout_seconds: float = 15.0) -> None:
        deadline = time.monotonic() + timeout_seconds
        while not condition():
            assert time.monotonic() < deadline, "condition not reached in time"
            time.sleep(0.1)


@pytest.fixture(scope="module")
def banks(ledger, cluster, shard_map) -> Participants:
    return Participants(ledger, cluster, shard_map)


def _status(ledger, transfer_id: str) -> tuple[int, str]:
    transfer = ledger.payments.GetTransfer(payments_pb2.GetTransferRequest(transfer_id=transfer_id))
    return transfer.status, transfer.reason


def _refusal(call) -> str:
    with pytest.raises(grpc.RpcError) as refused:
        call()
    code, reason, _ = failure(refused.value)
    assert code == grpc.StatusCode.FAILED_PRECONDITION, (code, reason)
    return reason


@pytest.mark.parametrize("between_shards", [False, True], ids=["same-shard", "between-shards"])
def test_cross_participant_transfers_move_positions_and_intra_participant_ones_do_not(banks, ledger, between_shards):
    payer, payee = banks.register(), banks.register()
    debit_shard = banks.shards[0]
    credit_shard = banks.shards[1] if between_shards else debit_shard
    paying = banks.funded(payer, debit_shard)
    paid, own = banks.open(payee, credit_shard), banks.open(payer, credit_shard)
    assert ledger.get(paid).participant_id == payee

    transfer = ledger.transfer(paying, paid, 250)
    assert transfer.status == transfers_pb2.POSTED
    assert banks.position(payer) == 250 and banks.position(payee) == -250
    # Written on the debit shard, the payee's share included; reservations back to zero.
    assert banks.shares(payer)[debit_shard] == (250, 0, None)
    assert banks.shares(payee)[debit_shard][:2] == (-250, 0)
    assert banks.totals(payer) == (250, 0, 1) and banks.totals(payee) == (0, 250, 0)
    row = _rows(banks.cluster, debit_shard,
                "SELECT payer_participant_id, payee_participant_id, window_id FROM transfers WHERE transfer_id = %s AND branch IN (0, 1)",
                [transfer.transfer_id])
    assert row[0][:2] == (payer, payee) and row[0][2] is not None

    ledger.transfer(paying, own, 100)  # within the payer: nothing moves
    assert banks.position(payer) == 250 and banks.totals(payer) == (250, 0, 1)


def test_payments_to_a_collecting_merchant_are_cleared_to_its_participant(banks, ledger):
    payer, merchant_bank = banks.register(), banks.register()
    merchant = banks.open(merchant_bank, None, kind=accounts_pb2.MERCHANT, tier=3, collect=True)
    for shard in banks.shards:
        ledger.transfer(banks.funded(payer, shard), merchant, 40)
    assert banks.position(payer) == 40 * len(banks.shards) and banks.position(merchant_bank) == -40 * len(banks.shards)
    assert banks.totals(merchant_bank) == (0, 40 * len(banks.shards), 0)
    # The sweeps into the merchant stay within its participant: its position does not move again.
    banks.wait_until(lambda: ledger.get(merchant).balance_minor == 40 * len(banks.shards))
    assert banks.position(merchant_bank) == -40 * len(banks.shards)


def test_an_account_of_an_unknown_participant_or_currency_is_refused(banks, ledger):
    participant = banks.register()
    for participant_id, currency, expected in (("nobody-" + participant[-8:], CURRENCY, "PARTICIPANT_NOT_FOUND"),
                                               (participant, "EUR", "PARTICIPANT_CURRENCY_NOT_ENABLED")):
        with pytest.raises(grpc.RpcError) as refused:
            ledger.accounts.OpenAccount(accounts_pb2.OpenAccountRequest(
                request_id=ledger.unique_id("open"), owner_id="o", currency=currency, kind=accounts_pb2.CUSTOMER, tier=2,
                participant_id=participant_id,
            ))
        assert failure(refused.value)[1] == expected


def test_a_retry_naming_another_participant_is_a_conflict(banks, ledger):
    participant = banks.register()
    request = accounts_pb2.OpenAccountRequest(
        request_id=ledger.unique_id("open"), owner_id="o", currency=CURRENCY, kind=accounts_pb2.CUSTOMER, tier=2, participant_id=participant
    )
    opened = ledger.accounts.OpenAccount(request)
    assert ledger.accounts.OpenAccount(request).account_id == opened.account_id
    request.participant_id = ""
    with pytest.raises(grpc.RpcError) as refused:
        ledger.accounts.OpenAccount(request)
    assert failure(refused.value)[1] == "IDEMPOTENCY_CONFLICT"


def test_settlement_accounts_cannot_be_named_in_a_transfer(banks, ledger):
    paying = banks.funded(banks.register(), banks.shards[0])
    with pytest.raises(grpc.RpcError) as refused:
        ledger.transfer(paying, clearing.settlement_bank_account_id(CURRENCY), 1)
    assert failure(refused.value)[1] == "INTERNAL_ACCOUNT"


@pytest.mark.parametrize("between_shards", [False, True], ids=["same-shard", "between-shards"])
def test_the_cap_holds_for_the_whole_position_wherever_its_headroom_sits(banks, ledger, between_shards):
    payer, payee = banks.register(), banks.register()
    allotments = banks.set_cap(payer, 1_000)
    assert sorted(share.allotment_minor for share in allotments.values()) == [333, 333, 334]
    debit_shard = banks.shards[0]
    paying = banks.funded(payer, debit_shard)
    paid = banks.open(payee, banks.shards[1] if between_shards else debit_shard)

    assert ledger.transfer(paying, paid, 600).status == transfers_pb2.POSTED  # more than this shard's share
    refused_id = ledger.unique_id("t")
    assert _refusal(lambda: ledger.transfer(paying, paid, 500, transfer_id=refused_id)) == "NET_DEBIT_CAP_EXCEEDED"
    assert _status(ledger, refused_id) == (transfers_pb2.REJECTED, "NET_DEBIT_CAP_EXCEEDED")
    assert ledger.transfer(paying, paid, 400).status == transfers_pb2.POSTED  # exactly up to the cap
    assert _refusal(lambda: ledger.transfer(paying, paid, 1)) == "NET_DEBIT_CAP_EXCEEDED"
    assert banks.position(payer) == 1_000
    assert sum(allotment for _, _, allotment in banks.shares(payer).values()) == 1_000
    # Receiving makes room again.
    ledger.transfer(banks.funded(payee, debit_shard), banks.open(payer, debit_shard), 300)
    assert ledger.transfer(paying, paid, 300).status == transfers_pb2.POSTED
    assert banks.position(payer) == 1_000


def test_a_cap_split_over_shards_is_never_passed_by_concurrent_debits_from_every_shard(banks, ledger):
    payer, payee = banks.register(), banks.register()
    banks.set_cap(payer, 1_000)
    payers = [banks.funded(payer, shard) for shard in banks.shards for _ in range(2)]
    payees = [banks.open(payee, shard) for shard in banks.shards]
    plan = [(payers[i % len(payers)], payees[(i // len(payers)) % len(payees)]) for i in range(36)]

    def pay(pair) -> str:
        try:
            ledger.transfer(*pair, 100, timeout=30)
            return "POSTED"
        except grpc.RpcError as error:
            return failure(error)[1]

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        outcomes = list(pool.map(pay, plan))
    assert set(outcomes) <= {"POSTED", "NET_DEBIT_CAP_EXCEEDED"}, outcomes
    assert outcomes.count("POSTED") == 10  # as many as fit, no more
    assert banks.position(payer) == 1_000
    assert all(reserved == 0 for _, reserved, _ in banks.shares(payer).values())


def test_a_cancelled_transfer_between_shards_releases_its_reservation(banks, ledger, cluster):
    payer, payee = banks.register(), banks.register()
    banks.set_cap(payer, 1_000)
    debit_shard, credit_shard = banks.shards[0], banks.shards[1]
    paying = banks.funded(payer, debit_shard)
    paid = banks.open(payee, credit_shard)
    ledger.accounts.UpdateAccountStatus(accounts_pb2.UpdateAccountStatusRequest(account_id=paid, status=accounts_pb2.FROZEN))
    transfer_id = ledger.unique_id("t")
    assert _refusal(lambda: ledger.transfer(paying, paid, 700, transfer_id=transfer_id)) == "ACCOUNT_FROZEN"
    assert banks.shares(payer)[debit_shard][:2] == (0, 0)
    assert banks.position(payer) == 0 and banks.totals(payer) == (0, 0, 0)
    # The whole cap is free again.
    ledger.accounts.UpdateAccountStatus(accounts_pb2.UpdateAccountStatusRequest(account_id=paid, status=accounts_pb2.ACTIVE))
    assert ledger.transfer(paying, paid, 1_000).status == transfers_pb2.POSTED
