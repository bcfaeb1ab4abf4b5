"""Who is calling: a caller is a subject acting in one role (from its signed token).

Pure: the API layer authenticates the token and hands the ledger a Caller; the rules
on what each role may do live beside it (services/ledger/authorization.py).
"""

from __future__ import annotations

import dataclasses
import enum


class Role(enum.Enum):
    """A token's role claim, by its value."""

    CUSTOMER = "customer"  # acts for one owner_id: the token's subject
    OPERATOR = "operator"  # reads everything, changes account status, drives in-doubt transfers
    ADMIN = "admin"  # everything, SYSTEM accounts and limits included
    SERVICE = "service"  # a trusted back-office microservice acting for any customer (payments gateway)


@dataclasses.dataclass(frozen=True)
class Caller:
    subject: str
    role: Role

    def __str__(self) -> str:
        return f"{self.role.value}:{self.subject}"


# The ledger acting on its own (sweeps of collecting merchants, recovery): never a token.
LEDGER = Caller("corebank-ledger", Role.ADMIN)
