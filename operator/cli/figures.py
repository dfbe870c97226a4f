"""How a replay's figures are written for a person, in its table and its picture: dollars and percentages."""

from __future__ import annotations

from decimal import Decimal


def usd(text: str) -> str:
    """Dollars to four significant digits, at least cents: $360.69, $3.325, $0.9164, $0.00001234."""
    value = Decimal(text)
    if not value:
        return "$0"
    places = min(8, max(2, 3 - value.copy_abs().adjusted()))
    return f"{'-' if value < 0 else ''}${abs(value):,.{places}f}"


def pct(text: str, scale: int = 1) -> str:
    if text == "NaN":
        return "n/a"
    return f"{(Decimal(text) * scale).quantize(Decimal('0.01'))}%"
