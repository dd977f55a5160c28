"""Offline Meta stand-in: the Facebook Login OAuth dialog, the Graph API token endpoint and the
Marketing API (ad accounts, campaigns, insights incl. asynchronous report runs, batch requests).

Three parts, glued by ``MetaSandbox`` (the object ``SandboxServer.platform("meta")`` returns):

``MetaSandboxData`` — the seeded generator and truth accessor: several ad accounts in different
currencies (one zero-decimal: JPY) and time zones, campaigns of every status (ACTIVE, PAUSED,
ARCHIVED, DELETED) and several objectives, daily or lifetime budgets in *minor units* (cents; yen for
JPY) or none (ad-set budgets), and daily insights computed on the fly from ``(seed, account,
campaign, date)`` — constant memory for any date range. Insight dates are account-local dates; spend
is in currency units, as the Graph API sends it.

OAuth (HTTP, ``/meta/www`` stands for www.facebook.com, ``/meta/graph`` for graph.facebook.com):
  ``GET  /meta/www/<v>/dialog/oauth``            consent page (Allow / Cancel buttons, ``name="decision"``)
  ``POST /meta/www/dialog/oauth/confirm``        decision → redirect with ``code`` or ``error=access_denied``
  ``GET|POST /meta/graph/<v>/oauth/access_token`` code exchange (short-lived token, ~2 h) and
                                                 ``grant_type=fb_exchange_token`` (long-lived, ~60 days)

Graph API (``/meta/graph/<v>/...``; any ``vNN.0`` prefix, or none; ``access_token`` as a parameter or an
``Authorization: OAuth|Bearer`` header; ``appsecret_proof`` verified when present and required when
``require_appsecret_proof`` is on):
  ``GET  me``, ``me/adaccounts`` (``summary=true`` → ``total_count``), ``act_<id>/`` (account node)
  ``GET  act_<id>/campaigns``   without a status filter ARCHIVED and DELETED campaigns are left out, as
                                Meta does; ``effective_status=[...]`` or ``filtering=[{field:
                                "effective_status"|"updated_time"|"id", operator, value}]`` select them
  ``GET  <campaign_id>/``       campaign node (deleted ones too)
  ``GET  act_<id>/insights``    synchronous insights (``level``, ``fields``, ``time_range``/``time_ranges``/
                                ``date_preset``, ``time_increment`` 1|N|monthly|all_days, ``filtering`` on
                                ``campaign.effective_status``/``campaign.id`` …); without a
                                ``campaign.effective_status`` filter DELETED/ARCHIVED campaigns' rows are
                                left out (as ``act_<id>/insights?level=…`` does at Meta). Large requests
                                fail with code 1 "Please reduce the amount of data" (use async).
  ``POST act_<id>/insights``    asynchronous ``AdReportRun`` → ``{"report_run_id"}``; ``GET <run_id>/``
                                advances it one step per poll (``async_status``/``async_percent_completion``);
                                ``GET <run_id>/insights`` pages the result
  ``GET  <campaign_id>/insights`` insights of one campaign
  ``POST /``                    batch: ``batch=[{"method","relative_url","body"?}]`` → ``[{code, headers, body}]``
Every answer, success or error, carries ``x-business-use-case-usage`` (per ad account: ``call_count``,
``total_cputime``, ``total_time`` in percent, ``estimated_time_to_regain_access`` in minutes),
``x-app-usage`` and ``x-fb-trace-id``; insights answers add ``x-fb-ads-insights-throttle`` and
``x-ad-account-usage``. Paging uses opaque ``after`` cursors and an absolute ``paging.next`` URL.
Errors are Graph error bodies ``{"error": {message, type, code, error_subcode?, is_transient,
fbtrace_id}}``: 190/463 expired token, 190/458 revoked, 190 invalid, 100 bad parameter or
``appsecret_proof``, 80000 (insights) / 80004 (campaigns) / 4 (app) rate limits with subcode 2446079,
17 and 613 rate limits, 2 transient (HTTP 500).

Admin knobs (HTTP, JSON bodies; each has a Python method on ``MetaSandbox``):
  ``POST /_sandbox/meta/expire-tokens``  ``{"token": optional}`` → tokens expire now (190/463)
  ``POST /_sandbox/meta/revoke``         ``{"token": optional}`` → the user removed the app (190/458)
  ``POST /_sandbox/meta/throttle``       ``{"account_id", "seconds", "code": 80000|80004|17|613|4}``
                                         (``account_id`` omitted: app-level, code 4)
  ``POST /_sandbox/meta/unthrottle``     ``{"account_id": optional}``
  ``POST /_sandbox/meta/usage``          ``{"account_id", "pct"}`` → reported usage at least ``pct`` %
  ``POST /_sandbox/meta/faults``         ``{"kind": transient|unknown|http_500|http_503|rate_limit|
                                         expired_token|invalid_token|permission|async_failed,
                                         "count", "target": api|token|insights|campaigns|accounts,
                                         "regain_minutes", "latency"}``
  ``POST /_sandbox/meta/restate``        ``{"days": 3}`` → the most recent days get new values
  ``POST /_sandbox/meta/require-proof``  ``{"on": true|false}``
  ``POST /_sandbox/meta/issue-token``    → a long-lived user token (for tools that skip the dialog)
  ``POST /_sandbox/meta/reset``          clear faults, throttles, usage, restatements, token TTLs
  ``GET  /_sandbox/meta/stats``          calls per kind and ``appsecret_proof`` counts
"""
from __future__ import annotations

import base64
import collections
import dataclasses
import datetime as dt
import hashlib
import hmac
import html
import json
import logging
import re
import secrets
import threading
import time
import zoneinfo
from pathlib import Path
from decimal import Decimal
from typing import Any, Iterable, Iterator
from urllib.parse import parse_qsl, urlencode, urlsplit

from flask import Blueprint, Response, jsonify, redirect, request

from sandbox.common import (SHARED_CAMPAIGN_NAMES, FaultInjector, admin_blueprint, digest_units, read_state_file,
                            redirect_allowed, request_body, seeded_random, stable_int, write_state_file)

log = logging.getLogger(__name__)

API_VERSION = "v26.0"
SHORT_TOKEN_TTL = 2 * 3600
LONG_TOKEN_TTL = 60 * 86400
DEFAULT_LIMIT = 25
MAX_LIMIT = 5000
#: a synchronous insights request producing more (period × object) cells than this fails with code 1
SYNC_CELL_LIMIT = 12_000
#: insights cannot start more than 37 months ago
MAX_HISTORY_MONTHS = 37
ASYNC_POLLS = 2
MAX_RUNS = 2000

USER = {"id": "10000000000001", "name": "Sandbox Marketer"}
DEFAULT_ACCOUNTS = (
    {"id": "101000000000001", "name": "Sandbox Outdoor Gear (US)", "currency": "USD",
     "time_zone": "America/Los_Angeles"},
    {"id": "101000000000002", "name": "Sandbox Wanderbedarf (DE)", "currency": "EUR", "time_zone": "Europe/Berlin"},
    {"id": "101000000000003", "name": "Sandbox Tokyo Store (JP)", "currency": "JPY", "time_zone": "Asia/Tokyo"},
    {"id": "101000000000004", "name": "Sandbox Sydney Surf (AU)", "currency": "AUD", "time_zone": "Australia/Sydney"},
)

#: Meta's currency offsets: these currencies have no minor unit (budgets are whole units)
ZERO_DECIMAL = {"CLP", "COP", "CRC", "HUF", "ISK", "IDR", "JPY", "KRW", "PYG", "TWD", "VND"}
CURRENCY_SCALE = {"USD": 1, "EUR": 1, "GBP": 1, "CAD": 1.3, "AUD": 1.5, "JPY": 150, "KRW": 1300}

CAMPAIGN_STATUSES = ("ACTIVE", "PAUSED", "ARCHIVED", "DELETED")
ALL_EFFECTIVE_STATUSES = ("ACTIVE", "PAUSED", "ARCHIVED", "DELETED", "IN_PROCESS", "WITH_ISSUES")
#: what an edge shows without a status filter
DEFAULT_VISIBLE = {"ACTIVE", "PAUSED", "IN_PROCESS", "WITH_ISSUES"}
OBJECTIVES = ("OUTCOME_SALES", "OUTCOME_TRAFFIC", "OUTCOME_AWARENESS", "OUTCOME_LEADS", "OUTCOME_ENGAGEMENT",
              "OUTCOME_APP_PROMOTION")
_OBJECTIVE_PROFILE = {  # (ctr, cpm in USD, conversion rate per click, reach factor)
    "OUTCOME_SALES": (0.012, 11.0, 0.03, 1.0),
    "OUTCOME_TRAFFIC": (0.018, 7.5, 0.0, 1.4),
    "OUTCOME_AWARENESS": (0.004, 3.2, 0.0, 3.5),
    "OUTCOME_LEADS": (0.011, 9.0, 0.06, 0.9),
    "OUTCOME_ENGAGEMENT": (0.009, 5.0, 0.0, 1.8),
    "OUTCOME_APP_PROMOTION": (0.014, 8.0, 0.05, 1.2),
}
#: action types a conversion is counted from (the connector's mapping, mirrored by the truth)
CONVERSION_ACTION_TYPES = ("purchase", "lead", "mobile_app_install", "complete_registration")
_THEMES = ("Prospecting", "Retargeting", "Lookalike 1%", "Advantage+ Shopping", "Catalog Sales", "Video Views",
           "Lead Form", "App Installs", "Page Likes", "Summer Drop", "Winter Collection", "Gift Cards",
           "Local Awareness", "Broad Audience", "Interests - Hiking", "Interests - Surf", "UGC Creatives")
_WEEKDAY = (1.0, 1.04, 1.06, 1.03, 0.97, 0.85, 0.82)
RATE_LIMIT_MESSAGES = {
    4: "(#4) Application request limit reached",
    17: "(#17) User request limit reached",
    613: "(#613) Calls to this api have exceeded the rate limit.",
    80000: "(#80000) There have been too many calls from this ad-account. Wait a bit and try again. "
           "For more info, please refer to https://developers.facebook.com/docs/graph-api/overview/rate-limiting.",
    80004: "(#80004) There have been too many calls to this ad-account. Wait a bit and try again. "
           "For more info, please refer to https://developers.facebook.com/docs/graph-api/overview/rate-limiting#ads-management.",
}
RATE_LIMIT_SUBCODES = {17: 2446079, 613: 1487742, 80000: 2446079, 80004: 2446079, 4: 1504022}
#: call kinds of the insights family (ads_insights limits, the insights throttle header)
INSIGHT_KINDS = {"insights", "insights_async", "report_run", "report_results"}


# =============================================================================================
# data generator
# =============================================================================================

def currency_exponent(currency: str) -> int:
    """Digits of the minor unit Meta uses for ``currency`` (0 for JPY and other offset-1 currencies)."""
    return 0 if currency in ZERO_DECIMAL else 2


@dataclasses.dataclass(frozen=True)
class SandboxAdAccount:
    """An ad account. ``id`` is digits only (the Graph node is ``act_<id>``)."""

    id: str
    name: str
    currency: str
    time_zone: str
    status: int = 1  # 1 = ACTIVE

    @property
    def exponent(self) -> int:
        return currency_exponent(self.currency)


@dataclasses.dataclass(frozen=True)
class SandboxMetaCampaign:
    """A campaign. Budgets in minor units of the account currency; dates account-local.

    ``daily_budget`` or ``lifetime_budget`` is set when the budget is at campaign level (CBO); both are
    None when ad sets carry the budgets. ``last_active`` is the last day with delivery for PAUSED,
    ARCHIVED and DELETED campaigns (None: still delivering).
    """

    account_id: str
    id: str
    name: str
    status: str
    objective: str
    daily_budget: int | None
    lifetime_budget: int | None
    start_date: dt.date
    stop_date: dt.date | None
    last_active: dt.date | None
    base_impressions: float
    ctr: float
    cpm_minor: float
    conversion_rate: float

    @property
    def adset_id(self) -> str:
        return str(int(self.id) + 1)

    @property
    def ad_id(self) -> str:
        return str(int(self.id) + 2)


class MetaSandboxData:
    """Deterministic Meta Marketing data and the truth accessor tests compare against.

    Args:
        seed: generator seed (same seed → same accounts, campaigns and insights).
        accounts: ad accounts as dicts ``{id, name, currency, time_zone}`` (default: USD/Los Angeles,
            EUR/Berlin, JPY/Tokyo, AUD/Sydney).
        campaigns_per_account: campaigns per account (≥ 6, so every status and objective appears).
        anchor: the date campaign start/stop dates are generated around (default: today, UTC).

    Truth accessors: ``accounts()``, ``account(id)``, ``campaigns(account_id)``, ``campaign(id)``,
    ``metrics_for(campaign, day)`` and ``daily_metrics(account_id, start, end)`` (spend in minor units,
    account-local ``datetime.date``s). Insights are computed on the fly, never stored.
    """

    def __init__(self, seed: int = 7, accounts: Iterable[dict] | None = None, campaigns_per_account: int = 30,
                 anchor: dt.date | None = None):
        self.seed = seed
        self.anchor = anchor or dt.datetime.now(dt.timezone.utc).date()
        specs = list(accounts) if accounts is not None else list(DEFAULT_ACCOUNTS)
        self._accounts: dict[str, SandboxAdAccount] = {}
        self._campaigns: dict[str, list[SandboxMetaCampaign]] = {}
        self._lock = threading.Lock()
        self._restatement_version = 0
        self._restated_since: dt.date | None = None
        for index, spec in enumerate(specs):
            account = SandboxAdAccount(str(spec["id"]), spec["name"], spec["currency"], spec["time_zone"],
                                       int(spec.get("status", 1)))
            self._accounts[account.id] = account
            self._campaigns[account.id] = self._generate(account, index, max(6, int(campaigns_per_account)))
        self._by_id = {c.id: c for camps in self._campaigns.values() for c in camps}
        self._by_child_id = {}
        for c in self._by_id.values():
            self._by_child_id[c.adset_id] = ("adset", c)
            self._by_child_id[c.ad_id] = ("ad", c)

    # ---- static entities -----------------------------------------------------------------------
    def _generate(self, account: SandboxAdAccount, index: int, count: int) -> list[SandboxMetaCampaign]:
        rng = seeded_random(self.seed, "meta-campaigns", account.id)
        scale = CURRENCY_SCALE.get(account.currency, 1)
        minor = 10 ** account.exponent
        shared = list(SHARED_CAMPAIGN_NAMES)
        rng.shuffle(shared)
        shared_count = min(len(shared), 3 + index % 3)
        campaigns = []
        for i in range(count):
            status = CAMPAIGN_STATUSES[i] if i < 4 else rng.choices(CAMPAIGN_STATUSES, (60, 22, 10, 8))[0]
            objective = OBJECTIVES[i % len(OBJECTIVES)] if i < 12 else rng.choices(OBJECTIVES, (35, 20, 12, 13, 10, 10))[0]
            ctr, cpm, cvr, reach = _OBJECTIVE_PROFILE[objective]
            campaign_id = str(120_200_000_000_000_000 + (index + 1) * 1_000_000_000 + i * 1000 + rng.randrange(100) * 10)
            recent = rng.random() < 0.1
            start = self.anchor - dt.timedelta(days=rng.randint(0, 29) if recent else rng.randint(30, 900))
            stop = None
            last_active = None
            if status in ("ARCHIVED", "DELETED"):
                span = max(1, (self.anchor - start).days - 1)
                last_active = start + dt.timedelta(days=rng.randint(min(7, span), span))
            elif status == "PAUSED":
                span = max(0, (self.anchor - start).days)
                last_active = max(start, self.anchor - dt.timedelta(days=rng.randint(1, max(1, min(span, 150)))))
            kind = rng.choices(("daily", "lifetime", "adset"), (60, 20, 20))[0]
            daily = lifetime = None
            if kind == "daily":
                daily = int(rng.randint(10, 400) * scale) * minor
            elif kind == "lifetime":
                lifetime = int(rng.randint(500, 20_000) * scale) * minor
                stop = start + dt.timedelta(days=rng.randint(14, 400))
            elif rng.random() < 0.2:
                stop = self.anchor + dt.timedelta(days=rng.randint(-60, 200))
                stop = max(stop, start)
            if i < shared_count:
                name = shared[i]
            else:
                name = f"{objective.replace('OUTCOME_', '').title()} | {rng.choice(_THEMES)} #{i + 1}"
            campaigns.append(SandboxMetaCampaign(
                account_id=account.id, id=campaign_id, name=name, status=status, objective=objective,
                daily_budget=daily, lifetime_budget=lifetime, start_date=start, stop_date=stop,
                last_active=last_active, base_impressions=rng.lognormvariate(7.4, 0.8) * reach,
                ctr=ctr * rng.uniform(0.6, 1.5), cpm_minor=cpm * scale * minor * rng.uniform(0.6, 1.6),
                conversion_rate=cvr * rng.uniform(0.5, 1.8)))
        campaigns.sort(key=lambda c: int(c.id))
        return campaigns

    # ---- truth accessors -----------------------------------------------------------------------
    def accounts(self) -> list[SandboxAdAccount]:
        return list(self._accounts.values())

    def account(self, account_id: str) -> SandboxAdAccount | None:
        return self._accounts.get(str(account_id).removeprefix("act_"))

    def campaigns(self, account_id: str) -> list[SandboxMetaCampaign]:
        """The account's campaigns (every status), ordered by id."""
        return list(self._campaigns.get(str(account_id).removeprefix("act_"), ()))

    def campaign(self, campaign_id: str) -> SandboxMetaCampaign | None:
        return self._by_id.get(str(campaign_id))

    def child(self, object_id: str) -> tuple[str, SandboxMetaCampaign] | None:
        """``("adset"|"ad", campaign)`` for the single ad set / ad each campaign has."""
        return self._by_child_id.get(str(object_id))

    def local_today(self, account_id: str) -> dt.date:
        """Today in the account's time zone: the last date that can have insights."""
        tz = zoneinfo.ZoneInfo(self.account(account_id).time_zone)
        return dt.datetime.now(tz).date()

    def metrics_for(self, campaign: SandboxMetaCampaign, day: dt.date) -> dict[str, Any] | None:
        """One campaign-day (None without delivery): ``{impressions, clicks, spend_minor, reach,
        actions: {action_type: int}}``. Spend in minor units of the account currency."""
        if day < campaign.start_date or (campaign.last_active and day > campaign.last_active) \
                or (campaign.stop_date and day > campaign.stop_date):
            return None
        version = 0
        with self._lock:
            if self._restated_since is not None and day >= self._restated_since:
                version = self._restatement_version
        u = digest_units(self.seed, "meta", campaign.id, day.toordinal(), version, count=8)
        if u[0] < 0.05:
            return None
        impressions = int(campaign.base_impressions * _WEEKDAY[day.weekday()] * (0.55 + 0.9 * u[1]))
        if impressions <= 0:
            return None
        clicks = min(impressions, int(impressions * campaign.ctr * (0.7 + 0.6 * u[2]) + u[3]))
        spend = int(impressions * campaign.cpm_minor / 1000 * (0.75 + 0.5 * u[4]))
        budget = campaign.daily_budget
        if budget:
            spend = min(spend, 2 * budget)
        actions: dict[str, int] = {}
        link_clicks = int(clicks * 0.85)
        if link_clicks:
            actions["link_click"] = link_clicks
            views = int(link_clicks * (0.55 + 0.3 * u[6]))
            if views:
                actions["landing_page_view"] = views
        conversions = int(clicks * campaign.conversion_rate * (0.4 + 1.2 * u[5]) + u[7] * 0.6)
        if campaign.objective == "OUTCOME_SALES":
            carts = int(clicks * 0.08 * (0.5 + u[7]))
            if carts:
                actions["add_to_cart"] = carts
            if conversions:
                actions["purchase"] = conversions
                actions["offsite_conversion.fb_pixel_purchase"] = conversions
        elif campaign.objective == "OUTCOME_LEADS" and conversions:
            actions["lead"] = conversions
            actions["offsite_conversion.fb_pixel_lead"] = conversions
        elif campaign.objective == "OUTCOME_APP_PROMOTION" and conversions:
            actions["mobile_app_install"] = conversions
        elif campaign.objective == "OUTCOME_ENGAGEMENT":
            engagement = int(impressions * 0.015 * (0.5 + u[6]))
            if engagement:
                actions["post_engagement"] = engagement
        elif campaign.objective == "OUTCOME_AWARENESS":
            actions["video_view"] = int(impressions * 0.08 * (0.5 + u[6])) or 1
        reach = max(1, int(impressions / (1.05 + 0.9 * u[6])))
        return {"impressions": impressions, "clicks": clicks, "spend_minor": spend, "reach": reach,
                "actions": actions}

    def daily_metrics(self, account_id: str, start: dt.date, end: dt.date,
                      campaign_ids: set[str] | None = None) -> Iterator[dict[str, Any]]:
        """Rows ``{account_id, campaign_id, date (account-local date), impressions, clicks, spend_minor,
        reach, actions}`` for days in ``[start, end]`` with delivery, ordered by date then campaign id.
        Days after the account's local today have none. Constant memory."""
        campaigns = [c for c in self.campaigns(account_id) if campaign_ids is None or c.id in campaign_ids]
        if not campaigns:
            return
        end = min(end, self.local_today(account_id))
        day, one = start, dt.timedelta(days=1)
        while day <= end:
            for campaign in campaigns:
                row = self.metrics_for(campaign, day)
                if row is not None:
                    row.update(account_id=campaign.account_id, campaign_id=campaign.id, date=day)
                    yield row
            day += one

    # ---- knobs ---------------------------------------------------------------------------------
    def restate(self, days: int = 3) -> dt.date:
        """Change every date from ``days`` days before today (UTC) onwards (late attribution)."""
        since = dt.datetime.now(dt.timezone.utc).date() - dt.timedelta(days=max(1, days))
        with self._lock:
            self._restatement_version += 1
            self._restated_since = since if self._restated_since is None else min(since, self._restated_since)
        return since

    def reset_restatements(self) -> None:
        with self._lock:
            self._restatement_version = 0
            self._restated_since = None


# =============================================================================================
# Graph API errors and helpers
# =============================================================================================

class GraphError(Exception):
    """A Graph API error answer."""

    def __init__(self, code: int, message: str, *, subcode: int | None = None, status: int = 400,
                 kind: str = "OAuthException", transient: bool = False, headers: dict | None = None,
                 user_title: str | None = None, user_msg: str | None = None):
        super().__init__(message)
        self.code, self.message, self.subcode, self.status = code, message, subcode, status
        self.kind, self.transient, self.headers = kind, transient, dict(headers or {})
        self.user_title, self.user_msg = user_title, user_msg

    def body(self, trace_id: str) -> dict:
        error: dict[str, Any] = {"message": self.message, "type": self.kind, "code": self.code}
        if self.subcode is not None:
            error["error_subcode"] = self.subcode
        error["is_transient"] = self.transient
        if self.user_title:
            error["error_user_title"] = self.user_title
        if self.user_msg:
            error["error_user_msg"] = self.user_msg
        error["fbtrace_id"] = trace_id
        return {"error": error}


def _json_param(value: Any, name: str) -> Any:
    """A JSON-encoded parameter (the SDK JSON-encodes lists, maps and booleans)."""
    if value is None or not isinstance(value, str):
        return value
    text = value.strip()
    if not text:
        return None
    if text[0] in "[{" or text in ("true", "false") or text[0] == '"':
        try:
            return json.loads(text)
        except ValueError:
            raise GraphError(100, f"(#100) param {name} must be valid JSON", kind="OAuthException") from None
    return text


def _list_param(value: Any, name: str) -> list[str] | None:
    value = _json_param(value, name)
    if value is None:
        return None
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, list):
        return [str(v) for v in value]
    raise GraphError(100, f"(#100) param {name} must be an array.")


def _bool_param(value: Any) -> bool:
    value = _json_param(value, "bool")
    if isinstance(value, str):
        return value.lower() in ("1", "true", "yes")
    return bool(value)


def _fields_param(value: Any) -> list[str]:
    """``fields=a,b,actions{action_type}`` → ``["a", "b", "actions"]`` (sub-selections ignored)."""
    if value is None:
        return []
    if isinstance(value, str) and value.strip().startswith("["):  # the SDK JSON-encodes POSTed field lists
        try:
            value = json.loads(value)
        except ValueError:
            raise GraphError(100, "(#100) param fields must be a list of fields") from None
    if isinstance(value, list):
        value = ",".join(str(v) for v in value)
    value = re.sub(r"\{[^{}]*\}", "", str(value))
    value = re.sub(r"\.[a-z_]+\([^)]*\)", "", value)  # .limit(10) etc.
    return [f.strip() for f in value.split(",") if f.strip()]


def _encode_cursor(*parts: int) -> str:
    return base64.urlsafe_b64encode(("c:" + ":".join(str(p) for p in parts)).encode()).decode().rstrip("=")


def _decode_cursor(value: str | None, size: int) -> tuple[int, ...] | None:
    if not value:
        return None
    try:
        text = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).decode()
        if not text.startswith("c:"):
            raise ValueError
        parts = tuple(int(p) for p in text[2:].split(":"))
        if len(parts) != size:
            raise ValueError
        return parts
    except Exception:
        raise GraphError(100, "(#100) Invalid cursor value", subcode=1870040) from None


def _money(minor: int, exponent: int) -> str:
    """Minor units → the currency-unit string Meta sends (``"12.34"``; ``"1234"`` for JPY)."""
    return format(Decimal(int(minor)).scaleb(-exponent), "f")


def _iso_local(day: dt.date, hour: int, tz: str) -> str:
    moment = dt.datetime.combine(day, dt.time(hour), zoneinfo.ZoneInfo(tz))
    return moment.strftime("%Y-%m-%dT%H:%M:%S%z")


# =============================================================================================
# insights query
# =============================================================================================

@dataclasses.dataclass
class InsightsQuery:
    """A parsed insights request. ``periods`` are ``(start, end)`` account-local date pairs."""

    account_id: str
    level: str
    fields: list[str]
    periods: list[tuple[dt.date, dt.date]]
    campaigns: list[SandboxMetaCampaign]

    @property
    def cells(self) -> int:
        """Campaign-days the query has to compute (what makes a synchronous call "too large")."""
        return sum((b - a).days + 1 for a, b in self.periods) * max(1, len(self.campaigns))


_INSIGHT_FIELDS = {"account_id", "account_name", "account_currency", "campaign_id", "campaign_name", "adset_id",
                   "adset_name", "ad_id", "ad_name", "objective", "impressions", "clicks", "spend", "reach",
                   "frequency", "cpc", "cpm", "ctr", "actions", "conversions", "inline_link_clicks",
                   "unique_clicks", "date_start", "date_stop", "buying_type", "optimization_goal"}
DEFAULT_INSIGHT_FIELDS = ["account_id", "impressions", "spend"]


def _date_preset(name: str, today: dt.date) -> tuple[dt.date, dt.date]:
    one = dt.timedelta(days=1)
    m = re.fullmatch(r"last_(\d+)d", name)
    if name == "today":
        return today, today
    if name == "yesterday":
        return today - one, today - one
    if m:
        return today - dt.timedelta(days=int(m[1])), today - one
    if name == "this_month":
        return today.replace(day=1), today
    if name == "last_month":
        last = today.replace(day=1) - one
        return last.replace(day=1), last
    if name == "this_year":
        return today.replace(month=1, day=1), today
    if name == "maximum":
        return _months_ago(today, MAX_HISTORY_MONTHS), today
    if name == "this_week_mon_today":
        return today - dt.timedelta(days=today.weekday()), today
    raise GraphError(100, f"(#100) date_preset must be one of the following values: today, yesterday, "
                          f"this_month, last_month, this_year, maximum, last_Nd; got {name!r}")


def _months_ago(day: dt.date, months: int) -> dt.date:
    year, month = divmod(day.year * 12 + day.month - 1 - months, 12)
    return dt.date(year, month + 1, min(day.day, 28))


def _split(start: dt.date, end: dt.date, increment: Any) -> list[tuple[dt.date, dt.date]]:
    if increment in (None, "", "all_days"):
        return [(start, end)]
    if increment == "monthly":
        periods, day = [], start
        while day <= end:
            nxt = (day.replace(day=28) + dt.timedelta(days=4)).replace(day=1)
            periods.append((day, min(end, nxt - dt.timedelta(days=1))))
            day = nxt
        return periods
    try:
        step = int(increment)
    except (TypeError, ValueError):
        raise GraphError(100, "(#100) time_increment must be 1-90, monthly or all_days") from None
    if not 1 <= step <= 90:
        raise GraphError(100, "(#100) time_increment must be 1-90, monthly or all_days")
    periods, day = [], start
    while day <= end:
        last = min(end, day + dt.timedelta(days=step - 1))
        periods.append((day, last))
        day = last + dt.timedelta(days=1)
    return periods


# =============================================================================================
# OAuth + token state
# =============================================================================================

@dataclasses.dataclass
class _Token:
    app_id: str
    kind: str  # short | long
    expires_at: float
    scopes: tuple[str, ...]
    revoked: bool = False


class MetaTokens:
    """Codes and user access tokens. Thread-safe. ``check(token)`` → ``ok|expired|revoked|invalid``."""

    def __init__(self, short_ttl: int = SHORT_TOKEN_TTL, long_ttl: int = LONG_TOKEN_TTL, state_file=None):
        self.default_short_ttl, self.default_long_ttl = short_ttl, long_ttl
        self.short_ttl, self.long_ttl = short_ttl, long_ttl
        self._lock = threading.Lock()
        self._consents: dict[str, dict] = {}
        self._codes: dict[str, dict] = {}
        self._tokens: dict[str, _Token] = {}
        self.state_file = state_file
        for token, t in ((read_state_file(state_file) or {}).get("tokens") or {}).items():
            self._tokens[token] = _Token(t["app_id"], t["kind"], t["expires_at"], tuple(t["scopes"]), t["revoked"])

    def _save(self) -> None:
        """Persist live tokens (called with the lock held), so connections survive a sandbox restart."""
        now = time.time()
        write_state_file(self.state_file, {"tokens": {
            k: {"app_id": t.app_id, "kind": t.kind, "expires_at": t.expires_at, "scopes": list(t.scopes),
                "revoked": t.revoked} for k, t in self._tokens.items() if t.expires_at > now}})

    def add_consent(self, entry: dict) -> str:
        consent_id = secrets.token_urlsafe(24)
        with self._lock:
            self._consents[consent_id] = dict(entry, expires_at=time.time() + 600)
        return consent_id

    def pop_consent(self, consent_id: str) -> dict | None:
        with self._lock:
            entry = self._consents.pop(consent_id, None)
        return entry if entry and entry["expires_at"] >= time.time() else None

    def add_code(self, entry: dict) -> str:
        code = "AQ" + secrets.token_urlsafe(48)
        with self._lock:
            self._codes[code] = dict(entry, used=False, expires_at=time.time() + 600)
        return code

    def use_code(self, code: str) -> tuple[dict | None, str]:
        """``(entry, "ok"|"used"|"expired"|"invalid")``; a code works once."""
        with self._lock:
            entry = self._codes.get(code)
            if entry is None:
                return None, "invalid"
            if entry["used"]:
                return entry, "used"
            entry["used"] = True
            if entry["expires_at"] < time.time():
                return entry, "expired"
            return entry, "ok"

    def issue(self, app_id: str, kind: str, scopes: Iterable[str]) -> tuple[str, int]:
        token = "EAA" + secrets.token_urlsafe(96 if kind == "long" else 64).replace("-", "Z").replace("_", "Y")
        with self._lock:
            ttl = self.long_ttl if kind == "long" else self.short_ttl
            self._tokens[token] = _Token(app_id, kind, time.time() + ttl, tuple(scopes))
            self._save()
        return token, ttl

    def get(self, token: str) -> _Token | None:
        with self._lock:
            return self._tokens.get(token)

    def check(self, token: str) -> str:
        with self._lock:
            entry = self._tokens.get(token)
            if entry is None:
                return "invalid"
            if entry.revoked:
                return "revoked"
            if entry.expires_at <= time.time():
                return "expired"
            return "ok"

    def expire(self, token: str | None = None) -> int:
        with self._lock:
            targets = [self._tokens[token]] if token in self._tokens else [] if token else list(self._tokens.values())
            for entry in targets:
                entry.expires_at = min(entry.expires_at, time.time() - 1)
            self._save()
            return len(targets)

    def revoke(self, token: str | None = None) -> int:
        with self._lock:
            targets = [self._tokens[token]] if token in self._tokens else [] if token else list(self._tokens.values())
            for entry in targets:
                entry.revoked = True
            self._save()
            return len(targets)

    def set_ttl(self, long_ttl: int | None = None, short_ttl: int | None = None) -> None:
        with self._lock:
            if long_ttl is not None:
                self.long_ttl = int(long_ttl)
            if short_ttl is not None:
                self.short_ttl = int(short_ttl)

    def reset(self) -> None:
        with self._lock:
            self.short_ttl, self.long_ttl = self.default_short_ttl, self.default_long_ttl


# =============================================================================================
# the platform sandbox
# =============================================================================================

@dataclasses.dataclass
class _Run:
    id: str
    account_id: str
    params: dict
    created: float
    polls: int = 0
    fail: bool = False


class MetaSandbox:
    """Meta OAuth + Graph/Marketing API stand-in (see the module docstring).

    Options (``SandboxServer(options={"meta": {...}})``): ``accounts`` (list of ``{id, name, currency,
    time_zone}``), ``campaigns_per_account`` (30), ``app_id``, ``app_secret``, ``redirect_uris`` (exact
    list; default any loopback URI), ``short_token_ttl`` (7200 s), ``long_token_ttl`` (60 days),
    ``require_appsecret_proof`` (False: verified when present), ``async_polls`` (2: polls until a report
    run completes), ``sync_cell_limit`` (12,000 period × campaign cells per synchronous insights call),
    ``usage_capacity`` (calls per account per 5 minutes that count as 100 % usage; 3000),
    ``app_name``.
    """

    id = "meta"

    def __init__(self, server, seed: int = 7, options: dict | None = None):
        options = dict(options or {})
        self.server = server
        self.seed = seed
        self.options = options
        self.data = MetaSandboxData(seed, accounts=options.get("accounts"),
                                    campaigns_per_account=int(options.get("campaigns_per_account", 30)))
        self.app_id = str(options.get("app_id", 900000000000000 + stable_int(seed, "meta-app") % 99_999_999))
        self.app_secret = options.get("app_secret", f"{stable_int(seed, 'meta-secret'):016x}" * 2)
        self.app_name = options.get("app_name", "Unified Ads (sandbox)")
        self.redirect_uris = options.get("redirect_uris")
        self.faults = FaultInjector()
        self.tokens = MetaTokens(int(options.get("short_token_ttl", SHORT_TOKEN_TTL)),
                                 int(options.get("long_token_ttl", LONG_TOKEN_TTL)),
                                 state_file=Path(server.data_dir) / f"meta-oauth-state-{seed}.json")
        self.default_require_proof = bool(options.get("require_appsecret_proof", False))
        self.require_proof = self.default_require_proof
        self.async_polls = max(1, int(options.get("async_polls", ASYNC_POLLS)))
        self.sync_cell_limit = int(options.get("sync_cell_limit", SYNC_CELL_LIMIT))
        self.usage_capacity = max(1, int(options.get("usage_capacity", 3000)))
        self._lock = threading.Lock()
        self._runs: collections.OrderedDict[str, _Run] = collections.OrderedDict()
        self._run_counter = 0
        self._fail_next_runs = 0
        self._throttles: dict[str | None, tuple[float, int]] = {}  # account (None = app) -> (until, code)
        self._forced_usage: dict[str, int] = {}
        self._calls: collections.Counter = collections.Counter()
        self._usage_log: dict[str, collections.deque] = collections.defaultdict(collections.deque)

    # ---- SandboxServer interface ---------------------------------------------------------------
    def register_routes(self, app) -> None:
        app.register_blueprint(self._www_blueprint())
        app.register_blueprint(self._graph_blueprint())
        app.register_blueprint(self._admin_blueprint())

    def start(self) -> None:
        """Nothing to start: everything is served by the shared HTTP server."""

    def stop(self) -> None:
        """Nothing to stop."""

    @property
    def graph_url(self) -> str:
        """The graph.facebook.com stand-in (no trailing slash): ``FacebookSession.GRAPH`` for the SDK."""
        return f"{self.server.base_url}/meta/graph"

    @property
    def dialog_url(self) -> str:
        return f"{self.server.base_url}/meta/www/{API_VERSION}/dialog/oauth"

    def env(self) -> dict[str, str]:
        """``META_*`` variables for ``MetaAdsSettings`` (report runs finish within a few polls here, so
        the connector polls them quickly)."""
        return {
            "META_APP_ID": self.app_id,
            "META_APP_SECRET": self.app_secret,
            "META_DIALOG_URL": self.dialog_url,
            "META_GRAPH_URL": self.graph_url,
            "META_API_VERSION": API_VERSION,
            "META_ASYNC_POLL_SECONDS": "0.2",
        }

    # ---- truth in document form ----------------------------------------------------------------
    def connect_form_values(self) -> dict[str, str]:
        """Values for the portal's connect form before the redirect (Meta needs none)."""
        return {}

    def expected_campaigns(self, account_id: str) -> Iterator[dict[str, Any]]:
        """The campaign documents a correct connector produces: budgets as exact ``Decimal`` currency
        units (minor units ÷ 10^exponent; JPY has exponent 0), dates account-local ``YYYY-MM-DD``."""
        account = self.data.account(account_id)
        for c in self.data.campaigns(account.id):
            minor = c.daily_budget if c.daily_budget is not None else c.lifetime_budget
            yield {"account_id": account.id, "campaign_id": c.id, "name": c.name, "status": c.status,
                   "effective_status": c.status, "objective": c.objective, "currency": account.currency,
                   "budget": Decimal(minor).scaleb(-account.exponent) if minor is not None else None,
                   "budget_period": "DAILY" if c.daily_budget is not None else
                   ("LIFETIME" if c.lifetime_budget is not None else None),
                   "start_date": c.start_date.isoformat(),
                   "end_date": c.stop_date.isoformat() if c.stop_date else None}

    def expected_metrics(self, account_id: str, start: dt.date, end: dt.date) -> Iterator[dict[str, Any]]:
        """The metric documents a correct connector produces for ``[start, end]`` (account-local dates):
        ``{account_id, campaign_id, date, impressions, clicks, spend (Decimal currency units), currency,
        conversions (Decimal: purchase + lead + mobile_app_install + complete_registration actions)}``."""
        account = self.data.account(account_id)
        for row in self.data.daily_metrics(account.id, start, end):
            yield {"account_id": account.id, "campaign_id": row["campaign_id"], "date": row["date"].isoformat(),
                   "impressions": row["impressions"], "clicks": row["clicks"],
                   "spend": Decimal(row["spend_minor"]).scaleb(-account.exponent), "currency": account.currency,
                   "conversions": Decimal(sum(row["actions"].get(t, 0) for t in CONVERSION_ACTION_TYPES))}

    # ---- knobs (Python) ------------------------------------------------------------------------
    def expire_tokens(self, token: str | None = None) -> int:
        """Expire one token or all now: the API answers 190/463 and ``fb_exchange_token`` refuses them."""
        return self.tokens.expire(token)

    def revoke(self, token: str | None = None) -> int:
        """The user removed the app (one token or all): 190/458."""
        return self.tokens.revoke(token)

    def throttle(self, account_id: str | None, seconds: float, code: int | None = None) -> None:
        """Rate-limit one ad account (``code`` 80000 for insights / 80004 for other calls by default,
        or 17 / 613) or, with ``account_id=None``, the whole app (code 4) for ``seconds``.
        ``estimated_time_to_regain_access`` reports the remaining whole minutes (0 under a minute)."""
        key = str(account_id).removeprefix("act_") if account_id else None
        with self._lock:
            self._throttles[key] = (time.time() + float(seconds), int(code) if code else 0)

    def unthrottle(self, account_id: str | None = None) -> None:
        with self._lock:
            if account_id is None:
                self._throttles.clear()
            else:
                self._throttles.pop(str(account_id).removeprefix("act_"), None)

    def set_usage(self, account_id: str, pct: int) -> None:
        """Report at least ``pct`` % usage for an account (to exercise the connector's pacing)."""
        with self._lock:
            self._forced_usage[str(account_id).removeprefix("act_")] = int(pct)

    def inject_fault(self, kind: str, count: int = 1, target: str = "api", regain_minutes: int = 0) -> None:
        """Make the next ``count`` calls to ``target`` (api, token, insights, campaigns, accounts) fail with
        ``kind``: transient (code 2, HTTP 500), unknown (code 1), http_500/http_503 (no JSON body),
        rate_limit (17 with ``regain_minutes``), expired_token (190/463), invalid_token (190),
        permission (200). ``async_failed``: the next ``count`` report runs end with "Job Failed"."""
        kind = kind.lower()
        if kind == "async_failed":
            with self._lock:
                self._fail_next_runs += int(count)
            return
        self.faults.inject(kind, count, target=target, regain_minutes=int(regain_minutes))

    def set_latency(self, seconds: float) -> None:
        self.faults.set_latency(seconds)

    def set_require_proof(self, on: bool) -> None:
        self.require_proof = bool(on)

    def issue_token(self) -> dict[str, Any]:
        """A long-lived user token for the sandbox user, without the dialog (benchmarks, peers)."""
        token, ttl = self.tokens.issue(self.app_id, "long", ("ads_read", "business_management"))
        return {"access_token": token, "token_type": "bearer", "expires_in": ttl}

    def restate(self, days: int = 3) -> dt.date:
        return self.data.restate(days)

    def reset(self) -> None:
        """Clear faults, latency, throttles, forced usage, restatements, token TTLs and the proof
        requirement. Tokens stay valid."""
        self.faults.reset()
        self.tokens.reset()
        self.data.reset_restatements()
        self.require_proof = self.default_require_proof
        with self._lock:
            self._throttles.clear()
            self._forced_usage.clear()
            self._fail_next_runs = 0
            self._usage_log.clear()

    def stats(self) -> dict[str, int]:
        """Calls received per kind (``accounts``, ``campaigns``, ``insights``, ``insights_async``,
        ``report_run``, ``report_results``, ``batch``, ``token`` …) and ``proof_valid``/``proof_missing``/
        ``proof_invalid``, ``throttled``, ``faults``."""
        with self._lock:
            return dict(self._calls)

    def reset_stats(self) -> None:
        with self._lock:
            self._calls.clear()

    # ---- usage accounting ----------------------------------------------------------------------
    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._calls[key] += n

    def _record_usage(self, account_id: str) -> None:
        now = time.time()
        with self._lock:
            log_ = self._usage_log[account_id]
            log_.append(now)
            while log_ and log_[0] < now - 300:
                log_.popleft()

    def _throttle_state(self, account_id: str | None) -> tuple[float, int] | None:
        with self._lock:
            entry = self._throttles.get(account_id)
        if entry and entry[0] > time.time():
            return entry
        return None

    def _usage(self, account_id: str, kind: str) -> dict[str, Any]:
        with self._lock:
            calls = len(self._usage_log.get(account_id, ()))
            forced = self._forced_usage.get(account_id, 0)
        pct = max(forced, min(100, calls * 100 // self.usage_capacity))
        regain = 0
        state = self._throttle_state(account_id)
        if state:
            pct = max(pct, 100)
            regain = int((state[0] - time.time()) // 60)
        return {"type": "ads_insights" if kind in INSIGHT_KINDS else "ads_management", "call_count": pct,
                "total_cputime": max(0, pct - 7) if pct < 100 else pct, "total_time": max(0, pct - 4) if pct < 100 else pct,
                "estimated_time_to_regain_access": regain, "ads_api_access_tier": "standard_access"}

    def _headers(self, account_id: str | None, kind: str) -> dict[str, str]:
        trace = base64.b64encode(secrets.token_bytes(9)).decode()
        headers = {"x-fb-trace-id": trace, "x-fb-request-id": secrets.token_hex(8), "x-fb-rev": "1010000000",
                   "facebook-api-version": API_VERSION}
        app_state = self._throttle_state(None)
        app_pct = 100 if app_state else 0
        headers["x-app-usage"] = json.dumps({"call_count": app_pct, "total_cputime": app_pct, "total_time": app_pct})
        if account_id:
            usage = self._usage(account_id, kind)
            headers["x-business-use-case-usage"] = json.dumps({account_id: [usage]})
            if kind in INSIGHT_KINDS:
                headers["x-fb-ads-insights-throttle"] = json.dumps(
                    {"app_id_util_pct": app_pct, "acc_id_util_pct": usage["call_count"],
                     "ads_api_access_tier": "standard_access"})
                headers["x-ad-account-usage"] = json.dumps(
                    {"acc_id_util_pct": usage["call_count"], "reset_time_duration": usage["estimated_time_to_regain_access"] * 60,
                     "ads_api_access_tier": "standard_access"})
        elif kind in INSIGHT_KINDS:
            headers["x-fb-ads-insights-throttle"] = json.dumps(
                {"app_id_util_pct": app_pct, "acc_id_util_pct": 0, "ads_api_access_tier": "standard_access"})
        return headers

    # ---- request handling ----------------------------------------------------------------------
    def handle(self, method: str, path: str, params: dict[str, Any], auth_header: str | None,
               url_base: str) -> tuple[int, dict[str, str], Any]:
        """Answer one Graph API call: ``(HTTP status, headers, JSON body)``. ``url_base`` is the absolute
        URL of the call without its query (for ``paging.next``)."""
        segments = [s for s in path.split("/") if s]
        version = None
        if segments and re.fullmatch(r"v\d+\.\d+", segments[0]):
            version = segments.pop(0)
        account_id: str | None = None
        kind = "other"
        try:
            kind, account_id = self._classify(method, segments)
            self._count(kind)
            if kind == "token":
                return 200, self._headers(None, kind), self._token_endpoint(params)
            if kind == "batch":
                return self._batch(params, auth_header, url_base, version)
            self._authenticate(params, auth_header)
            self._apply_faults(kind)
            if account_id:
                self._check_throttle(account_id, kind)
                self._record_usage(account_id)
            elif self._throttle_state(None):
                self._check_throttle(None, kind)
            self.faults.delay()
            body = self._route(method, segments, params, url_base, kind)
            return 200, self._headers(account_id, kind), body
        except GraphError as exc:
            headers = self._headers(account_id, kind)
            headers.update(exc.headers)
            if exc.code == 190:
                headers["WWW-Authenticate"] = f'OAuth "Facebook Platform" "invalid_token" "{exc.message[:80]}"'
            if exc.status in (500, 503) and exc.code == -1:
                return exc.status, headers, None
            return exc.status, headers, exc.body(headers["x-fb-trace-id"])

    def _classify(self, method: str, segments: list[str]) -> tuple[str, str | None]:
        if not segments:
            if method == "POST":
                return "batch", None
            raise GraphError(100, "Unsupported get request.", kind="GraphMethodException")
        head = segments[0]
        if segments == ["oauth", "access_token"]:
            return "token", None
        if head == "me":
            return ("accounts" if segments[1:] == ["adaccounts"] else "me"), None
        if head == "debug_token":
            return "debug_token", None
        if head.startswith("act_"):
            account_id = head[4:]
            edge = segments[1] if len(segments) > 1 else ""
            if edge == "insights":
                return ("insights_async" if method == "POST" else "insights"), account_id
            if edge == "campaigns":
                return "campaigns", account_id
            return "account", account_id
        with self._lock:
            run = self._runs.get(head)
        if run is not None:
            return ("report_results" if segments[1:] == ["insights"] else "report_run"), run.account_id
        campaign = self.data.campaign(head)
        child = self.data.child(head)
        target = campaign or (child[1] if child else None)
        if target is not None:
            if segments[1:] == ["insights"]:
                return ("insights_async" if method == "POST" else "insights"), target.account_id
            return "campaign" if campaign else "node", target.account_id
        return "unknown", None

    def _authenticate(self, params: dict[str, Any], auth_header: str | None) -> None:
        token = params.get("access_token")
        if not token and auth_header:
            scheme, _, value = auth_header.partition(" ")
            if scheme.lower() in ("oauth", "bearer"):
                token = value.strip()
        if not token:
            raise GraphError(104, "An access token is required to request this resource.")
        state = self.tokens.check(token)
        if state == "invalid":
            raise GraphError(190, "Invalid OAuth access token - Cannot parse access token")
        entry = self.tokens.get(token)
        proof = params.get("appsecret_proof")
        if proof:
            expected = hmac.new(self.app_secret.encode(), token.encode(), hashlib.sha256).hexdigest()
            if not hmac.compare_digest(str(proof), expected):
                self._count("proof_invalid")
                raise GraphError(100, "Invalid appsecret_proof provided in the API argument",
                                 kind="GraphMethodException")
            self._count("proof_valid")
        else:
            self._count("proof_missing")
            if self.require_proof:
                raise GraphError(100, "API calls from the server require an appsecret_proof argument",
                                 kind="GraphMethodException")
        if state == "revoked":
            raise GraphError(190, "Error validating access token: The user has not authorized application "
                                  f"{entry.app_id}.", subcode=458)
        if state == "expired":
            when = dt.datetime.fromtimestamp(entry.expires_at, dt.timezone.utc)
            raise GraphError(190, "Error validating access token: Session has expired on "
                                  f"{when:%A, %d-%b-%y %H:%M:%S} PST. The current time is "
                                  f"{dt.datetime.now(dt.timezone.utc):%A, %d-%b-%y %H:%M:%S} PST.", subcode=463)

    def _apply_faults(self, kind: str) -> None:
        target = {"insights": "insights", "insights_async": "insights", "report_run": "insights",
                  "report_results": "insights", "campaigns": "campaigns", "campaign": "campaigns",
                  "accounts": "accounts", "account": "accounts"}.get(kind)
        fault = (self.faults.take(target) if target else None) or self.faults.take("api")
        if fault is None:
            return
        self._count("faults")
        self._raise_fault(fault)

    def _raise_fault(self, fault) -> None:
        kind = fault.kind
        if kind == "transient":
            raise GraphError(2, "An unexpected error has occurred. Please retry your request later.",
                             status=500, transient=True)
        if kind == "unknown":
            raise GraphError(1, "An unknown error occurred", subcode=99, status=500)
        if kind in ("http_500", "http_503"):
            raise GraphError(-1, "", status=500 if kind == "http_500" else 503)
        if kind == "rate_limit":
            regain = int(fault.extra.get("regain_minutes", 0))
            usage = {"call_count": 100, "total_cputime": 100, "total_time": 100,
                     "estimated_time_to_regain_access": regain, "type": "ads_management"}
            raise GraphError(17, RATE_LIMIT_MESSAGES[17], subcode=2446079,
                             headers={"x-business-use-case-usage": json.dumps({"0": [usage]}),
                                      "x-app-usage": json.dumps({"call_count": 100, "total_cputime": 40, "total_time": 60})})
        if kind == "expired_token":
            raise GraphError(190, "Error validating access token: Session has expired.", subcode=463)
        if kind == "invalid_token":
            raise GraphError(190, "Invalid OAuth access token - Cannot parse access token")
        if kind == "permission":
            raise GraphError(200, "(#200) Ad account owner has NOT grant ads_management or ads_read permission",
                             kind="OAuthException")
        raise GraphError(1, f"An unknown error occurred ({kind})", status=500)

    def _check_throttle(self, account_id: str | None, kind: str) -> None:
        state = self._throttle_state(account_id) or self._throttle_state(None)
        if not state:
            return
        self._count("throttled")
        until, code = state
        if account_id is None or self._throttle_state(account_id) is None:
            code = 4
        elif not code:
            code = 80000 if kind in INSIGHT_KINDS else 80004
        raise GraphError(code, RATE_LIMIT_MESSAGES.get(code, RATE_LIMIT_MESSAGES[80004]),
                         subcode=RATE_LIMIT_SUBCODES.get(code), transient=False,
                         user_title="Ad Account Has Too Many API Calls" if code >= 80000 else None,
                         user_msg="There have been too many calls from this ad-account. Please wait a bit and try again."
                         if code >= 80000 else None)

    # ---- Graph routes --------------------------------------------------------------------------
    def _route(self, method: str, segments: list[str], params: dict, url_base: str, kind: str) -> Any:
        if kind == "me":
            return {"id": USER["id"], "name": USER["name"]}
        if kind == "debug_token":
            entry = self.tokens.get(params.get("input_token") or "")
            return {"data": {"app_id": entry.app_id if entry else self.app_id, "type": "USER",
                             "application": self.app_name, "is_valid": bool(entry and self.tokens.check(params["input_token"]) == "ok"),
                             "expires_at": int(entry.expires_at) if entry else 0,
                             "scopes": list(entry.scopes) if entry else [], "user_id": USER["id"]}}
        if kind == "accounts":
            return self._ad_accounts(params, url_base)
        if kind == "account":
            account = self._account_or_error(segments[0][4:])
            if len(segments) > 1:
                raise GraphError(100, f"(#100) Unknown edge {segments[1]!r} on AdAccount (the sandbox serves "
                                      "campaigns and insights)")
            return self._account_node(account, _fields_param(params.get("fields")) or ["id", "account_id"])
        if kind == "campaigns":
            return self._campaigns(self._account_or_error(segments[0][4:]), params, url_base)
        if kind == "campaign":
            campaign = self.data.campaign(segments[0])
            return self._campaign_node(campaign, _fields_param(params.get("fields")) or ["id", "name"])
        if kind == "node":
            level, campaign = self.data.child(segments[0])
            name = f"{campaign.name} - {'Ad set' if level == 'adset' else 'Ad'}"
            return {"id": segments[0], "name": name, "campaign_id": campaign.id, "account_id": campaign.account_id,
                    "status": campaign.status, "effective_status": campaign.status}
        if kind == "insights":
            if segments[0].startswith("act_"):
                account = self._account_or_error(segments[0][4:])
                query = self._insights_query(account, params, None)
            else:
                query = self._insights_query(None, params, segments[0])
            if query.cells > self.sync_cell_limit:
                raise GraphError(1, "Please reduce the amount of data you're asking for, then retry your request",
                                 subcode=1487534, status=500)
            return self._insights_page(query, params, url_base)
        if kind == "insights_async":
            if segments[0].startswith("act_"):
                account = self._account_or_error(segments[0][4:])
                self._insights_query(account, params, None)  # validate now, like Meta
            else:
                self._insights_query(None, params, segments[0])
            return {"report_run_id": self._create_run(segments[0], params)}
        if kind == "report_run":
            return self._run_node(segments[0], _fields_param(params.get("fields")))
        if kind == "report_results":
            return self._run_results(segments[0], params, url_base)
        raise GraphError(100, f"Unsupported get request. Object with ID '{segments[0]}' does not exist, cannot be "
                              "loaded due to missing permissions, or does not support this operation.",
                         subcode=33, kind="GraphMethodException")

    def _account_or_error(self, account_id: str) -> SandboxAdAccount:
        account = self.data.account(account_id)
        if account is None:
            raise GraphError(100, f"(#100) Ad account owner has NOT grant ads_management or ads_read permission "
                                  f"(act_{account_id} is not reachable)", subcode=33)
        return account

    def _account_node(self, account: SandboxAdAccount, fields: list[str]) -> dict:
        tz = zoneinfo.ZoneInfo(account.time_zone)
        offset = dt.datetime.now(tz).utcoffset().total_seconds() / 3600
        values = {"id": f"act_{account.id}", "account_id": account.id, "name": account.name,
                  "currency": account.currency, "timezone_name": account.time_zone,
                  "timezone_offset_hours_utc": offset, "account_status": account.status,
                  "business_name": "Sandbox Business", "amount_spent": "0", "age": 1000.0, "disable_reason": 0,
                  "owner": USER["id"], "timezone_id": 1}
        out = {f: values[f] for f in fields if f in values}
        out.setdefault("id", values["id"])
        return out

    def _page(self, items: list, start: int, limit: int, params: dict, url_base: str) -> dict:
        """A list page with ``before``/``after`` cursors and an absolute ``next`` URL when more remain."""
        chunk = items[start:start + limit]
        body: dict[str, Any] = {"data": chunk}
        if chunk:
            paging: dict[str, Any] = {"cursors": {"before": _encode_cursor(start), "after": _encode_cursor(start + len(chunk) - 1)}}
            if start + limit < len(items):
                paging["next"] = self._next_url(url_base, params, _encode_cursor(start + len(chunk) - 1))
            if start > 0:
                paging["previous"] = self._next_url(url_base, params, None, before=_encode_cursor(start))
            body["paging"] = paging
        return body

    @staticmethod
    def _next_url(url_base: str, params: dict, after: str | None, before: str | None = None) -> str:
        query = {k: v for k, v in params.items() if k not in ("after", "before", "batch")}
        if after:
            query["after"] = after
        if before:
            query["before"] = before
        return url_base + "?" + urlencode({k: v if isinstance(v, str) else json.dumps(v) for k, v in query.items()})

    @staticmethod
    def _limit(params: dict) -> int:
        try:
            limit = int(params.get("limit") or DEFAULT_LIMIT)
        except ValueError:
            raise GraphError(100, "(#100) param limit must be an integer") from None
        return max(1, min(MAX_LIMIT, limit))

    def _offset(self, params: dict) -> int:
        cursor = _decode_cursor(params.get("after"), 1)
        return cursor[0] + 1 if cursor else 0

    def _ad_accounts(self, params: dict, url_base: str) -> dict:
        fields = _fields_param(params.get("fields")) or ["account_id", "id"]
        items = [self._account_node(a, fields) for a in self.data.accounts()]
        body = self._page(items, self._offset(params), self._limit(params), params, url_base)
        if _bool_param(params.get("summary")):
            body["summary"] = {"total_count": len(items)}
        return body

    def _campaign_node(self, c: SandboxMetaCampaign, fields: list[str]) -> dict:
        account = self.data.account(c.account_id)
        tz = account.time_zone
        updated = c.last_active or c.start_date
        values = {
            "id": c.id, "account_id": c.account_id, "name": c.name, "status": c.status,
            "configured_status": c.status, "effective_status": c.status, "objective": c.objective,
            "buying_type": "AUCTION", "bid_strategy": "LOWEST_COST_WITHOUT_CAP",
            "start_time": _iso_local(c.start_date, 9, tz),
            "created_time": _iso_local(c.start_date - dt.timedelta(days=2), 14, tz),
            "updated_time": _iso_local(min(updated, self.data.anchor), 10, tz),
            "special_ad_categories": [], "special_ad_category": "NONE", "source_campaign_id": "0",
            "smart_promotion_type": "GUIDED_CREATION", "can_use_spend_cap": True, "spend_cap": None,
            "is_skadnetwork_attribution": False, "budget_rebalance_flag": False, "pacing_type": ["standard"],
            "primary_attribution": None, "issues_info": None, "adlabels": None,
        }
        if c.stop_date:
            values["stop_time"] = _iso_local(c.stop_date, 23, tz)
        if c.daily_budget is not None:
            values["daily_budget"] = str(c.daily_budget)
            values["budget_remaining"] = str(c.daily_budget // 2)
        if c.lifetime_budget is not None:
            values["lifetime_budget"] = str(c.lifetime_budget)
            values["budget_remaining"] = str(c.lifetime_budget // 3)
        out = {f: values[f] for f in fields if values.get(f) is not None}
        out["id"] = c.id
        return out

    def _status_filter(self, params: dict, prefix: str) -> tuple[set[str] | None, list[tuple[str, str, Any]]]:
        """Statuses selected by ``effective_status`` / ``filtering`` (None = default visibility), and the
        other filter clauses ``(field, operator, value)``."""
        statuses: set[str] | None = None
        explicit = _list_param(params.get("effective_status"), "effective_status")
        if explicit:
            statuses = {s.upper() for s in explicit}
        others = []
        filtering = _json_param(params.get("filtering"), "filtering") or []
        if not isinstance(filtering, list):
            raise GraphError(100, "(#100) param filtering must be an array.")
        for clause in filtering:
            if not isinstance(clause, dict) or not {"field", "operator"} <= set(clause):
                raise GraphError(100, "(#100) Filtering field must have 'field', 'operator' and 'value'.")
            field = str(clause["field"])
            op = str(clause["operator"]).upper()
            value = clause.get("value")
            if field in (f"{prefix}effective_status", "effective_status", f"{prefix}delivery_status"):
                values = {str(v).upper() for v in (value if isinstance(value, list) else [value])}
                if op == "IN":
                    statuses = values if statuses is None else statuses & values
                elif op == "NOT_IN":
                    statuses = (set(ALL_EFFECTIVE_STATUSES) if statuses is None else statuses) - values
                elif op == "EQUAL":
                    statuses = values
                else:
                    raise GraphError(100, f"(#100) Operator {op} is not supported on {field}")
            else:
                others.append((field, op, value))
        return statuses, others

    @staticmethod
    def _matches(c: SandboxMetaCampaign, clauses, updated_epoch: float, prefix: str) -> bool:
        for field, op, value in clauses:
            if field in ("id", f"{prefix}id", "campaign.id"):
                values = {str(v) for v in (value if isinstance(value, list) else [value])}
                ok = c.id in values
                if (op in ("IN", "EQUAL") and not ok) or (op in ("NOT_IN", "NOT_EQUAL") and ok):
                    return False
            elif field in ("updated_time", f"{prefix}updated_time"):
                try:
                    target = float(value)
                except (TypeError, ValueError):
                    raise GraphError(100, "(#100) updated_time filter needs an epoch value") from None
                if (op == "GREATER_THAN" and not updated_epoch > target) or \
                        (op == "LESS_THAN" and not updated_epoch < target) or \
                        (op == "GREATER_THAN_OR_EQUAL" and not updated_epoch >= target) or \
                        (op == "LESS_THAN_OR_EQUAL" and not updated_epoch <= target):
                    return False
            elif field in ("name", f"{prefix}name") and op == "CONTAIN":
                if str(value).lower() not in c.name.lower():
                    return False
            # other clauses (objective, spend …) are accepted and ignored by the sandbox
        return True

    def _select_campaigns(self, account: SandboxAdAccount, params: dict, prefix: str) -> list[SandboxMetaCampaign]:
        statuses, clauses = self._status_filter(params, prefix)
        visible = statuses if statuses is not None else DEFAULT_VISIBLE
        out = []
        for c in self.data.campaigns(account.id):
            if c.status not in visible:
                continue
            if clauses:
                updated = dt.datetime.strptime(self._campaign_node(c, ["updated_time"])["updated_time"],
                                               "%Y-%m-%dT%H:%M:%S%z").timestamp()
                if not self._matches(c, clauses, updated, prefix):
                    continue
            out.append(c)
        return out

    def _campaigns(self, account: SandboxAdAccount, params: dict, url_base: str) -> dict:
        fields = _fields_param(params.get("fields")) or ["id"]
        campaigns = self._select_campaigns(account, params, "campaign.")
        start, limit = self._offset(params), self._limit(params)
        items = [self._campaign_node(c, fields) for c in campaigns[start:start + limit]]
        body: dict[str, Any] = {"data": items}
        if items:
            paging: dict[str, Any] = {"cursors": {"before": _encode_cursor(start),
                                                  "after": _encode_cursor(start + len(items) - 1)}}
            if start + limit < len(campaigns):
                paging["next"] = self._next_url(url_base, params, _encode_cursor(start + len(items) - 1))
            body["paging"] = paging
        if _bool_param(params.get("summary")):
            body["summary"] = {"total_count": len(campaigns)}
        return body

    # ---- insights ------------------------------------------------------------------------------
    def _insights_query(self, account: SandboxAdAccount | None, params: dict, object_id: str | None) -> InsightsQuery:
        if account is None:
            campaign = self.data.campaign(object_id)
            child = None if campaign else self.data.child(object_id)
            campaign = campaign or child[1]
            account = self.data.account(campaign.account_id)
            campaigns = [campaign]
            default_level = child[0] if child else "campaign"
        else:
            campaigns = None
            default_level = "account"
        level = str(params.get("level") or default_level)
        if level not in ("account", "campaign", "adset", "ad"):
            raise GraphError(100, "(#100) level must be one of the following values: ad, adset, campaign, account")
        if campaigns is None:
            # without a campaign.effective_status filter, DELETED/ARCHIVED campaigns are left out
            campaigns = self._select_campaigns(account, params, "campaign.")
        fields = _fields_param(params.get("fields")) or list(DEFAULT_INSIGHT_FIELDS)
        today = self.data.local_today(account.id)
        increment = _json_param(params.get("time_increment"), "time_increment")
        ranges = _json_param(params.get("time_ranges"), "time_ranges")
        time_range = _json_param(params.get("time_range"), "time_range")
        if ranges:
            if not isinstance(ranges, list):
                raise GraphError(100, "(#100) param time_ranges must be an array.")
            spans = [self._parse_range(r, today) for r in ranges]
        elif time_range:
            spans = [self._parse_range(time_range, today)]
        else:
            spans = [_date_preset(str(params.get("date_preset") or "last_30d"), today)]
        periods = []
        for start, end in spans:
            periods.extend(_split(start, end, increment if not ranges or increment else None))
        return InsightsQuery(account.id, level, fields, periods, campaigns)

    def _parse_range(self, value: Any, today: dt.date) -> tuple[dt.date, dt.date]:
        if not isinstance(value, dict) or "since" not in value or "until" not in value:
            raise GraphError(100, "(#100) time_range must contain since and until")
        try:
            since = dt.date.fromisoformat(str(value["since"]))
            until = dt.date.fromisoformat(str(value["until"]))
        except ValueError:
            raise GraphError(100, "(#100) time_range dates must be YYYY-MM-DD", subcode=1487472) from None
        if since > until:
            raise GraphError(100, "(#100) The since date must be before the until date", subcode=1487472)
        if since < _months_ago(today, MAX_HISTORY_MONTHS):
            raise GraphError(100, "(#3018) The start date of the time range cannot be beyond 37 months from the "
                                  "current date", subcode=1487472, user_title="Invalid time range")
        return since, until

    def _insights_rows(self, query: InsightsQuery, period_index: int, object_index: int) -> Iterator[tuple[int, int, dict]]:
        """``(period index, object index, row)`` from a position on, in period-major order."""
        account = self.data.account(query.account_id)
        today = self.data.local_today(account.id)
        if query.level == "account":
            objects: list[Any] = [None]
        else:
            objects = query.campaigns
        for p in range(period_index, len(query.periods)):
            start, end = query.periods[p]
            if start > today:
                break
            for o in range(object_index if p == period_index else 0, len(objects)):
                members = query.campaigns if objects[o] is None else [objects[o]]
                totals = _Totals()
                day = start
                while day <= min(end, today):
                    for campaign in members:
                        totals.add(self.data.metrics_for(campaign, day))
                    day += dt.timedelta(days=1)
                if not totals.impressions:
                    continue
                yield p, o, self._insight_row(query, account, objects[o], start, end, totals)

    def _insight_row(self, query: InsightsQuery, account: SandboxAdAccount, campaign, start, end, t: "_Totals") -> dict:
        spend = _money(t.spend_minor, account.exponent)
        spend_units = Decimal(t.spend_minor).scaleb(-account.exponent)
        values: dict[str, Any] = {
            "account_id": account.id, "account_name": account.name, "account_currency": account.currency,
            "impressions": str(t.impressions), "clicks": str(t.clicks), "spend": spend, "reach": str(t.reach),
            "frequency": format(Decimal(t.impressions) / Decimal(max(1, t.reach)), ".6f"),
            "ctr": format(Decimal(t.clicks * 100) / Decimal(t.impressions), ".6f"),
            "cpm": format(spend_units * 1000 / Decimal(t.impressions), ".6f"),
            "inline_link_clicks": str(t.actions.get("link_click", 0)), "unique_clicks": str(t.clicks),
            "buying_type": "AUCTION",
        }
        if t.clicks:
            values["cpc"] = format(spend_units / Decimal(t.clicks), ".6f")
        if t.actions:
            values["actions"] = [{"action_type": k, "value": str(v)} for k, v in sorted(t.actions.items())]
        if campaign is not None and query.level in ("campaign", "adset", "ad"):
            values.update(campaign_id=campaign.id, campaign_name=campaign.name, objective=campaign.objective)
            if query.level in ("adset", "ad"):
                values.update(adset_id=campaign.adset_id, adset_name=f"{campaign.name} - Ad set",
                              optimization_goal="OFFSITE_CONVERSIONS")
            if query.level == "ad":
                values.update(ad_id=campaign.ad_id, ad_name=f"{campaign.name} - Ad")
        row = {f: values[f] for f in query.fields if f in values}
        row["date_start"] = start.isoformat()
        row["date_stop"] = end.isoformat()
        return row

    def _insights_page(self, query: InsightsQuery, params: dict, url_base: str) -> dict:
        limit = self._limit(params)
        cursor = _decode_cursor(params.get("after"), 2)
        p0, o0 = (cursor[0], cursor[1] + 1) if cursor else (0, 0)
        rows, last, more, first = [], None, False, None
        for p, o, row in self._insights_rows(query, p0, o0):
            if len(rows) >= limit:
                more = True
                break
            rows.append(row)
            last = (p, o)
            first = first or (p, o)
        body: dict[str, Any] = {"data": rows}
        if rows:
            paging: dict[str, Any] = {"cursors": {"before": _encode_cursor(*first), "after": _encode_cursor(*last)}}
            if more:
                paging["next"] = self._next_url(url_base, params, _encode_cursor(*last))
            body["paging"] = paging
        return body

    # ---- async report runs ---------------------------------------------------------------------
    def _create_run(self, node: str, params: dict) -> str:
        account_id = node[4:] if node.startswith("act_") else None
        if account_id is None:
            c = self.data.campaign(node) or self.data.child(node)[1]
            account_id = c.account_id
        with self._lock:
            self._run_counter += 1
            run_id = str(6_000_000_000_000_000 + stable_int(self.seed, "run-base") % 10**12 * 1000 + self._run_counter)
            fail = self._fail_next_runs > 0
            if fail:
                self._fail_next_runs -= 1
            stored = {k: v for k, v in params.items() if k not in ("access_token", "appsecret_proof")}
            stored["_node"] = node
            self._runs[run_id] = _Run(run_id, account_id, stored, time.time(), fail=fail)
            while len(self._runs) > MAX_RUNS:
                self._runs.popitem(last=False)
        return run_id

    def _run_node(self, run_id: str, fields: list[str]) -> dict:
        with self._lock:
            run = self._runs[run_id]
            run.polls += 1
            polls, fail = run.polls, run.fail
        percent = min(100, polls * 100 // self.async_polls)
        if fail and percent >= 100:
            status, percent = "Job Failed", 0
        elif percent >= 100:
            status = "Job Completed"
        elif polls <= 0:
            status = "Job Not Started"
        else:
            status = "Job Running"
        values = {"id": run_id, "account_id": run.account_id, "async_status": status,
                  "async_percent_completion": percent, "time_ref": int(run.created),
                  "time_completed": int(time.time()) if status == "Job Completed" else 0,
                  "is_running": status == "Job Running", "date_start": "", "date_stop": ""}
        selected = fields or ["id", "account_id", "async_status", "async_percent_completion", "time_ref",
                              "time_completed", "is_running"]
        out = {f: values[f] for f in selected if f in values}
        out["id"] = run_id
        return out

    def _run_results(self, run_id: str, params: dict, url_base: str) -> dict:
        with self._lock:
            run = self._runs[run_id]
            done = run.polls * 100 // self.async_polls >= 100 and not run.fail
        if not done:
            raise GraphError(100, "(#100) The report run is not complete yet; poll the AdReportRun until "
                                  "async_status is 'Job Completed'", subcode=2601)
        stored = dict(run.params)
        node = stored.pop("_node")
        if node.startswith("act_"):
            query = self._insights_query(self.data.account(node[4:]), stored, None)
        else:
            query = self._insights_query(None, stored, node)
        page_params = {k: v for k, v in params.items() if k in ("limit", "after")}
        return self._insights_page(query, page_params, url_base)

    # ---- token endpoint ------------------------------------------------------------------------
    def _client(self, params: dict) -> None:
        if str(params.get("client_id") or "") != self.app_id:
            raise GraphError(101, "Error validating application. Invalid application ID.")
        if not hmac.compare_digest(str(params.get("client_secret") or ""), self.app_secret):
            raise GraphError(1, "Error validating client secret.")

    def _token_endpoint(self, params: dict) -> dict:
        fault = self.faults.take("token")
        if fault is not None:
            self._count("faults")
            self._raise_fault(fault)
        self._client(params)
        grant = params.get("grant_type")
        if grant == "fb_exchange_token":
            old = str(params.get("fb_exchange_token") or "")
            state = self.tokens.check(old)
            if state == "invalid":
                raise GraphError(190, "Invalid OAuth access token - Cannot parse access token")
            if state == "revoked":
                raise GraphError(190, "Error validating access token: The user has not authorized application "
                                      f"{self.app_id}.", subcode=458)
            if state == "expired":
                raise GraphError(190, "Error validating access token: Session has expired.", subcode=463)
            entry = self.tokens.get(old)
            token, ttl = self.tokens.issue(self.app_id, "long", entry.scopes)
            return {"access_token": token, "token_type": "bearer", "expires_in": ttl}
        if grant not in (None, "", "authorization_code"):
            raise GraphError(100, f"Unsupported grant_type {grant!r} (the sandbox serves the code exchange and "
                                  "fb_exchange_token)")
        code = str(params.get("code") or "")
        if not code:
            raise GraphError(100, "Missing code parameter.")
        entry, state = self.tokens.use_code(code)
        if state == "invalid":
            raise GraphError(100, "Invalid verification code format.")
        if state == "used":
            raise GraphError(100, "This authorization code has been used.", subcode=36009)
        if state == "expired":
            raise GraphError(100, "This authorization code has expired.", subcode=36007)
        if params.get("redirect_uri") != entry["redirect_uri"]:
            raise GraphError(100, "Error validating verification code. Please make sure your redirect_uri is "
                                  "identical to the one you used in the OAuth dialog request", subcode=36008)
        token, ttl = self.tokens.issue(self.app_id, "short", entry["scopes"])
        return {"access_token": token, "token_type": "bearer", "expires_in": ttl}

    # ---- batch ---------------------------------------------------------------------------------
    def _batch(self, params: dict, auth_header: str | None, url_base: str, version: str | None):
        self._authenticate(params, auth_header)
        calls = _json_param(params.get("batch"), "batch")
        if not isinstance(calls, list) or not calls:
            raise GraphError(100, "(#100) param batch must be a non-empty array")
        if len(calls) > 50:
            raise GraphError(1, "Batch requests cannot have more than 50 requests", status=400)
        root = url_base.rstrip("/")
        if version and root.endswith("/" + version):
            root = root[: -len(version) - 1]
        include_headers = _bool_param(params.get("include_headers", "true"))
        answers = []
        for call in calls:
            method = str(call.get("method", "GET")).upper()
            relative = str(call.get("relative_url", "")).lstrip("/")
            path, _, query = relative.partition("?")
            sub = dict(parse_qsl(query, keep_blank_values=True))
            if call.get("body"):
                sub.update(dict(parse_qsl(str(call["body"]), keep_blank_values=True)))
            for key in ("access_token", "appsecret_proof"):
                if key not in sub and params.get(key):
                    sub[key] = params[key]
            segments = [s for s in path.split("/") if s]
            sub_version = segments[0] if segments and re.fullmatch(r"v\d+\.\d+", segments[0]) else version
            rest = "/".join(segments[1:] if segments and segments[0] == sub_version else segments)
            sub_base = f"{root}/{sub_version}/{rest}" if sub_version else f"{root}/{rest}"
            status, headers, body = self.handle(method, path, sub, auth_header, sub_base)
            answer: dict[str, Any] = {"code": status, "body": json.dumps(body) if body is not None else ""}
            if include_headers:
                answer["headers"] = [{"name": "Content-Type", "value": "text/javascript; charset=UTF-8"}] + \
                    [{"name": k, "value": v} for k, v in headers.items()]
            answers.append(answer)
        return 200, self._headers(None, "batch"), answers

    # ---- blueprints ----------------------------------------------------------------------------
    def _graph_blueprint(self) -> Blueprint:
        bp = Blueprint("meta_graph", __name__, url_prefix="/meta/graph")

        def serve(path: str = ""):
            params: dict[str, Any] = request.args.to_dict()
            params.update(request.form.to_dict())
            status, headers, body = self.handle(request.method, path, params, request.headers.get("Authorization"),
                                                request.base_url)
            payload = "" if body is None else json.dumps(body)
            response = Response(payload if body is not None else "Service Unavailable", status=status,
                                mimetype="application/json" if body is not None else "text/html")
            for key, value in headers.items():
                response.headers[key] = value
            return response

        bp.add_url_rule("/", "root", serve, methods=["GET", "POST"])
        bp.add_url_rule("/<path:path>", "graph", serve, methods=["GET", "POST", "DELETE"])
        return bp

    def _www_blueprint(self) -> Blueprint:
        bp = Blueprint("meta_www", __name__, url_prefix="/meta/www")

        def dialog(version: str | None = None):
            args = request.args
            client_id = args.get("client_id", "")
            if client_id != self.app_id:
                return _error_page("Invalid App ID", "The provided app ID does not look like a valid app ID."), 400
            redirect_uri = args.get("redirect_uri", "")
            if not redirect_uri or not self._redirect_allowed(redirect_uri):
                return _error_page("URL blocked", "This redirect failed because the redirect URI is not "
                                                  "whitelisted in the app's client OAuth settings."), 400
            state = args.get("state")
            if args.get("response_type", "code") not in ("code", "code granted_scopes"):
                return _redirect(redirect_uri, {"error": "invalid_request", "error_code": 100,
                                                "error_description": "Unsupported response_type",
                                                "error_reason": "invalid_request"}, state)
            scopes = [s for s in re.split(r"[,\s]+", args.get("scope") or "public_profile") if s]
            consent_id = self.tokens.add_consent({"redirect_uri": redirect_uri, "state": state, "scopes": scopes})
            return _consent_page(self.app_name, scopes, consent_id)

        bp.add_url_rule("/<version>/dialog/oauth", "dialog_versioned", dialog)
        bp.add_url_rule("/dialog/oauth", "dialog", dialog)

        @bp.post("/dialog/oauth/confirm")
        def confirm():
            entry = self.tokens.pop_consent(request.form.get("consent_id", ""))
            if entry is None:
                return _error_page("Session expired", "This login request expired or was already answered."), 400
            if request.form.get("decision") != "allow":
                return _redirect(entry["redirect_uri"], {"error": "access_denied", "error_code": 200,
                                                         "error_description": "Permissions error",
                                                         "error_reason": "user_denied"}, entry["state"])
            code = self.tokens.add_code({"redirect_uri": entry["redirect_uri"], "scopes": entry["scopes"]})
            return _redirect(entry["redirect_uri"], {"code": code}, entry["state"])

        return bp

    def _redirect_allowed(self, redirect_uri: str) -> bool:
        return redirect_allowed(self.redirect_uris, redirect_uri)

    def _admin_blueprint(self) -> Blueprint:
        bp = admin_blueprint("meta_sandbox_admin", "/_sandbox/meta")

        body = request_body

        @bp.post("/expire-tokens")
        def expire_tokens():
            return jsonify({"expired": self.expire_tokens(body().get("token"))})

        @bp.post("/revoke")
        def revoke():
            return jsonify({"revoked": self.revoke(body().get("token"))})

        @bp.post("/throttle")
        def throttle():
            payload = body()
            self.throttle(payload.get("account_id"), float(payload.get("seconds", 600)), payload.get("code"))
            return jsonify({"throttled": payload.get("account_id") or "app"})

        @bp.post("/unthrottle")
        def unthrottle():
            self.unthrottle(body().get("account_id"))
            return jsonify({"unthrottled": True})

        @bp.post("/usage")
        def usage():
            payload = body()
            self.set_usage(str(payload["account_id"]), int(payload.get("pct", 0)))
            return jsonify({"usage": payload})

        @bp.post("/faults")
        def faults():
            payload = body()
            if "latency" in payload:
                self.set_latency(float(payload["latency"]))
            kind = payload.get("kind")
            if kind:
                kind = str(kind).lower()
                if kind not in ("transient", "unknown", "http_500", "http_503", "rate_limit", "expired_token",
                                "invalid_token", "permission", "async_failed"):
                    return jsonify({"error": f"unknown fault kind {kind}"}), 400
                self.inject_fault(kind, payload.get("count", 1), payload.get("target", "api"),
                                  int(payload.get("regain_minutes", 0)))
            return jsonify({"pending": self.faults.pending(), "latency": self.faults.latency})

        @bp.post("/restate")
        def restate():
            return jsonify({"since": self.restate(int(body().get("days", 3))).isoformat()})

        @bp.post("/require-proof")
        def require_proof():
            self.set_require_proof(bool(body().get("on", True)))
            return jsonify({"require_appsecret_proof": self.require_proof})

        @bp.post("/issue-token")
        def issue_token():
            return jsonify(self.issue_token())

        @bp.post("/reset")
        def reset():
            self.reset()
            return jsonify({"reset": True})

        @bp.get("/stats")
        def stats():
            return jsonify({"calls": self.stats(), "pending_faults": self.faults.pending()})

        return bp


class _Totals:
    """Sums of campaign-day metrics over a period (and over campaigns at account level)."""

    __slots__ = ("impressions", "clicks", "spend_minor", "reach", "actions")

    def __init__(self):
        self.impressions = self.clicks = self.spend_minor = self.reach = 0
        self.actions: dict[str, int] = {}

    def add(self, row: dict | None) -> None:
        if row is None:
            return
        self.impressions += row["impressions"]
        self.clicks += row["clicks"]
        self.spend_minor += row["spend_minor"]
        self.reach += row["reach"]
        for key, value in row["actions"].items():
            self.actions[key] = self.actions.get(key, 0) + value


def _redirect(redirect_uri: str, params: dict, state: str | None):
    if state is not None:
        params = dict(params, state=state)
    separator = "&" if urlsplit(redirect_uri).query else "?"
    return redirect(redirect_uri + separator + urlencode(params) + "#_=_", code=302)


def _error_page(title: str, message: str) -> str:
    return (f"<!doctype html><title>{html.escape(title)} | Facebook (sandbox)</title><h1>{html.escape(title)}</h1>"
            f"<p id='error'>{html.escape(message)}</p>")


_SCOPE_LABELS = {"ads_read": "Read your ads performance (Ads Insights).",
                 "ads_management": "Manage your ads.",
                 "business_management": "Read your Business Manager ad accounts.",
                 "public_profile": "Your name and profile picture."}


def _consent_page(app_name: str, scopes: list[str], consent_id: str) -> str:
    items = "".join(f"<li><code>{html.escape(s)}</code> — {html.escape(_SCOPE_LABELS.get(s, s))}</li>" for s in scopes)
    cid = html.escape(consent_id)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Log in with Facebook (sandbox)</title>
<style>body{{font-family:sans-serif;max-width:36rem;margin:3rem auto}}button{{padding:.5rem 1.5rem;margin-right:1rem}}</style>
</head><body>
<h1>Facebook (sandbox)</h1>
<p><strong id="app-name">{html.escape(app_name)}</strong> is requesting access to your Facebook account
<em>{html.escape(USER['name'])}</em> and the ad accounts it manages.</p>
<ul id="scopes">{items}</ul>
<form method="post" action="/meta/www/dialog/oauth/confirm">
<input type="hidden" name="consent_id" value="{cid}">
<button type="submit" name="decision" value="deny" id="deny">Cancel</button>
<button type="submit" name="decision" value="allow" id="allow">Continue as {html.escape(USER['name'])}</button>
</form></body></html>"""
