"""Repositories over the store: ``users`` (identity + OAuth connections) and per-platform campaigns.

Document shapes are in the blueprint (``../shared/reference/blueprint.md``) and summarised here:

``users``::

    {_id: ObjectId, email (lower-cased, unique), password_hash (bcrypt, str), created_at, updated_at,
     session_epoch: int,
     oauth: {<platform>: {status: "connected"|"needs_reauth", token: <Fernet ciphertext>, scopes: [str],
                          expires_at: datetime|None (UTC), connected_at, refreshed_at,
                          accounts: [{id, name, currency, time_zone, manager, manager_id?, status?}],
                          last_error?: str, sync: {last_success_at?, last_status?, last_error?,
                          last_run_at?, rows?: {...}}, ...platform extras (e.g. shop)}}}

Campaign and metric documents are upserted on their natural keys with ``bulk_write``; documents whose
content did not change are not written at all (a content hash ``_h`` is compared first), so a
re-sync of unchanged data modifies 0 documents and a restated day overwrites.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import secrets
import unicodedata
from decimal import Decimal
from typing import Any, Iterable

from bson import Decimal128, ObjectId
from bson.errors import InvalidId
from pymongo import InsertOne, ReturnDocument, UpdateOne
from pymongo.database import Database
from pymongo.errors import BulkWriteError, DuplicateKeyError

from resources.store import CAMPAIGN_KEY, METRIC_KEY, campaigns_collection, metrics_collection
from resources.sync_state import SyncStateRepository

CONNECTED = "connected"
NEEDS_REAUTH = "needs_reauth"
#: concurrent logins kept per user (the oldest session ends when a newer one goes past this)
MAX_SESSIONS = 20


class DuplicateEmail(ValueError):
    """A user with this email already exists."""


def utcnow() -> dt.datetime:
    """Current time, UTC, truncated to milliseconds (what BSON dates keep)."""
    now = dt.datetime.now(dt.timezone.utc)
    return now.replace(microsecond=(now.microsecond // 1000) * 1000)


def normalize_email(email: str) -> str:
    """Trim, NFKC-normalise and lower-case an email address (the stored, unique form).

    Anything that is not a string (e.g. an operator object such as ``{"$ne": None}`` smuggled in a
    JSON body) normalises to ``""``, which matches no user.
    """
    if not isinstance(email, str):
        return ""
    return unicodedata.normalize("NFKC", email).strip().lower()


def parse_user_id(value: Any) -> ObjectId | None:
    """An ObjectId from an ObjectId or a 24-char hex string; None when it is not one."""
    if isinstance(value, ObjectId):
        return value
    if not isinstance(value, str):
        return None
    try:
        return ObjectId(value)
    except (InvalidId, TypeError):
        return None


def session_id_hash(session_id: str) -> str:
    """What is stored for a session id (SHA-256 hex): a leaked ``users`` document reveals no session."""
    return hashlib.sha256(session_id.encode("utf-8")).hexdigest()


def session_is_valid(doc: dict[str, Any], session_id: Any) -> bool:
    """True when ``session_id`` is one of the user's live sessions."""
    return isinstance(session_id, str) and session_id_hash(session_id) in (doc.get("sessions") or [])


class UserRepository:
    """The ``users`` collection: identity and OAuth connections. Never campaign data."""

    def __init__(self, db: Database):
        self.col = db.users

    # ---- identity ------------------------------------------------------------------------------
    def create(self, email: str, password_hash: str) -> dict[str, Any]:
        """Insert a user; returns the document.

        Raises:
            DuplicateEmail: the (normalised) email is taken.
        """
        now = utcnow()
        doc = {"email": normalize_email(email), "password_hash": password_hash, "created_at": now,
               "updated_at": now, "session_epoch": 0, "oauth": {}}
        try:
            result = self.col.insert_one(doc)
        except DuplicateKeyError:
            raise DuplicateEmail(normalize_email(email)) from None
        doc["_id"] = result.inserted_id
        return doc

    def find_by_email(self, email: str) -> dict[str, Any] | None:
        """The user with this (normalised) email, or None. Never matches on a non-string."""
        normalized = normalize_email(email)
        return self.col.find_one({"email": normalized}) if normalized else None

    def get(self, user_id: Any) -> dict[str, Any] | None:
        """The user by ObjectId or hex string; None when absent or not an id."""
        oid = parse_user_id(user_id)
        return self.col.find_one({"_id": oid}) if oid else None

    def set_password(self, user_id: ObjectId, password_hash: str) -> None:
        """Replace the password hash (callers end the other sessions with ``bump_session_epoch``)."""
        self.col.update_one({"_id": user_id}, {"$set": {"password_hash": password_hash, "updated_at": utcnow()}})

    def bump_session_epoch(self, user_id: ObjectId) -> int:
        """Invalidate every existing session of the user ("log out everywhere"); returns the new epoch."""
        doc = self.col.find_one_and_update(
            {"_id": user_id}, {"$inc": {"session_epoch": 1}, "$set": {"updated_at": utcnow(), "sessions": []}},
            return_document=ReturnDocument.AFTER,
        )
        return int(doc.get("session_epoch", 0)) if doc else 0

    # ---- server-side session ids ---------------------------------------------------------------
    def start_session(self, user_id: ObjectId) -> str:
        """Issue a new random session id for a login and remember (a hash of) it on the user.

        The portal's cookie carries the id; a session is valid only while its hash is listed here, so
        logging out ends that one session for good (a copied cookie stops working too). The newest
        ``MAX_SESSIONS`` are kept; older ones end.
        """
        session_id = secrets.token_urlsafe(32)
        self.col.update_one({"_id": user_id}, {"$push": {"sessions": {
            "$each": [session_id_hash(session_id)], "$slice": -MAX_SESSIONS}}})
        return session_id

    def end_session(self, user_id: ObjectId, session_id: str | None) -> None:
        """Forget one session id (log out in this browser)."""
        if session_id:
            self.col.update_one({"_id": user_id}, {"$pull": {"sessions": session_id_hash(session_id)}})

    def delete(self, user_id: ObjectId) -> bool:
        """Delete the ``users`` document only (see ``delete_user_everywhere`` for the whole account)."""
        return self.col.delete_one({"_id": user_id}).deleted_count == 1

    # ---- connections ---------------------------------------------------------------------------
    def save_connection(self, user_id: ObjectId, platform_id: str, token_ciphertext: str, *,
                        scopes: list[str], expires_at: dt.datetime | None, accounts: list[dict],
                        extra: dict[str, Any] | None = None) -> dt.datetime:
        """Store a fresh connection (replacing any previous one, including its sync record).

        Returns ``connected_at`` (used in the sensor's run key, so a reconnect syncs again).
        """
        now = utcnow()
        connection = {"status": CONNECTED, "token": token_ciphertext, "scopes": list(scopes),
                      "expires_at": expires_at, "connected_at": now, "refreshed_at": now,
                      "accounts": accounts, "sync": {}}
        connection.update(extra or {})
        self.col.update_one({"_id": user_id}, {"$set": {f"oauth.{platform_id}": connection, "updated_at": now}})
        return now

    def update_token(self, user_id: ObjectId, platform_id: str, token_ciphertext: str,
                     expires_at: dt.datetime | None, accounts: list[dict] | None = None) -> bool:
        """Save a refreshed token (status back to connected). Returns False if the connection is gone
        (disconnected meanwhile), in which case nothing is written."""
        fields = {f"oauth.{platform_id}.token": token_ciphertext, f"oauth.{platform_id}.expires_at": expires_at,
                  f"oauth.{platform_id}.refreshed_at": utcnow(), f"oauth.{platform_id}.status": CONNECTED}
        if accounts is not None:
            fields[f"oauth.{platform_id}.accounts"] = accounts
        result = self.col.update_one(
            {"_id": user_id, f"oauth.{platform_id}.token": {"$exists": True}},
            {"$set": fields, "$unset": {f"oauth.{platform_id}.last_error": ""}},
        )
        return result.matched_count == 1

    def mark_needs_reauth(self, user_id: ObjectId, platform_id: str, error: str) -> None:
        """Flag a connection whose grant no longer works; the portal asks the user to reconnect."""
        self.col.update_one(
            {"_id": user_id, f"oauth.{platform_id}": {"$exists": True}},
            {"$set": {f"oauth.{platform_id}.status": NEEDS_REAUTH, f"oauth.{platform_id}.last_error": error,
                      "updated_at": utcnow()}},
        )

    def record_sync(self, user_id: ObjectId, platform_id: str, *, status: str, error: str | None = None,
                    rows: dict[str, int] | None = None, success: bool = False) -> None:
        """Record the outcome of a sync run on the connection (shown in the portal)."""
        now = utcnow()
        fields: dict[str, Any] = {f"oauth.{platform_id}.sync.last_status": status,
                                  f"oauth.{platform_id}.sync.last_run_at": now}
        if success:
            fields[f"oauth.{platform_id}.sync.last_success_at"] = now
        if rows is not None:
            fields[f"oauth.{platform_id}.sync.rows"] = rows
        update: dict[str, Any] = {"$set": fields}
        if error:
            fields[f"oauth.{platform_id}.sync.last_error"] = error
        else:
            update["$unset"] = {f"oauth.{platform_id}.sync.last_error": ""}
        self.col.update_one({"_id": user_id, f"oauth.{platform_id}": {"$exists": True}}, update)

    def clear_connection(self, user_id: ObjectId, platform_id: str) -> bool:
        """Remove the connection and its token. Returns True if there was one."""
        result = self.col.update_one(
            {"_id": user_id, f"oauth.{platform_id}": {"$exists": True}},
            {"$unset": {f"oauth.{platform_id}": ""}, "$set": {"updated_at": utcnow()}},
        )
        return result.modified_count == 1

    def connections(self, platform_id: str, projection: dict | None = None) -> Iterable[dict[str, Any]]:
        """Users with a connection (any status) to the platform."""
        return self.col.find({f"oauth.{platform_id}.token": {"$exists": True}},
                             projection or {"_id": 1, f"oauth.{platform_id}": 1})

    def connection(self, user_id: Any, platform_id: str) -> dict[str, Any] | None:
        """The ``oauth.<platform>`` sub-document of a user, or None."""
        oid = parse_user_id(user_id)
        if oid is None:
            return None
        doc = self.col.find_one({"_id": oid}, {f"oauth.{platform_id}": 1})
        return ((doc or {}).get("oauth") or {}).get(platform_id)


@dataclasses.dataclass
class UpsertResult:
    """Outcome of a bulk upsert: documents inserted, updated (content changed), unchanged (skipped)."""

    inserted: int = 0
    updated: int = 0
    unchanged: int = 0

    def __iadd__(self, other: "UpsertResult") -> "UpsertResult":
        self.inserted += other.inserted
        self.updated += other.updated
        self.unchanged += other.unchanged
        return self

    @property
    def written(self) -> int:
        return self.inserted + self.updated


def to_bson(value: Any) -> Any:
    """Decimals become Decimal128 (exact money); dates become ISO strings; containers recurse."""
    if isinstance(value, Decimal):
        return Decimal128(value)
    if isinstance(value, dict):
        return {k: to_bson(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_bson(v) for v in value]
    if isinstance(value, dt.date) and not isinstance(value, dt.datetime):
        return value.isoformat()
    return value


def content_hash(doc: dict[str, Any]) -> str:
    """A stable hash of a document's content (key order and Decimal formatting normalised)."""

    def default(value):
        if isinstance(value, Decimal):
            return format(value.normalize(), "f")
        if isinstance(value, Decimal128):
            return format(value.to_decimal().normalize(), "f")
        if isinstance(value, (dt.date, dt.datetime)):
            return value.isoformat()
        if isinstance(value, ObjectId):
            return str(value)
        raise TypeError(type(value).__name__)

    return hashlib.sha1(json.dumps(doc, sort_keys=True, default=default).encode()).hexdigest()


class KeyedCollectionRepository:
    """Bulk upsert of documents on a natural key, skipping unchanged ones."""

    def __init__(self, collection, key: tuple[str, ...]):
        self.col = collection
        self.key = key

    def upsert_many(self, docs: list[dict[str, Any]], synced_at: dt.datetime | None = None,
                    known: dict[tuple, str | None] | None = None) -> UpsertResult:
        """Upsert a batch (one ``bulk_write``, unordered). Each doc must hold every key field.

        Content is compared by hash first; unchanged documents are not sent. New documents are sent
        as inserts (an upsert costs the store a lookup by key first: about twice the time), changed
        ones as ``$set`` updates; a new document that another writer stored meanwhile (duplicate key)
        is retried as an upsert, so concurrent syncs stay correct. Changed and new documents get
        ``last_synced = synced_at`` (UTC). Returns counts.

        Args:
            known: stored content hashes by natural key (see ``hashes``) covering every stored
                document these keys can match; given, no lookup query is made for this batch.
        """
        if not docs:
            return UpsertResult()
        synced_at = synced_at or utcnow()
        existing = known if known is not None else self._existing_hashes(docs)
        ops, upserts, result = [], {}, UpsertResult()
        seen: set[tuple] = set()
        for doc in docs:
            key = tuple(to_bson(doc[k]) for k in self.key)
            if key in seen:
                continue
            seen.add(key)
            body = {k: v for k, v in doc.items() if k not in self.key}
            digest = content_hash(body)
            old = existing.get(key)
            if old == digest:
                result.unchanged += 1
                continue
            body = to_bson(body)
            body["_h"] = digest
            body["last_synced"] = synced_at
            match = dict(zip(self.key, key))
            if key in existing:
                result.updated += 1
                ops.append(UpdateOne(match, {"$set": body}, upsert=True))
            else:
                result.inserted += 1
                upserts[len(ops)] = UpdateOne(match, {"$set": body}, upsert=True)
                ops.append(InsertOne({**match, **body}))
        if ops:
            try:
                self.col.bulk_write(ops, ordered=False)
            except BulkWriteError as exc:
                errors = exc.details.get("writeErrors") or []
                if not errors or any(e.get("code") != 11000 or e.get("index") not in upserts for e in errors):
                    raise
                # stored by another writer since we looked: update those instead
                self.col.bulk_write([upserts[e["index"]] for e in errors], ordered=False)
                result.inserted -= len(errors)
                result.updated += len(errors)
        return result

    def hashes(self, query: dict[str, Any]) -> dict[tuple, str | None]:
        """Natural key -> content hash of the stored documents matching ``query`` (one query)."""
        projection = {field: 1 for field in self.key}
        projection.update({"_h": 1, "_id": 0})
        return {tuple(d.get(f) for f in self.key): d.get("_h") for d in self.col.find(query, projection)}

    def delete_keys(self, keys: Iterable[tuple]) -> int:
        """Delete the documents with these natural keys; returns how many were deleted."""
        keys = list(keys)
        deleted = 0
        for chunk in range(0, len(keys), 500):
            match = [dict(zip(self.key, key)) for key in keys[chunk:chunk + 500]]
            deleted += self.col.delete_many({"$or": match}).deleted_count
        return deleted

    def _existing_hashes(self, docs: list[dict[str, Any]]) -> dict[tuple, str]:
        query = {}
        for field in self.key:
            values = list({to_bson(d[field]) for d in docs})
            query[field] = values[0] if len(values) == 1 else {"$in": values}
        return self.hashes(query)


class CampaignRepository:
    """A platform's ``<id>_campaigns`` and ``<id>_campaign_metrics`` collections."""

    def __init__(self, db: Database, platform_id: str):
        self.platform_id = platform_id
        self.states = SyncStateRepository(db)
        self.campaigns = KeyedCollectionRepository(db[campaigns_collection(platform_id)], CAMPAIGN_KEY)
        self.metrics = KeyedCollectionRepository(db[metrics_collection(platform_id)], METRIC_KEY)

    def upsert_campaigns(self, user_id: ObjectId, docs: Iterable[dict[str, Any]],
                         synced_at: dt.datetime | None = None,
                         known: dict[tuple, str | None] | None = None) -> UpsertResult:
        """Upsert campaign documents (``account_id``, ``campaign_id`` set by the connector). ``known``:
        the stored hashes of the account's campaigns (``stored_campaigns``), to skip the lookup."""
        return self.campaigns.upsert_many([{**d, "user_id": user_id} for d in docs], synced_at, known)

    def stored_campaigns(self, user_id: ObjectId, account_id: str) -> tuple[dict[str, dict], dict[tuple, str | None]]:
        """The account's stored campaigns in one query: ``(totals, hashes)`` where ``totals`` maps
        campaign id -> ``{impressions, clicks, spend (Decimal currency units or None), totals_from,
        totals_to}`` as last written, and ``hashes`` maps natural key -> content hash (for ``known``)."""
        fields = ("impressions", "clicks", "spend", "totals_from", "totals_to")
        projection = {field: 1 for field in (*CAMPAIGN_KEY, *fields, "_h")}
        projection["_id"] = 0
        totals, hashes = {}, {}
        for doc in self.campaigns.col.find({"user_id": user_id, "account_id": account_id}, projection):
            hashes[tuple(doc.get(f) for f in CAMPAIGN_KEY)] = doc.get("_h")
            spend = doc.get("spend")
            totals[doc["campaign_id"]] = {
                "impressions": doc.get("impressions", 0), "clicks": doc.get("clicks", 0),
                "spend": spend.to_decimal() if isinstance(spend, Decimal128) else spend,
                "totals_from": doc.get("totals_from"), "totals_to": doc.get("totals_to")}
        return totals, hashes

    def upsert_metrics(self, user_id: ObjectId, docs: Iterable[dict[str, Any]],
                       synced_at: dt.datetime | None = None,
                       known: dict[tuple, str | None] | None = None) -> UpsertResult:
        """Upsert daily metric documents (``date`` = account-local ``YYYY-MM-DD``). ``known``: the
        stored hashes of the window these rows belong to (``metric_hashes``), to skip the lookup."""
        return self.metrics.upsert_many([{**d, "user_id": user_id} for d in docs], synced_at, known)

    def metric_hashes(self, user_id: ObjectId, account_id: str, start: str, end: str) -> dict[tuple, str | None]:
        """Natural key ``(user_id, account_id, campaign_id, date)`` -> content hash of the account's
        stored metric rows dated ``start``..``end`` (``YYYY-MM-DD``, inclusive)."""
        return self.metrics.hashes({"user_id": user_id, "account_id": account_id,
                                    "date": {"$gte": start, "$lte": end}})

    def metric_hashes_on(self, user_id: ObjectId, account_id: str, dates: list[str]) -> dict[tuple, str | None]:
        """Like ``metric_hashes`` for the listed dates (``YYYY-MM-DD``) only."""
        return self.metrics.hashes({"user_id": user_id, "account_id": account_id, "date": {"$in": list(dates)}})

    def delete_metrics(self, keys: Iterable[tuple]) -> int:
        """Delete metric rows by natural key (days the platform no longer reports after a restatement)."""
        return self.metrics.delete_keys(keys)

    def campaigns_for_user(self, user_id: ObjectId, **filters) -> list[dict[str, Any]]:
        return list(self.campaigns.col.find({"user_id": user_id, **filters}, {"_h": 0}))

    def metrics_for_user(self, user_id: ObjectId, **filters) -> list[dict[str, Any]]:
        return list(self.metrics.col.find({"user_id": user_id, **filters}, {"_h": 0}))

    def delete_user(self, user_id: ObjectId, account_ids: list[str] | None = None) -> int:
        """Delete a user's documents (optionally only some accounts) and their sync state (the next
        sync compares row by row); returns how many campaign and metric documents were deleted."""
        self.states.delete(user_id, self.platform_id, account_ids)
        query: dict[str, Any] = {"user_id": user_id}
        if account_ids is not None:
            query["account_id"] = {"$in": account_ids}
        return (self.campaigns.col.delete_many(query).deleted_count
                + self.metrics.col.delete_many(query).deleted_count)


def delete_user_everywhere(db: Database, user_id: ObjectId, platform_ids: Iterable[str]) -> dict[str, int]:
    """Delete an account: the ``users`` document (identity, every token) first, then every document
    carrying its ``user_id`` — each platform's campaigns and metrics, ``sync_requests``, and any other
    collection of the database that holds such documents.

    The user document goes first so the account stops working at once and the Dagster connections
    sensors drop the user's partitions on their next tick (the portal never calls Dagster).

    Returns:
        deleted document counts by collection name (``users`` included).
    """
    counts = {"users": db.users.delete_one({"_id": user_id}).deleted_count}
    names = {"sync_requests"}
    for platform_id in platform_ids:
        names.update((campaigns_collection(platform_id), metrics_collection(platform_id)))
    names.update(name for name in db.list_collection_names() if not name.startswith("system."))
    names.discard("users")
    for name in sorted(names):
        counts[name] = db[name].delete_many({"user_id": user_id}).deleted_count
    return counts
