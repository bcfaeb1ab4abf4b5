"""The ledger's invariants, checked from the databases themselves.

    python -m services.storage.audit [.corebank/cluster.json]

Prints each invariant with its figures and exits 1 if any is broken. Tests and
load tests call `audit_cluster` after their runs.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys

import psycopg

SHARD_TOTALS = """
    SELECT coalesce(sum(debits_posted_minor), 0), coalesce(sum(credits_posted_minor), 0),
           coalesce(sum(debits_pending_minor), 0), coalesce(sum(credits_pending_minor), 0),
           count(*) FILTER (WHERE kind <> 3 AND credits_posted_minor - debits_posted_minor - debits_pending_minor < 0)
    FROM accounts"""
BALANCE_BY_CURRENCY = """
    SELECT currency, sum(credits_posted_minor::numeric - debits_posted_minor::numeric) FROM accounts GROUP BY currency"""
# Every account's four counters must be exactly what its transfer rows say. A row
# of a transfer between shards (branch 1 or 2) has the shard's clearing account
# on the far side; a payment collected for a merchant (branch 3) credits the
# merchant's sub-account on this shard.
ACCOUNTS_NOT_MATCHING_TRANSFERS = """
    WITH entries AS (
        SELECT CASE WHEN branch = 2 THEN clearing_account_id ELSE debit_account_id END AS debited,
               CASE WHEN branch IN (1, 3) THEN clearing_account_id ELSE credit_account_id END AS credited,
               amount_minor::numeric AS amount, status
        FROM transfers WHERE status IN (1, 2)
    ), legs AS (
        SELECT debited AS account_id,
               CASE WHEN status = 2 THEN amount ELSE 0 END AS debits_posted, 0 AS credits_posted,
               CASE WHEN status = 1 THEN amount ELSE 0 END AS debits_pending, 0 AS credits_pending
        FROM entries
        UNION ALL
        SELECT credited, 0, CASE WHEN status = 2 THEN amount ELSE 0 END, 0, CASE WHEN status = 1 THEN amount ELSE 0 END
        FROM entries
    ), sums AS (
        SELECT account_id, sum(debits_posted) AS debits_posted, sum(credits_posted) AS credits_posted,
               sum(debits_pending) AS debits_pending, sum(credits_pending) AS credits_pending
        FROM legs GROUP BY account_id
    )
    SELECT a.account_id FROM accounts a LEFT JOIN sums s USING (account_id)
    WHERE (a.debits_posted_minor, a.credits_posted_minor, a.debits_pending_minor, a.credits_pending_minor)
          IS DISTINCT FROM (coalesce(s.debits_posted, 0), coalesce(s.credits_posted, 0),
                            coalesce(s.debits_pending, 0), coalesce(s.credits_pending, 0))"""
CLEARING_BALANCE_BY_CURRENCY = """
    SELECT currency, sum(credits_posted_minor::numeric - debits_posted_minor::numeric) FROM accounts
    WHERE owner_id = 'corebank-clearing' GROUP BY currency"""
COORDINATOR_STATES = "SELECT transfer_id, state, credit_shard FROM tcc_transfers"
BRANCH_STATUSES = "SELECT transfer_id, branch, status FROM transfers WHERE branch IN (1, 2)"

# tcc_transfers.state values (services.coordinator.state_machine.CoordinatorState), kept as
# plain numbers so the audit reads the database without the service's code.
POSTED_STATE, REJECTED_STATE, VOIDED_STATE = 4, 5, 6
PENDING_STATUS, POSTED_STATUS = 1, 2


@dataclasses.dataclass
class ShardAudit:
    shard_name: str
    debits_posted_minor: int
    credits_posted_minor: int
    debits_pending_minor: int
    credits_pending_minor: int
    negative_customer_accounts: int
    balance_by_currency: dict[str, int]
    clearing_balance_by_currency: dict[str, int]
    accounts_not_matching_transfers: list[str]
    coordinator_states: dict[str, tuple[int, str]]  # transfer_id -> (state, credit shard)
    branch_statuses: dict[tuple[str, int], int]  # (transfer_id, branch) -> status

    @property
    def balanced(self) -> bool:
        return (self.debits_posted_minor, self.debits_pending_minor) == (self.credits_posted_minor, self.credits_pending_minor)


@dataclasses.dataclass
class ClusterAudit:
    shards: list[ShardAudit]

    @property
    def balance_by_currency(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for shard in self.shards:
            for currency, balance in shard.balance_by_currency.items():
                totals[currency] = totals.get(currency, 0) + balance
        return totals

    @property
    def in_doubt(self) -> list[str]:
        final = (POSTED_STATE, REJECTED_STATE, VOIDED_STATE)
        return [t for shard in self.shards for t, (state, _) in shard.coordinator_states.items() if state not in final]

    def cross_shard_violations(self) -> list[str]:
        """Every transfer between shards is all or nothing: both branches posted, or neither."""
        branch_status = {key: status for shard in self.shards for key, status in shard.branch_statuses.items()}
        found = []
        for shard in self.shards:
            for transfer_id, (state, credit_shard) in shard.coordinator_states.items():
                debit_status = branch_status.get((transfer_id, 1))
                credit_status = branch_status.get((transfer_id, 2))
                if state == POSTED_STATE and (debit_status, credit_status) != (POSTED_STATUS, POSTED_STATUS):
                    found.append(f"{transfer_id} POSTED but its branches are {debit_status}/{credit_status}")
                if state in (REJECTED_STATE, VOIDED_STATE) and {debit_status, credit_status} & {PENDING_STATUS, POSTED_STATUS}:
                    found.append(f"{transfer_id} ended {state} but a branch is still {debit_status}/{credit_status}")
        records = {t for shard in self.shards for t in shard.coordinator_states}
        found += [f"branch {key} has no coordinator record" for key in branch_status if key[0] not in records]
        if not self.in_doubt:
            clearing: dict[str, int] = {}
            for shard in self.shards:
                for currency, balance in shard.clearing_balance_by_currency.items():
                    clearing[currency] = clearing.get(currency, 0) + balance
            found += [f"clearing accounts of {c} net to {total}, not 0" for c, total in clearing.items() if total]
        return found

    def violations(self) -> list[str]:
        found = self.cross_shard_violations()
        for shard in self.shards:
            if not shard.balanced:
                found.append(
                    f"{shard.shard_name}: debits {shard.debits_posted_minor}/{shard.debits_pending_minor} (posted/pending)"
                    f" != credits {shard.credits_posted_minor}/{shard.credits_pending_minor}"
                )
            if shard.negative_customer_accounts:
                found.append(f"{shard.shard_name}: {shard.negative_customer_accounts} customer accounts below zero")
            if shard.accounts_not_matching_transfers:
                found.append(f"{shard.shard_name}: counters differ from transfers for {shard.accounts_not_matching_transfers[:5]}")
        found += [f"{currency} sums to {total}, not 0" for currency, total in self.balance_by_currency.items() if total != 0]
        return found


def coordinator_states(dsn: str) -> dict[str, tuple[int, str]]:
    with psycopg.connect(dsn) as connection:
        return {row[0]: (row[1], row[2]) for row in connection.execute(COORDINATOR_STATES)}


def audit_shard(shard_name: str, dsn: str, states: dict[str, tuple[int, str]]) -> ShardAudit:
    # One snapshot for all three queries, so they describe the same instant.
    with psycopg.connect(dsn) as connection:
        connection.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        debits, credits, debits_pending, credits_pending, negative = connection.execute(SHARD_TOTALS).fetchone()
        by_currency = {currency: int(total) for currency, total in connection.execute(BALANCE_BY_CURRENCY)}
        clearing = {currency: int(total) for currency, total in connection.execute(CLEARING_BALANCE_BY_CURRENCY)}
        mismatched = [row[0] for row in connection.execute(ACCOUNTS_NOT_MATCHING_TRANSFERS)]
        branches = {(row[0], row[1]): row[2] for row in connection.execute(BRANCH_STATUSES)}
    return ShardAudit(
        shard_name, int(debits), int(credits), int(debits_pending), int(credits_pending), int(negative),
        by_currency, clearing, mismatched, states, branches,
    )


def audit_cluster(shards: list[dict]) -> ClusterAudit:
    """Meant for a quiet cluster. Coordinator records are read from every shard before
    any branch, so a transfer that finishes during the audit still reads consistently."""
    states = [coordinator_states(shard["dsn"]) for shard in shards]
    return ClusterAudit([audit_shard(shard["name"], shard["dsn"], s) for shard, s in zip(shards, states)])


def main() -> None:
    cluster_json = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else ".corebank/cluster.json")
    audit = audit_cluster(json.loads(cluster_json.read_text())["shards"])
    for shard in audit.shards:
        print(
            f"{shard.shard_name}: debits_posted={shard.debits_posted_minor} credits_posted={shard.credits_posted_minor}"
            f" debits_pending={shard.debits_pending_minor} credits_pending={shard.credits_pending_minor}"
            f" balanced={shard.balanced} negative_customers={shard.negative_customer_accounts}"
            f" counters_match_transfers={not shard.accounts_not_matching_transfers}"
        )
    print("sum of balances by currency:", audit.balance_by_currency or "{} (no accounts)")
    print(f"transfers between shards not yet final: {len(audit.in_doubt)}")
    violations = audit.violations()
    print("invariants hold" if not violations else "INVARIANTS BROKEN:\n  " + "\n  ".join(violations))
    sys.exit(1 if violations else 0)


if __name__ == "__main__":
    main()
