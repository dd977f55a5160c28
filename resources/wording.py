"""Small helpers for messages people read (logs, portal pages)."""
from __future__ import annotations


def count_of(count: int, noun: str, plural: str | None = None) -> str:
    """``count_of(1, "account")`` → ``"1 account"``; ``count_of(3, "account")`` → ``"3 accounts"``;
    ``count_of(2, "day", "days")``; thousands are grouped (``"1,200 rows"``).

    Args:
        count: how many.
        noun: the singular form.
        plural: the plural form when it is not ``noun + "s"`` (e.g. ``"metric rows"`` is regular, but
            ``"entries"`` is not).
    """
    return f"{count:,} {noun if count == 1 else (plural or noun + 's')}"
