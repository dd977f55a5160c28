"""Blueprint ``dashboard``: the user's campaigns across every platform, and "sync now".

Campaigns come from each platform's ``<id>_campaigns``; spend/clicks/impressions over the chosen
date range are summed in the store from ``<id>_campaign_metrics`` (``$match``/``$group``; money is
Decimal128, so sums are exact). Totals are per currency and never added across currencies.
Pagination is server-side: only the rows of the requested page are read.
"""
from __future__ import annotations

import datetime as dt
import math
from decimal import Decimal
from typing import Any
from urllib.parse import urlencode

from bson import Decimal128
from flask import Blueprint, abort, current_app, flash, redirect, render_template, request, url_for
from flask_login import current_user, login_required

from oauth_portal.connections import platform_views
from oauth_portal.core import portal_state
from resources.repositories import utcnow
from resources.store import campaigns_collection, metrics_collection

bp = Blueprint("dashboard", __name__)

SORT = [("account_id", 1), ("name", 1), ("campaign_id", 1)]


def to_decimal(value: Any) -> Decimal | None:
    """Decimal from Decimal128/number/str; None stays None."""
    if value is None:
        return None
    if isinstance(value, Decimal128):
        return value.to_decimal()
    if isinstance(value, Decimal):
        return value
    try:
        return Decimal(str(value))
    except ArithmeticError:
        return None


def format_money(value: Any) -> str:
    """``1234.5`` → ``1,234.50`` (exact; at least two decimals, more when the value has them)."""
    amount = to_decimal(value)
    if amount is None:
        return "—"
    if amount == amount.to_integral_value() or -amount.as_tuple().exponent <= 2:
        return f"{amount:,.2f}"
    return f"{amount:,}"


def _parse_date(name: str, default: dt.date) -> dt.date:
    raw = (request.args.get(name) or "").strip()
    if not raw:
        return default
    try:
        return dt.date.fromisoformat(raw)
    except ValueError:
        abort(400, description=f"“{name}” must be a date written as YYYY-MM-DD, for example 2026-01-31.")


def _date_range() -> tuple[dt.date, dt.date]:
    today = dt.datetime.now(dt.timezone.utc).date()
    days = int(current_app.config.get("DASHBOARD_DEFAULT_DAYS", 30))
    end = _parse_date("end", today)
    start = _parse_date("start", end - dt.timedelta(days=days - 1))
    if start > end:
        abort(400, description="The start date must be on or before the end date.")
    if (end - start).days > 3660:
        abort(400, description="Choose a date range of at most ten years.")
    return start, end


def _metric_match(user_id, start: dt.date, end: dt.date, **extra) -> dict[str, Any]:
    return {"user_id": user_id, "date": {"$gte": start.isoformat(), "$lte": end.isoformat()}, **extra}


def _group_sums(key) -> dict[str, Any]:
    return {"_id": key, "spend": {"$sum": "$spend"}, "clicks": {"$sum": "$clicks"},
            "impressions": {"$sum": "$impressions"}}


def campaign_rows(db, platform_ids, user_id, status: str | None, start, end, page: int, page_size: int):
    """The page's campaign rows and the total number of matching campaigns.

    Platforms are listed in registry order; each collection is counted and only the slice that falls
    on the requested page is read (skip/limit), so memory does not grow with the number of campaigns.
    """
    query: dict[str, Any] = {"user_id": user_id}
    if status:
        query["status"] = status
    counts = {pid: db[campaigns_collection(pid)].count_documents(query) for pid in platform_ids}
    total = sum(counts.values())
    offset, remaining = (page - 1) * page_size, page_size
    rows: list[dict[str, Any]] = []
    for pid in platform_ids:
        if remaining <= 0:
            break
        if offset >= counts[pid]:
            offset -= counts[pid]
            continue
        docs = list(db[campaigns_collection(pid)].find(query, {"_h": 0}).sort(SORT).skip(offset).limit(remaining))
        offset = 0
        remaining -= len(docs)
        sums = {}
        if docs:
            match = _metric_match(user_id, start, end,
                                  campaign_id={"$in": sorted({d["campaign_id"] for d in docs})})
            pipeline = [{"$match": match},
                        {"$group": _group_sums({"account_id": "$account_id", "campaign_id": "$campaign_id"})}]
            for group in db[metrics_collection(pid)].aggregate(pipeline):
                sums[(group["_id"]["account_id"], group["_id"]["campaign_id"])] = group
        for doc in docs:
            metrics = sums.get((doc.get("account_id"), doc.get("campaign_id")), {})
            rows.append({
                "platform": pid, "account_id": doc.get("account_id"), "campaign_id": doc.get("campaign_id"),
                "name": doc.get("name"), "status": doc.get("status"), "currency": doc.get("currency"),
                "budget": to_decimal(doc.get("budget")), "budget_period": doc.get("budget_period"),
                "spend": to_decimal(metrics.get("spend")) or Decimal(0),
                "clicks": int(metrics.get("clicks") or 0), "impressions": int(metrics.get("impressions") or 0),
                "last_synced": doc.get("last_synced"),
            })
    return rows, total


def currency_totals(db, platform_ids, user_id, start, end, campaign_filter: dict | None = None):
    """Spend/clicks/impressions per currency over the range, across the given platforms.

    Args:
        campaign_filter: when the status filter is on, ``{platform: [(account_id, campaign_id), ...]}``
            restricts the totals to those campaigns.
    """
    totals: dict[str, dict[str, Any]] = {}
    for pid in platform_ids:
        match = _metric_match(user_id, start, end)
        if campaign_filter is not None:
            ids = sorted({c for _, c in campaign_filter.get(pid, [])})
            if not ids:
                continue
            match["campaign_id"] = {"$in": ids}
        for group in db[metrics_collection(pid)].aggregate([{"$match": match}, {"$group": _group_sums("$currency")}]):
            currency = group["_id"] or "?"
            entry = totals.setdefault(currency, {"currency": currency, "spend": Decimal(0), "clicks": 0,
                                                 "impressions": 0})
            entry["spend"] += to_decimal(group.get("spend")) or Decimal(0)
            entry["clicks"] += int(group.get("clicks") or 0)
            entry["impressions"] += int(group.get("impressions") or 0)
    return [totals[c] for c in sorted(totals)]


@bp.get("/")
def index():
    """Home: the dashboard when logged in, else the login page."""
    if current_user.is_authenticated:
        return redirect(url_for("dashboard.dashboard"))
    return redirect(url_for("auth.login"))


@bp.get("/dashboard")
@login_required
def dashboard():
    """Campaigns across platforms with totals per currency; filters ``platform``, ``status``,
    ``start``, ``end``; ``page`` (page size ``DASHBOARD_PAGE_SIZE``)."""
    state = portal_state()
    db, user_id = state.db, current_user.oid
    all_ids = list(state.connectors)
    platform = (request.args.get("platform") or "").strip()
    if platform and platform not in state.connectors:
        abort(404, description=f"There is no platform called “{platform}”.")
    platform_ids = [platform] if platform else all_ids
    status = (request.args.get("status") or "").strip() or None
    start, end = _date_range()
    try:
        page = max(1, int(request.args.get("page", "1")))
    except ValueError:
        abort(400, description="“page” must be a whole number.")
    page_size = int(current_app.config.get("DASHBOARD_PAGE_SIZE", 50))

    rows, total = campaign_rows(db, platform_ids, user_id, status, start, end, page, page_size)
    pages = max(1, math.ceil(total / page_size))
    campaign_filter = None
    if status:
        campaign_filter = {pid: [(d["account_id"], d["campaign_id"]) for d in db[campaigns_collection(pid)].find(
            {"user_id": user_id, "status": status}, {"account_id": 1, "campaign_id": 1, "_id": 0})]
            for pid in platform_ids}
    totals = currency_totals(db, platform_ids, user_id, start, end, campaign_filter)

    statuses = sorted({s for pid in all_ids
                       for s in db[campaigns_collection(pid)].distinct("status", {"user_id": user_id}) if s})
    account_names = {}
    platforms = platform_views(current_user)
    for view in platforms:
        for account in view["connection"].get("accounts", []):
            account_names[(view["id"], account["id"])] = account["name"]
    for row in rows:
        row["account_name"] = account_names.get((row["platform"], row["account_id"]), "")
        row["platform_name"] = state.connectors[row["platform"]].display_name

    base_args = {k: v for k, v in {"platform": platform, "status": status or "", "start": start.isoformat(),
                                   "end": end.isoformat()}.items() if v}

    def page_url(number: int) -> str:
        return url_for("dashboard.dashboard") + "?" + urlencode({**base_args, "page": number})

    pending = {doc["platform"] for doc in db.sync_requests.find(
        {"user_id": user_id, "status": "requested"}, {"platform": 1})}
    return render_template(
        "dashboard.html", rows=rows, total=total, page=page, pages=pages, page_url=page_url,
        totals=totals, platforms=platforms, statuses=statuses, filter_platform=platform,
        filter_status=status or "", start=start, end=end, pending=pending, format_money=format_money,
    )


@bp.post("/sync/<platform_id>")
@login_required
def sync_now(platform_id: str):
    """Ask for a sync of one connected platform: inserts a ``sync_requests`` document that a Dagster
    sensor picks up. A request already waiting is not duplicated."""
    state = portal_state()
    connector = state.connector_or_404(platform_id)
    if current_user.connection(platform_id) is None:
        abort(400, description=f"{connector.display_name} is not connected, so there is nothing to sync.")
    pending = state.db.sync_requests.find_one(
        {"user_id": current_user.oid, "platform": platform_id, "status": "requested"})
    if pending:
        flash(f"A sync of {connector.display_name} is already requested; it starts shortly.", "info")
    else:
        state.db.sync_requests.insert_one({"user_id": current_user.oid, "platform": platform_id,
                                           "requested_at": utcnow(), "status": "requested"})
        flash(f"Sync of {connector.display_name} requested; fresh data appears in a few minutes.", "success")
    target = request.form.get("back")
    return redirect(url_for("connections.index") if target == "connections" else url_for("dashboard.dashboard"))
