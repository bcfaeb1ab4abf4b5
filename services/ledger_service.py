"""Use cases: route each request to its shard, apply idempotency, bound it by the deadline.

No gRPC here: servicers translate messages, this layer speaks domain types.
"""

from __future__ import annotations

import asyncio

from services.coordinator.driver import TransferDriver, outcome
from services.coordinator.state_machine import FINAL_STATES
from services.ledger import errors, ids, paging
from services.ledger.accounts import Account, OpenAccountRequest
from services.ledger.limits import TierLimits
from services.ledger.transfers import Transfer, TransferRequest
from services.storage.shard_store import ShardStore
from services.storage.tcc_store import TccStore
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
    def __init__(self, router: ShardRouter[ShardStore], limits: TierLimits, driver: TransferDriver) -> None:
        self.router = router
        self.limits = limits
        self.driver = driver
        # Drives outlive the request that started them (a client deadline does not stop a transfer).
        self._drives: set[asyncio.Task] = set()

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
        credit_shard = self.router.shard_name_for(request.credit_account_id)
        if debit_shard != credit_shard:
            return await self._transfer_between_shards(request, debit_shard, credit_shard, timeout_seconds)
        transfer, fresh_refusal = await self.router.handle(debit_shard).post_transfer(request, self.limits, timeout_seconds)
        return self._answer(request, transfer, fresh_refusal)

    @staticmethod
    def _answer(request: TransferRequest, transfer: Transfer, fresh_refusal: errors.LedgerError | None) -> Transfer:
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

    async def _transfer_between_shards(
        self, request: TransferRequest, debit_shard: str, credit_shard: str, timeout_seconds: float
    ) -> Transfer:
        deadline = asyncio.get_running_loop().time() + timeout_seconds
        begun = await self.driver.begin(request, debit_shard, credit_shard, timeout_seconds)
        if begun.record is None:  # the id belongs to a same-shard transfer
            return self._answer(request, begun.same_shard_transfer, None)
        record = begun.record
        if not begun.created or begun.fresh_refusal is not None:
            self._answer(request, record.as_transfer(), begun.fresh_refusal)  # raises on conflict or refusal
        if record.state not in FINAL_STATES:
            if begun.created:
                drive = asyncio.create_task(self.driver.drive(record))
            else:  # a retry while the first attempt is still in flight: wait for its driver
                drive = asyncio.create_task(self.driver.wait_until_final(record.transfer_id, debit_shard))
            self._drives.add(drive)
            drive.add_done_callback(self._drives.discard)
            try:
                async with asyncio.timeout_at(deadline):
                    record = await asyncio.shield(drive)
                    if record.state not in FINAL_STATES:  # our driver lost its lease: wait for the new owner
                        record = await self.driver.wait_until_final(record.transfer_id, debit_shard)
            except TimeoutError:
                raise errors.DeadlineExceeded(
                    f"transfer {request.transfer_id} is still in flight; it will complete, GetTransfer tells its state",
                    transfer_id=request.transfer_id,
                ) from None
        return outcome(record)

    async def drain(self) -> None:
        """Let in-flight drives finish (shutdown); recovery would take them over otherwise."""
        if self._drives:
            await asyncio.wait(self._drives, timeout=5.0)

    async def get_transfer(self, transfer_id: str, timeout_seconds: float) -> Transfer:
        """Ask every shard at once and answer as soon as the one that holds it does, so a
        shard that is down or frozen only slows the lookups it could matter to."""
        ids.validate_id(transfer_id, "transfer_id")
        lookups = [
            asyncio.ensure_future(TccStore(store).find(transfer_id, timeout_seconds)) for store in self.router.handles()
        ]
        failures: list[BaseException] = []
        try:
            for lookup in asyncio.as_completed(lookups):
                try:
                    record, local = await lookup
                except Exception as error:  # noqa: BLE001 (a shard that did not answer is judged below)
                    failures.append(error)
                    continue
                # A coordinator record (between shards) or a same-shard row is the whole answer;
                # a branch row alone is not: its coordinator record is on another shard.
                if record is not None:
                    return record.as_transfer()
                if local is not None and local.branch == 0:
                    return local
        finally:
            for lookup in lookups:
                lookup.cancel()
        if failures:
            # A shard that did not answer might hold it: "not found" would be a guess.
            raise failures[0] if isinstance(failures[0], errors.LedgerError) else errors.ShardUnavailable(str(failures[0]))
        raise errors.TransferNotFound(f"transfer {transfer_id} not found", transfer_id=transfer_id)
