"""Money display helpers shared by the portal and the demo.

Amounts are stored as exact decimals in currency units (``Decimal128``); only display rounds. The
number of decimals shown follows ISO 4217's minor units: 0 for e.g. JPY/KRW, 3 for e.g. KWD, else 2.
"""
from __future__ import annotations

from decimal import Decimal
from typing import Any

#: ISO 4217 currencies without minor units
ZERO_DECIMAL = frozenset({"BIF", "CLP", "DJF", "GNF", "ISK", "JPY", "KMF", "KRW", "PYG", "RWF", "UGX", "UYI",
                          "VND", "VUV", "XAF", "XOF", "XPF"})
#: ISO 4217 currencies with three decimals
THREE_DECIMAL = frozenset({"BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND"})


def minor_unit_digits(currency: str | None) -> int:
    """Decimals a currency is shown with (ISO 4217 minor units; 2 when unknown)."""
    code = (currency or "").upper()
    return 0 if code in ZERO_DECIMAL else 3 if code in THREE_DECIMAL else 2


def format_amount(value: Any, currency: str | None = None) -> str:
    """An amount in currency units for display: thousands separators and the currency's decimals
    (``1234.5, "USD"`` → ``1,234.50``; ``46200, "JPY"`` → ``46,200``). Extra precision the value really
    has (e.g. fractional cents) is kept rather than rounded away. ``None`` → ``—``."""
    if value is None:
        return "—"
    if hasattr(value, "to_decimal"):
        value = value.to_decimal()
    amount = Decimal(str(value)) if not isinstance(value, Decimal) else value
    digits = minor_unit_digits(currency)
    if amount == amount.to_integral_value() or -amount.as_tuple().exponent <= digits:
        return f"{amount:,.{digits}f}"
    return f"{amount:,}"
