"""Merchants that collect on every shard: the flash-sale design.

In a flash sale thousands of buyers on every shard pay one merchant. Credited
directly, the merchant's row would take one lock, one transaction, one fsync at
a time, and most payments would cross shards. Instead such a merchant
(`collect_on_every_shard`, id prefix `hot_`) has a collection sub-account on
every shard. A payment credits the sub-account on the payer's shard: a
same-shard transfer, so group commit applies a whole batch of payments to that
row as one update. The coordinator processes sweep each sub-account into the
merchant at every recovery scan (RECOVERY_SCAN_INTERVAL_SECONDS, 1 s), with an ordinary transfer whose id is
derived from the sub-account's state (see sweep_id), until every collected amount
has arrived exactly once.

What the merchant has is always exact: balance_minor (swept) plus
collecting_minor (the sub-accounts' posted balances); every payment is a
transfer row that names the buyer, the merchant, and the sub-account it
credited; refunds debit the merchant's swept balance like any transfer.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import hashlib
import logging

from services.ledger import errors, ids
from services.ledger.transfers import TransferRequest
from sharding.shard_map import ShardMap

SWEEPS_PER_SHARD_MAX = 200
SWEEP_ID_PREFIX = ids.RESERVED_TRANSFER_ID_PREFIX + "sw:"
SWEEP_REFERENCE = "sweep"
COLLECTION_ID_CANDIDATES_MAX = 100_000

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=65_536)
def collection_account_id(shard_map: ShardMap, shard_name: str, merchant_id: str) -> str:
    """The merchant's sub-account on a shard: the first numbered id that hashes there."""
    body = merchant_id[len(ids.COLLECTING_ACCOUNT_ID_PREFIX):]
    for number in range(COLLECTION_ID_CANDIDATES_MAX):
        candidate = f"{ids.COLLECTION_ACCOUNT_ID_PREFIX}{body}_{number}"
        if shard_map.shard_name_for_key(candidate) == shard_name:
            return candidate
    raise AssertionError(f"no collection account id hashes to {shard_name}")


def routed(request: TransferRequest, shard_map: ShardMap) -> TransferRequest:
    """A payment to a collecting merchant credits its sub-account on the payer's shard.

    Sweeps (from the merchant's own sub-accounts) go to the merchant itself.
    """
    if not ids.is_collecting_account(request.credit_account_id) or ids.collection_parent(request.debit_account_id) == request.credit_account_id:
        return request
    payer_shard = shard_map.shard_name_for_key(request.debit_account_id)
    return dataclasses.replace(
        request, credited_account_id=collection_account_id(shard_map, payer_shard, request.credit_account_id)
    )


def sweep_id(sub_account_id: str, debits_so_far_minor: int, failed_sweeps: int, amount_minor: int) -> str:
    """In the ledger's own namespace (clients cannot choose it), and derived from the
    sub-account's state, so two coordinators that read the same state make the same id
    and only one moves the money. A failed (refused or voided) sweep's id is final;
    counting failures in the id gives the next try of the same money a new one. The
    amount is part of it too: an id registered by a sweeper that died before posting
    must not block a later sweep of a larger amount (the sub-account's funds, not the
    id, keep two sweeps read at different moments from moving the same money twice)."""
    digest = hashlib.blake2b(
        f"{sub_account_id}:{debits_so_far_minor}:{failed_sweeps}:{amount_minor}".encode(), digest_size=16, person=b"corebank.sweep"
    ).digest()
    return SWEEP_ID_PREFIX + base64.b32encode(digest).decode("ascii").rstrip("=").lower()


@dataclasses.dataclass
class SweepPass:
    """What one sweep of every shard found and did. The backlog is what it read before sweeping
    (no other scan): the sub-accounts holding an unswept balance, SWEEPS_PER_SHARD_MAX per shard
    at most, less those waiting to retry a failed sweep (SWEEP_RETRY_AFTER_FAILURE_SECONDS)."""

    posted: int = 0
    shards_unread: int = 0  # shards whose scan failed: their backlog is not counted
    backlog_minor_by_currency: dict[str, int] = dataclasses.field(default_factory=dict)
    backlog_sub_accounts: int = 0

    @property
    def complete(self) -> bool:
        return self.shards_unread == 0


async def sweep_once(ledger, timeout_seconds: float) -> SweepPass:
    """Sweep every sub-account with money into its merchant."""
    done = SweepPass()
    for store in ledger.router.handles():
        try:
            sweepable = await store.sweepable(SWEEPS_PER_SHARD_MAX, timeout_seconds)
        except errors.LedgerError as error:
            log.info("sweep scan of %s failed: %s", store.shard_name, error)
            done.shards_unread += 1
            continue
        done.backlog_sub_accounts += len(sweepable)
        for _, _, currency, amount_minor, _, _ in sweepable:
            done.backlog_minor_by_currency[currency] = done.backlog_minor_by_currency.get(currency, 0) + amount_minor
        for sub_account_id, merchant_id, currency, amount_minor, debits_so_far_minor, failed_sweeps in sweepable:
            request = TransferRequest(
                sweep_id(sub_account_id, debits_so_far_minor, failed_sweeps, amount_minor), sub_account_id, merchant_id, amount_minor,
                currency, SWEEP_REFERENCE,
            )
            try:
                await ledger.sweep(request, timeout_seconds)
                done.posted += 1
            except errors.IdempotencyConflict:
                pass  # another coordinator swept the same money first (its amount was read earlier)
            except errors.LedgerError as error:
                # Refused or voided: the money stays in the sub-account, and the next scan
                # tries again under a new id (see sweep_id).
                log.info("sweep %s failed: %s", request.transfer_id, error)
    return done
