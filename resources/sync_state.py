"""Day digests of what the store holds per ad account, so a re-sync of unchanged days reads and writes
nothing but the platform's rows.

Collection ``sync_state``: one document per (user, platform, account)::

    {user_id: ObjectId, platform: "google", account_id: "1234567890",
     from: "YYYY-MM-DD", to: "YYYY-MM-DD",       # the account-local days the digests describe
     days: {"YYYY-MM-DD": "<rows>:<digest>"},      # days that had rows; a day of the range not listed had none
     pending: "<run token>",                       # present while a sync is changing the account's rows
     updated_at: datetime (UTC)}

Invariant, kept by ``pipelines.sync``: while ``pending`` is absent, the account's stored metric rows of
every day ``from``..``to`` are exactly the rows whose digest is listed for that day, and the campaign
documents' totals are those of the stored metric rows. A sync sets ``pending`` (``invalidate``) before it
writes any metric row and replaces the digests (``save``) only after the campaign totals are written, so a
crash or a concurrent sync leaves the state invalid (the next sync compares row by row) rather than wrong.
Writing the metric collections outside a sync (by hand, or a restore) must delete the account's state
document (``delete``) to force that full comparison.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import secrets
from typing import Any, Iterable

from bson import ObjectId
from pymongo.database import Database

COLLECTION = "sync_state"
KEY = ("user_id", "platform", "account_id")
#: the digest of a day without rows
EMPTY_DAY = "0:0"


class DayDigests:
    """Digests of metric rows per day (``row["date"]``, ``YYYY-MM-DD``): the row count and a BLAKE2b
    digest of the rows' values in the order the platform returned them (``repr`` keeps types and
    Decimal scale), after the field names of the day's first row. ~1.6 µs per row.

    Equal digests mean equal rows. Rows returned in another order give another digest, which reads as a
    change: the day is then compared row by row (slower, never wrong).
    """

    def __init__(self) -> None:
        self._days: dict[str, list] = {}

    def add(self, row: dict[str, Any]) -> None:
        """Count one row in its day."""
        day = self._days.get(row["date"])
        if day is None:
            digest = hashlib.blake2b(repr(tuple(row)).encode(), digest_size=16)
            day = self._days[row["date"]] = [0, digest]
        day[0] += 1
        day[1].update(repr(tuple(row.values())).encode())

    def add_all(self, rows: Iterable[dict[str, Any]]) -> None:
        """Count rows in their days, in order."""
        for row in rows:
            self.add(row)

    def digest(self, date: str) -> str:
        """``"<rows>:<hex digest>"`` of a day; ``EMPTY_DAY`` when it had no rows."""
        day = self._days.get(date)
        return f"{day[0]}:{day[1].hexdigest()}" if day else EMPTY_DAY

    def as_doc(self, start: str, end: str) -> dict[str, str]:
        """Digests of the days ``start``..``end`` that had rows, as stored in ``days``."""
        return {date: self.digest(date) for date in sorted(self._days) if start <= date <= end}


@dataclasses.dataclass(frozen=True)
class AccountState:
    """A valid (not ``pending``) state document: day digests for ``start``..``end`` (``YYYY-MM-DD``)."""

    start: str
    end: str
    days: dict[str, str]

    def digest(self, date: str) -> str | None:
        """The stored digest of a day; None when the day is outside the described range (unknown)."""
        if not self.start <= date <= self.end:
            return None
        return self.days.get(date, EMPTY_DAY)

    def changed_days(self, fetched: DayDigests, dates: Iterable[str]) -> list[str]:
        """The days among ``dates`` whose fetched rows differ from what the store holds (or unknown)."""
        return [date for date in dates if fetched.digest(date) != self.digest(date)]


class SyncStateRepository:
    """The ``sync_state`` collection (see the module docstring for the document and its invariant)."""

    def __init__(self, db: Database):
        self.col = db[COLLECTION]

    @staticmethod
    def _key(user_id: ObjectId, platform_id: str, account_id: str) -> dict[str, Any]:
        return {"user_id": user_id, "platform": platform_id, "account_id": account_id}

    def get(self, user_id: ObjectId, platform_id: str, account_id: str) -> AccountState | None:
        """The account's state when it is valid; None when absent or a sync is (or was, then crashed)
        changing the account's rows."""
        return _valid(self.col.find_one(self._key(user_id, platform_id, account_id)))

    def get_all(self, user_id: ObjectId, platform_id: str) -> dict[str, AccountState]:
        """The valid states of a user's accounts on a platform, by account id (one query)."""
        states = {doc["account_id"]: _valid(doc) for doc in self.col.find({"user_id": user_id, "platform": platform_id})}
        return {account_id: state for account_id, state in states.items() if state is not None}

    def invalidate(self, user_id: ObjectId, platform_id: str, account_id: str) -> str:
        """Mark the account's rows as being changed (before any write); returns this run's token,
        which ``save`` needs."""
        token = secrets.token_hex(8)
        self.col.update_one(self._key(user_id, platform_id, account_id),
                            {"$set": {"pending": token, "updated_at": _utcnow()}}, upsert=True)
        return token

    def save(self, user_id: ObjectId, platform_id: str, account_id: str, token: str, start: str, end: str,
             digests: DayDigests) -> bool:
        """Replace the digests with those of ``start``..``end`` (what this run fetched and stored) and
        clear ``pending`` — only if ``pending`` is still this run's token (no other sync started
        changing the rows meanwhile). Returns whether it was saved."""
        result = self.col.update_one(
            {**self._key(user_id, platform_id, account_id), "pending": token},
            {"$set": {"from": start, "to": end, "days": digests.as_doc(start, end), "updated_at": _utcnow()},
             "$unset": {"pending": ""}})
        return result.modified_count == 1

    def delete(self, user_id: ObjectId, platform_id: str, account_ids: list[str] | None = None) -> int:
        """Forget the state of a user's accounts on a platform (all when ``account_ids`` is None), e.g.
        when their rows are deleted; the next sync then compares row by row. Returns how many."""
        query: dict[str, Any] = {"user_id": user_id, "platform": platform_id}
        if account_ids is not None:
            query["account_id"] = {"$in": list(account_ids)}
        return self.col.delete_many(query).deleted_count


def _valid(doc: dict[str, Any] | None) -> AccountState | None:
    if not doc or doc.get("pending") or not doc.get("from"):
        return None
    return AccountState(doc["from"], doc["to"], dict(doc.get("days") or {}))


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)
