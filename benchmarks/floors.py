"""The floor of a sync, per platform: the same rows read by a bare loop over the platform's official
SDK and written by one ``bulk_write`` per collection of the same documents to the same store.

No connector, no repository, no Dagster, no hashing, no idempotency: this is what the sync could
cost at best. A platform without an entry here is measured without a floor (the table says so).

Also the "fetch-only" reader used by P4: the project's own connector session, rows discarded.
"""
from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any, Callable

from bson import Decimal128
from pymongo import ASCENDING, InsertOne
from pymongo.database import Database

from pipelines.sync import sync_window
from resources.platforms.base import Account
from resources.platforms.registry import get_connector
from resources.repositories import UserRepository
from resources.store import CAMPAIGN_KEY, METRIC_KEY

FLOOR_PREFIX = "floor_"


def floor_collections(db: Database, platform_id: str):
    """Empty ``floor_<p>_campaigns`` / ``floor_<p>_campaign_metrics`` with the product's unique indexes."""
    campaigns, metrics = db[f"{FLOOR_PREFIX}{platform_id}_campaigns"], db[f"{FLOOR_PREFIX}{platform_id}_campaign_metrics"]
    for col, key in ((campaigns, CAMPAIGN_KEY), (metrics, METRIC_KEY)):
        col.drop()
        col.create_index([(f, ASCENDING) for f in key], unique=True, name="natural_key")
    return campaigns, metrics


def _connection(db: Database, cipher, platform_id: str, user_id) -> tuple[dict, list[Account]]:
    connection = UserRepository(db).connection(user_id, platform_id)
    token = cipher.decrypt(connection["token"])
    return token, [Account.from_doc(a) for a in connection.get("accounts", [])]


def _money(value: Decimal | None):
    return Decimal128(value) if value is not None else None


_ENUM_NAMES: dict[tuple[str, str, int], str | None] = {}


def _enum(message, field: str) -> str | None:
    """An enum field of a raw protobuf message by name ("PAUSED"), as the stored documents hold it."""
    value = getattr(message, field)
    key = (message.DESCRIPTOR.full_name, field, value)
    if key not in _ENUM_NAMES:
        entry = message.DESCRIPTOR.fields_by_name[field].enum_type.values_by_number.get(value)
        _ENUM_NAMES[key] = entry.name if entry is not None and entry.name != "UNSPECIFIED" else None
    return _ENUM_NAMES[key]


# ---- Google: SearchStream over the google-ads SDK -------------------------------------------------

def google_floor(db: Database, cipher, user_id, days: int) -> int:
    """Bare SearchStream loops (campaigns + daily metrics per client customer), then one
    ``bulk_write`` of ``InsertOne`` per collection. Returns the metric rows written."""
    from google.oauth2.credentials import Credentials
    from pathlib import Path

    from resources.platforms.google import (CAMPAIGN_QUERY, METRICS_QUERY, SCOPES, GoogleAdsSettings,
                                            _google_ads_client_class)

    token, accounts = _connection(db, cipher, "google", user_id)
    settings = GoogleAdsSettings()
    credentials = Credentials(token=token["access_token"], refresh_token=token.get("refresh_token"),
                              client_id=settings.client_id, client_secret=settings.client_secret,
                              token_uri=settings.token_url, scopes=SCOPES)
    # The SDK's client; the subclass only adds the sandbox CA to the channel's trust roots.
    client = _google_ads_client_class()(credentials=credentials, developer_token=settings.developer_token,
                                        endpoint=settings.ads_endpoint or None, use_proto_plus=True,
                                        login_customer_id=None, version=settings.api_version)
    client.root_certificates = Path(settings.ads_ca_file).read_bytes() if settings.ads_ca_file else None
    now = dt.datetime.now(dt.timezone.utc)
    campaign_docs: list[dict[str, Any]] = []
    metric_docs: list[dict[str, Any]] = []
    services = {}
    for account in accounts:
        if account.manager:
            continue
        login = account.manager_id or account.id
        service = services.get(login)
        if service is None:
            client.login_customer_id = login
            service = services[login] = client.get_service("GoogleAdsService")
        start, end = sync_window(account, days, now)
        totals: dict[str, list] = {}
        query = METRICS_QUERY.format(start=start.isoformat(), end=end.isoformat())
        for batch in service.search_stream(customer_id=account.id, query=query):
            for row in type(batch).pb(batch).results:
                m = row.metrics
                campaign_id = str(row.campaign.id)
                spend = Decimal(m.cost_micros).scaleb(-6).normalize() if m.cost_micros else Decimal(0)
                metric_docs.append({
                    "user_id": user_id, "account_id": account.id, "campaign_id": campaign_id,
                    "date": row.segments.date, "impressions": int(m.impressions), "clicks": int(m.clicks),
                    "spend": Decimal128(spend), "currency": account.currency,
                    "conversions": Decimal128(Decimal(repr(float(m.conversions))).normalize() if m.conversions else Decimal(0)),
                    "last_synced": now})
                t = totals.setdefault(campaign_id, [0, 0, Decimal(0), row.segments.date, row.segments.date])
                t[0] += int(m.impressions)
                t[1] += int(m.clicks)
                t[2] += spend
                t[3] = min(t[3], row.segments.date)
                t[4] = max(t[4], row.segments.date)
        for batch in service.search_stream(customer_id=account.id, query=CAMPAIGN_QUERY):
            for row in type(batch).pb(batch).results:
                c, b = row.campaign, row.campaign_budget
                t = totals.get(str(c.id), [0, 0, None, None, None])
                micros = b.total_amount_micros if b.HasField("total_amount_micros") else (
                    b.amount_micros if b.HasField("amount_micros") else None)
                campaign_docs.append({
                    "user_id": user_id, "account_id": account.id, "campaign_id": str(c.id), "name": c.name,
                    "status": _enum(c, "status"), "channel_type": _enum(c, "advertising_channel_type"), "currency": account.currency,
                    "budget": _money(Decimal(micros).scaleb(-6).normalize() if micros is not None else None),
                    "budget_period": _enum(b, "period"), "budget_delivery": _enum(b, "delivery_method"),
                    "start_date": c.start_date_time[:10] or None, "end_date": c.end_date_time[:10] or None,
                    "impressions": t[0], "clicks": t[1], "spend": _money(t[2]), "totals_from": t[3], "totals_to": t[4],
                    "last_synced": now})
    for service in services.values():
        service.transport.close()
    campaigns, metrics = db[f"{FLOOR_PREFIX}google_campaigns"], db[f"{FLOOR_PREFIX}google_campaign_metrics"]
    if metric_docs:
        metrics.bulk_write([InsertOne(d) for d in metric_docs], ordered=False)
    if campaign_docs:
        campaigns.bulk_write([InsertOne(d) for d in campaign_docs], ordered=False)
    return len(metric_docs)


# ---- Meta: campaigns + insights over the facebook-business SDK --------------------------------------

def meta_floor(db: Database, cipher, user_id, days: int) -> int:
    """Bare facebook-business loops per ad account: campaigns (every status, paged), daily campaign
    insights (an async report run when the range is longer than the connector's sync threshold,
    polled without pausing), then one ``bulk_write`` of ``InsertOne`` per collection."""
    from facebook_business.adobjects.adaccount import AdAccount
    from facebook_business.api import FacebookAdsApi
    from facebook_business.session import FacebookSession

    from resources.platforms.meta import (CAMPAIGN_FIELDS, CAMPAIGN_STATUSES, INSIGHT_FIELDS, MetaAdsSettings,
                                          _conversions, currency_exponent)
    from resources.platforms.base import minor_units_to_decimal

    token, accounts = _connection(db, cipher, "meta", user_id)
    settings = MetaAdsSettings()
    session = FacebookSession(settings.app_id or None, settings.app_secret or None, token["access_token"])
    session.GRAPH = settings.graph_url.rstrip("/")
    api = FacebookAdsApi(session, api_version=settings.api_version)
    now = dt.datetime.now(dt.timezone.utc)
    campaign_docs, metric_docs = [], []
    for account in accounts:
        ad_account = AdAccount(f"act_{account.id}", api=api)
        start, end = sync_window(account, days, now)
        params = {"level": "campaign", "time_increment": 1,
                  "time_range": {"since": start.isoformat(), "until": end.isoformat()},
                  "filtering": [{"field": "campaign.effective_status", "operator": "IN", "value": CAMPAIGN_STATUSES}]}
        if (end - start).days + 1 > settings.async_threshold_days:
            run = ad_account.get_insights(fields=INSIGHT_FIELDS, params=params, is_async=True)
            while True:
                run = run.api_get(fields=["async_status", "async_percent_completion"])
                if run.get("async_status") == "Job Completed":
                    break
                if run.get("async_status") in ("Job Failed", "Job Skipped"):
                    raise RuntimeError(f"report run {run.get('async_status')}")
            rows = run.get_result(params={"limit": settings.page_size})
        else:
            rows = ad_account.get_insights(fields=INSIGHT_FIELDS, params={**params, "limit": settings.page_size})
        totals: dict[str, list] = {}
        for row in rows:
            spend = Decimal(str(row.get("spend") or 0))
            campaign_id, day = str(row["campaign_id"]), row["date_start"]
            metric_docs.append({"user_id": user_id, "account_id": account.id, "campaign_id": campaign_id, "date": day,
                                "impressions": int(row.get("impressions") or 0), "clicks": int(row.get("clicks") or 0),
                                "spend": Decimal128(spend), "currency": account.currency,
                                "conversions": Decimal128(_conversions(row.get("actions"))), "last_synced": now})
            t = totals.setdefault(campaign_id, [0, 0, Decimal(0), day, day])
            t[0] += int(row.get("impressions") or 0)
            t[1] += int(row.get("clicks") or 0)
            t[2] += spend
            t[3], t[4] = min(t[3], day), max(t[4], day)
        exponent = currency_exponent(account.currency)
        for row in ad_account.get_campaigns(fields=CAMPAIGN_FIELDS,
                                            params={"effective_status": CAMPAIGN_STATUSES, "limit": settings.page_size}):
            daily, lifetime = row.get("daily_budget"), row.get("lifetime_budget")
            budget = minor_units_to_decimal(daily or lifetime, exponent) if (daily or lifetime) not in (None, "", "0") else None
            t = totals.get(str(row["id"]), [0, 0, None, None, None])
            start_time, stop_time = row.get("start_time"), row.get("stop_time")
            campaign_docs.append({
                "user_id": user_id, "account_id": account.id, "campaign_id": str(row["id"]), "name": row.get("name"),
                "status": row.get("status"), "effective_status": row.get("effective_status"),
                "objective": row.get("objective"), "currency": account.currency, "budget": _money(budget),
                "budget_period": "DAILY" if daily not in (None, "", "0") else ("LIFETIME" if budget is not None else None),
                "start_date": start_time[:10] if start_time else None, "end_date": stop_time[:10] if stop_time else None,
                "impressions": t[0], "clicks": t[1], "spend": _money(t[2]), "totals_from": t[3], "totals_to": t[4],
                "last_synced": now})
    session.requests.close()
    campaigns, metrics = db[f"{FLOOR_PREFIX}meta_campaigns"], db[f"{FLOOR_PREFIX}meta_campaign_metrics"]
    if metric_docs:
        metrics.bulk_write([InsertOne(d) for d in metric_docs], ordered=False)
    if campaign_docs:
        campaigns.bulk_write([InsertOne(d) for d in campaign_docs], ordered=False)
    return len(metric_docs)


# ---- any platform: the project's connector session, then one bulk_write --------------------------------

def connector_floor(platform_id: str) -> Callable[..., int]:
    """A floor for a platform without a bare-SDK loop here: its connector session's documents (the SDK
    calls, pacing and mapping the connector does), written with one ``bulk_write`` per collection — no
    repository, no hashing, no Dagster. Higher than a bare loop, so ratios against it flatter us less
    than they seem: the table marks it."""

    def floor(db: Database, cipher, user_id, days: int) -> int:
        token, accounts = _connection(db, cipher, platform_id, user_id)
        session = get_connector(platform_id).open_session(token)
        now = dt.datetime.now(dt.timezone.utc)
        campaign_docs, metric_docs = [], []
        try:
            for account in accounts:
                if not session.syncable(account):
                    continue
                start, end = sync_window(account, days, now)
                for doc in session.fetch_daily_metrics(account, start, end):
                    metric_docs.append({**_bson(doc), "user_id": user_id, "last_synced": now})
                for doc in session.fetch_campaigns(account):
                    campaign_docs.append({**_bson(doc), "user_id": user_id, "last_synced": now})
        finally:
            session.close()
        campaigns = db[f"{FLOOR_PREFIX}{platform_id}_campaigns"]
        metrics = db[f"{FLOOR_PREFIX}{platform_id}_campaign_metrics"]
        if metric_docs:
            metrics.bulk_write([InsertOne(d) for d in metric_docs], ordered=False)
        if campaign_docs:
            campaigns.bulk_write([InsertOne(d) for d in campaign_docs], ordered=False)
        return len(metric_docs)

    floor.kind = "connector fetch + one bulk_write"
    return floor


def _bson(doc: dict) -> dict:
    return {k: (Decimal128(v) if isinstance(v, Decimal) else v) for k, v in doc.items()}


google_floor.kind = "bare google-ads SearchStream loop + one bulk_write"
meta_floor.kind = "bare facebook-business loop + one bulk_write"

#: platform id -> floor function ``(db, cipher, user_id, days) -> metric rows``
FLOORS: dict[str, Callable[..., int]] = {
    "google": google_floor,
    "meta": meta_floor,
}


def floor_for(platform_id: str) -> Callable[..., int]:
    """The bare-SDK floor of a platform, or the connector floor when there is none."""
    return FLOORS.get(platform_id) or connector_floor(platform_id)


# ---- fetch only: the project's connector, nothing written -------------------------------------------

def fetch_only(db: Database, cipher, platform_id: str, user_id, days: int) -> int:
    """Read what a sync of ``days`` days reads, through the project's connector session, and discard it.
    Returns the metric rows read."""
    token, accounts = _connection(db, cipher, platform_id, user_id)
    session = get_connector(platform_id).open_session(token)
    now = dt.datetime.now(dt.timezone.utc)
    rows = 0
    try:
        for account in accounts:
            if not session.syncable(account):
                continue
            start, end = sync_window(account, days, now)
            for _ in session.fetch_daily_metrics(account, start, end):
                rows += 1
            for _ in session.fetch_campaigns(account):
                pass
    finally:
        session.close()
    return rows
