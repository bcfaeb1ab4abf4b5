"""corebank.v1 Accounts, Payments and Clearing. Each method: message in, use case, message out.

Each use case is called as the call's authenticated caller (current_caller(), set by the
interceptor once the token is verified); the use cases authorise it.
"""

import grpc

from corebank.v1 import accounts_pb2, accounts_pb2_grpc, clearing_pb2, clearing_pb2_grpc, payments_pb2, payments_pb2_grpc
from corebank.v1 import transfers_pb2
from services.api import metrics
from services.api.clearing_convert import participant_message, position_message, reconcile_message, settlement_message, window_message
from services.api.convert import account_message, transfer_message
from services.api.identity import current_caller
from services.api.interceptor import status_message
from services.ledger import authorization, errors
from services.ledger.accounts import OpenAccountRequest
from services.ledger.transfers import TransferRequest
from services.clearing_service import ClearingService, Unimplemented
from services.ledger_service import LedgerService, bounded_timeout


def _timeout(context: grpc.aio.ServicerContext) -> float:
    return bounded_timeout(context.time_remaining())


class AccountsServicer(accounts_pb2_grpc.AccountsServicer):
    def __init__(self, ledger: LedgerService) -> None:
        self.ledger = ledger

    async def OpenAccount(self, request, context) -> accounts_pb2.Account:
        account, _ = await self.ledger.open_account(
            current_caller(),
            OpenAccountRequest(
                request.request_id, request.owner_id, request.currency, request.kind, request.tier, request.collect_on_every_shard,
                request.participant_id,
            ),
            _timeout(context),
        )
        return account_message(account)

    async def GetAccount(self, request, context) -> accounts_pb2.Account:
        return account_message(*await self.ledger.get_account(current_caller(), request.account_id, _timeout(context)))

    async def UpdateAccountStatus(self, request, context) -> accounts_pb2.Account:
        return account_message(*await self.ledger.update_account_status(current_caller(), request.account_id, request.status, _timeout(context)))

    async def CloseAccount(self, request, context) -> accounts_pb2.Account:
        return account_message(await self.ledger.close_account(current_caller(), request.account_id, _timeout(context)))

    async def ListAccountTransfers(self, request, context) -> accounts_pb2.ListAccountTransfersResponse:
        transfers, next_page_token = await self.ledger.list_account_transfers(
            current_caller(), request.account_id, request.page_size, request.page_token, _timeout(context)
        )
        return accounts_pb2.ListAccountTransfersResponse(
            transfers=[transfer_message(t) for t in transfers], next_page_token=next_page_token
        )


class PaymentsServicer(payments_pb2_grpc.PaymentsServicer):
    def __init__(self, ledger: LedgerService) -> None:
        self.ledger = ledger

    async def Transfer(self, request, context) -> transfers_pb2.Transfer:
        try:
            if request.linked:
                raise errors.LinkedChainOpen("linked chains need CreateTransfers: a single transfer closes its chain")
            transfer = await self.ledger.transfer(current_caller(), _transfer_request(request), _timeout(context))
        except Exception as error:  # noqa: BLE001 (counted by reason and outcome, then re-raised to the interceptor)
            metrics.record_transfer_failure(error)
            metrics.record_transfer_answer(error, request.currency, request.amount_minor)
            raise
        metrics.record_transfer_answer(transfer, transfer.currency, transfer.amount_minor)
        return transfer_message(transfer)

    async def GetTransfer(self, request, context) -> transfers_pb2.Transfer:
        return transfer_message(await self.ledger.get_transfer(current_caller(), request.transfer_id, _timeout(context)))

    async def CreateTransfers(self, request, context) -> payments_pb2.CreateTransfersResponse:
        caller = current_caller()
        answers = await self.ledger.create_transfers(
            caller,
            [_transfer_request(transfer) for transfer in request.transfers],
            [transfer.linked for transfer in request.transfers],
            _timeout(context),
        )
        results = []
        for transfer, answer in zip(request.transfers, answers):
            metrics.record_transfer_answer(answer, transfer.currency, transfer.amount_minor)
            if isinstance(answer, errors.LedgerError):
                metrics.record_transfer_failure(answer)
                if isinstance(answer, errors.RateLimited):
                    metrics.record_rate_limited(answer, caller.role)
                results.append(payments_pb2.TransferResult(error=status_message(authorization.disclosed(caller, answer))))
            else:
                results.append(payments_pb2.TransferResult(transfer=transfer_message(answer)))
        return payments_pb2.CreateTransfersResponse(results=results)


def _transfer_request(message) -> TransferRequest:
    return TransferRequest(
        message.transfer_id, message.debit_account_id, message.credit_account_id,
        message.amount_minor, message.currency, message.reference,
    )


class ClearingServicer(clearing_pb2_grpc.ClearingServicer):
    def __init__(self, clearing: ClearingService) -> None:
        self.clearing = clearing

    async def RegisterParticipant(self, request, context) -> clearing_pb2.Participant:
        return participant_message(await self.clearing.register_participant(
            current_caller(), request.request_id, request.participant_id, request.name, list(request.currencies), _timeout(context)
        ))

    async def GetParticipant(self, request, context) -> clearing_pb2.Participant:
        return participant_message(await self.clearing.get_participant(current_caller(), request.participant_id, _timeout(context)))

    async def SetNetDebitCap(self, request, context) -> clearing_pb2.Position:
        return position_message(await self.clearing.set_net_debit_cap(
            current_caller(), request.participant_id, request.currency, request.cap_minor, request.threshold_percent, _timeout(context)
        ))

    async def GetPosition(self, request, context) -> clearing_pb2.Position:
        return position_message(await self.clearing.get_position(current_caller(), request.participant_id, request.currency, _timeout(context)))

    async def GetSettlementWindow(self, request, context) -> clearing_pb2.SettlementWindow:
        view = await self.clearing.get_settlement_window(current_caller(), request.window_id, _timeout(context))
        return window_message(view.window, view)

    async def ListSettlementWindows(self, request, context) -> clearing_pb2.ListSettlementWindowsResponse:
        windows, next_page_token = await self.clearing.list_settlement_windows(
            current_caller(), request.state, request.page_size, request.page_token, _timeout(context)
        )
        return clearing_pb2.ListSettlementWindowsResponse(windows=[window_message(w) for w in windows], next_page_token=next_page_token)

    async def CloseSettlementWindow(self, request, context) -> clearing_pb2.CloseSettlementWindowResponse:
        closed, opened = await self.clearing.close_settlement_window(current_caller(), request.request_id, request.reason, _timeout(context))
        return clearing_pb2.CloseSettlementWindowResponse(closed_window=window_message(closed), open_window=window_message(opened))

    async def CreateSettlement(self, request, context) -> clearing_pb2.Settlement:
        return settlement_message(await self.clearing.create_settlement(
            current_caller(), request.request_id, list(request.window_ids), request.model, _timeout(context)
        ))

    async def GetSettlement(self, request, context) -> clearing_pb2.Settlement:
        return settlement_message(await self.clearing.get_settlement(current_caller(), request.settlement_id, _timeout(context)))

    async def RecordParticipantSettled(self, request, context) -> clearing_pb2.Settlement:
        return settlement_message(await self.clearing.record_participant_settled(
            current_caller(), request.settlement_id, request.participant_id, request.currency, _timeout(context)
        ))

    async def Reconcile(self, request, context) -> clearing_pb2.ReconcileResponse:
        try:
            report = await self.clearing.reconcile(current_caller(), list(request.window_ids), _timeout(context))
        except Unimplemented as missing:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, str(missing))
        return reconcile_message(report)
