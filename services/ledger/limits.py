"""Tier limits: configuration, not code. Default table in tier_limits.json."""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import pathlib

from services.ledger import errors


@dataclasses.dataclass(frozen=True)
class TierLimit:
    balance_cap_minor: int | None  # None: no cap
    transfer_cap_minor: int


@dataclasses.dataclass(frozen=True)
class TierLimits:
    by_tier_and_currency: dict[tuple[int, str], TierLimit]

    def limit(self, tier: int, currency: str) -> TierLimit:
        """The limit in force; tiers are validated when an account is opened."""
        return self.by_tier_and_currency[(tier, currency)]

    def validate_tier(self, tier: int, currency: str) -> int:
        if (tier, currency) not in self.by_tier_and_currency:
            raise errors.InvalidTier(f"tier {tier} is not configured for {currency}", tier=tier, currency=currency)
        return tier

    @classmethod
    def from_json(cls, text: str) -> TierLimits:
        table = {}
        for tier, by_currency in json.loads(text)["tiers"].items():
            for currency, limit in by_currency.items():
                table[(int(tier), currency)] = TierLimit(limit["balance_cap_minor"], limit["transfer_cap_minor"])
        return cls(table)

    @classmethod
    def load(cls, path: pathlib.Path | None = None) -> TierLimits:
        if path is not None:
            return cls.from_json(path.read_text())
        return cls.from_json(importlib.resources.files("services.ledger").joinpath("tier_limits.json").read_text())
