"""Blueprint ``dashboard``: every campaign across platforms on one page, a per-day chart of one
campaign, "Sync now" and its status.

The rows, totals and chart data come from ``oauth_portal.reporting`` (sums computed in the store, one
small document per campaign; see there for the measured costs). Totals are per currency and never
added across currencies. Pagination is server-side.

Query parameters of ``/dashboard`` (all optional, validated; bad values answer 400):
``platform``, ``status``, ``start``/``end`` (``YYYY-MM-DD``, account-local dates), ``sort`` (a column
of ``reporting.SORT_COLUMNS``; a money column sorts by currency, then amount), ``dir`` (``asc``/``desc``),
``page``, and ``chart_platform`` + ``chart_account`` + ``chart_campaign`` to draw one campaign's chart.
"""
from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any
from urllib.parse import urlencode

from flask import Blueprint, abort, current_app, flash, jsonify, redirect, render_template, request, url_for
from flask_login import current_user, login_required

from oauth_portal import reporting
from oauth_portal.charts import spend_clicks_svg
from oauth_portal.connections import platform_views
from oauth_portal.core import portal_state
from oauth_portal.reporting import to_decimal  # noqa: F401 — re-exported for older imports
from oauth_portal.sync_status import PENDING, describe, is_stale, latest_requests
from resources.money import format_amount
from resources.repositories import utcnow
from resources.store import campaigns_collection

bp = Blueprint("dashboard", __name__)

#: app.extensions key of the per-app cache of per-campaign metric sums
CACHE_KEY = "dashboard_sums_cache"
#: ranges longer than this are charted per week
CHART_MAX_DAYS = 120


def format_money(value: Any, currency: str | None = None) -> str:
    """``1234.5, "USD"`` → ``1,234.50``; ``46200, "JPY"`` → ``46,200`` (see ``resources.money``)."""
    return format_amount(to_decimal(value), currency)


def format_ratio(value: Decimal | None, places: int = 2, suffix: str = "") -> str:
    """A rate or average for display (``—`` when undefined, e.g. CTR without impressions)."""
    if value is None:
        return "—"
    return f"{value:,.{places}f}{suffix}"


def _arg(name: str) -> str:
    """One query-string value, stripped (``""`` when absent).

    Raises:
        werkzeug.exceptions.BadRequest: the name appears more than once (which one was meant is unclear).
    """
    values = request.args.getlist(name)
    if len(values) > 1:
        abort(400, description=f"“{name}” is given {len(values)} times in the address; give it once.")
    value = values[0] if values else ""
    return value.strip() if isinstance(value, str) else ""


def _parse_date(name: str, default: dt.date) -> dt.date:
    raw = _arg(name)
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


def _cache() -> reporting.SumsCache:
    cache = current_app.extensions.get(CACHE_KEY)
    if cache is None:
        cache = current_app.extensions.setdefault(CACHE_KEY, reporting.SumsCache())
    return cache


def sync_views(user, platform_names: dict[str, str]) -> dict[str, dict[str, Any]]:
    """The newest "Sync now" request per platform, described for display (see ``sync_status.describe``)."""
    state = portal_state()
    now = dt.datetime.now(dt.timezone.utc)
    stale = float(current_app.config.get("SYNC_REQUEST_STALE_SECONDS", 3600))
    views = {}
    for platform_id, doc in latest_requests(state.db, user.oid, list(platform_names)).items():
        view = describe(doc, user.connection(platform_id), platform_names[platform_id], now, stale)
        if view:
            views[platform_id] = view
    return views


@bp.get("/")
def index():
    """Home: the dashboard when logged in, else the login page."""
    if current_user.is_authenticated:
        return redirect(url_for("dashboard.dashboard"))
    return redirect(url_for("auth.login"))


@bp.get("/dashboard")
@login_required
def dashboard():
    """Campaigns across platforms: filters, sorting, pagination, totals per currency, optional chart."""
    state = portal_state()
    platform = _arg("platform")
    if platform and platform not in state.connectors:
        abort(404, description=f"There is no platform called “{platform}”.")
    status = _arg("status") or None
    start, end = _date_range()
    sort = _arg("sort") or reporting.DEFAULT_SORT[0]
    if sort not in reporting.SORT_COLUMNS:
        abort(400, description=f"“sort” must be one of: {', '.join(reporting.SORT_COLUMNS)}.")
    direction = _arg("dir") or (reporting.DEFAULT_SORT[1] if sort == reporting.DEFAULT_SORT[0] else
                                "desc" if sort in reporting.DESCENDING_FIRST else "asc")
    if direction not in ("asc", "desc"):
        abort(400, description="“dir” must be asc or desc.")
    try:
        page = max(1, int(_arg("page") or "1"))
    except ValueError:
        abort(400, description="“page” must be a whole number.")
    page_size = int(current_app.config.get("DASHBOARD_PAGE_SIZE", 50))

    names = {pid: c.display_name for pid, c in state.connectors.items()}
    selected = [(pid, names[pid]) for pid in ([platform] if platform else list(names))]
    report = reporting.build_report(
        state.db, selected, current_user.doc, status=status, start=start, end=end, sort=sort,
        descending=direction == "desc", page=page, page_size=page_size, cache=_cache(),
        cache_seconds=float(current_app.config.get("DASHBOARD_CACHE_SECONDS", 0)))

    filters = {k: v for k, v in {"platform": platform, "status": status or "", "start": start.isoformat(),
                                 "end": end.isoformat()}.items() if v}

    def page_url(number: int) -> str:
        return url_for("dashboard.dashboard") + "?" + urlencode({**filters, "sort": sort, "dir": direction,
                                                                 "page": number})

    def sort_url(column: str) -> str:
        if column == sort:
            new_dir = "asc" if direction == "desc" else "desc"
        else:
            new_dir = "desc" if column in reporting.DESCENDING_FIRST else "asc"
        return url_for("dashboard.dashboard") + "?" + urlencode({**filters, "sort": column, "dir": new_dir})

    def range_url(days: int) -> str:
        today = dt.datetime.now(dt.timezone.utc).date()
        args = {**filters, "start": (today - dt.timedelta(days=days - 1)).isoformat(), "end": today.isoformat(),
                "sort": sort, "dir": direction}
        return url_for("dashboard.dashboard") + "?" + urlencode(args)

    def chart_url(row: reporting.CampaignRow) -> str:
        args = {**filters, "sort": sort, "dir": direction, "page": report.page, "chart_platform": row.platform,
                "chart_account": row.account_id, "chart_campaign": row.campaign_id}
        return url_for("dashboard.dashboard") + "?" + urlencode(args) + "#chart"

    chart = _chart(state, names, start, end)
    platforms = platform_views(current_user)
    syncs = sync_views(current_user, names)
    return render_template(
        "dashboard.html", report=report, rows=report.rows, total=report.total, page=report.page,
        pages=report.pages, page_url=page_url, sort_url=sort_url, range_url=range_url, chart_url=chart_url,
        sort=sort, direction=direction, columns=reporting.SORT_COLUMNS, totals=report.totals,
        money_sort=sort in reporting.MONEY_COLUMNS,
        platforms=platforms, statuses=report.statuses, filter_platform=platform, filter_status=status or "",
        start=start, end=end, syncs=syncs, any_pending=any(v["pending"] for v in syncs.values()),
        chart=chart, format_money=format_money, format_ratio=format_ratio,
        poll_ms=int(current_app.config.get("SYNC_STATUS_POLL_MS", 3000)),
    )


def _chart(state, names: dict[str, str], start: dt.date, end: dt.date) -> dict[str, Any] | None:
    """The chosen campaign's chart (None when no campaign is chosen)."""
    platform_id, account_id, campaign_id = _arg("chart_platform"), _arg("chart_account"), _arg("chart_campaign")
    if not (platform_id or account_id or campaign_id):
        return None
    if platform_id not in names or not account_id or not campaign_id:
        abort(400, description="To draw a chart, choose a campaign from the table.")
    doc = state.db[campaigns_collection(platform_id)].find_one(
        {"user_id": current_user.oid, "account_id": account_id, "campaign_id": campaign_id},
        {"name": 1, "currency": 1, "status": 1, "_id": 0})
    points = reporting.campaign_series(state.db, platform_id, current_user.oid, account_id, campaign_id, start, end)
    if doc is None and not any(p.spend or p.clicks or p.impressions for p in points):
        abort(404, description="This campaign is not among your campaigns.")
    doc = doc or {"name": f"Campaign {campaign_id}"}
    accounts = {a.get("id"): a for a in (current_user.connection(platform_id) or {}).get("accounts") or []}
    currency = doc.get("currency") or (accounts.get(account_id) or {}).get("currency") or ""
    weekly = len(points) > CHART_MAX_DAYS
    shown = reporting.by_week(points) if weekly else points
    title = f"{doc.get('name')} ({names[platform_id]})"
    return {"platform": platform_id, "platform_name": names[platform_id], "account_id": account_id,
            "campaign_id": campaign_id, "name": doc.get("name"), "status": doc.get("status"), "currency": currency,
            "weekly": weekly, "points": points, "svg": spend_clicks_svg(shown, currency, title),
            "spend": sum((p.spend for p in points), Decimal(0)), "clicks": sum(p.clicks for p in points),
            "impressions": sum(p.impressions for p in points),
            "close_url": url_for("dashboard.dashboard") + "?" + urlencode(
                {k: v for k, v in request.args.items() if not k.startswith("chart_")})}


@bp.get("/sync/status")
@login_required
def sync_status():
    """JSON for the page's status poller: the newest "Sync now" request of each platform.

    ``{"pending": bool, "platforms": {<id>: {state, label, message, pending, requested_at, finished_at}}}``
    """
    names = {pid: c.display_name for pid, c in portal_state().connectors.items()}
    views = sync_views(current_user, names)
    response = jsonify(pending=any(v["pending"] for v in views.values()), platforms=views)
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.post("/sync/<platform_id>")
@login_required
def sync_now(platform_id: str):
    """Ask for a sync of one connected platform: inserts a ``sync_requests`` document that a Dagster
    sensor picks up. A request already waiting, queued or running is not duplicated."""
    state = portal_state()
    connector = state.connector_or_404(platform_id)
    if current_user.connection(platform_id) is None:
        abort(400, description=f"{connector.display_name} is not connected, so there is nothing to sync.")
    now = dt.datetime.now(dt.timezone.utc)
    stale = float(current_app.config.get("SYNC_REQUEST_STALE_SECONDS", 3600))
    pending = [doc for doc in state.db.sync_requests.find(
        {"user_id": current_user.oid, "platform": platform_id, "status": {"$in": list(PENDING)}})
        if not is_stale(doc, now, stale)]
    if pending:
        flash(f"A sync of {connector.display_name} is already requested; it starts shortly.", "info")
    else:
        state.db.sync_requests.insert_one({"user_id": current_user.oid, "platform": platform_id,
                                           "requested_at": utcnow(), "status": "requested"})
        flash(f"Sync of {connector.display_name} requested; fresh data appears in a few minutes.", "success")
    target = request.form.get("back")
    return redirect(url_for("connections.index") if target == "connections" else url_for("dashboard.dashboard"))
