"""Use cases: route each request to its shard, apply idempotency, bound it by the deadline.

No gRPC here: servicers translate messages, this layer speaks domain types.
"""

from __future__ import annotations

import asyncio

from services.ledger import errors, ids, paging
from services.ledger.accounts import Account, OpenAccountRequest
from services.ledger.limits import TierLimits
from services.ledger.transfers import Transfer, TransferRequest
from services.storage.shard_store import ShardStore
from sharding.router import ShardRouter

# When a client sends no deadline, no request holds a database connection longer than this.
REQUEST_TIMEOUT_SECONDS_MAX = 10.0


def bounded_timeout(time_remaining_seconds: float | None) -> float:
    if time_remaining_seconds is None:
        return REQUEST_TIMEOUT_SECONDS_MAX
    if time_remaining_seconds <= 0:
        raise errors.DeadlineExceeded("the deadline passed before the request started")
    return min(time_remaining_seconds, REQUEST_TIMEOUT_SECONDS_MAX)


class LedgerService:
    def __init__(self, router: ShardRouter[ShardStore], limits: TierLimits) -> None:
        self.router = router
        self.limits = limits

    async def open_account(self, request: OpenAccountRequest, timeout_seconds: float) -> tuple[Account, bool]:
        request.validated(self.limits)
        account, created = await self.router.handle_for(request.account_id).open_account(request, timeout_seconds)
        conflicts = [] if created else account.conflicting_fields(request)
        if conflicts:
            raise errors.IdempotencyConflict(
                f"request_id {request.request_id} opened an account with other {', '.join(conflicts)}",
                conflicting_fields=",".join(conflicts),
            )
        return account, created

    async def get_account(self, account_id: str, timeout_seconds: float) -> Account:
        ids.validate_id(account_id, "account_id")
        account = await self.router.handle_for(account_id).get_account(account_id, timeout_seconds)
        if account is None:
            raise errors.AccountNotFound(f"account {account_id} not found", account_id=account_id)
        return account

    async def update_account_status(self, account_id: str, status: int, timeout_seconds: float) -> Account:
        ids.validate_id(account_id, "account_id")
        return await self.router.handle_for(account_id).update_account_status(account_id, status, timeout_seconds)

    async def close_account(self, account_id: str, timeout_seconds: float) -> Account:
        ids.validate_id(account_id, "account_id")
        return await self.router.handle_for(account_id).close_account(account_id, timeout_seconds)

    async def list_account_transfers(
        self, account_id: str, page_size: int, page_token: str, timeout_seconds: float
    ) -> tuple[list[Transfer], str]:
        ids.validate_id(account_id, "account_id")
        limit = paging.validate_page_size(page_size)
        before_seq = paging.decode_page_token(page_token, account_id)
        # One row more than asked tells whether another page exists.
        transfers = await self.router.handle_for(account_id).list_account_transfers(
            account_id, before_seq, limit + 1, timeout_seconds
        )
        if len(transfers) <= limit:
            return transfers, ""
        page = transfers[:limit]
        return page, paging.encode_page_token(account_id, page[-1].seq)

    async def transfer(self, request: TransferRequest, timeout_seconds: float) -> Transfer:
        """The final transfer; a refusal is raised after it is recorded."""
        request.validated()
        debit_shard = self.router.shard_name_for(request.debit_account_id)
        if debit_shard != self.router.shard_name_for(request.credit_account_id):
            raise errors.CrossShardNotSupported(
                "debit and credit accounts live on different shards; cross-shard transfers arrive with the coordinator",
                debit_shard=debit_shard, credit_shard=self.router.shard_name_for(request.credit_account_id),
            )
        transfer, fresh_refusal = await self.router.handle(debit_shard).post_transfer(request, self.limits, timeout_seconds)
        if fresh_refusal is not None:
            fresh_refusal.metadata["transfer_id"] = transfer.transfer_id
            raise fresh_refusal
        conflicts = transfer.conflicting_fields(request)
        if conflicts:
            raise errors.IdempotencyConflict(
                f"transfer_id {request.transfer_id} was used with other {', '.join(conflicts)}",
                conflicting_fields=",".join(conflicts),
            )
        refusal = transfer.refusal()
        if refusal is not None:
            raise refusal
        return transfer

    async def get_transfer(self, transfer_id: str, timeout_seconds: float) -> Transfer:
        """A transfer lives on its debit account's shard; ask every shard at once."""
        ids.validate_id(transfer_id, "transfer_id")
        answers = await asyncio.gather(
            *(store.get_transfer(transfer_id, timeout_seconds) for store in self.router.handles()),
            return_exceptions=True,
        )
        found = [answer for answer in answers if isinstance(answer, Transfer)]
        if found:
            return found[0]
        failures = [answer for answer in answers if isinstance(answer, BaseException)]
        if failures:
            # A shard that did not answer might hold it: "not found" would be a guess.
            raise failures[0] if isinstance(failures[0], errors.LedgerError) else errors.ShardUnavailable(str(failures[0]))
        raise errors.TransferNotFound(f"transfer {transfer_id} not found", transfer_id=transfer_id)
