"""Random sequences of API calls by a careless or malicious client, judged by an auditor.

Each example opens a small pool of accounts (customers, SYSTEM banks, a merchant, a
merchant collecting on every shard at tier 3, internal and unknown account ids, on
different shards) and draws a sequence of calls over a small pool of transfer ids, so
that ids are reused across shards and kinds: Transfer, CreateTransfers with linked
chains (new ids, existing ones, rejected ones, the same id twice), status changes,
closes, payments to and refunds from the collecting merchant, squatted sweep ids,
extreme amounts between SYSTEM accounts, and steps that fire several calls at once.

Every call must answer with a google.rpc.Status carrying an ErrorInfo, never INTERNAL or
UNKNOWN. After each sequence the test waits (bounded) for quiescence and checks the
invariants from the databases, and what the client was told against what was stored.

    HOSTILE_EXAMPLES=500 SEED=7 make hostile     # the long form; SEED replays a failure
"""

from __future__ import annotations

import concurrent.futures
import os
import time

import grpc
import pytest
from hypothesis import HealthCheck, Phase, given, note, seed, settings
from hypothesis import strategies as st

from corebank.v1 import accounts_pb2, clearing_pb2, payments_pb2
from services.collection import collection_account_id
from services.coordinator.clearing import clearing_account_id
from tests.fixtures import clearing as clearing_books
from tests.fixtures.clearing import ClearingClient, closed_pair
from tests.hostile import support

EXAMPLES = int(os.environ.get("HOSTILE_EXAMPLES") or 5)
SEED = int(os.environ.get("SEED") or 20240601)
SHRINK = os.environ.get("HOSTILE_SHRINK", "") not in ("", "0")
STEPS_MAX = int(os.environ.get("HOSTILE_STEPS") or 20)
# Per example: about 3 s of calls and checks, plus up to QUIESCENCE_WAIT_SECONDS_MAX when stuck.
TIMEOUT_SECONDS = max(300, EXAMPLES * 60)

pytestmark = [pytest.mark.cluster, pytest.mark.hostile]

CURRENCY = "GBP"  # no other test of the session uses it: the property test owns its clearing lanes
EXTREME_CURRENCY = "KWD"  # SYSTEM accounts moving amounts near 2**63 (they may saturate its lanes)
FUNDING_MINOR = 100_000
TIER0_FUNDING_MINOR = 15_000  # under tier 0's transfer cap (20 000) and balance cap (100 000)
INT64_MAX = 2**63 - 1
THREADS_MAX = 8

# The account pool, by index. The ids at INTERNAL_AND_UNKNOWN belong to nobody a client may name.
# Participants: C1 and MERCHANT belong to participant PA, C2 and COLLECTING to PB, the rest to the
# hosting bank, so payments between them are cleared; STL is PA's settlement account (no client moves it).
C0, C1, C2, C_TIER0, MERCHANT, COLLECTING, S0, S1, S2, K0, K1, K0_SAME_SHARD, GHOST, SUB, CLEARING, STL = range(16)
ACCOUNT_COUNT = 16
PARTICIPANTS = 2
CLOSE_IDS = 3  # close request ids per sequence: drawn twice, a close is retried
CUSTOMERS = [C0, C1, C2, C_TIER0]
TRANSFER_IDS = 6

accounts = st.one_of(st.integers(C0, S2), st.integers(C0, S2), st.integers(C0, STL))
transfer_ids = st.integers(0, TRANSFER_IDS - 1)
amounts = st.one_of(
    st.just(1), st.integers(1, 5_000), st.integers(5_001, 30_000_000), st.sampled_from([INT64_MAX, 2**62, 0, -1])
)
currencies = st.sampled_from(["own", "own", "own", "other", "unknown"])
statuses = st.sampled_from([
    accounts_pb2.ACTIVE, accounts_pb2.ACTIVE, accounts_pb2.BLOCK_DEBIT, accounts_pb2.BLOCK_CREDIT, accounts_pb2.FROZEN,
    accounts_pb2.CLOSED, 0,
])

transfer_step = st.tuples(st.just("transfer"), transfer_ids, accounts, accounts, amounts, currencies)
batch_step = st.tuples(
    st.just("batch"),
    st.lists(st.tuples(transfer_ids, accounts, accounts, amounts, st.booleans()), min_size=1, max_size=5),
    st.sampled_from(["closed", "closed", "open"]),
)
status_step = st.tuples(st.just("status"), st.sampled_from([C0, C1, C2, MERCHANT, COLLECTING, COLLECTING, SUB]), statuses)
close_step = st.tuples(st.just("close"), st.sampled_from([C_TIER0, MERCHANT, COLLECTING, COLLECTING]))
pay_step = st.tuples(st.just("pay"), transfer_ids, st.sampled_from(CUSTOMERS + [MERCHANT]), st.integers(1, 20_000))
refund_step = st.tuples(st.just("refund"), transfer_ids, st.sampled_from(CUSTOMERS), st.integers(1, 20_000))
huge_step = st.tuples(
    st.just("huge"), transfer_ids, st.sampled_from([(K0, K1), (K1, K0), (K0, K0_SAME_SHARD), (K1, K0_SAME_SHARD)]),
    st.sampled_from([INT64_MAX, INT64_MAX - 1, 2**62 + 1, 1]),
)
squat_step = st.tuples(st.just("squat"), st.sampled_from(["sys", "sw"]), st.integers(0, 2), st.sampled_from(CUSTOMERS), st.integers(1, 100))
get_step = st.tuples(st.just("get"), transfer_ids)
settle_step = st.just(("settle",))
window_step = st.tuples(st.just("window"), st.integers(0, CLOSE_IDS - 1))
cap_step = st.tuples(st.just("cap"), st.integers(0, PARTICIPANTS - 1), st.sampled_from([0, 1, 5_000, 50_000, 10**12]), st.sampled_from([0, 1, 100]))
settle_windows_step = st.tuples(st.just("settle_windows"), st.sampled_from([clearing_pb2.DEFERRED_NET, clearing_pb2.GROSS]))
concurrent_step = st.tuples(
    st.just("concurrent"),
    st.lists(st.one_of(transfer_step, batch_step, status_step, close_step, pay_step, refund_step, huge_step, window_step, cap_step,
                       settle_windows_step), min_size=2, max_size=4),
)
steps = st.lists(
    st.one_of(
        transfer_step, transfer_step, batch_step, batch_step, status_step, close_step, pay_step, pay_step, refund_step,
        huge_step, squat_step, get_step, settle_step, concurrent_step, concurrent_step, window_step, cap_step, settle_windows_step,
    ),
    min_size=1, max_size=STEPS_MAX,
)


class Sequence:
    """One example: its pool of accounts and ids, the journal of answers, and the steps' I/O."""

    def __init__(self, ledger, shard_map, channel) -> None:
        self.ledger = ledger
        self.clearing = ClearingClient(channel, ledger)
        self.shard_map = shard_map
        self.journal = support.Journal()
        self.prefix = ledger.unique_id("hx")
        self.ids = [f"{self.prefix}-{i}" for i in range(TRANSFER_IDS)]
        shards = [shard.name for shard in shard_map.shards]
        self.shard_names = shards
        banks = [ledger.open(kind=accounts_pb2.SYSTEM, tier=0, currency=CURRENCY, shard=shards[i]) for i in range(3)]
        self.participants = [f"{self.prefix}-p{i}"[-32:] for i in range(PARTICIPANTS)]
        registered = [self.clearing.register(p, [CURRENCY]) for p in self.participants]
        pa, pb = self.participants
        customers = [ledger.open(tier=2, currency=CURRENCY, shard=shards[0]), self.clearing.open(pa, shards[1], tier=2, currency=CURRENCY),
                     self.clearing.open(pb, shards[2], tier=2, currency=CURRENCY)]
        customers.append(ledger.open(tier=0, currency=CURRENCY, shard=shards[0]))
        merchant = self.clearing.open(pa, shards[1], kind=accounts_pb2.MERCHANT, tier=1, currency=CURRENCY)
        collecting = self.clearing.open(pb, kind=accounts_pb2.MERCHANT, tier=3, currency=CURRENCY, collect_on_every_shard=True)
        settlement_account = next(c.settlement_account_id for c in registered[0].currencies if c.currency == CURRENCY)
        self.closes: dict[int, tuple[int, int]] = {}
        extreme = [ledger.open(kind=accounts_pb2.SYSTEM, tier=0, currency=EXTREME_CURRENCY, shard=shards[i]) for i in (0, 1, 0)]
        ghost = ledger.unique_id("acc_ghost").replace("-", "")
        sub = collection_account_id(shard_map, shards[0], collecting.account_id)
        clearing = clearing_account_id(shard_map, shards[0], CURRENCY, self.ids[0])
        self.account_ids = (
            [c.account_id for c in customers] + [merchant.account_id, collecting.account_id]
            + [b.account_id for b in banks] + [k.account_id for k in extreme] + [ghost, sub, clearing, settlement_account]
        )
        assert len(self.account_ids) == ACCOUNT_COUNT
        self.currencies = [CURRENCY] * ACCOUNT_COUNT
        for index in (K0, K1, K0_SAME_SHARD):
            self.currencies[index] = EXTREME_CURRENCY
        for customer, bank in zip((C0, C1, C2, C_TIER0), (S0, S1, S2, S0)):
            funded = support.transfer(self.ledger, self.journal, self.request(f"{self.prefix}-fund-{customer}", bank, customer, FUNDING_MINOR if customer != C_TIER0 else TIER0_FUNDING_MINOR))
            assert funded.acknowledged_posted, f"could not fund the pool: {funded}"

    @property
    def collecting_id(self) -> str:
        return self.account_ids[COLLECTING]

    def request(self, transfer_id: str, debit: int, credit: int, amount: int, currency: str = "own", linked: bool = False):
        if currency == "own":
            currency = self.currencies[debit]
        elif currency == "other":
            currency = EXTREME_CURRENCY if self.currencies[debit] == CURRENCY else CURRENCY
        elif currency == "unknown":
            currency = "XXX"
        return payments_pb2.TransferRequest(
            transfer_id=transfer_id, debit_account_id=self.account_ids[debit], credit_account_id=self.account_ids[credit],
            amount_minor=amount, currency=currency, linked=linked,
        )

    def run(self, step: tuple) -> None:
        kind = step[0]
        if kind == "transfer":
            _, tid, debit, credit, amount, currency = step
            support.transfer(self.ledger, self.journal, self.request(self.ids[tid], debit, credit, amount, currency))
        elif kind == "batch":
            _, members, ending = step
            requests = [self.request(self.ids[tid], d, c, a, linked=linked) for tid, d, c, a, linked in members]
            if ending == "closed":
                requests[-1].linked = False
            support.create_transfers(self.ledger, self.journal, requests)
        elif kind == "status":
            _, account, status = step
            support.update_status(self.ledger, self.journal, self.account_ids[account], status)
        elif kind == "close":
            support.close_account(self.ledger, self.journal, self.account_ids[step[1]])
        elif kind == "pay":
            _, tid, payer, amount = step
            support.transfer(self.ledger, self.journal, self.request(self.ids[tid], payer, COLLECTING, amount))
        elif kind == "refund":
            _, tid, customer, amount = step
            support.transfer(self.ledger, self.journal, self.request(self.ids[tid], COLLECTING, customer, amount))
        elif kind == "huge":
            _, tid, (debit, credit), amount = step
            support.transfer(self.ledger, self.journal, self.request(self.ids[tid], debit, credit, amount))
        elif kind == "squat":
            # The id a sweep of the collecting merchant's sub-account would take next (with either
            # prefix the ledger uses for its own ids), taken first by a client.
            _, prefix, shard_index, payer, amount = step
            sub = collection_account_id(self.shard_map, self.shard_names[shard_index], self.collecting_id)
            squatted = f"{prefix}:{sub.removeprefix(support.SUB_ACCOUNT_PREFIX)}:0"
            support.transfer(self.ledger, self.journal, self.request(squatted, payer, C1 if payer != C1 else C2, amount))
        elif kind == "get":
            support.get_transfer(self.ledger, self.ids[step[1]])
        elif kind == "settle":
            deadline = time.monotonic() + 3.0
            while time.monotonic() < deadline:
                try:
                    if self.ledger.get(self.collecting_id).collecting_minor == 0:
                        break
                except grpc.RpcError as error:
                    support.error_info(error, self.journal, f"GetAccount({self.collecting_id})")
                    break
                time.sleep(0.2)
        elif kind == "window":
            request_id = f"{self.prefix}-w{step[1]}"
            try:
                answer = self.clearing.close(request_id, reason="hostile sequence", timeout=support.CALL_TIMEOUT_SECONDS)
            except grpc.RpcError as error:
                support.error_info(error, self.journal, f"CloseSettlementWindow({request_id})")
                return
            pair = closed_pair(answer)
            if self.closes.setdefault(step[1], pair) != pair:
                self.journal.breach(f"CloseSettlementWindow({request_id}) answered {pair}, earlier {self.closes[step[1]]}")
        elif kind == "cap":
            _, participant, cap, threshold = step
            try:
                self.clearing.set_cap(self.participants[participant], CURRENCY, cap, threshold)
            except grpc.RpcError as error:
                support.error_info(error, self.journal, f"SetNetDebitCap({self.participants[participant]}, {cap})")
        elif kind == "settle_windows":
            # Every CLOSED window of the cluster, settled and recorded (a concurrent one may take some first).
            what = "CreateSettlement"
            try:
                closed = [w.window_id for w in self.clearing.windows(clearing_pb2.WINDOW_CLOSED)][:100]
                if not closed:
                    return
                what = f"CreateSettlement({closed})"
                settlement = self.clearing.create_settlement(self.ledger.unique_id("hxs"), closed, step[1], timeout=support.CALL_TIMEOUT_SECONDS)
                for entry in settlement.entries:
                    what = f"RecordParticipantSettled({settlement.settlement_id}, {entry.participant_id}, {entry.currency})"
                    self.clearing.record(settlement.settlement_id, entry.participant_id, entry.currency, timeout=support.CALL_TIMEOUT_SECONDS)
            except grpc.RpcError as error:
                code, reason, _ = support.error_info(error, self.journal, what)
                if (code, reason) != (grpc.StatusCode.FAILED_PRECONDITION, "SETTLEMENT_WINDOW_ALREADY_SETTLED"):
                    self.journal.breach(f"{what}: {code.name}/{reason}")
        elif kind == "concurrent":
            with concurrent.futures.ThreadPoolExecutor(THREADS_MAX) as pool:
                for done in [pool.submit(self.run, inner) for inner in step[1]]:
                    done.result()
        else:
            raise AssertionError(f"unknown step {step}")


@pytest.mark.timeout(TIMEOUT_SECONDS)
def test_random_api_sequences_keep_the_money_safe(cluster, ledger, shard_map, grpc_channel):
    print(f"\nhostile sequences: SEED={SEED} HOSTILE_EXAMPLES={EXAMPLES} HOSTILE_STEPS={STEPS_MAX} (replay: SEED={SEED} make hostile)")
    shards = cluster["shards"]

    @seed(SEED)
    @settings(
        max_examples=EXAMPLES, deadline=None, database=None, print_blob=True,
        phases=[Phase.explicit, Phase.generate] + ([Phase.shrink] if SHRINK else []),
        suppress_health_check=list(HealthCheck),
    )
    @given(sequence_steps=steps)
    def sequence_keeps_the_money_safe(sequence_steps):
        sequence = Sequence(ledger, shard_map, grpc_channel)
        note(f"pool: {dict(zip(['C0', 'C1', 'C2', 'C_TIER0', 'MERCHANT', 'COLLECTING', 'S0', 'S1', 'S2', 'K0', 'K1', 'K0_SAME_SHARD', 'GHOST', 'SUB', 'CLEARING', 'STL'], sequence.account_ids))}")
        for step in sequence_steps:
            sequence.run(step)
        waited = support.wait_for_quiescence(shards, [sequence.collecting_id])
        violations = support.ledger_violations(shards, [sequence.collecting_id])
        used_ids = {answer.request.transfer_id for answer in sequence.journal.answers}
        violations += support.id_violations(shards, used_ids)
        # The settlement account moves by the ledger's own settlement legs only (judged by the clearing books below).
        violations += support.model_violations(shards, sequence.journal, sequence.account_ids[:STL], [sequence.collecting_id])
        violations += [f"{answer}: names a settlement account, yet not refused as INVALID_ARGUMENT" for answer in sequence.journal.answers
                       if sequence.account_ids[STL] in (answer.request.debit_account_id, answer.request.credit_account_id)
                       and answer.code != grpc.StatusCode.INVALID_ARGUMENT]
        violations += [f"clearing: {text}" for text in clearing_books.books_violations(shards, sequence.clearing.home_shard)]
        violations += support.get_transfer_violations(ledger, shards, used_ids)
        note("answers:\n  " + "\n  ".join(str(a) for a in sequence.journal.answers))
        assert not violations, (
            f"SEED={SEED}: {len(violations)} violations after {len(sequence_steps)} steps"
            f" (waited {waited:.1f}s for quiescence):\n  " + "\n  ".join(violations)
        )

    sequence_keeps_the_money_safe()
