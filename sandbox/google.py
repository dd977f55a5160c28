"""Offline Google stand-in: Google OAuth 2.0 (HTTP) and the Google Ads API v26 (gRPC over TLS).

Three parts, glued by ``GoogleSandbox`` (the object ``SandboxServer.platform("google")`` returns):

``GoogleSandboxData`` — the seeded data generator and truth accessor. One manager customer with
client customers in different currencies/time zones, campaigns of every status and several channel
types, budgets in micros, and daily metrics computed on the fly from ``(seed, customer, campaign,
date)`` (constant memory for any date range). Money is in micros; dates are customer-local dates.

``GoogleOAuthServer`` — Flask routes under ``/google``:
  ``GET  /google/o/oauth2/v2/auth``          authorize → HTML consent page (Allow / Deny buttons)
  ``POST /google/o/oauth2/v2/auth/consent``  consent decision → redirect with ``code``/``error``
  ``POST /google/token``                     ``authorization_code`` (PKCE S256/plain) and ``refresh_token``
  ``POST /google/revoke``                    revoke a refresh or access token (like oauth2.googleapis.com/revoke)

Google Ads API — a gRPC server over TLS (the sandbox certificate) on a free loopback port serving
``GoogleAdsService.SearchStream``/``Search`` and ``CustomerService.ListAccessibleCustomers`` with the
SDK's own message types. It checks ``authorization: Bearer``, ``developer-token`` and
``login-customer-id``, parses the GAQL subset the connector uses (``FROM customer``,
``customer_client``, ``campaign`` with ``campaign_budget.*``, ``metrics.*``, ``segments.date``
``BETWEEN``/comparisons/``DURING``, ``IN``, ``ORDER BY``, ``LIMIT``), and fails like Google: a
serialized ``GoogleAdsFailure`` in the trailing metadata ``google.ads.googleads.v26.errors.googleadsfailure-bin``
plus ``request-id``, then the matching status code.

Admin knobs (HTTP, JSON bodies; each has a Python method on ``GoogleSandbox``):
  ``POST /_sandbox/google/revoke``        ``{"refresh_token": optional}`` → revoke one grant or all
  ``POST /_sandbox/google/expire-tokens`` ``{"ttl": optional seconds for new tokens}`` → live access tokens expire now
  ``POST /_sandbox/google/faults``        ``{"kind": RESOURCE_EXHAUSTED|INTERNAL|UNAVAILABLE|UNAUTHENTICATED,
                                           "count": N, "retry_delay": s, "target": "api"|"token", "latency": s}``
  ``POST /_sandbox/google/restate``       ``{"days": 3}`` → the most recent days get new values
  ``POST /_sandbox/google/reset``         clear faults, latency, restatements and the token TTL (grants stay)
  ``GET  /_sandbox/google/stats``         calls received per method
"""
from __future__ import annotations

import base64
import collections
import dataclasses
import datetime as dt
import hashlib
import html
import logging
import re
import secrets
import threading
import time
import uuid
import zoneinfo
from concurrent import futures
from pathlib import Path
from typing import Any, Iterable, Iterator
from urllib.parse import urlencode, urlsplit

from flask import Blueprint, Response, jsonify, redirect, request

from resources.platforms.base import batched
from sandbox.common import (SHARED_CAMPAIGN_NAMES, FaultInjector, admin_blueprint, digest_units, read_state_file,
                            redirect_allowed, request_body, seeded_random, stable_int, write_state_file)

log = logging.getLogger(__name__)

API_VERSION = "v26"
SCOPE_ADWORDS = "https://www.googleapis.com/auth/adwords"
FAILURE_METADATA_KEY = f"google.ads.googleads.{API_VERSION}.errors.googleadsfailure-bin"
STREAM_BATCH_ROWS = 10_000
SEARCH_PAGE_ROWS = 10_000
ACCESS_TOKEN_TTL = 3600

MANAGER = {"id": "1234567890", "name": "Sandbox Agency MCC", "currency": "USD", "time_zone": "America/New_York"}
DEFAULT_CLIENTS = (
    {"id": "2345678901", "name": "Sandbox Outdoor Gear (US)", "currency": "USD", "time_zone": "America/New_York"},
    {"id": "3456789012", "name": "Sandbox Wanderbedarf (DE)", "currency": "EUR", "time_zone": "Europe/Berlin"},
)
JPY_CLIENT = {"id": "4567890123", "name": "Sandbox Tokyo Store (JP)", "currency": "JPY", "time_zone": "Asia/Tokyo"}

#: currencies without minor units: spend and budgets are whole units (micros multiple of 1,000,000)
ZERO_DECIMAL = {"JPY", "KRW", "CLP", "VND", "ISK", "HUF"}
#: rough size of one currency unit relative to USD, so budgets/CPCs look plausible
CURRENCY_SCALE = {"USD": 1, "EUR": 1, "GBP": 1, "CHF": 1, "CAD": 1.3, "AUD": 1.5, "JPY": 150, "KRW": 1300}

CAMPAIGN_STATUSES = ("ENABLED", "PAUSED", "REMOVED")
CHANNEL_TYPES = ("SEARCH", "DISPLAY", "VIDEO", "SHOPPING", "PERFORMANCE_MAX")
_CHANNEL_PROFILE = {  # (ctr, cpc in USD, conversion rate, relative reach)
    "SEARCH": (0.045, 1.6, 0.06, 1.0),
    "DISPLAY": (0.006, 0.45, 0.01, 4.0),
    "VIDEO": (0.011, 0.12, 0.004, 3.0),
    "SHOPPING": (0.014, 0.75, 0.035, 1.6),
    "PERFORMANCE_MAX": (0.02, 0.9, 0.045, 2.5),
}
_THEMES = ("Brand", "Generic", "Competitor", "Summer Sale", "Winter Sale", "Hiking Boots", "Tents",
           "Backpacks", "Retargeting", "Prospecting", "Black Friday", "New Arrivals", "Clearance",
           "Jackets", "Climbing", "Trail Running", "Gift Guide", "Local Stores", "Loyalty", "App Users")
_WEEKDAY = (1.0, 1.06, 1.08, 1.05, 0.96, 0.78, 0.74)


# =============================================================================================
# data generator
# =============================================================================================

@dataclasses.dataclass(frozen=True)
class SandboxCustomer:
    """A Google Ads customer. ``id`` is ten digits without dashes; ``manager_id`` is set on clients."""

    id: str
    name: str
    currency: str
    time_zone: str
    manager: bool = False
    manager_id: str | None = None
    status: str = "ENABLED"


@dataclasses.dataclass(frozen=True)
class SandboxCampaign:
    """A campaign. Money in micros of the customer's currency; dates are customer-local.

    ``budget_amount_micros`` is set for DAILY budgets, ``budget_total_micros`` for CUSTOM_PERIOD ones.
    ``last_active`` is the last day with activity for PAUSED/REMOVED campaigns (None: still running).
    """

    customer_id: str
    id: int
    name: str
    status: str
    channel_type: str
    budget_id: int
    budget_period: str
    budget_delivery: str
    budget_amount_micros: int | None
    budget_total_micros: int | None
    start_date: dt.date
    end_date: dt.date | None
    last_active: dt.date | None
    base_impressions: float
    ctr: float
    cpc_micros: float
    conversion_rate: float

    @property
    def start_date_time(self) -> str:
        return f"{self.start_date.isoformat()} 00:00:00"

    @property
    def end_date_time(self) -> str | None:
        return f"{self.end_date.isoformat()} 23:59:59" if self.end_date else None


#: campaigns #4..#7 of each client are named from ``SHARED_CAMPAIGN_NAMES`` (Shopify orders use them as
#: ``utm_campaign``, so ad spend joins shop sales by name in the demo)
SHARED_NAME_SLOTS = range(3, 7)


def _campaign_name(channel: str, theme: str, i: int, client_index: int) -> str:
    """A campaign name: ``"<Channel> | <theme> #<n>"``, or a shared campaign name for a few slots."""
    if i in SHARED_NAME_SLOTS:
        return SHARED_CAMPAIGN_NAMES[(i - SHARED_NAME_SLOTS.start + 3 * client_index) % len(SHARED_CAMPAIGN_NAMES)]
    return f"{channel.replace('_', ' ').title()} | {theme} #{i + 1}"


class GoogleSandboxData:
    """Deterministic Google Ads data and the truth accessor tests compare against.

    Args:
        seed: generator seed (same seed → same customers, campaigns and metrics).
        clients: client customers as dicts ``{id, name, currency, time_zone}``; default: one USD
            (America/New_York) and one EUR (Europe/Berlin) client.
        campaigns_per_client: campaigns generated per client (≥ 5 so every status/channel appears).
        include_jpy: add a JPY (Asia/Tokyo, zero-decimal currency) client.
        anchor: the date campaign start/stop dates are generated around (default: today, UTC).

    Truth accessors: ``customers()``, ``customer(id)``, ``campaigns(customer_id)``,
    ``daily_metrics(customer_id, start, end)`` (an iterator; money in micros, conversions a float,
    ``date`` a customer-local ``datetime.date``). Metrics are computed on the fly, never stored.
    """

    def __init__(self, seed: int = 7, clients: Iterable[dict] | None = None, campaigns_per_client: int = 50,
                 include_jpy: bool = False, anchor: dt.date | None = None):
        self.seed = seed
        self.anchor = anchor or dt.datetime.now(dt.timezone.utc).date()
        specs = list(clients) if clients is not None else list(DEFAULT_CLIENTS)
        if include_jpy and not any(c["id"] == JPY_CLIENT["id"] for c in specs):
            specs.append(JPY_CLIENT)
        self.manager = SandboxCustomer(MANAGER["id"], MANAGER["name"], MANAGER["currency"], MANAGER["time_zone"],
                                       manager=True)
        self._customers: dict[str, SandboxCustomer] = {self.manager.id: self.manager}
        self._campaigns: dict[str, list[SandboxCampaign]] = {self.manager.id: []}
        self._lock = threading.Lock()
        self._restatement_version = 0
        self._restated_since: dt.date | None = None
        for index, spec in enumerate(specs):
            customer = SandboxCustomer(str(spec["id"]), spec["name"], spec["currency"], spec["time_zone"],
                                       manager=False, manager_id=self.manager.id)
            self._customers[customer.id] = customer
            self._campaigns[customer.id] = self._generate_campaigns(customer, index, max(5, campaigns_per_client))
        self._by_id = {c.id: c for camps in self._campaigns.values() for c in camps}

    # ---- static entities -----------------------------------------------------------------------
    def _generate_campaigns(self, customer: SandboxCustomer, index: int, count: int) -> list[SandboxCampaign]:
        rng = seeded_random(self.seed, "campaigns", customer.id)
        scale = CURRENCY_SCALE.get(customer.currency, 1)
        step = self.money_step(customer.currency)
        campaigns = []
        for i in range(count):
            status = CAMPAIGN_STATUSES[i] if i < 3 else rng.choices(CAMPAIGN_STATUSES, (70, 20, 10))[0]
            channel = CHANNEL_TYPES[i % 5] if i < 10 else rng.choices(CHANNEL_TYPES, (35, 20, 12, 15, 18))[0]
            ctr, cpc, cvr, reach = _CHANNEL_PROFILE[channel]
            campaign_id = 10_000_000_000 + (index + 1) * 1_000_000_000 + i * 1000 + rng.randrange(1000)
            recent = rng.random() < 0.1
            start = self.anchor - dt.timedelta(days=rng.randint(0, 29) if recent else rng.randint(30, 1100))
            end = None
            last_active = None
            if status == "REMOVED":
                span = max(1, (self.anchor - start).days - 1)
                last_active = start + dt.timedelta(days=rng.randint(min(7, span), span))
            elif status == "PAUSED":
                span = max(0, (self.anchor - start).days)
                last_active = self.anchor - dt.timedelta(days=rng.randint(1, max(1, min(span, 200))))
                last_active = max(last_active, start)
            elif rng.random() < 0.15:
                end = self.anchor + dt.timedelta(days=rng.randint(-120, 240))
                end = max(end, start)
            custom = channel == "VIDEO" and rng.random() < 0.4
            if custom:
                total_units = rng.randint(50, 2000) * 10 * scale
                amount, total = None, self._round_money(total_units * 1_000_000, step)
            else:
                amount = self._round_money(rng.randint(500, 80_000) / 100 * scale * 1_000_000, step)
                total = None
            campaigns.append(SandboxCampaign(
                customer_id=customer.id, id=campaign_id,
                name=_campaign_name(channel, rng.choice(_THEMES), i, index),
                status=status, channel_type=channel,
                budget_id=20_000_000_000 + (index + 1) * 1_000_000_000 + i,
                budget_period="CUSTOM_PERIOD" if custom else "DAILY",
                budget_delivery="ACCELERATED" if rng.random() < 0.1 else "STANDARD",
                budget_amount_micros=amount, budget_total_micros=total,
                start_date=start, end_date=end, last_active=last_active,
                base_impressions=rng.lognormvariate(6.3, 0.9) * reach,
                ctr=ctr * rng.uniform(0.6, 1.5), cpc_micros=cpc * scale * rng.uniform(0.6, 1.6) * 1_000_000,
                conversion_rate=cvr * rng.uniform(0.5, 1.8),
            ))
        return campaigns

    @staticmethod
    def money_step(currency: str) -> int:
        """Smallest money increment in micros: one cent (10,000) or one unit for zero-decimal currencies."""
        return 1_000_000 if currency in ZERO_DECIMAL else 10_000

    @staticmethod
    def _round_money(micros: float, step: int) -> int:
        return max(step, int(micros // step) * step)

    # ---- truth accessors -----------------------------------------------------------------------
    def customers(self) -> list[SandboxCustomer]:
        """Every customer, manager first."""
        return list(self._customers.values())

    def customer(self, customer_id: str) -> SandboxCustomer | None:
        return self._customers.get(str(customer_id))

    def clients(self) -> list[SandboxCustomer]:
        return [c for c in self._customers.values() if not c.manager]

    def campaigns(self, customer_id: str) -> list[SandboxCampaign]:
        """The customer's campaigns (every status), ordered by id (empty for a manager)."""
        return list(self._campaigns.get(str(customer_id), ()))

    def campaign(self, campaign_id: int) -> SandboxCampaign | None:
        return self._by_id.get(int(campaign_id))

    def local_today(self, customer_id: str) -> dt.date:
        """Today in the customer's time zone: the last date that can have metrics."""
        tz = zoneinfo.ZoneInfo(self._customers[str(customer_id)].time_zone)
        return dt.datetime.now(tz).date()

    def metrics_for(self, campaign: SandboxCampaign, day: dt.date) -> dict[str, Any] | None:
        """One campaign-day's metrics (None when there is no activity). Money in micros."""
        if day < campaign.start_date or (campaign.last_active and day > campaign.last_active) \
                or (campaign.end_date and day > campaign.end_date):
            return None
        version = 0
        with self._lock:
            if self._restated_since is not None and day >= self._restated_since:
                version = self._restatement_version
        u = digest_units(self.seed, campaign.customer_id, campaign.id, day.toordinal(), version, count=6)
        if u[0] < 0.04:
            return None
        impressions = int(campaign.base_impressions * _WEEKDAY[day.weekday()] * (0.55 + 0.9 * u[1]))
        if impressions <= 0:
            return None
        clicks = min(impressions, int(impressions * campaign.ctr * (0.7 + 0.6 * u[2]) + u[3]))
        customer = self._customers[campaign.customer_id]
        step = self.money_step(customer.currency)
        cost = int(clicks * campaign.cpc_micros * (0.75 + 0.5 * u[4]) // step) * step
        if campaign.budget_amount_micros:
            cost = min(cost, 2 * campaign.budget_amount_micros)
        conversions = round(clicks * campaign.conversion_rate * (0.4 + 1.2 * u[5]), 2)
        return {"customer_id": campaign.customer_id, "campaign_id": campaign.id, "date": day,
                "impressions": impressions, "clicks": clicks, "cost_micros": cost, "conversions": conversions}

    def daily_metrics(self, customer_id: str, start: dt.date, end: dt.date,
                      campaign_ids: set[int] | None = None) -> Iterator[dict[str, Any]]:
        """Rows ``{customer_id, campaign_id (int), date (customer-local date), impressions, clicks,
        cost_micros (int), conversions (float)}`` for days in ``[start, end]`` with activity, ordered by
        date then campaign id. Days after the customer's local today have no rows. Constant memory."""
        campaigns = [c for c in self.campaigns(customer_id) if campaign_ids is None or c.id in campaign_ids]
        if not campaigns:
            return
        end = min(end, self.local_today(customer_id))
        day = start
        one = dt.timedelta(days=1)
        while day <= end:
            for campaign in campaigns:
                row = self.metrics_for(campaign, day)
                if row is not None:
                    yield row
            day += one

    # ---- knobs ---------------------------------------------------------------------------------
    def restate(self, days: int = 3) -> dt.date:
        """Change the values of every date from ``days`` days before today (UTC) onwards, as Google
        restates recent data (one extra day covers customers ahead of UTC). Returns the first restated date."""
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
# OAuth server
# =============================================================================================

@dataclasses.dataclass
class _Grant:
    refresh_token: str
    client_id: str
    scope: str
    revoked: bool = False


@dataclasses.dataclass
class _AccessToken:
    client_id: str
    scope: str
    expires_at: float
    grant: _Grant | None


class OAuthError(Exception):
    def __init__(self, error: str, description: str = "", status: int = 400):
        super().__init__(error)
        self.error, self.description, self.status = error, description, status


class GoogleOAuthServer:
    """Google-style OAuth 2.0 authorization server state (grants, codes, tokens). Thread-safe.

    ``clients``: ``{client_id: {"secret", "name", "redirect_uris" (None = any loopback URI)}}``.
    ``check_access_token(token)`` → ``"ok" | "expired" | "revoked" | "invalid"`` (used by the Ads API).
    """

    def __init__(self, clients: dict[str, dict], faults: FaultInjector, access_token_ttl: int = ACCESS_TOKEN_TTL,
                 state_file: Path | None = None):
        self.clients = clients
        self.faults = faults
        self.default_ttl = access_token_ttl
        self.access_token_ttl = access_token_ttl
        self._lock = threading.RLock()
        self._consents: dict[str, dict] = {}
        self._codes: dict[str, dict] = {}
        self._grants: dict[str, _Grant] = {}
        self._tokens: dict[str, _AccessToken] = {}
        self.state_file = Path(state_file) if state_file else None
        self._load()

    # ---- persistence: grants and live access tokens survive a sandbox restart -------------------
    def _load(self) -> None:
        state = read_state_file(self.state_file)
        if state is None:
            return
        for refresh_token, g in state.get("grants", {}).items():
            self._grants[refresh_token] = _Grant(refresh_token, g["client_id"], g["scope"], g.get("revoked", False))
        for token, t in state.get("tokens", {}).items():
            grant = self._grants.get(t.get("grant") or "")
            self._tokens[token] = _AccessToken(t["client_id"], t["scope"], t["expires_at"], grant)

    def _save(self) -> None:
        """Write grants and unexpired access tokens to ``state_file`` (mode 0600, atomic)."""
        if not self.state_file:
            return
        now = time.time()
        with self._lock:
            state = {
                "grants": {k: {"client_id": g.client_id, "scope": g.scope, "revoked": g.revoked}
                           for k, g in self._grants.items()},
                "tokens": {k: {"client_id": t.client_id, "scope": t.scope, "expires_at": t.expires_at,
                               "grant": t.grant.refresh_token if t.grant else None}
                           for k, t in self._tokens.items() if t.expires_at > now},
            }
            write_state_file(self.state_file, state)

    # ---- validation helpers --------------------------------------------------------------------
    def _redirect_allowed(self, client: dict, redirect_uri: str) -> bool:
        return redirect_allowed(client.get("redirect_uris"), redirect_uri)

    def _authenticate_client(self, form: dict, auth_header: str | None) -> str:
        client_id = form.get("client_id")
        secret = form.get("client_secret")
        if auth_header and auth_header.lower().startswith("basic "):
            try:
                decoded = base64.b64decode(auth_header[6:].strip()).decode()
                from urllib.parse import unquote
                basic_id, _, basic_secret = decoded.partition(":")
                client_id, secret = unquote(basic_id), unquote(basic_secret)
            except Exception:
                raise OAuthError("invalid_client", "Malformed Basic authorization.", 401) from None
        client = self.clients.get(client_id or "")
        if client is None:
            raise OAuthError("invalid_client", "The OAuth client was not found.", 401)
        if not secret or not secrets.compare_digest(secret, client["secret"]):
            raise OAuthError("invalid_client", "Unauthorized", 401)
        return client_id

    # ---- token issuing -------------------------------------------------------------------------
    def _issue_access(self, client_id: str, scope: str, grant: _Grant | None) -> dict:
        token = "ya29.sandbox-" + secrets.token_urlsafe(32)
        with self._lock:
            ttl = self.access_token_ttl
            self._tokens[token] = _AccessToken(client_id, scope, time.time() + ttl, grant)
            self._save()
        return {"access_token": token, "expires_in": ttl, "scope": scope, "token_type": "Bearer"}

    def exchange_code(self, form: dict, auth_header: str | None) -> dict:
        client_id = self._authenticate_client(form, auth_header)
        code = form.get("code") or ""
        with self._lock:
            entry = self._codes.get(code)
            if entry is None or entry["used"] or entry["expires_at"] < time.time():
                raise OAuthError("invalid_grant", "Bad Request")
            entry["used"] = True  # single use, even when the rest of the request is wrong
        if entry["client_id"] != client_id:
            raise OAuthError("invalid_grant", "Bad Request")
        if form.get("redirect_uri") != entry["redirect_uri"]:
            raise OAuthError("redirect_uri_mismatch", "Bad Request")
        challenge = entry.get("code_challenge")
        if challenge:
            verifier = form.get("code_verifier") or ""
            if not verifier:
                raise OAuthError("invalid_grant", "Missing code verifier.")
            if entry.get("code_challenge_method", "plain") == "S256":
                computed = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
            else:
                computed = verifier
            if not secrets.compare_digest(computed, challenge):
                raise OAuthError("invalid_grant", "Invalid code verifier.")
        grant = None
        if entry["access_type"] == "offline":
            grant = _Grant("1//sandbox-" + secrets.token_urlsafe(40), client_id, entry["scope"])
            with self._lock:
                self._grants[grant.refresh_token] = grant
        answer = self._issue_access(client_id, entry["scope"], grant)
        if grant:
            answer["refresh_token"] = grant.refresh_token
        return answer

    def refresh(self, form: dict, auth_header: str | None) -> dict:
        client_id = self._authenticate_client(form, auth_header)
        with self._lock:
            grant = self._grants.get(form.get("refresh_token") or "")
        if grant is None or grant.revoked or grant.client_id != client_id:
            raise OAuthError("invalid_grant", "Token has been expired or revoked.")
        return self._issue_access(client_id, grant.scope, grant)

    # ---- knobs and checks ----------------------------------------------------------------------
    def check_access_token(self, token: str) -> str:
        with self._lock:
            entry = self._tokens.get(token)
            if entry is None:
                return "invalid"
            if entry.grant is not None and entry.grant.revoked:
                return "revoked"
            if entry.expires_at <= time.time():
                return "expired"
            return "ok"

    def revoke(self, token: str | None = None) -> int:
        """Revoke one grant (by refresh or access token) or, with None, every grant and access token.
        Returns the number of grants revoked."""
        with self._lock:
            if token is None:
                for grant in self._grants.values():
                    grant.revoked = True
                for access in self._tokens.values():
                    access.expires_at = 0
                self._save()
                return len(self._grants)
            grant = self._grants.get(token)
            if grant is None and token in self._tokens:
                grant = self._tokens[token].grant
                self._tokens[token].expires_at = 0
            if grant is None:
                return 0
            grant.revoked = True
            for access in self._tokens.values():
                if access.grant is grant:
                    access.expires_at = 0
            self._save()
            return 1

    def expire_access_tokens(self, ttl: int | None = None) -> int:
        """Make every live access token expire now; optionally set the TTL of new ones."""
        with self._lock:
            if ttl is not None:
                self.access_token_ttl = max(0, int(ttl))
            for access in self._tokens.values():
                access.expires_at = 0
            self._save()
            return len(self._tokens)

    def reset(self) -> None:
        with self._lock:
            self.access_token_ttl = self.default_ttl

    # ---- HTTP routes ---------------------------------------------------------------------------
    def blueprint(self) -> Blueprint:
        bp = Blueprint("google_oauth", __name__, url_prefix="/google")

        @bp.get("/o/oauth2/v2/auth")
        def authorize():
            args = request.args
            client_id = args.get("client_id", "")
            client = self.clients.get(client_id)
            if client is None:
                return _error_page("invalid_client", "The OAuth client was not found."), 401
            redirect_uri = args.get("redirect_uri", "")
            if not redirect_uri or not self._redirect_allowed(client, redirect_uri):
                return _error_page("redirect_uri_mismatch",
                                   "The redirect URI in the request does not match the ones authorized "
                                   "for the OAuth client."), 400
            state = args.get("state")
            if args.get("response_type") != "code":
                return _redirect_error(redirect_uri, "unsupported_response_type", state)
            scope = " ".join((args.get("scope") or "").split())
            if not scope:
                return _redirect_error(redirect_uri, "invalid_scope", state, "Missing required parameter: scope")
            challenge = args.get("code_challenge")
            method = args.get("code_challenge_method", "plain" if challenge else None)
            if challenge and method not in ("S256", "plain"):
                return _redirect_error(redirect_uri, "invalid_request", state, "Invalid code_challenge_method")
            consent_id = secrets.token_urlsafe(24)
            with self._lock:
                self._consents[consent_id] = {
                    "client_id": client_id, "redirect_uri": redirect_uri, "scope": scope, "state": state,
                    "code_challenge": challenge, "code_challenge_method": method,
                    "access_type": args.get("access_type", "online"), "expires_at": time.time() + 600}
            return _consent_page(client.get("name", client_id), scope.split(), consent_id)

        @bp.post("/o/oauth2/v2/auth/consent")
        def consent():
            consent_id = request.form.get("consent_id", "")
            with self._lock:
                entry = self._consents.pop(consent_id, None)
            if entry is None or entry["expires_at"] < time.time():
                return _error_page("invalid_request", "This consent request expired or was already answered."), 400
            if request.form.get("decision") != "allow":
                return _redirect_error(entry["redirect_uri"], "access_denied", entry["state"])
            code = "4/sandbox-" + secrets.token_urlsafe(32)
            with self._lock:
                self._codes[code] = dict(entry, used=False, expires_at=time.time() + 600)
            params = {"code": code, "scope": entry["scope"]}
            if entry["state"] is not None:
                params["state"] = entry["state"]
            return redirect(_with_query(entry["redirect_uri"], params), code=302)

        @bp.post("/token")
        def token():
            fault = self.faults.take("token")
            if fault is not None:
                if fault.kind in ("INTERNAL", "UNAVAILABLE"):
                    return Response("<html><body>Server Error</body></html>",
                                    status=500 if fault.kind == "INTERNAL" else 503, mimetype="text/html")
                if fault.kind == "RESOURCE_EXHAUSTED":
                    return _json({"error": "rate_limit_exceeded"}, 429,
                                 {"Retry-After": str(int(fault.retry_delay or 1))})
            form = request.form.to_dict()
            try:
                grant_type = form.get("grant_type")
                if grant_type == "authorization_code":
                    answer = self.exchange_code(form, request.headers.get("Authorization"))
                elif grant_type == "refresh_token":
                    answer = self.refresh(form, request.headers.get("Authorization"))
                elif not grant_type:
                    raise OAuthError("invalid_request", "Missing required parameter: grant_type")
                else:
                    raise OAuthError("unsupported_grant_type", "Invalid grant_type: " + grant_type)
            except OAuthError as exc:
                return _json({"error": exc.error, "error_description": exc.description}, exc.status)
            return _json(answer, 200)

        @bp.post("/revoke")
        def revoke():
            token = request.values.get("token")
            if not token or not self.revoke(token):
                return _json({"error": "invalid_token", "error_description": "Token expired or revoked"}, 400)
            return _json({}, 200)

        return bp


def _json(body: dict, status: int, headers: dict | None = None) -> Response:
    response = jsonify(body)
    response.status_code = status
    response.headers["Cache-Control"] = "no-store"
    for key, value in (headers or {}).items():
        response.headers[key] = value
    return response


def _with_query(url: str, params: dict) -> str:
    return url + ("&" if urlsplit(url).query else "?") + urlencode(params)


def _redirect_error(redirect_uri: str, error: str, state: str | None, description: str | None = None):
    params = {"error": error}
    if description:
        params["error_description"] = description
    if state is not None:
        params["state"] = state
    return redirect(_with_query(redirect_uri, params), code=302)


def _error_page(error: str, message: str) -> str:
    return (f"<!doctype html><title>Error 400: {html.escape(error)}</title><h1>Access blocked</h1>"
            f"<p id='error'>Error: {html.escape(error)}</p><p>{html.escape(message)}</p>")


_SCOPE_LABELS = {SCOPE_ADWORDS: "See, edit, create and delete your Google Ads accounts and data."}


def _consent_page(app_name: str, scopes: list[str], consent_id: str) -> str:
    items = "".join(f"<li><code>{html.escape(s)}</code> — {html.escape(_SCOPE_LABELS.get(s, s))}</li>" for s in scopes)
    cid = html.escape(consent_id)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Sign in - Google Accounts (sandbox)</title>
<style>body{{font-family:sans-serif;max-width:36rem;margin:3rem auto}}button{{padding:.5rem 1.5rem;margin-right:1rem}}</style>
</head><body>
<h1>Google (sandbox)</h1>
<p><strong id="app-name">{html.escape(app_name)}</strong> wants access to your Google Account
<em>sandbox.user@example.com</em>.</p>
<p>This will allow {html.escape(app_name)} to:</p><ul id="scopes">{items}</ul>
<form method="post" action="/google/o/oauth2/v2/auth/consent">
<input type="hidden" name="consent_id" value="{cid}">
<button type="submit" name="decision" value="deny" id="deny">Cancel</button>
<button type="submit" name="decision" value="allow" id="allow">Allow</button>
</form></body></html>"""


# =============================================================================================
# GAQL
# =============================================================================================

class QueryProblem(Exception):
    """A GAQL error: ``code`` is a ``QueryErrorEnum.QueryError`` name."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclasses.dataclass
class Condition:
    field: str
    op: str  # = != < <= > >= IN NOT_IN LIKE NOT_LIKE BETWEEN DURING IS_NULL IS_NOT_NULL
    value: Any


@dataclasses.dataclass
class GaqlQuery:
    """A parsed query: selected fields (lower-case, dotted), resource, conditions, ordering, limit."""

    fields: list[str]
    resource: str
    conditions: list[Condition]
    order_by: list[tuple[str, bool]]  # (field, descending)
    limit: int | None


_QUERY_RE = re.compile(
    r"^\s*SELECT\s+(?P<select>.+?)\s+FROM\s+(?P<resource>[a-z_]+)"
    r"(?:\s+WHERE\s+(?P<where>.+?))?(?:\s+ORDER\s+BY\s+(?P<order>.+?))?"
    r"(?:\s+LIMIT\s+(?P<limit>\d+))?(?:\s+PARAMETERS\s+(?P<params>.+?))?\s*;?\s*$", re.I | re.S)
_VALUE = r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|[^\s()',]+"
_COND_RE = re.compile(
    r"\s*(?P<field>[a-z_]+(?:\.[a-z_]+)+)\s+(?:"
    rf"(?P<between>BETWEEN)\s+(?P<b1>{_VALUE})\s+AND\s+(?P<b2>{_VALUE})"
    r"|(?P<during>DURING)\s+(?P<dval>[A-Z_0-9]+)"
    r"|(?P<inop>NOT\s+IN|IN)\s*\((?P<list>[^)]*)\)"
    r"|(?P<nullop>IS\s+NOT\s+NULL|IS\s+NULL)"
    rf"|(?P<cmp>!=|<=|>=|=|<|>|NOT\s+LIKE|LIKE|CONTAINS\s+ANY|CONTAINS\s+ALL|CONTAINS\s+NONE)\s*(?P<val>{_VALUE})"
    r")\s*(?:(?P<and>AND)\b|$)", re.I | re.S)


def _literal(token: str) -> Any:
    token = token.strip()
    if len(token) >= 2 and token[0] == token[-1] and token[0] in "'\"":
        return token[1:-1]
    if re.fullmatch(r"-?\d+", token):
        return int(token)
    if re.fullmatch(r"-?\d+\.\d*", token):
        return float(token)
    if token.upper() in ("TRUE", "FALSE"):
        return token.upper() == "TRUE"
    return token  # enum constant


def parse_gaql(text: str) -> GaqlQuery:
    """Parse the GAQL subset the sandbox supports.

    Raises:
        QueryProblem: malformed query (``code`` is a QueryError name).
    """
    match = _QUERY_RE.match(text or "")
    if not match:
        if not re.search(r"\bSELECT\b", text or "", re.I):
            raise QueryProblem("EXPECTED_SELECT", "Expected SELECT.")
        if not re.search(r"\bFROM\b", text or "", re.I):
            raise QueryProblem("EXPECTED_FROM", "Expected FROM.")
        raise QueryProblem("UNEXPECTED_INPUT", "Query could not be parsed.")
    fields = [f.strip().lower() for f in match["select"].split(",")]
    if any(not re.fullmatch(r"[a-z_]+(\.[a-z_]+)+", f) for f in fields):
        raise QueryProblem("BAD_FIELD_NAME", "Malformed field name in SELECT.")
    conditions: list[Condition] = []
    where = match["where"]
    if where:
        pos = 0
        while pos < len(where):
            cm = _COND_RE.match(where, pos)
            if not cm:
                raise QueryProblem("UNEXPECTED_INPUT", f"Cannot parse WHERE near {where[pos:pos + 30]!r}.")
            field = cm["field"].lower()
            if cm["between"]:
                conditions.append(Condition(field, "BETWEEN", (_literal(cm["b1"]), _literal(cm["b2"]))))
            elif cm["during"]:
                conditions.append(Condition(field, "DURING", cm["dval"].upper()))
            elif cm["inop"]:
                values = [_literal(v) for v in re.findall(_VALUE, cm["list"])]
                conditions.append(Condition(field, "NOT_IN" if "NOT" in cm["inop"].upper() else "IN", values))
            elif cm["nullop"]:
                conditions.append(Condition(field, "IS_NOT_NULL" if "NOT" in cm["nullop"].upper() else "IS_NULL", None))
            else:
                conditions.append(Condition(field, re.sub(r"\s+", "_", cm["cmp"].upper()), _literal(cm["val"])))
            pos = cm.end()
            if not cm["and"] and where[pos:].strip():
                raise QueryProblem("EXPECTED_AND", "Expected AND between conditions.")
    order_by = []
    if match["order"]:
        for part in match["order"].split(","):
            bits = part.split()
            if not bits:
                continue
            order_by.append((bits[0].lower(), len(bits) > 1 and bits[1].upper() == "DESC"))
    return GaqlQuery(fields, match["resource"].lower(), conditions, order_by,
                     int(match["limit"]) if match["limit"] else None)


_CUSTOMER_FIELDS = {"customer.id", "customer.descriptive_name", "customer.currency_code", "customer.time_zone",
                    "customer.manager", "customer.status", "customer.resource_name", "customer.test_account"}
_CUSTOMER_CLIENT_FIELDS = {f"customer_client.{f}" for f in (
    "id", "client_customer", "descriptive_name", "currency_code", "time_zone", "manager", "level", "hidden",
    "status", "resource_name", "test_account")}
_CAMPAIGN_FIELDS = {f"campaign.{f}" for f in (
    "id", "name", "status", "advertising_channel_type", "start_date_time", "end_date_time", "resource_name",
    "campaign_budget")}
_BUDGET_FIELDS = {f"campaign_budget.{f}" for f in (
    "id", "name", "amount_micros", "total_amount_micros", "period", "delivery_method", "resource_name",
    "explicitly_shared", "status")}
_METRIC_FIELDS = {f"metrics.{f}" for f in (
    "impressions", "clicks", "cost_micros", "conversions", "ctr", "average_cpc")}
_SEGMENT_FIELDS = {"segments.date"}
RESOURCE_FIELDS = {
    "customer": _CUSTOMER_FIELDS | _METRIC_FIELDS | _SEGMENT_FIELDS,
    "customer_client": _CUSTOMER_CLIENT_FIELDS | _CUSTOMER_FIELDS,
    "campaign": _CAMPAIGN_FIELDS | _BUDGET_FIELDS | _CUSTOMER_FIELDS | _METRIC_FIELDS | _SEGMENT_FIELDS,
    "campaign_budget": _BUDGET_FIELDS | _CUSTOMER_FIELDS,
}
#: enum fields -> (module under google.ads.googleads.v26.enums.types, Enum class path)
_ENUM_FIELDS = {
    "customer.status": ("customer_status", "CustomerStatusEnum", "CustomerStatus"),
    "customer_client.status": ("customer_status", "CustomerStatusEnum", "CustomerStatus"),
    "campaign.status": ("campaign_status", "CampaignStatusEnum", "CampaignStatus"),
    "campaign.advertising_channel_type": ("advertising_channel_type", "AdvertisingChannelTypeEnum",
                                          "AdvertisingChannelType"),
    "campaign_budget.period": ("budget_period", "BudgetPeriodEnum", "BudgetPeriod"),
    "campaign_budget.delivery_method": ("budget_delivery_method", "BudgetDeliveryMethodEnum", "BudgetDeliveryMethod"),
    "campaign_budget.status": ("budget_status", "BudgetStatusEnum", "BudgetStatus"),
}


def _enum_value(field: str, name: str) -> int:
    import importlib
    module, outer, inner = _ENUM_FIELDS[field]
    mod = importlib.import_module(f"google.ads.googleads.{API_VERSION}.enums.types.{module}")
    return int(getattr(getattr(mod, outer), inner)[name])


def _date_range(conditions: list[Condition], today: dt.date) -> tuple[dt.date, dt.date] | None:
    """The ``segments.date`` range the conditions select (None when there is no date filter)."""
    lo: dt.date | None = None
    hi: dt.date | None = None
    found = False

    def parse(value) -> dt.date:
        try:
            return dt.date.fromisoformat(str(value))
        except ValueError:
            raise QueryProblem("INVALID_VALUE_WITH_BETWEEN_OPERATOR", f"Invalid date {value!r}.") from None

    for cond in conditions:
        if cond.field != "segments.date":
            continue
        found = True
        if cond.op == "BETWEEN":
            a, b = parse(cond.value[0]), parse(cond.value[1])
            lo, hi = max(lo or a, a), min(hi or b, b)
        elif cond.op == "DURING":
            named = _during(cond.value, today)
            lo, hi = max(lo or named[0], named[0]), min(hi or named[1], named[1])
        elif cond.op in (">=", ">"):
            d = parse(cond.value) + dt.timedelta(days=1 if cond.op == ">" else 0)
            lo = max(lo or d, d)
        elif cond.op in ("<=", "<"):
            d = parse(cond.value) - dt.timedelta(days=1 if cond.op == "<" else 0)
            hi = min(hi or d, d)
        elif cond.op == "=":
            d = parse(cond.value)
            lo, hi = max(lo or d, d), min(hi or d, d)
        else:
            raise QueryProblem("PROHIBITED_FIELD_IN_WHERE_CLAUSE", f"Unsupported operator on segments.date: {cond.op}")
    if not found:
        return None
    if lo is None or hi is None:
        raise QueryProblem("EXPECTED_FILTERS_ON_DATE_RANGE", "segments.date needs a finite date range.")
    if lo > hi:
        raise QueryProblem("DATE_RANGE_TOO_NARROW", "The start date is after the end date.")
    return lo, hi


def _during(name: str, today: dt.date) -> tuple[dt.date, dt.date]:
    if name == "TODAY":
        return today, today
    if name == "YESTERDAY":
        return today - dt.timedelta(days=1), today - dt.timedelta(days=1)
    m = re.fullmatch(r"LAST_(\d+)_DAYS", name)
    if m:
        return today - dt.timedelta(days=int(m[1])), today - dt.timedelta(days=1)
    if name == "THIS_MONTH":
        return today.replace(day=1), today
    if name == "LAST_MONTH":
        last = today.replace(day=1) - dt.timedelta(days=1)
        return last.replace(day=1), last
    raise QueryProblem("INVALID_VALUE_WITH_DURING_OPERATOR", f"Unsupported DURING value {name}.")


def _matches(value: Any, cond: Condition) -> bool:
    op, target = cond.op, cond.value
    if op == "IS_NULL":
        return value is None
    if op == "IS_NOT_NULL":
        return value is not None
    if value is None:
        return op in ("!=", "NOT_IN", "NOT_LIKE")
    if isinstance(value, bool) and isinstance(target, str):
        target = target.upper() == "TRUE"
    elif isinstance(value, int) and isinstance(target, str) and re.fullmatch(r"-?\d+", target):
        target = int(target)
    elif isinstance(value, str) and not isinstance(target, (list, tuple)):
        target = str(target)
    if op == "=":
        return value == target
    if op == "!=":
        return value != target
    if op == "IN":
        return value in [type(value)(t) if not isinstance(value, bool) else t for t in target]
    if op == "NOT_IN":
        return value not in [type(value)(t) if not isinstance(value, bool) else t for t in target]
    if op in ("LIKE", "NOT_LIKE"):
        pattern = "^" + re.escape(str(target)).replace("%", ".*").replace("_", ".") + "$"
        hit = re.match(pattern, str(value), re.I | re.S) is not None
        return hit if op == "LIKE" else not hit
    if op == "<":
        return value < target
    if op == "<=":
        return value <= target
    if op == ">":
        return value > target
    if op == ">=":
        return value >= target
    if op == "BETWEEN":
        return target[0] <= value <= target[1]
    raise QueryProblem("PROHIBITED_FIELD_IN_WHERE_CLAUSE", f"Unsupported operator {op}.")


# =============================================================================================
# Google Ads API (gRPC)
# =============================================================================================

class AdsApiError(Exception):
    """Raised inside a handler; turned into a GoogleAdsFailure + status code."""

    def __init__(self, status: str, error_field: str | None, error_name: str | None, message: str,
                 retry_delay: float | None = None):
        super().__init__(message)
        self.status, self.error_field, self.error_name = status, error_field, error_name
        self.message, self.retry_delay = message, retry_delay


class GoogleAdsApiServer:
    """The gRPC Google Ads API stand-in (TLS, loopback, free port). See the module docstring."""

    def __init__(self, sandbox: "GoogleSandbox", cert_path, key_path, host: str = "127.0.0.1", port: int = 0,
                 max_workers: int = 16):
        self.sandbox = sandbox
        self.cert_path, self.key_path = cert_path, key_path
        self.host, self.requested_port = host, port
        self.max_workers = max_workers
        self.port: int | None = None
        self._server = None
        self.calls: collections.Counter = collections.Counter()
        self._calls_lock = threading.Lock()

    # ---- lifecycle -----------------------------------------------------------------------------
    def start(self) -> int:
        import grpc
        from google.ads.googleads.v26.errors.types import errors as error_types
        from google.ads.googleads.v26.services.types import customer_service, google_ads_service

        self._types = google_ads_service
        self._error_types = error_types
        self._row_pb = google_ads_service.GoogleAdsRow.pb()
        self._stream_pb = google_ads_service.SearchGoogleAdsStreamResponse.pb()
        self._search_pb = google_ads_service.SearchGoogleAdsResponse.pb()
        self._enum_cache: dict[tuple[str, str], int] = {}
        ser = lambda message: message.SerializeToString()  # noqa: E731 - raw protobuf messages
        ads = grpc.method_handlers_generic_handler(f"google.ads.googleads.{API_VERSION}.services.GoogleAdsService", {
            "SearchStream": grpc.unary_stream_rpc_method_handler(
                self._search_stream, request_deserializer=google_ads_service.SearchGoogleAdsStreamRequest.deserialize,
                response_serializer=ser),
            "Search": grpc.unary_unary_rpc_method_handler(
                self._search, request_deserializer=google_ads_service.SearchGoogleAdsRequest.deserialize,
                response_serializer=ser),
        })
        customers = grpc.method_handlers_generic_handler(f"google.ads.googleads.{API_VERSION}.services.CustomerService", {
            "ListAccessibleCustomers": grpc.unary_unary_rpc_method_handler(
                self._list_accessible, request_deserializer=customer_service.ListAccessibleCustomersRequest.deserialize,
                response_serializer=customer_service.ListAccessibleCustomersResponse.serialize),
        })
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=self.max_workers, thread_name_prefix="gads"),
                             options=[("grpc.so_reuseport", 0)])
        server.add_generic_rpc_handlers((ads, customers))
        credentials = grpc.ssl_server_credentials([(self.key_path.read_bytes(), self.cert_path.read_bytes())])
        self.port = server.add_secure_port(f"{self.host}:{self.requested_port}", credentials)
        if not self.port:
            raise RuntimeError("could not bind the Google Ads sandbox gRPC port")
        server.start()
        self._server = server
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=0.5).wait(5)
            self._server = None

    # ---- common checks -------------------------------------------------------------------------
    def _count(self, method: str) -> None:
        with self._calls_lock:
            self.calls[method] += 1

    @staticmethod
    def _request_id() -> str:
        return uuid.uuid4().hex[:22]

    def _begin(self, method: str, context) -> dict:
        """Faults, latency and authentication. Returns the request metadata (lower-cased keys)."""
        self._count(method)
        sandbox = self.sandbox
        sandbox.faults.delay()
        metadata = {k.lower(): v for k, v in context.invocation_metadata()}
        fault = sandbox.faults.take("api")
        if fault is not None:
            raise self._fault_error(fault)
        auth = metadata.get("authorization", "")
        if not auth.lower().startswith("bearer "):
            raise AdsApiError("UNAUTHENTICATED", "authentication_error", "OAUTH_TOKEN_HEADER_INVALID",
                              "Authorization header is missing or malformed.")
        state = sandbox.oauth.check_access_token(auth[7:].strip())
        if state != "ok":
            name = {"expired": "OAUTH_TOKEN_EXPIRED", "revoked": "OAUTH_TOKEN_REVOKED"}.get(state, "OAUTH_TOKEN_INVALID")
            raise AdsApiError("UNAUTHENTICATED", "authentication_error", name,
                              "Request had invalid authentication credentials. Expected OAuth 2 access token.")
        developer_token = metadata.get("developer-token")
        if not developer_token:
            raise AdsApiError("INVALID_ARGUMENT", "request_error", "DEVELOPER_TOKEN_PARAMETER_MISSING",
                              "Developer token parameter is missing.")
        if developer_token != sandbox.developer_token:
            raise AdsApiError("UNAUTHENTICATED", "authentication_error", "DEVELOPER_TOKEN_INVALID",
                              "The developer token is not valid.")
        return metadata

    @staticmethod
    def _fault_error(fault) -> AdsApiError:
        kind = fault.kind.upper()
        if kind == "RESOURCE_EXHAUSTED":
            delay = fault.retry_delay if fault.retry_delay is not None else 30
            return AdsApiError("RESOURCE_EXHAUSTED", "quota_error", "RESOURCE_TEMPORARILY_EXHAUSTED",
                               "Too many requests. Retry in %s seconds." % int(delay), retry_delay=delay)
        if kind == "INTERNAL":
            return AdsApiError("INTERNAL", "internal_error", "INTERNAL_ERROR",
                               "An internal error has occurred.")
        if kind == "UNAVAILABLE":
            return AdsApiError("UNAVAILABLE", None, None, "The service is currently unavailable.")
        if kind == "DEADLINE_EXCEEDED":
            return AdsApiError("DEADLINE_EXCEEDED", "internal_error", "DEADLINE_EXCEEDED", "Deadline exceeded.")
        if kind == "UNAUTHENTICATED":
            return AdsApiError("UNAUTHENTICATED", "authentication_error", "OAUTH_TOKEN_REVOKED",
                               "Request had invalid authentication credentials.")
        if kind == "PERMISSION_DENIED":
            return AdsApiError("PERMISSION_DENIED", "authorization_error", "USER_PERMISSION_DENIED",
                               "User doesn't have permission to access customer.")
        return AdsApiError("INTERNAL", "internal_error", "INTERNAL_ERROR", f"Injected fault {kind}.")

    def _check_customer(self, customer_id: str, metadata: dict) -> "SandboxCustomer":
        data = self.sandbox.data
        customer_id = (customer_id or "").replace("-", "")
        if not re.fullmatch(r"\d{10}", customer_id):
            raise AdsApiError("INVALID_ARGUMENT", "request_error", "INVALID_CUSTOMER_ID",
                              "Invalid customer ID '%s'." % customer_id)
        customer = data.customer(customer_id)
        accessible = set(self.sandbox.accessible_customer_ids())
        if customer is None:
            raise AdsApiError("PERMISSION_DENIED", "authorization_error", "USER_PERMISSION_DENIED",
                              "User doesn't have permission to access customer. Note: If you're accessing a client "
                              "customer, the manager's customer id must be set in the 'login-customer-id' header.")
        login = (metadata.get("login-customer-id") or "").replace("-", "")
        if login:
            if login not in accessible:
                raise AdsApiError("PERMISSION_DENIED", "authorization_error", "USER_PERMISSION_DENIED",
                                  "User doesn't have permission to access the login customer.")
            if login != customer.id and customer.manager_id != login:
                raise AdsApiError("PERMISSION_DENIED", "authorization_error",
                                  "INVALID_LOGIN_CUSTOMER_ID_SERVING_CUSTOMER_ID_COMBINATION",
                                  "The login customer is not a manager of the serving customer.")
        elif customer.id not in accessible:
            raise AdsApiError("PERMISSION_DENIED", "authorization_error", "USER_PERMISSION_DENIED",
                              "User doesn't have permission to access customer. Note: If you're accessing a client "
                              "customer, the manager's customer id must be set in the 'login-customer-id' header.")
        return customer

    def _abort(self, context, error: AdsApiError, request_id: str):
        import grpc
        from google.protobuf import duration_pb2

        status = getattr(grpc.StatusCode, error.status)
        trailing = [("request-id", request_id)]
        if error.error_field:
            et = self._error_types
            enum_cls = et.ErrorCode.meta.fields[error.error_field].enum
            kwargs: dict[str, Any] = {"error_code": et.ErrorCode(**{error.error_field: enum_cls[error.error_name]}),
                                      "message": error.message}
            if error.retry_delay is not None:
                seconds = int(error.retry_delay)
                kwargs["details"] = et.ErrorDetails(quota_error_details=et.QuotaErrorDetails(
                    rate_scope=et.QuotaErrorDetails.QuotaRateScope.ACCOUNT,
                    rate_name="Number of operations for basic access",
                    retry_delay=duration_pb2.Duration(seconds=seconds,
                                                      nanos=int(round((error.retry_delay - seconds) * 1e9)))))
            failure = et.GoogleAdsFailure(errors=[et.GoogleAdsError(**kwargs)], request_id=request_id)
            trailing.insert(0, (FAILURE_METADATA_KEY, et.GoogleAdsFailure.serialize(failure)))
        context.set_trailing_metadata(tuple(trailing))
        context.abort(status, error.message)

    # ---- handlers ------------------------------------------------------------------------------
    def _list_accessible(self, request, context):
        from google.ads.googleads.v26.services.types import customer_service
        request_id = self._request_id()
        try:
            self._begin("ListAccessibleCustomers", context)
        except AdsApiError as exc:
            self._abort(context, exc, request_id)
        context.set_trailing_metadata((("request-id", request_id),))
        return customer_service.ListAccessibleCustomersResponse(
            resource_names=[f"customers/{cid}" for cid in self.sandbox.accessible_customer_ids()])

    def _search_stream(self, request, context):
        request_id = self._request_id()
        try:
            metadata = self._begin("SearchStream", context)
            customer = self._check_customer(request.customer_id, metadata)
            query, rows, mask = self._plan(customer, request.query)
            first = True
            for batch in batched(rows, STREAM_BATCH_ROWS):
                message = self._stream_pb(results=batch, request_id=request_id)
                message.field_mask.paths.extend(mask)
                first = False
                yield message
            if first:
                message = self._stream_pb(request_id=request_id)
                message.field_mask.paths.extend(mask)
                yield message
        except AdsApiError as exc:
            self._abort(context, exc, request_id)
            return
        context.set_trailing_metadata((("request-id", request_id),))

    def _search(self, request, context):
        request_id = self._request_id()
        try:
            metadata = self._begin("Search", context)
            customer = self._check_customer(request.customer_id, metadata)
            if request.page_size:
                raise AdsApiError("INVALID_ARGUMENT", "request_error", "PAGE_SIZE_NOT_SUPPORTED",
                                  "Setting the page size is not supported.")
            offset = 0
            if request.page_token:
                try:
                    offset = int(base64.urlsafe_b64decode(request.page_token.encode()).decode())
                except Exception:
                    raise AdsApiError("INVALID_ARGUMENT", "request_error", "INVALID_PAGE_TOKEN",
                                      "Page token is invalid.") from None
            query, rows, mask = self._plan(customer, request.query)
            page, total = [], 0
            for index, row in enumerate(rows):
                total = index + 1
                if offset <= index < offset + SEARCH_PAGE_ROWS:
                    page.append(row)
                elif index >= offset + SEARCH_PAGE_ROWS and not request.return_total_results_count:
                    total = None
                    break
            message = self._search_pb(results=page)
            message.field_mask.paths.extend(mask)
            if total is None or (total and offset + SEARCH_PAGE_ROWS < total):
                message.next_page_token = base64.urlsafe_b64encode(str(offset + SEARCH_PAGE_ROWS).encode()).decode()
            if request.return_total_results_count and total is not None:
                message.total_results_count = total
        except AdsApiError as exc:
            self._abort(context, exc, request_id)
            return None
        context.set_trailing_metadata((("request-id", request_id),))
        return message

    # ---- query execution -----------------------------------------------------------------------
    def _plan(self, customer: SandboxCustomer, text: str):
        """Validate a query and return ``(query, row iterator of raw GoogleAdsRow, field mask paths)``."""
        try:
            query = parse_gaql(text)
            allowed = RESOURCE_FIELDS.get(query.resource)
            if allowed is None:
                raise QueryProblem("PROHIBITED_RESOURCE_TYPE_IN_FROM_CLAUSE",
                                   f"Resource '{query.resource}' is not supported by the sandbox.")
            for field in query.fields + [c.field for c in query.conditions] + [o[0] for o in query.order_by]:
                if field not in allowed:
                    raise QueryProblem("UNRECOGNIZED_FIELD", f"Unrecognized field in the query: '{field}'.")
            wants_metrics = any(f.startswith("metrics.") for f in query.fields + [c.field for c in query.conditions])
            if wants_metrics and customer.manager:
                raise QueryProblem("REQUESTED_METRICS_FOR_MANAGER",
                                   "Metrics cannot be requested for a manager account. To retrieve metrics, issue "
                                   "separate requests against each client account under the manager account.")
            date_range = _date_range(query.conditions, self.sandbox.data.local_today(customer.id))
            if "segments.date" in query.fields and date_range is None:
                raise QueryProblem("EXPECTED_FILTERS_ON_DATE_RANGE",
                                   "Filtering by date range is required when segments.date is selected.")
        except QueryProblem as exc:
            raise AdsApiError("INVALID_ARGUMENT", "query_error", exc.code, str(exc)) from None
        flat = self._flat_rows(customer, query, wants_metrics, date_range)
        others = [c for c in query.conditions if c.field != "segments.date"]
        if others:
            flat = (r for r in flat if all(_matches(r.get(c.field), c) for c in others))
        if query.order_by and not wants_metrics:
            rows = list(flat)
            for field, desc in reversed(query.order_by):
                rows.sort(key=lambda r: (r.get(field) is None, r.get(field)), reverse=desc)
            flat = iter(rows)
        if query.limit is not None:
            flat = _limit(flat, query.limit)
        return query, (self._to_pb(r, query.fields) for r in flat), list(query.fields)

    def _flat_rows(self, customer, query: GaqlQuery, wants_metrics: bool, date_range) -> Iterator[dict]:
        data = self.sandbox.data
        cust = _customer_fields(customer)
        if query.resource == "customer":
            if not wants_metrics:
                yield cust
                return
            campaigns = data.campaigns(customer.id)
            yield from _metric_rows(data, customer, campaigns, date_range, "segments.date" in query.fields,
                                    lambda campaign: cust, group_all=True)
            return
        if query.resource == "customer_client":
            yield dict(cust, **_client_fields(customer, 0))
            if customer.manager:
                for client in data.customers():
                    if client.manager_id == customer.id:
                        yield dict(cust, **_client_fields(client, 1))
            return
        campaigns = data.campaigns(customer.id)
        if query.resource == "campaign_budget":
            for campaign in campaigns:
                yield dict(cust, **_budget_fields(campaign))
            return
        if not wants_metrics:
            for campaign in campaigns:
                yield dict(cust, **_campaign_fields(campaign))
            return
        yield from _metric_rows(data, customer, campaigns, date_range, "segments.date" in query.fields,
                                lambda campaign: dict(cust, **_campaign_fields(campaign)))

    def _to_pb(self, flat: dict, fields: list[str]):
        row = self._row_pb()
        for field in fields:
            value = flat.get(field)
            if value is None:
                continue
            resource, _, attr = field.partition(".")
            if value.__class__ is str and field in _ENUM_FIELDS:
                key = (field, value)
                cached = self._enum_cache.get(key)
                if cached is None:
                    cached = self._enum_cache[key] = _enum_value(field, value)
                value = cached
            setattr(getattr(row, resource), attr, value)
        return row


def _limit(rows: Iterator, limit: int) -> Iterator:
    for index, row in enumerate(rows):
        if index >= limit:
            return
        yield row


def _customer_fields(c: SandboxCustomer) -> dict:
    return {"customer.id": int(c.id), "customer.descriptive_name": c.name, "customer.currency_code": c.currency,
            "customer.time_zone": c.time_zone, "customer.manager": c.manager, "customer.status": c.status,
            "customer.resource_name": f"customers/{c.id}", "customer.test_account": False}


def _client_fields(c: SandboxCustomer, level: int) -> dict:
    return {"customer_client.id": int(c.id), "customer_client.client_customer": f"customers/{c.id}",
            "customer_client.descriptive_name": c.name, "customer_client.currency_code": c.currency,
            "customer_client.time_zone": c.time_zone, "customer_client.manager": c.manager,
            "customer_client.level": level, "customer_client.hidden": False, "customer_client.status": c.status,
            "customer_client.resource_name": f"customers/{c.manager_id or c.id}/customerClients/{c.id}",
            "customer_client.test_account": False}


def _budget_fields(c: SandboxCampaign) -> dict:
    return {"campaign_budget.id": c.budget_id, "campaign_budget.name": f"Budget {c.name}",
            "campaign_budget.amount_micros": c.budget_amount_micros,
            "campaign_budget.total_amount_micros": c.budget_total_micros,
            "campaign_budget.period": c.budget_period, "campaign_budget.delivery_method": c.budget_delivery,
            "campaign_budget.resource_name": f"customers/{c.customer_id}/campaignBudgets/{c.budget_id}",
            "campaign_budget.explicitly_shared": False,
            "campaign_budget.status": "REMOVED" if c.status == "REMOVED" else "ENABLED"}


def _campaign_fields(c: SandboxCampaign) -> dict:
    fields = {"campaign.id": c.id, "campaign.name": c.name, "campaign.status": c.status,
              "campaign.advertising_channel_type": c.channel_type, "campaign.start_date_time": c.start_date_time,
              "campaign.end_date_time": c.end_date_time,
              "campaign.resource_name": f"customers/{c.customer_id}/campaigns/{c.id}",
              "campaign.campaign_budget": f"customers/{c.customer_id}/campaignBudgets/{c.budget_id}"}
    fields.update(_budget_fields(c))
    return fields


def _metric_fields(impressions: int, clicks: int, cost: int, conversions: float) -> dict:
    return {"metrics.impressions": impressions, "metrics.clicks": clicks, "metrics.cost_micros": cost,
            "metrics.conversions": conversions, "metrics.ctr": clicks / impressions if impressions else 0.0,
            "metrics.average_cpc": cost / clicks if clicks else 0.0}


def _metric_rows(data: GoogleSandboxData, customer, campaigns, date_range, by_date: bool, base,
                 group_all: bool = False) -> Iterator[dict]:
    """Metric rows: per (date, campaign) when segmented by date, else totals per campaign (or per
    customer with ``group_all``). Rows without activity are omitted, as Google does."""
    if date_range is None:
        start = min((c.start_date for c in campaigns), default=data.local_today(customer.id))
        date_range = (start, data.local_today(customer.id))
    start, end = date_range
    if by_date and not group_all:
        bases: dict[int, dict] = {}  # per-campaign attribute fields, built once
        for row in data.daily_metrics(customer.id, start, end):
            cid = row["campaign_id"]
            common = bases.get(cid)
            if common is None:
                common = bases[cid] = base(data.campaign(cid))
            flat = dict(common)
            flat.update(_metric_fields(row["impressions"], row["clicks"], row["cost_micros"], row["conversions"]))
            flat["segments.date"] = row["date"].isoformat()
            yield flat
        return
    totals: dict[Any, list] = {}
    order: list = []
    for row in data.daily_metrics(customer.id, start, end):
        key = (row["date"] if by_date else None) if group_all else row["campaign_id"]
        if key not in totals:
            totals[key] = [0, 0, 0, 0.0]
            order.append(key)
        t = totals[key]
        t[0] += row["impressions"]
        t[1] += row["clicks"]
        t[2] += row["cost_micros"]
        t[3] += row["conversions"]
    for key in order:
        t = totals[key]
        flat = base(None if group_all else data.campaign(key))
        flat.update(_metric_fields(t[0], t[1], t[2], round(t[3], 2)))
        if by_date and group_all:
            flat["segments.date"] = key.isoformat()
        yield flat


# =============================================================================================
# the platform sandbox
# =============================================================================================

class GoogleSandbox:
    """Google OAuth + Google Ads API stand-in (see the module docstring).

    Options (``SandboxServer(options={"google": {...}})``): ``campaigns_per_client`` (50), ``clients``
    (list of ``{id, name, currency, time_zone}``), ``include_jpy`` (False), ``client_id``,
    ``client_secret``, ``developer_token``, ``redirect_uris`` (exact list; default any loopback URI),
    ``access_token_ttl`` (3600), ``grpc_port`` (0 = free), ``app_name``.
    """

    id = "google"

    def __init__(self, server, seed: int = 7, options: dict | None = None):
        options = dict(options or {})
        self.server = server
        self.seed = seed
        self.options = options
        self.data = GoogleSandboxData(seed, clients=options.get("clients"),
                                      campaigns_per_client=int(options.get("campaigns_per_client", 50)),
                                      include_jpy=bool(options.get("include_jpy", False)))
        self.client_id = options.get("client_id", "sandbox-ads-portal.apps.googleusercontent.com")
        self.client_secret = options.get("client_secret", f"GOCSPX-sandbox-{stable_int(seed, 'secret'):x}")
        self.developer_token = options.get("developer_token", "SANDBOX-DEVELOPER-TOKEN")
        self.faults = FaultInjector()
        self.oauth = GoogleOAuthServer(
            {self.client_id: {"secret": self.client_secret, "name": options.get("app_name", "Unified Ads (sandbox)"),
                              "redirect_uris": options.get("redirect_uris")}},
            self.faults, int(options.get("access_token_ttl", ACCESS_TOKEN_TTL)),
            state_file=Path(server.data_dir) / f"google-oauth-state-{seed}.json")
        self.api = GoogleAdsApiServer(self, server.cert_path, server.key_path, host="127.0.0.1",
                                      port=int(options.get("grpc_port", 0)))

    # ---- SandboxServer interface ---------------------------------------------------------------
    def register_routes(self, app) -> None:
        app.register_blueprint(self.oauth.blueprint())
        app.register_blueprint(self._admin_blueprint())

    def start(self) -> None:
        self.api.start()

    def stop(self) -> None:
        self.api.stop()

    def env(self) -> dict[str, str]:
        base = self.server.base_url
        return {
            "GOOGLE_CLIENT_ID": self.client_id,
            "GOOGLE_CLIENT_SECRET": self.client_secret,
            "GOOGLE_DEVELOPER_TOKEN": self.developer_token,
            "GOOGLE_AUTHORIZE_URL": f"{base}/google/o/oauth2/v2/auth",
            "GOOGLE_TOKEN_URL": f"{base}/google/token",
            "GOOGLE_REVOKE_URL": f"{base}/google/revoke",
            "GOOGLE_ADS_ENDPOINT": f"localhost:{self.api.port}" if self.api.port else "",
            "GOOGLE_ADS_CA_FILE": str(self.server.cert_path),
        }

    # ---- accessors -----------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        return f"localhost:{self.api.port}"

    def accessible_customer_ids(self) -> list[str]:
        """Customers the sandbox user reaches directly (``ListAccessibleCustomers``): the manager only;
        clients are reached through it (``login-customer-id``)."""
        return [self.data.manager.id]

    # ---- truth in document form (generic across platform sandboxes) ----------------------------
    def connect_form_values(self) -> dict[str, str]:
        """Values for the portal's connect form before the redirect (Google needs none)."""
        return {}

    def expected_campaigns(self, account_id: str) -> Iterator[dict[str, Any]]:
        """The campaign documents a correct connector produces for ``account_id`` (money in Decimal
        currency units, dates ``YYYY-MM-DD``)."""
        from decimal import Decimal

        customer = self.data.customer(account_id)
        for c in self.data.campaigns(account_id):
            micros = c.budget_amount_micros if c.budget_period == "DAILY" else c.budget_total_micros
            yield {"account_id": customer.id, "campaign_id": str(c.id), "name": c.name, "status": c.status,
                   "channel_type": c.channel_type, "currency": customer.currency,
                   "budget": Decimal(micros).scaleb(-6).normalize() if micros is not None else None,
                   "budget_period": c.budget_period, "budget_delivery": c.budget_delivery,
                   "start_date": c.start_date.isoformat(),
                   "end_date": c.end_date.isoformat() if c.end_date else None}

    def expected_metrics(self, account_id: str, start: dt.date, end: dt.date) -> Iterator[dict[str, Any]]:
        """The metric documents a correct connector produces for ``[start, end]`` (customer-local dates):
        ``{account_id, campaign_id (str), date ("YYYY-MM-DD"), impressions, clicks, spend (Decimal
        currency units), currency, conversions (Decimal)}``."""
        from decimal import Decimal

        customer = self.data.customer(account_id)
        for row in self.data.daily_metrics(account_id, start, end):
            yield {"account_id": customer.id, "campaign_id": str(row["campaign_id"]), "date": row["date"].isoformat(),
                   "impressions": row["impressions"], "clicks": row["clicks"],
                   "spend": Decimal(row["cost_micros"]).scaleb(-6).normalize() if row["cost_micros"] else Decimal(0),
                   "currency": customer.currency, "conversions": Decimal(repr(row["conversions"]))}

    # ---- knobs (Python) ------------------------------------------------------------------------
    def inject_fault(self, kind: str, count: int = 1, retry_delay: float | None = None, target: str = "api") -> None:
        """Make the next ``count`` Ads API calls (``target="api"``) or token requests (``"token"``) fail with
        ``kind``: RESOURCE_EXHAUSTED (with ``retry_delay`` seconds), INTERNAL, UNAVAILABLE, UNAUTHENTICATED,
        PERMISSION_DENIED, DEADLINE_EXCEEDED."""
        self.faults.inject(kind.upper(), count, retry_delay=retry_delay, target=target)

    def set_latency(self, seconds: float) -> None:
        """Delay every Ads API call by ``seconds``."""
        self.faults.set_latency(seconds)

    def revoke(self, refresh_token: str | None = None) -> int:
        """Revoke one grant (refresh token) or all; refresh then fails with invalid_grant and the
        grant's access tokens stop working."""
        return self.oauth.revoke(refresh_token)

    def expire_access_tokens(self, ttl: int | None = None) -> int:
        """Expire every live access token now; ``ttl`` sets the lifetime of new ones (0 = born expired)."""
        return self.oauth.expire_access_tokens(ttl)

    def restate(self, days: int = 3) -> dt.date:
        """Change the most recent ``days`` days' metrics (a restatement)."""
        return self.data.restate(days)

    def reset(self) -> None:
        """Clear faults, latency, restatements and the token TTL. Grants and tokens stay valid."""
        self.faults.reset()
        self.oauth.reset()
        self.data.reset_restatements()

    def stats(self) -> dict[str, int]:
        """Ads API calls received, per method."""
        with self.api._calls_lock:
            return dict(self.api.calls)

    # ---- knobs (HTTP) --------------------------------------------------------------------------
    def _admin_blueprint(self) -> Blueprint:
        bp = admin_blueprint("google_sandbox_admin", "/_sandbox/google")

        body = request_body

        @bp.post("/revoke")
        def revoke():
            return jsonify({"revoked": self.revoke(body().get("refresh_token"))})

        @bp.post("/expire-tokens")
        def expire_tokens():
            ttl = body().get("ttl")
            return jsonify({"expired": self.expire_access_tokens(int(ttl) if ttl is not None else None)})

        @bp.post("/faults")
        def faults():
            payload = body()
            if "latency" in payload:
                self.set_latency(float(payload["latency"]))
            kind = payload.get("kind")
            if kind:
                kind = str(kind).upper()
                if kind not in ("RESOURCE_EXHAUSTED", "INTERNAL", "UNAVAILABLE", "UNAUTHENTICATED",
                                "PERMISSION_DENIED", "DEADLINE_EXCEEDED"):
                    return _json({"error": f"unknown fault kind {kind}"}, 400)
                delay = payload.get("retry_delay")
                self.inject_fault(kind, payload.get("count", 1),
                                  float(delay) if delay is not None else None, payload.get("target", "api"))
            return jsonify({"pending": self.faults.pending(), "latency": self.faults.latency})

        @bp.post("/restate")
        def restate():
            return jsonify({"since": self.restate(int(body().get("days", 3))).isoformat()})

        @bp.post("/reset")
        def reset():
            self.reset()
            return jsonify({"reset": True})

        @bp.get("/stats")
        def stats():
            return jsonify({"calls": self.stats(), "pending_faults": self.faults.pending()})

        return bp
