"""Currencies and amounts. Money is always an int of minor units."""

from services.ledger import errors

INT64_MAX = 2**63 - 1

# ISO 4217 minor-unit exponents of the currencies this service knows.
CURRENCY_EXPONENTS: dict[str, int] = {
    "AED": 2, "AUD": 2, "BHD": 3, "BRL": 2, "CAD": 2, "CHF": 2, "CLP": 0, "CNY": 2,
    "CZK": 2, "DKK": 2, "EUR": 2, "GBP": 2, "HKD": 2, "HUF": 2, "IDR": 2, "ILS": 2,
    "INR": 2, "ISK": 0, "JOD": 3, "JPY": 0, "KRW": 0, "KWD": 3, "MXN": 2, "MYR": 2,
    "NOK": 2, "NZD": 2, "OMR": 3, "PHP": 2, "PLN": 2, "SAR": 2, "SEK": 2, "SGD": 2,
    "THB": 2, "TND": 3, "TRY": 2, "TWD": 2, "USD": 2, "VND": 0, "ZAR": 2,
}


def validate_currency(currency: str) -> str:
    if not currency:
        raise errors.MissingField("currency is required", field="currency")
    if currency not in CURRENCY_EXPONENTS:
        raise errors.UnknownCurrency(f"unknown currency {currency[:8]!r}", currency=currency[:8])
    return currency


def currency_exponent(currency: str) -> int:
    return CURRENCY_EXPONENTS[currency]


def validate_amount(amount_minor: int) -> int:
    if amount_minor <= 0 or amount_minor > INT64_MAX:
        raise errors.InvalidAmount(f"amount_minor must be between 1 and {INT64_MAX}, got {amount_minor}")
    return amount_minor
