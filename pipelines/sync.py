"""The work behind the token and campaigns assets, as plain functions over the store and a connector.

Dagster assets (``pipelines.assets``) call these; benchmarks call them too. Nothing here imports
Dagster: outcomes are returned as dataclasses and the asset turns them into metadata, checks and
``Failure``s.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from decimal import Decimal
from typing import Any, Callable, Iterable
from zoneinfo import ZoneInfo

from bson import ObjectId
from pymongo.database import Database

from resources.crypto import TokenCipher
from resources.platforms.base import (Account, Connector, PlatformError, RateLimited, ReauthRequired,
                                      batched)
from resources.repositories import (NEEDS_REAUTH, CampaignRepository, UpsertResult, UserRepository,
                                    utcnow)
from resources.sync_state import AccountState, DayDigests
from resources.wording import count_of

log = logging.getLogger(__name__)

#: documents per ``bulk_write``
BATCH_SIZE = 2000


class NotConnected(PlatformError):
    """The (user, platform) pair has no stored connection (disconnected since the run was asked)."""


class ConnectionNeedsReauth(PlatformError):
    """The connection is marked ``needs_reauth``; nothing is called until the user reconnects."""


@dataclasses.dataclass
class TokenOutcome:
    """Result of ``refresh_connection``.

    Attributes:
        refreshed: a new access token was obtained and saved.
        expires_at: when the (possibly new) access token expires, UTC; None if it does not.
        accounts: number of accounts the token reaches (validated by listing them).
    """

    refreshed: bool
    expires_at: dt.datetime | None
    accounts: int


@dataclasses.dataclass
class AccountOutcome:
    """What one account's sync did. Dates are the account's local dates."""

    account_id: str
    currency: str
    start: dt.date
    end: dt.date
    campaigns: UpsertResult
    metrics: UpsertResult
    metric_rows: int
    metric_rows_deleted: int = 0
    #: how the rows were compared with the store (``MetricsLoad.describe``), e.g. "every day unchanged"
    compared: str = ""


@dataclasses.dataclass
class SyncOutcome:
    """Result of ``sync_connection``: per-account results, totals and API call count."""

    accounts: list[AccountOutcome]
    api_calls: int
    first_sync: bool
    seconds: float

    @property
    def campaigns(self) -> UpsertResult:
        total = UpsertResult()
        for account in self.accounts:
            total += account.campaigns
        return total

    @property
    def metrics(self) -> UpsertResult:
        total = UpsertResult()
        for account in self.accounts:
            total += account.metrics
        return total

    def rows(self) -> dict[str, int]:
        """Counts recorded on the connection and shown in the portal."""
        c, m = self.campaigns, self.metrics
        return {"campaigns": c.inserted + c.updated + c.unchanged, "metric_rows": m.inserted + m.updated + m.unchanged,
                "written": c.written + m.written, "deleted": self.metric_rows_deleted}

    @property
    def metric_rows_deleted(self) -> int:
        return sum(a.metric_rows_deleted for a in self.accounts)


def expires_at_datetime(token: dict[str, Any]) -> dt.datetime | None:
    """``token["expires_at"]`` (epoch seconds) as an aware UTC datetime, or None."""
    value = token.get("expires_at")
    return dt.datetime.fromtimestamp(float(value), dt.timezone.utc) if value else None


def _load_connection(users: UserRepository, user_id: ObjectId, connector: Connector) -> dict[str, Any]:
    connection = users.connection(user_id, connector.id)
    if not connection or not connection.get("token"):
        raise NotConnected(f"user {user_id} has no {connector.display_name} connection")
    return connection


def refresh_connection(db: Database, cipher: TokenCipher, connector: Connector, user_id: ObjectId, *,
                       margin_seconds: int = 600, now: dt.datetime | None = None,
                       force: bool = False) -> TokenOutcome:
    """Refresh the access token if it expires within ``margin_seconds`` (or ``force``), save it, and
    validate the grant by listing the accounts (saved too).

    Raises:
        NotConnected: no connection stored.
        ReauthRequired: the grant is revoked/invalid; the connection is marked ``needs_reauth`` first.
        TransientPlatformError, RateLimited: temporary; nothing is changed.
    """
    users = UserRepository(db)
    connection = _load_connection(users, user_id, connector)
    token = cipher.decrypt(connection["token"])
    now = now or dt.datetime.now(dt.timezone.utc)
    refreshed = False
    try:
        if force or connector.needs_refresh(token, now, margin_seconds):
            token = connector.refresh(token)
            refreshed = True
            # Saved before anything else can fail: a rotated refresh token must never be lost.
            if not users.update_token(user_id, connector.id, cipher.encrypt(token), expires_at_datetime(token)):
                raise NotConnected(f"user {user_id} disconnected {connector.display_name} during refresh")
        accounts = connector.list_accounts(token)
    except ReauthRequired as exc:
        users.mark_needs_reauth(user_id, connector.id, str(exc))
        raise
    users.update_token(user_id, connector.id, cipher.encrypt(token), expires_at_datetime(token),
                       accounts=[a.to_doc() for a in accounts])
    return TokenOutcome(refreshed=refreshed, expires_at=expires_at_datetime(token), accounts=len(accounts))


def sync_window(account: Account, days: int, now: dt.datetime) -> tuple[dt.date, dt.date]:
    """``(start, end)`` covering the last ``days`` days up to today in the account's time zone."""
    try:
        zone = ZoneInfo(account.time_zone)
    except Exception:  # unknown zone: fall back to UTC rather than fail the sync
        zone = dt.timezone.utc
    end = now.astimezone(zone).date()
    return end - dt.timedelta(days=days - 1), end


def sync_connection(db: Database, cipher: TokenCipher, connector: Connector, user_id: ObjectId, *,
                    lookback_days: int = 14, history_days: int = 90, now: dt.datetime | None = None,
                    progress: Callable[[str], None] | None = None, batch_size: int = BATCH_SIZE) -> SyncOutcome:
    """Extract campaigns and daily metrics of every syncable account and load both collections.

    The first sync of a connection (no ``sync.last_success_at`` since it was connected) reads
    ``history_days``; later syncs re-read the last ``lookback_days`` (restated days overwrite).
    Days whose rows are unchanged since the last sync are recognised by their day digests
    (``resources.sync_state``) and neither read from nor written to the store; other days are compared
    row by row against the stored content hashes and only changed rows are written (see
    ``_load_metrics``; a first sync streams in batches of ``batch_size`` documents). Campaign documents
    carry totals over every stored day (``impressions``, ``clicks``, ``spend`` in currency units,
    ``totals_from``/``totals_to``), summed again only when metric rows changed.

    Raises:
        NotConnected, ConnectionNeedsReauth: nothing to do / must reconnect first.
        ReauthRequired: the platform rejected the token; the connection is marked ``needs_reauth``.
        TransientPlatformError, RateLimited: temporary; rows already loaded stay (upserts are idempotent).
            A ``RateLimited`` naming the account being synced (``account_id``) skips only that account:
            the others are synced, then one ``RateLimited`` listing the deferred accounts is raised.
    """
    started = time.monotonic()
    users = UserRepository(db)
    connection = _load_connection(users, user_id, connector)
    if connection.get("status") == NEEDS_REAUTH:
        raise ConnectionNeedsReauth(
            f"{connector.display_name} connection needs to be reconnected: {connection.get('last_error', '')}".strip())
    token = cipher.decrypt(connection["token"])
    first_sync = not (connection.get("sync") or {}).get("last_success_at")
    days = history_days if first_sync else lookback_days
    now = now or dt.datetime.now(dt.timezone.utc)
    repo = CampaignRepository(db, connector.id)
    say = progress or (lambda message: log.info(message))
    outcomes: list[AccountOutcome] = []
    deferred: list[RateLimited] = []
    session = connector.open_session(token)
    # one worker thread for what can overlap the platform's answers: store reads and row digests
    background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sync-background")
    try:
        accounts = [Account.from_doc(a) for a in connection.get("accounts", [])]
        syncable = [a for a in accounts if session.syncable(a)]
        states = repo.states.get_all(user_id, connector.id)
        for index, account in enumerate(syncable, 1):
            try:
                start, end = sync_window(account, days, now)
                synced_at = utcnow()
                state = states.get(account.id)
                # with day digests to compare, the rows are likely unchanged and the stored campaigns'
                # totals will do: read them while the platform's rows stream in (the store answers from
                # another process); without, the campaign upsert looks up only the fetched campaigns
                stored_campaigns = background.submit(repo.stored_campaigns, user_id, account.id) if state else None
                load = _load_metrics(repo, user_id, account, session.fetch_daily_metrics(account, start, end),
                                     start, end, synced_at, batch_size, state, background)
                stored_totals, campaign_hashes = stored_campaigns.result() if stored_campaigns else ({}, None)
                # unchanged rows leave the stored totals right; otherwise they are summed again
                totals = _campaign_totals(repo, user_id, account.id) if load.changed else stored_totals
                campaign_docs = []
                for doc in session.fetch_campaigns(account):
                    doc.update(totals.get(doc["campaign_id"], _ZERO_TOTALS))
                    campaign_docs.append(doc)
                campaigns_result = UpsertResult()
                for batch in batched(campaign_docs, batch_size):
                    campaigns_result += repo.upsert_campaigns(user_id, batch, synced_at, known=campaign_hashes)
                if load.token:
                    repo.states.save(user_id, connector.id, account.id, load.token, start.isoformat(),
                                     end.isoformat(), load.digests)
                outcomes.append(AccountOutcome(account.id, account.currency, start, end, campaigns_result,
                                               load.result, load.rows, load.deleted, load.describe()))
                say(f"account {index}/{len(syncable)} {account.id} ({account.currency}): "
                    f"{count_of(len(campaign_docs), 'campaign')}, {count_of(load.rows, 'metric row')} {start}..{end} "
                    f"({load.describe()}), written {campaigns_result.written + load.result.written}, "
                    f"deleted {load.deleted}")
                if campaigns_result.written or load.result.written or load.deleted:
                    _stop_if_gone(users, repo, user_id, connector)
            except RateLimited as exc:
                if not exc.account_id or exc.account_id != account.id:
                    raise  # the whole app/user is limited: stop the partition now
                # only this account is limited (e.g. Meta's per-ad-account limits): the others go on
                deferred.append(exc)
                say(f"account {index}/{len(syncable)} {account.id}: {exc}; deferred to the next sync")
        if deferred:
            ids = ", ".join(e.account_id for e in deferred)
            waits = [e.retry_after for e in deferred if e.retry_after]
            raise RateLimited(f"{len(deferred)} of {len(syncable)} accounts rate limited ({ids}); the other "
                              f"accounts were synced", retry_after=max(waits) if waits else None)
    except ReauthRequired as exc:
        users.mark_needs_reauth(user_id, connector.id, str(exc))
        raise
    finally:
        background.shutdown(wait=True)
        session.close()
    return SyncOutcome(outcomes, session.stats.api_calls, first_sync, time.monotonic() - started)


#: rows per digest task handed to the background worker
DIGEST_CHUNK_ROWS = 500
#: metric rows of one account's window held in memory while their day digests are compared with the
#: stored ones; a longer window streams against the stored rows instead (memory stays bounded)
DIGEST_BUFFER_ROWS = 25_000


@dataclasses.dataclass
class MetricsLoad:
    """What loading one account's metric rows did (see ``_load_metrics``).

    Attributes:
        result: documents inserted/updated/unchanged; ``rows``: rows the platform returned;
        deleted: stored rows of the window the platform no longer returned;
        changed: whether any stored row may have changed (the campaign totals must be summed again);
        token: the ``sync_state`` run token to ``save`` the digests with once the totals are written
            (None when nothing was invalidated); digests: the fetched rows' day digests;
        changed_days: days compared row by row (None: the whole window, no valid state).
    """

    result: UpsertResult
    rows: int
    deleted: int
    changed: bool
    token: str | None
    digests: DayDigests
    changed_days: list[str] | None = None

    def describe(self) -> str:
        if self.changed_days is None:
            return "compared row by row"
        if not self.changed_days:
            return "every day unchanged"
        return f"{len(self.changed_days)} changed day{'s' if len(self.changed_days) != 1 else ''}"


def _load_metrics(repo: CampaignRepository, user_id: ObjectId, account: Account, rows: Iterable[dict[str, Any]],
                  start: dt.date, end: dt.date, synced_at: dt.datetime, batch_size: int,
                  state: AccountState | None, background: ThreadPoolExecutor) -> MetricsLoad:
    """Load one account's metric rows of ``start``..``end`` (account-local dates).

    With a valid ``sync_state`` for the account (``state``), the window's rows (up to
    ``DIGEST_BUFFER_ROWS``) are held while ``background`` (a single-worker executor) computes their day
    digests; days whose digest equals the stored one are left alone
    (no store read, no write), and only the other days are compared row by row and written. Without one
    (first sync, a crashed or concurrent sync, or a longer window), every row is streamed in batches of
    ``batch_size`` against the stored hashes of the window, read once. Either way the stored rows of a
    compared day that the platform no longer returns are deleted, and the state is invalidated before
    the first write (``MetricsLoad.token`` saves it again after the campaign totals).
    """
    states, platform_id = repo.states, repo.platform_id
    dates = [(start + dt.timedelta(days=offset)).isoformat() for offset in range((end - start).days + 1)]
    digests = DayDigests()
    rows = iter(rows)
    held: list[dict[str, Any]] = []
    if state is not None:
        # rows are digested by ``background`` (one worker: chunks in arrival order) while this thread
        # waits for the platform's next page or batch
        chunks: list[Future] = []
        chunk: list[dict[str, Any]] = []
        for row in rows:
            chunk.append(row)
            if len(chunk) >= DIGEST_CHUNK_ROWS:
                chunks.append(background.submit(digests.add_all, chunk))
                held.extend(chunk)
                chunk = []
                if len(held) >= DIGEST_BUFFER_ROWS:
                    break
        else:
            chunks.append(background.submit(digests.add_all, chunk))
            held.extend(chunk)
        for done in chunks:
            done.result()
        if len(held) < DIGEST_BUFFER_ROWS:
            changed = state.changed_days(digests, dates)
            if not changed:
                return MetricsLoad(UpsertResult(unchanged=len(held)), len(held), 0, False, None, digests, [])
            token = states.invalidate(user_id, platform_id, account.id)
            wanted = set(changed)
            result, deleted = _write_metrics(repo, user_id, (r for r in held if r["date"] in wanted),
                                             repo.metric_hashes_on(user_id, account.id, changed), synced_at,
                                             batch_size)
            result.unchanged += sum(1 for r in held if r["date"] not in wanted)
            return MetricsLoad(result, len(held), deleted, True, token, digests, changed)

    def digested(more):
        for row in more:
            digests.add(row)
            yield row

    token = states.invalidate(user_id, platform_id, account.id)
    # What the store holds for the window, read once (no lookup per batch); it is empty on a first sync,
    # so memory never grows with the history read, only with what was stored.
    stored = repo.metric_hashes(user_id, account.id, start.isoformat(), end.isoformat())
    counter = _Counter(itertools.chain(held, digested(rows)))
    del held
    result, deleted = _write_metrics(repo, user_id, counter, stored, synced_at, batch_size)
    return MetricsLoad(result, counter.count, deleted, True, token, digests)


class _Counter:
    """Iterates ``items`` and counts them."""

    def __init__(self, items: Iterable):
        self.items, self.count = items, 0

    def __iter__(self):
        for item in self.items:
            self.count += 1
            yield item


def _write_metrics(repo: CampaignRepository, user_id: ObjectId, rows: Iterable[dict[str, Any]],
                   stored: dict[tuple, str | None], synced_at: dt.datetime, batch_size: int) -> tuple[UpsertResult, int]:
    """Upsert ``rows`` in batches against ``stored`` (natural key -> hash of the stored rows they may
    replace), then delete the stored rows no row matched: a restated day the platform no longer reports
    (e.g. activity reversed to zero) must not linger. Returns ``(result, rows deleted)``."""
    result = UpsertResult()
    for batch in batched(rows, batch_size):
        result += repo.upsert_metrics(user_id, batch, synced_at, known=stored)
        for m in batch:
            stored.pop((user_id, m["account_id"], m["campaign_id"], m["date"]), None)
    return result, repo.delete_metrics(stored) if stored else 0


def _stop_if_gone(users: UserRepository, repo: CampaignRepository, user_id: ObjectId, connector: Connector) -> None:
    """Stop a sync whose connection disappeared while it ran. If the whole account was deleted, the
    rows this run wrote after the deletion are removed too (nothing of a deleted user may remain).

    Raises:
        NotConnected: the connection (or the user) is gone.
    """
    if users.connection(user_id, connector.id):
        return
    if users.get(user_id) is None:
        repo.delete_user(user_id)
        raise NotConnected(f"user {user_id} deleted their account during the sync; its rows were removed")
    raise NotConnected(f"user {user_id} disconnected {connector.display_name} during the sync")


#: totals of a campaign without stored days (``totals_from``/``totals_to`` None say so)
_ZERO_TOTALS = {"impressions": 0, "clicks": 0, "spend": Decimal(0), "totals_from": None, "totals_to": None}


def _campaign_totals(repo: CampaignRepository, user_id: ObjectId, account_id: str) -> dict[str, dict]:
    """Totals per campaign over every stored day of an account (one aggregate)."""
    pipeline = [
        {"$match": {"user_id": user_id, "account_id": account_id}},
        {"$group": {"_id": "$campaign_id", "impressions": {"$sum": "$impressions"}, "clicks": {"$sum": "$clicks"},
                    "spend": {"$sum": "$spend"}, "first": {"$min": "$date"}, "last": {"$max": "$date"}}},
    ]
    totals = {}
    for row in repo.metrics.col.aggregate(pipeline):
        spend = row.get("spend")
        totals[row["_id"]] = {"impressions": int(row.get("impressions") or 0), "clicks": int(row.get("clicks") or 0),
                              "spend": spend.to_decimal() if hasattr(spend, "to_decimal") else spend,
                              "totals_from": row.get("first"), "totals_to": row.get("last")}
    return totals


def describe_rate_limit(exc: RateLimited) -> str:
    """A user-facing sentence for a rate limit that stops the partition until the next schedule, with
    what the connector said (which account, which limit; connector messages never contain tokens)."""
    wait = f" (the platform asks to wait {exc.retry_after:.0f}s)" if exc.retry_after else ""
    detail = f" — {str(exc)[:300]}" if str(exc) else ""
    return f"rate limited{wait}: deferred to the next scheduled sync; nothing was lost{detail}"
