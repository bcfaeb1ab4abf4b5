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
           count(*) FILTER (WHERE kind <> 3 AND credits_posted_minor - debits_posted_minor - debits_pending_minor < 0)
    FROM accounts"""
BALANCE_BY_CURRENCY = """
    SELECT currency, sum(credits_posted_minor::numeric - debits_posted_minor::numeric) FROM accounts GROUP BY currency"""
# Every account's posted counters must be exactly what its posted transfers say.
ACCOUNTS_NOT_MATCHING_TRANSFERS = """
    WITH posted AS (
        SELECT debit_account_id AS account_id, amount_minor::numeric AS debit, 0::numeric AS credit
        FROM transfers WHERE status = 2
        UNION ALL
        SELECT credit_account_id, 0, amount_minor FROM transfers WHERE status = 2
    ), sums AS (SELECT account_id, sum(debit) AS debits, sum(credit) AS credits FROM posted GROUP BY account_id)
    SELECT a.account_id FROM accounts a LEFT JOIN sums s USING (account_id)
    WHERE a.debits_posted_minor <> coalesce(s.debits, 0) OR a.credits_posted_minor <> coalesce(s.credits, 0)"""


@dataclasses.dataclass
class ShardAudit:
    shard_name: str
    debits_posted_minor: int
    credits_posted_minor: int
    negative_customer_accounts: int
    balance_by_currency: dict[str, int]
    accounts_not_matching_transfers: list[str]

    @property
    def balanced(self) -> bool:
        return self.debits_posted_minor == self.credits_posted_minor


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

    def violations(self) -> list[str]:
        found = []
        for shard in self.shards:
            if not shard.balanced:
                found.append(f"{shard.shard_name}: debits {shard.debits_posted_minor} != credits {shard.credits_posted_minor}")
            if shard.negative_customer_accounts:
                found.append(f"{shard.shard_name}: {shard.negative_customer_accounts} customer accounts below zero")
            if shard.accounts_not_matching_transfers:
                found.append(f"{shard.shard_name}: counters differ from transfers for {shard.accounts_not_matching_transfers[:5]}")
        found += [f"{currency} sums to {total}, not 0" for currency, total in self.balance_by_currency.items() if total != 0]
        return found


def audit_shard(shard_name: str, dsn: str) -> ShardAudit:
    # One snapshot for all three queries, so they describe the same instant.
    with psycopg.connect(dsn) as connection:
        connection.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        debits, credits, negative = connection.execute(SHARD_TOTALS).fetchone()
        by_currency = {currency: int(total) for currency, total in connection.execute(BALANCE_BY_CURRENCY)}
        mismatched = [row[0] for row in connection.execute(ACCOUNTS_NOT_MATCHING_TRANSFERS)]
    return ShardAudit(shard_name, int(debits), int(credits), int(negative), by_currency, mismatched)


def audit_cluster(shards: list[dict]) -> ClusterAudit:
    return ClusterAudit([audit_shard(shard["name"], shard["dsn"]) for shard in shards])


def main() -> None:
    cluster_json = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else ".corebank/cluster.json")
    audit = audit_cluster(json.loads(cluster_json.read_text())["shards"])
    for shard in audit.shards:
        print(
            f"{shard.shard_name}: debits_posted={shard.debits_posted_minor} credits_posted={shard.credits_posted_minor}"
            f" balanced={shard.balanced} negative_customers={shard.negative_customer_accounts}"
            f" counters_match_transfers={not shard.accounts_not_matching_transfers}"
        )
    print("sum of balances by currency:", audit.balance_by_currency or "{} (no accounts)")
    violations = audit.violations()
    print("invariants hold" if not violations else "INVARIANTS BROKEN:\n  " + "\n  ".join(violations))
    sys.exit(1 if violations else 0)


if __name__ == "__main__":
    main()
