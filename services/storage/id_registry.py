"""The bank-wide registry of idempotency keys, one table on every shard.

An id (a transfer_id, an OpenAccount request_id) is registered on the shard its
own hash picks, with the fields of its first use, before anything is done with
it. Registration is insert-or-nothing and then a read of what is stored, so it
is idempotent, and two racing uses of one id both see the same first use: the
one whose fields differ is refused. Registrations of many concurrent requests to
one shard share a transaction (group commit, like transfers).
"""

from __future__ import annotations

import dataclasses
import json

from services.ledger.ids import IdNamespace
from services.ledger.limits import TierLimits
from services.ledger.transfers import TransferRequest
from services.storage.prepared import prepared
from services.storage.shard_store import COMMIT, ShardStore

REGISTER = prepared("register_ids", """
    INSERT INTO id_registry (namespace, id, fields)
    SELECT * FROM unnest(%s::smallint[], %s::text[], %s::jsonb[]) ON CONFLICT DO NOTHING""")
SELECT_REGISTERED = prepared("select_registered_ids", """
    SELECT namespace, id, fields FROM id_registry
    WHERE (namespace, id) IN (SELECT * FROM unnest(%s::smallint[], %s::text[]))""")


@dataclasses.dataclass(frozen=True)
class Registration:
    namespace: IdNamespace
    id: str
    fields: dict


def transfer_registration(request: TransferRequest) -> Registration:
    return Registration(IdNamespace.TRANSFER, request.transfer_id, request.registry_fields())


def register_params(registrations: list[Registration]) -> list:
    """The parameters of REGISTER then SELECT_REGISTERED."""
    namespaces = [int(entry.namespace) for entry in registrations]
    keys = [entry.id for entry in registrations]
    return [namespaces, keys, [json.dumps(entry.fields, sort_keys=True) for entry in registrations], namespaces, keys]


def first_uses(rows: list[tuple]) -> dict[tuple[int, str], dict]:
    """SELECT_REGISTERED's rows: (namespace, id) -> the fields of the id's first use."""
    return {(namespace, key): fields for namespace, key, fields in rows}


async def registered(store: ShardStore, registrations: list[Registration], timeout_seconds: float) -> dict[tuple[int, str], dict]:
    """The first uses stored for these ids, registering nothing: (namespace, id) -> fields."""
    namespaces = [int(entry.namespace) for entry in registrations]
    async with store.session(timeout_seconds) as session:
        (stored,) = await session.run(session.begin(SELECT_REGISTERED, COMMIT), [namespaces, [entry.id for entry in registrations]])
    return first_uses(stored)


async def register(
    store: ShardStore, chains: list[list[Registration]], limits: TierLimits, timeout_seconds: float
) -> list[list[dict]]:
    """Register every id that is new; for each, the fields of its first use (maybe another request's).

    Shaped like batch_posting.post_chains so that a GroupCommitter batches it.
    """
    del limits  # registration applies no rule
    entries = [entry for chain in chains for entry in chain]
    async with store.session(timeout_seconds) as session:
        # READ COMMITTED: the SELECT, a later statement, sees a racing first use that the
        # INSERT waited for and then skipped.
        (stored,) = await session.run(session.begin(REGISTER, SELECT_REGISTERED, COMMIT), register_params(entries))
    first_use = first_uses(stored)
    missing = [entry.id for entry in entries if (int(entry.namespace), entry.id) not in first_use]
    assert not missing, f"ids not registered after registering them: {missing[:5]}"
    return [[first_use[(int(entry.namespace), entry.id)] for entry in chain] for chain in chains]
