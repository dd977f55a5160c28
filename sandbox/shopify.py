"""Offline Shopify stand-in: per-shop OAuth with expiring offline tokens and the GraphQL Admin API.

Four parts, glued by ``ShopifySandbox`` (the object ``SandboxServer.platform("shopify")`` returns):

``ShopifySandboxData`` — the seeded generator and truth accessor. Several shops with different
currencies (USD, EUR and the zero-decimal JPY) and IANA time zones; per shop a dozen marketing
activities (every useful status, the five marketing channels, budgets and ad spend for ads, UTM
parameters, marketing events with start/end) and orders computed on the fly from ``(seed, shop,
local date)`` with a customer journey (first/last visit with UTM parameters). Some UTM campaigns are
names from ``sandbox.common.SHARED_CAMPAIGN_NAMES`` (so Google/Meta spend joins shop sales); some
match no marketing activity ("UTM-only": every one has at least one attributed order every day);
some orders carry no UTM at all, some are cancelled or test orders.

``ShopifyOAuthServer`` — Flask routes under ``/shopify/<shop>``:
  ``GET  /shopify/<shop>/admin/oauth/authorize``          consent page (buttons ``decision=allow|deny``)
  ``POST /shopify/<shop>/admin/oauth/authorize/consent``  → redirect to the app with ``code, hmac, host,
                                                            shop, state, timestamp`` (HMAC-SHA256, hex)
  ``POST /shopify/<shop>/admin/oauth/access_token``       ``code`` (+ ``expiring=1``) and
                                                            ``grant_type=refresh_token`` (rotation)
  Expiring offline tokens follow Shopify's documented behaviour (changelog 2026-08-28, "More resilient
  refreshes"): the access token lasts ``expires_in`` = 3600 s, each refresh returns a new refresh token
  (90 days), and the *previous* refresh token stays usable until the app uses its replacement (at
  most 30 days after its own first use) — so an app that lost a refresh answer can retry with the
  token it has stored. Using a replacement retires its predecessor and every other replacement
  issued for it (a lost answer, or a concurrent refresh whose answer was not the one saved).
  Installs, refresh-token chains and live access tokens are kept in
  ``<data_dir>/shopify-oauth-state-<seed>.json`` so demo connections survive a sandbox restart.

GraphQL Admin API — ``POST /shopify/<shop>/admin/api/<version>/graphql.json`` with
``X-Shopify-Access-Token``: a real GraphQL executor (graphql-core) over a subset of the Admin schema
(``shop``, ``marketingActivities``, ``orders`` with ``customerJourneySummary``), connection
pagination (``first``/``after``, ``pageInfo``), the ``orders(query: "created_at:>='…' …")`` search
syntax, scope checks (``read_marketing_events``, ``read_orders``; orders older than 60 days need
``read_all_orders``, counted in whole shop-local days here so the truth stays deterministic), and
Shopify's cost model: every answer carries ``extensions.cost {requestedQueryCost, actualQueryCost,
throttleStatus {maximumAvailable, currentlyAvailable, restoreRate}}`` from a per-shop leaky bucket;
a query the bucket cannot pay for gets ``errors[].extensions.code = THROTTLED``; a query costing more
than 1000 gets ``MAX_COST_EXCEEDED``.

Admin knobs (HTTP, JSON bodies; each has a Python method on ``ShopifySandbox``):
  ``POST /_sandbox/shopify/faults``        ``{"kind": THROTTLED|HTTP_429|INTERNAL|UNAVAILABLE, "count": N,
                                            "retry_after": s, "target": "api"|"token", "latency": s}``
  ``POST /_sandbox/shopify/throttle``      ``{"shop": optional, "maximum": points, "restore_rate": points/s}``
  ``POST /_sandbox/shopify/revoke``        ``{"shop"|"token": optional}`` → the app is uninstalled (from the
                                            token's install, the shop, or everywhere): its tokens die
  ``POST /_sandbox/shopify/expire-tokens`` ``{"ttl": optional seconds for new tokens}``
  ``POST /_sandbox/shopify/clock-skew``    ``{"seconds": s}`` → callback timestamps shifted (stale callbacks)
  ``POST /_sandbox/shopify/reset``         faults, latency, throttle, skew and TTL back to defaults
  ``GET  /_sandbox/shopify/stats``         calls per operation, throttled answers, 429s

Money: ``MoneyV2.amount`` is a decimal string in the shop currency (``"59.9"``, ``"7480.0"`` for JPY).
Dates of the truth are shop-local ``YYYY-MM-DD``. The sandbox's "today" is already complete (orders
are generated for the whole local day) so the truth never depends on the clock within a day.
"""
from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import hashlib
import hmac
import html
import json
import logging
import math
import re
import secrets
import threading
import time
import zoneinfo
from decimal import Decimal
from pathlib import Path
from typing import Any, Iterable, Iterator
from urllib.parse import urlencode, urlsplit

from flask import Blueprint, Response, jsonify, redirect, request

from sandbox.common import (SHARED_CAMPAIGN_NAMES, FaultInjector, admin_blueprint, digest_units, read_state_file,
                            redirect_allowed, request_body, seeded_random, stable_int, write_state_file)

log = logging.getLogger(__name__)

SUPPORTED_VERSIONS = ("2025-10", "2026-01", "2026-04", "2026-07", "2026-10")
ACCESS_TOKEN_TTL = 3600
REFRESH_TOKEN_TTL = 90 * 86400
#: how long a used refresh token stays retryable while its replacement is unused (changelog 2026-08-28)
REFRESH_RECOVERY_WINDOW = 30 * 86400
CODE_TTL = 600
MAX_QUERY_COST = 1000
MAX_PAGE_SIZE = 250
ORDERS_VISIBLE_DAYS = 60
#: Shopify Plus-like bucket (points, points per second): a 60-day backfill never waits by default
DEFAULT_THROTTLE = (20_000.0, 1_000.0)
KNOWN_SCOPES = {"read_marketing_events", "write_marketing_events", "read_orders", "write_orders", "read_all_orders",
                "read_products", "read_customers", "read_analytics", "read_reports"}
DOCS_RATE_LIMITS = "https://shopify.dev/api/usage/rate-limits"

DEFAULT_SHOPS = (
    {"domain": "sandbox-outdoor.myshopify.com", "name": "Sandbox Outdoor Supply", "currency": "USD",
     "time_zone": "America/New_York", "email": "owner@outdoor.example"},
    {"domain": "sandbox-wanderlust.myshopify.com", "name": "Sandbox Wanderlust Berlin", "currency": "EUR",
     "time_zone": "Europe/Berlin", "email": "owner@wanderlust.example"},
    {"domain": "sandbox-kyoto-crafts.myshopify.com", "name": "Sandbox Kyoto Crafts", "currency": "JPY",
     "time_zone": "Asia/Tokyo", "email": "owner@kyoto.example"},
)

ZERO_DECIMAL = {"JPY", "KRW", "CLP", "VND", "ISK", "HUF"}
CURRENCY_SCALE = {"USD": 1, "EUR": 0.95, "GBP": 0.8, "CAD": 1.35, "AUD": 1.5, "JPY": 150, "KRW": 1300}

ACTIVITY_STATUSES = ("ACTIVE", "INACTIVE", "PAUSED", "SCHEDULED", "DRAFT", "DELETED_EXTERNALLY")
CHANNELS = ("SOCIAL", "SEARCH", "EMAIL", "DISPLAY", "REFERRAL")
_CHANNEL_PROFILE = {  # channel -> (tactic, utm_source, utm_medium, paid?)
    "SOCIAL": ("AD", "facebook", "paid_social", True),
    "SEARCH": ("AD", "google", "cpc", True),
    "EMAIL": ("NEWSLETTER", "shopify_email", "email", False),
    "DISPLAY": ("RETARGETING", "google", "display", True),
    "REFERRAL": ("AFFILIATE", "partner", "referral", False),
}
_THEMES = ("Autumn Drop", "Trail Season", "Loyalty Perks", "Gift Ideas", "Weekend Flash Sale", "New Colours",
           "Back in Stock", "Member Preview", "Winter Warmers", "Staff Picks", "Outlet", "Bundle Deals")
_SHOP_ONLY_UTM = ("newsletter_weekly", "influencer_collab", "instagram_bio", "podcast_sponsor")
_WEEKDAY = (1.0, 1.04, 1.05, 1.02, 1.1, 1.25, 1.15)


# =============================================================================================
# data generator
# =============================================================================================

@dataclasses.dataclass(frozen=True)
class SandboxShop:
    """A shop: ``domain`` is ``<name>.myshopify.com``; money in ``currency``; dates local to ``time_zone``."""

    index: int
    domain: str
    name: str
    currency: str
    time_zone: str
    email: str

    @property
    def zone(self) -> zoneinfo.ZoneInfo:
        return zoneinfo.ZoneInfo(self.time_zone)


@dataclasses.dataclass(frozen=True)
class SandboxActivity:
    """A marketing activity. Money as ``Decimal`` in the shop currency; ``start``/``end`` are UTC instants
    of its marketing event (None for drafts / open-ended); orders are attributed to it on shop-local days
    ``first_day``..``last_day`` (``last_day`` None: still running; ``first_day`` None: never ran)."""

    shop: str
    id: int
    title: str
    status: str
    channel: str
    tactic: str
    is_external: bool
    created_at: dt.datetime
    budget_type: str | None
    budget: Decimal | None
    ad_spend: Decimal | None
    utm_campaign: str
    utm_source: str
    utm_medium: str
    event_id: int | None
    started_at: dt.datetime | None
    ended_at: dt.datetime | None
    scheduled_to_end_at: dt.datetime | None
    first_day: dt.date | None
    last_day: dt.date | None
    weight: float

    @property
    def gid(self) -> str:
        return f"gid://shopify/MarketingActivity/{self.id}"

    def runs_on(self, day: dt.date) -> bool:
        return self.first_day is not None and day >= self.first_day and (self.last_day is None or day <= self.last_day)


@dataclasses.dataclass(frozen=True)
class SandboxVisit:
    """One visit of a customer journey; ``utm`` is ``(campaign, source, medium)`` or None (no UTM)."""

    occurred_at: dt.datetime
    source: str
    utm: tuple[str, str, str] | None


@dataclasses.dataclass(frozen=True)
class SandboxOrder:
    """An order. ``total`` is the current total price in the shop currency; ``created_at`` is UTC.
    ``journey`` None means Shopify has no customer journey for it; ``ready`` False means not computed yet
    (no visits)."""

    shop: str
    id: int
    name: str
    created_at: dt.datetime
    total: Decimal
    currency: str
    test: bool
    cancelled_at: dt.datetime | None
    journey: tuple[bool, SandboxVisit | None, SandboxVisit | None] | None  # (ready, first, last)

    @property
    def attributed_campaign(self) -> str | None:
        """The UTM campaign the order is attributed to: the last visit's, else the first visit's
        (the documented connector rule), lower-cased; None without any."""
        if self.journey is None:
            return None
        _ready, first, last = self.journey
        for visit in (last, first):
            if visit is not None and visit.utm and visit.utm[0].strip():
                return visit.utm[0].strip().lower()
        return None

    @property
    def counts(self) -> bool:
        """True for orders a correct connector counts (not cancelled, not a test order)."""
        return not self.test and self.cancelled_at is None


def _iso(moment: dt.datetime | None) -> str | None:
    if moment is None:
        return None
    return moment.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _amount(value: Decimal) -> str:
    """Shopify's Decimal rendering: ``"59.9"``, ``"12.0"``, ``"7480.0"``."""
    text = format(value.normalize(), "f")
    return text if "." in text else text + ".0"


def _local_midnight_utc(day: dt.date, zone: zoneinfo.ZoneInfo) -> dt.datetime:
    return dt.datetime.combine(day, dt.time(0), zone).astimezone(dt.timezone.utc)


class ShopifySandboxData:
    """Deterministic shops, marketing activities and orders, and the truth tests compare against.

    Args:
        seed: generator seed (same seed → same shops, activities and orders).
        shops: shop specs ``{domain, name, currency, time_zone, email}``; default three shops (USD
            America/New_York, EUR Europe/Berlin, JPY Asia/Tokyo).
        activities_per_shop: marketing activities per shop (≥ 6 so every status appears).
        anchor: the date activity dates are generated around (default: today, UTC).

    Orders are computed on the fly per (shop, local date) in constant memory; ``orders_between`` streams
    them in ``created_at`` order.
    """

    def __init__(self, seed: int = 7, shops: Iterable[dict] | None = None, activities_per_shop: int = 12,
                 anchor: dt.date | None = None):
        self.seed = seed
        self.anchor = anchor or dt.datetime.now(dt.timezone.utc).date()
        specs = list(shops) if shops is not None else list(DEFAULT_SHOPS)
        self._shops: dict[str, SandboxShop] = {}
        self._activities: dict[str, list[SandboxActivity]] = {}
        self._utm_only: dict[str, tuple[str, ...]] = {}
        for index, spec in enumerate(specs):
            shop = SandboxShop(index, spec["domain"], spec["name"], spec["currency"], spec["time_zone"],
                               spec.get("email", f"owner@{spec['domain']}"))
            self._shops[shop.domain] = shop
            self._activities[shop.domain] = self._generate_activities(shop, max(6, activities_per_shop))
            used = {a.utm_campaign for a in self._activities[shop.domain]}
            shared_free = [n for n in SHARED_CAMPAIGN_NAMES if n not in used]
            rng = seeded_random(seed, "utm-only", shop.domain)
            picks = rng.sample(shared_free, k=min(2, len(shared_free)))
            picks.append(_SHOP_ONLY_UTM[index % len(_SHOP_ONLY_UTM)])
            self._utm_only[shop.domain] = tuple(picks)

    # ---- static entities -----------------------------------------------------------------------
    @staticmethod
    def exponent(currency: str) -> int:
        """Minor-unit digits of a currency (0 for JPY and other zero-decimal currencies, else 2)."""
        return 0 if currency in ZERO_DECIMAL else 2

    def _money(self, units: float, currency: str) -> Decimal:
        step = Decimal(1).scaleb(-self.exponent(currency))
        return max(step, Decimal(repr(units)).quantize(step))

    def _generate_activities(self, shop: SandboxShop, count: int) -> list[SandboxActivity]:
        rng = seeded_random(self.seed, "activities", shop.domain)
        scale = CURRENCY_SCALE.get(shop.currency, 1)
        shared = list(SHARED_CAMPAIGN_NAMES)
        rng.shuffle(shared)
        shared_for_activities = shared[:4]
        zone = shop.zone
        activities = []
        used_utm: set[str] = set()
        for i in range(count):
            status = ACTIVITY_STATUSES[i] if i < len(ACTIVITY_STATUSES) else \
                rng.choices(ACTIVITY_STATUSES, (55, 25, 10, 4, 3, 3))[0]
            channel = CHANNELS[i % len(CHANNELS)]
            tactic, source, medium, paid = _CHANNEL_PROFILE[channel]
            theme = _THEMES[(i + shop.index * 5) % len(_THEMES)]
            title = f"{theme} — {channel.title()}"
            if i < len(shared_for_activities):
                utm = shared_for_activities[i]
            else:
                utm = re.sub(r"[^a-z0-9]+", "_", theme.lower()).strip("_") + f"_{channel.lower()}"
            while utm in used_utm:
                utm += "_2"
            used_utm.add(utm)
            first_day = last_day = None
            started_at = ended_at = scheduled_end = None
            if status == "DRAFT":
                start_day = None
            elif status == "SCHEDULED":
                start_day = self.anchor + dt.timedelta(days=rng.randint(3, 30))
            else:
                start_day = self.anchor - dt.timedelta(days=rng.randint(20, 150))
            if start_day is not None:
                started_at = dt.datetime.combine(start_day, dt.time(9, 0), zone).astimezone(dt.timezone.utc)
            if status in ("ACTIVE", "PAUSED", "INACTIVE", "DELETED_EXTERNALLY"):
                first_day = start_day
                span = (self.anchor - start_day).days
                if status in ("INACTIVE", "DELETED_EXTERNALLY"):
                    last_day = start_day + dt.timedelta(days=rng.randint(7, max(8, span - 2)))
                    ended_at = dt.datetime.combine(last_day, dt.time(23, 0), zone).astimezone(dt.timezone.utc)
                elif status == "PAUSED":
                    last_day = self.anchor - dt.timedelta(days=rng.randint(2, max(3, min(span, 40))))
                    last_day = max(last_day, start_day)
                elif rng.random() < 0.4:
                    end_day = self.anchor + dt.timedelta(days=rng.randint(5, 60))
                    scheduled_end = dt.datetime.combine(end_day, dt.time(23, 59), zone).astimezone(dt.timezone.utc)
            elif status == "SCHEDULED":
                end_day = start_day + dt.timedelta(days=rng.randint(7, 30))
                scheduled_end = dt.datetime.combine(end_day, dt.time(23, 59), zone).astimezone(dt.timezone.utc)
            budget_type = budget = ad_spend = None
            if paid:
                budget_type = rng.choice(("DAILY", "LIFETIME"))
                units = rng.randint(20, 400) * scale if budget_type == "DAILY" else rng.randint(500, 20_000) * scale
                budget = self._money(units, shop.currency)
                if first_day is not None:
                    ran = ((last_day or self.anchor) - first_day).days + 1
                    ad_spend = self._money(ran * rng.uniform(8, 120) * scale, shop.currency)
            created = (started_at or dt.datetime.combine(self.anchor, dt.time(8, 0), zone).astimezone(dt.timezone.utc)) \
                - dt.timedelta(days=rng.randint(1, 10), minutes=rng.randint(0, 600))
            activity_id = 31_000_000_000 + (shop.index + 1) * 10_000_000 + i * 1_000 + rng.randrange(1_000)
            activities.append(SandboxActivity(
                shop=shop.domain, id=activity_id, title=title, status=status, channel=channel, tactic=tactic,
                is_external=paid, created_at=created.replace(microsecond=0), budget_type=budget_type, budget=budget,
                ad_spend=ad_spend, utm_campaign=utm, utm_source=source, utm_medium=medium,
                event_id=None if status == "DRAFT" else activity_id + 500_000,
                started_at=started_at, ended_at=ended_at, scheduled_to_end_at=scheduled_end,
                first_day=first_day, last_day=last_day, weight=rng.uniform(0.4, 2.2)))
        activities.sort(key=lambda a: (a.created_at, a.id))
        return activities

    # ---- accessors -----------------------------------------------------------------------------
    def shops(self) -> list[SandboxShop]:
        """Every shop, in configuration order."""
        return list(self._shops.values())

    def shop(self, domain: str) -> SandboxShop | None:
        """The shop with this ``<name>.myshopify.com`` domain (None when unknown)."""
        return self._shops.get((domain or "").lower())

    def activities(self, domain: str) -> list[SandboxActivity]:
        """The shop's marketing activities ordered by ``created_at`` (Shopify's ``CREATED_AT`` sort)."""
        return list(self._activities.get(domain, ()))

    def utm_only_campaigns(self, domain: str) -> tuple[str, ...]:
        """UTM campaigns of the shop's orders that match no marketing activity."""
        return self._utm_only.get(domain, ())

    def local_today(self, domain: str) -> dt.date:
        """Today in the shop's time zone: the last date that has orders."""
        return dt.datetime.now(self._shops[domain].zone).date()

    def first_visible_day(self, domain: str, all_orders: bool = False) -> dt.date | None:
        """The first shop-local date whose orders the API returns (60 days without ``read_all_orders``)."""
        if all_orders:
            return None
        return self.local_today(domain) - dt.timedelta(days=ORDERS_VISIBLE_DAYS - 1)

    # ---- orders --------------------------------------------------------------------------------
    def orders_on(self, domain: str, day: dt.date) -> list[SandboxOrder]:
        """Every order created on a shop-local date (cancelled and test orders included), by time.

        Every UTM-only campaign gets at least one counted, attributed order per day."""
        shop = self._shops[domain]
        if day > self.local_today(domain):
            return []
        zone = shop.zone
        midnight = _local_midnight_utc(day, zone)
        day_seconds = int((_local_midnight_utc(day + dt.timedelta(days=1), zone) - midnight).total_seconds())
        rng = seeded_random(self.seed, "orders", domain, day.toordinal())
        weekday = _WEEKDAY[day.weekday()]
        plan: list[tuple[str | None, bool]] = []  # (intended utm campaign, guaranteed clean?)
        for name in self._utm_only[domain]:
            plan.append((name, True))
            plan.extend((name, False) for _ in range(_poisson(rng, 0.7 * weekday)))
        for activity in self._activities[domain]:
            if activity.runs_on(day):
                plan.extend((activity.utm_campaign, False) for _ in range(_poisson(rng, activity.weight * weekday)))
        plan.extend((None, False) for _ in range(_poisson(rng, 4.0 * weekday)))
        scale = CURRENCY_SCALE.get(shop.currency, 1)
        by_utm = {a.utm_campaign: a for a in self._activities[domain]}
        orders = []
        for index, (campaign, clean) in enumerate(plan):
            u = digest_units(self.seed, "order", domain, day.toordinal(), index, count=8)
            created = (midnight + dt.timedelta(seconds=int(u[0] * day_seconds))).replace(microsecond=0)
            total = self._money(math.exp(3.6 + 0.7 * (u[1] - 0.5) * 3) * scale, shop.currency)
            test = not clean and u[2] < 0.02
            cancelled = None if clean or u[3] >= 0.03 else created + dt.timedelta(hours=2 + int(u[4] * 30))
            journey = self._journey(created, campaign, clean, u[5], u[6], u[7], by_utm)
            order_id = 5_400_000_000_000 + shop.index * 100_000_000_000 + day.toordinal() * 1000 + index
            orders.append(SandboxOrder(domain, order_id, "", created, total, shop.currency, test, cancelled, journey))
        orders.sort(key=lambda o: (o.created_at, o.id))
        return [dataclasses.replace(o, name=f"#{(day.toordinal() % 100_000) * 100 + n + 1}")
                for n, o in enumerate(orders)]

    def _journey(self, created: dt.datetime, campaign: str | None, clean: bool, u1: float, u2: float, u3: float,
                 by_utm: dict[str, SandboxActivity]):
        def utm_of(name: str) -> tuple[str, str, str]:
            activity = by_utm.get(name)
            if activity is not None:
                return (name, activity.utm_source, activity.utm_medium)
            return (name, "newsletter" if "newsletter" in name else "google", "email" if "newsletter" in name else "cpc")

        first_at = created - dt.timedelta(days=int(u2 * 12), minutes=5 + int(u3 * 300))
        last_at = created - dt.timedelta(minutes=2 + int(u3 * 40))
        if campaign is None:
            if u1 < 0.06:
                return None
            if u1 < 0.12:
                return (False, None, None)
            return (True, SandboxVisit(first_at, "google", None), SandboxVisit(last_at, "direct", None))
        if clean or u1 >= 0.15:
            first_utm = utm_of(campaign) if u2 < 0.6 else None
            return (True, SandboxVisit(first_at, "google" if first_utm is None else first_utm[1], first_utm),
                    SandboxVisit(last_at, utm_of(campaign)[1], utm_of(campaign)))
        if u1 < 0.05:
            # an order whose journey is not ready yet: no visits, so nothing to attribute
            return (False, None, None)
        # the last visit came without UTM (a direct return): the first visit's campaign counts
        return (True, SandboxVisit(first_at, utm_of(campaign)[1], utm_of(campaign)), SandboxVisit(last_at, "direct", None))

    def orders_between(self, domain: str, start: dt.datetime, end: dt.datetime,
                       all_orders: bool = False) -> Iterator[SandboxOrder]:
        """Orders with ``start <= created_at < end`` (UTC instants), in ``(created_at, id)`` order, limited
        to the visible days (60 shop-local days without ``read_all_orders``)."""
        shop = self._shops[domain]
        zone = shop.zone
        day = start.astimezone(zone).date()
        last = min((end - dt.timedelta(microseconds=1)).astimezone(zone).date(), self.local_today(domain))
        first_visible = self.first_visible_day(domain, all_orders)
        if first_visible is not None:
            day = max(day, first_visible)
        while day <= last:
            for order in self.orders_on(domain, day):
                if start <= order.created_at < end:
                    yield order
            day += dt.timedelta(days=1)

    # ---- truth ---------------------------------------------------------------------------------
    def daily_attribution(self, domain: str, start: dt.date, end: dt.date,
                          all_orders: bool = False) -> dict[tuple[str, str], tuple[int, Decimal]]:
        """``{(shop-local date ISO, utm campaign lower-case): (orders, revenue)}`` over counted orders."""
        totals: dict[tuple[str, str], list] = {}
        first_visible = self.first_visible_day(domain, all_orders)
        day = max(start, first_visible) if first_visible else start
        end = min(end, self.local_today(domain))
        while day <= end:
            for order in self.orders_on(domain, day):
                campaign = order.attributed_campaign
                if campaign is None or not order.counts:
                    continue
                entry = totals.setdefault((day.isoformat(), campaign), [0, Decimal(0)])
                entry[0] += 1
                entry[1] += order.total
            day += dt.timedelta(days=1)
        return {k: (v[0], v[1]) for k, v in totals.items()}


def _poisson(rng, lam: float) -> int:
    """A Poisson draw (Knuth) from a ``random.Random``; small ``lam`` only."""
    if lam <= 0:
        return 0
    limit, k, p = math.exp(-lam), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


# =============================================================================================
# OAuth server
# =============================================================================================

def shopify_hmac(params: dict[str, str], secret: str) -> str:
    """Shopify's callback signature: hex HMAC-SHA256 over the sorted ``k=v`` pairs (``hmac`` left out)
    joined by ``&``, with ``%``/``&``/``=`` escaped as Shopify does."""
    pairs = []
    for key, value in params.items():
        if key == "hmac":
            continue
        key = str(key).replace("%", "%25").replace("=", "%3D")
        value = str(value).replace("%", "%25")
        pairs.append(f"{key}={value}".replace("&", "%26"))
    return hmac.new(secret.encode(), "&".join(sorted(pairs)).encode(), hashlib.sha256).hexdigest()


@dataclasses.dataclass
class _Install:
    """An installation of the app on a shop (revoked = uninstalled)."""

    shop: str
    client_id: str
    scope: str
    revoked: bool = False


@dataclasses.dataclass
class _RefreshToken:
    value: str
    install: _Install
    expires_at: float
    predecessor: "_RefreshToken | None" = None
    replacements: list = dataclasses.field(default_factory=list)
    first_used_at: float | None = None
    retired: bool = False


@dataclasses.dataclass
class _AccessToken:
    install: _Install
    expires_at: float | None  # None: a non-expiring offline token


class TokenProblem(Exception):
    """A token endpoint refusal: ``error`` / ``error_description`` answered with HTTP ``status``."""

    def __init__(self, error: str, description: str, status: int = 400):
        super().__init__(error)
        self.error, self.description, self.status = error, description, status


class ShopifyOAuthServer:
    """Shopify's per-shop OAuth state (consents, codes, installs, refresh-token chains). Thread-safe.

    ``clients``: ``{api_key: {"secret", "name", "redirect_uris" (None = any loopback URI)}}``.
    ``check_access_token(shop, token)`` → ``(status, scope)`` with status ``ok | expired | revoked | invalid``.
    """

    def __init__(self, data: ShopifySandboxData, clients: dict[str, dict], faults: FaultInjector,
                 access_token_ttl: int = ACCESS_TOKEN_TTL, state_file: Path | None = None):
        self.data = data
        self.clients = clients
        self.faults = faults
        self.default_ttl = access_token_ttl
        self.access_token_ttl = access_token_ttl
        self.clock_skew = 0
        self._lock = threading.RLock()
        self._consents: dict[str, dict] = {}
        self._codes: dict[str, dict] = {}
        self._installs: list[_Install] = []
        self._refresh: dict[str, _RefreshToken] = {}
        self._tokens: dict[str, _AccessToken] = {}
        self.token_calls = {"authorization_code": 0, "refresh_token": 0, "rejected": 0}
        self.state_file = Path(state_file) if state_file else None
        self._load()

    # ---- persistence: installs, refresh-token chains and live access tokens survive a restart ----
    def _load(self) -> None:
        state = read_state_file(self.state_file)
        if state is None:
            return
        try:
            installs = [_Install(i["shop"], i["client_id"], i["scope"], i.get("revoked", False))
                        for i in state.get("installs", [])]
            for value, r in state.get("refresh", {}).items():
                self._refresh[value] = _RefreshToken(value, installs[r["install"]], r["expires_at"],
                                                     first_used_at=r.get("first_used_at"), retired=r.get("retired", False))
            for value, r in state.get("refresh", {}).items():
                self._refresh[value].predecessor = self._refresh.get(r.get("predecessor") or "")
                self._refresh[value].replacements = [self._refresh[v] for v in r.get("replacements", [])
                                                     if v in self._refresh]
            for value, t in state.get("tokens", {}).items():
                self._tokens[value] = _AccessToken(installs[t["install"]], t.get("expires_at"))
            self._installs = installs
        except (OSError, ValueError, KeyError, IndexError, TypeError):
            log.warning("ignoring an unreadable Shopify sandbox state file %s", self.state_file)
            self._installs, self._refresh, self._tokens = [], {}, {}

    def _save(self) -> None:
        """Write installs, usable refresh tokens and live access tokens to ``state_file`` (0600, atomic)."""
        if not self.state_file:
            return
        now = time.time()
        with self._lock:
            index = {id(install): n for n, install in enumerate(self._installs)}
            refresh = {v: r for v, r in self._refresh.items() if not r.retired and r.expires_at > now}
            state = {
                "installs": [{"shop": i.shop, "client_id": i.client_id, "scope": i.scope, "revoked": i.revoked}
                             for i in self._installs],
                "refresh": {v: {"install": index[id(r.install)], "expires_at": r.expires_at,
                                "first_used_at": r.first_used_at, "retired": r.retired,
                                "predecessor": r.predecessor.value if r.predecessor else None,
                                "replacements": [x.value for x in r.replacements if x.value in refresh]}
                            for v, r in refresh.items()},
                "tokens": {v: {"install": index[id(t.install)], "expires_at": t.expires_at}
                           for v, t in self._tokens.items() if t.expires_at is None or t.expires_at > now},
            }
            write_state_file(self.state_file, state)

    # ---- helpers -------------------------------------------------------------------------------
    def _redirect_allowed(self, client: dict, redirect_uri: str) -> bool:
        return redirect_allowed(client.get("redirect_uris"), redirect_uri)

    def signed_callback(self, redirect_uri: str, shop: str, client_id: str, params: dict[str, str]) -> str:
        """``redirect_uri`` with ``params`` plus ``host``, ``shop``, ``timestamp`` and their ``hmac``."""
        name = shop.split(".")[0]
        full = dict(params)
        full.update({"host": base64.b64encode(f"admin.shopify.com/store/{name}".encode()).decode().rstrip("="),
                     "shop": shop, "timestamp": str(int(time.time()) + int(self.clock_skew))})
        full["hmac"] = shopify_hmac(full, self.clients[client_id]["secret"])
        return redirect_uri + ("&" if urlsplit(redirect_uri).query else "?") + urlencode(full)

    def _authenticate(self, form: dict) -> str:
        client_id = form.get("client_id") or ""
        client = self.clients.get(client_id)
        if client is None or not secrets.compare_digest(str(form.get("client_secret") or ""), client["secret"]):
            raise TokenProblem("invalid_client", "Client authentication failed: the API key or secret is wrong.", 401)
        return client_id

    def _issue(self, install: _Install, expiring: bool, predecessor: _RefreshToken | None = None) -> dict:
        now = time.time()
        access = "shpat_sandbox_" + secrets.token_hex(16)
        with self._lock:
            ttl = self.access_token_ttl
            self._tokens[access] = _AccessToken(install, now + ttl if expiring else None)
            answer: dict[str, Any] = {"access_token": access, "scope": install.scope}
            if expiring:
                refresh = _RefreshToken("shprt_sandbox_" + secrets.token_hex(24), install, now + REFRESH_TOKEN_TTL,
                                        predecessor=predecessor)
                self._refresh[refresh.value] = refresh
                answer.update({"expires_in": ttl, "refresh_token": refresh.value,
                               "refresh_token_expires_in": REFRESH_TOKEN_TTL})
            if predecessor is not None:
                predecessor.replacements.append(self._refresh[answer["refresh_token"]])
            self._save()
        return answer

    # ---- grants --------------------------------------------------------------------------------
    def exchange_code(self, shop: str, form: dict) -> dict:
        """``code`` (+ ``expiring=1``) → token answer; the code is single use and bound to shop and app.
        Without ``expiring=1`` the token never expires and has no refresh token (Shopify's legacy form)."""
        client_id = self._authenticate(form)
        code = form.get("code") or ""
        with self._lock:
            entry = self._codes.get(code)
            if entry is None or entry["used"] or entry["expires_at"] < time.time():
                raise TokenProblem("invalid_request", "The authorization code was not found or was already used.")
            entry["used"] = True
        if entry["client_id"] != client_id or entry["shop"] != shop:
            raise TokenProblem("invalid_request", "The authorization code was not issued for this shop and app.")
        install = _Install(shop, client_id, entry["scope"])
        with self._lock:
            self._installs.append(install)
        expiring = str(form.get("expiring", "")).strip() in ("1", "true")
        return self._issue(install, expiring)

    def refresh(self, shop: str, form: dict) -> dict:
        """Rotate: a new access + refresh token pair. The presented token stays retryable until one of
        its replacements is used (≤ 30 days from its first use); using a replacement retires its
        predecessor and the predecessor's other (never used) replacements."""
        client_id = self._authenticate(form)
        now = time.time()
        with self._lock:
            token = self._refresh.get(form.get("refresh_token") or "")
            if token is None or token.install.shop != shop or token.install.client_id != client_id:
                raise TokenProblem("invalid_grant", "The refresh token is invalid.")
            if token.install.revoked:
                raise TokenProblem("invalid_grant", "The app was uninstalled from this shop.")
            if token.retired:
                raise TokenProblem("invalid_grant", "The refresh token was already rotated and its replacement used.")
            if token.expires_at <= now:
                raise TokenProblem("invalid_grant", "The refresh token expired.")
            if token.first_used_at is not None and now - token.first_used_at > REFRESH_RECOVERY_WINDOW:
                raise TokenProblem("invalid_grant", "The refresh token's recovery period is over.")
            if token.first_used_at is None:
                token.first_used_at = now
            if token.predecessor is not None:
                # the app uses this replacement: the old token and any other answer to it are gone for good
                token.predecessor.retired = True
                for sibling in token.predecessor.replacements:
                    if sibling is not token:
                        sibling.retired = True
        return self._issue(token.install, True, predecessor=token)

    def check_access_token(self, shop: str, token: str) -> tuple[str, str]:
        """``(status, granted scope)`` of an access token presented to ``shop``'s Admin API."""
        with self._lock:
            entry = self._tokens.get(token or "")
            if entry is None or entry.install.shop != shop:
                return "invalid", ""
            if entry.install.revoked:
                return "revoked", ""
            if entry.expires_at is not None and entry.expires_at <= time.time():
                return "expired", ""
            return "ok", entry.install.scope

    # ---- knobs ---------------------------------------------------------------------------------
    def _install_of(self, token: str) -> _Install | None:
        entry = self._tokens.get(token) or self._refresh.get(token)
        return entry.install if entry is not None else None

    def revoke(self, shop: str | None = None, token: str | None = None) -> int:
        """Uninstall the app: from the install an access/refresh ``token`` belongs to, else from one
        ``shop``, else from every shop. Its tokens and refresh tokens stop working. Returns installs hit."""
        with self._lock:
            if token is not None:
                install = self._install_of(token)
                if install is None:
                    return 0
                install.revoked = True
                self._save()
                return 1
            count = 0
            for install in self._installs:
                if shop is None or install.shop == shop:
                    install.revoked = True
                    count += 1
            self._save()
            return count

    def expire_access_tokens(self, ttl: int | None = None, token: str | None = None) -> int:
        """Expire one access ``token`` or every live one now; ``ttl`` sets the lifetime of new ones."""
        with self._lock:
            if ttl is not None:
                self.access_token_ttl = max(0, int(ttl))
            targets = [self._tokens[token]] if token in self._tokens else [] if token else list(self._tokens.values())
            for entry in targets:
                entry.expires_at = 0
            self._save()
            return len(targets)

    def reset(self) -> None:
        """Token TTL and callback clock skew back to their defaults (installs and tokens stay)."""
        with self._lock:
            self.access_token_ttl = self.default_ttl
            self.clock_skew = 0

    # ---- HTTP routes ---------------------------------------------------------------------------
    def register(self, bp: Blueprint) -> None:
        """Add the authorize page, the consent answer and the token endpoint to ``bp`` (``/shopify``)."""
        @bp.get("/<shop>/admin/oauth/authorize")
        def authorize(shop: str):
            shop_obj = self.data.shop(shop)
            if shop_obj is None:
                return _page("Store unavailable", "There's no store at this address."), 404
            args = request.args
            client_id = args.get("client_id", "")
            client = self.clients.get(client_id)
            if client is None:
                return _page("Oauth error invalid_request", "The client_id provided is invalid."), 400
            redirect_uri = args.get("redirect_uri", "")
            if not redirect_uri or not self._redirect_allowed(client, redirect_uri):
                return _page("Oauth error invalid_request",
                             "The redirect_uri is not whitelisted for this app."), 400
            scopes = [s for s in re.split(r"[,\s]+", args.get("scope", "")) if s]
            unknown = [s for s in scopes if s not in KNOWN_SCOPES]
            if not scopes or unknown:
                return _page("Oauth error invalid_scope",
                             f"Invalid scope: {', '.join(unknown) or '(none requested)'}."), 400
            consent_id = secrets.token_urlsafe(24)
            with self._lock:
                self._consents[consent_id] = {"shop": shop_obj.domain, "client_id": client_id,
                                              "redirect_uri": redirect_uri, "scope": ",".join(scopes),
                                              "state": args.get("state"), "expires_at": time.time() + 600}
            return _consent_page(shop_obj, client.get("name", client_id), scopes, consent_id)

        @bp.post("/<shop>/admin/oauth/authorize/consent")
        def consent(shop: str):
            with self._lock:
                entry = self._consents.pop(request.form.get("consent_id", ""), None)
            if entry is None or entry["expires_at"] < time.time() or entry["shop"] != shop:
                return _page("Oauth error invalid_request", "This install request expired or was already answered."), 400
            extra = {"state": entry["state"]} if entry["state"] is not None else {}
            if request.form.get("decision") != "allow":
                return redirect(self.signed_callback(entry["redirect_uri"], shop, entry["client_id"],
                                                     {"error": "access_denied", **extra}), code=302)
            code = secrets.token_hex(16)
            with self._lock:
                self._codes[code] = dict(entry, used=False, expires_at=time.time() + CODE_TTL)
            return redirect(self.signed_callback(entry["redirect_uri"], shop, entry["client_id"],
                                                 {"code": code, **extra}), code=302)

        @bp.post("/<shop>/admin/oauth/access_token")
        def access_token(shop: str):
            if self.data.shop(shop) is None:
                return _json({"errors": "Not Found"}, 404)
            fault = self.faults.take("token")
            if fault is not None:
                if fault.kind == "HTTP_429":
                    return _json({"errors": "Too many requests"}, 429, {"Retry-After": str(fault.retry_delay or 1)})
                return _json({"errors": "Internal Server Error"}, 503 if fault.kind == "UNAVAILABLE" else 500)
            form = request.form.to_dict() or (request.get_json(silent=True) or {})
            try:
                if form.get("grant_type") == "refresh_token":
                    answer = self.refresh(shop, form)
                    self.token_calls["refresh_token"] += 1
                elif form.get("grant_type") in (None, "", "authorization_code"):
                    answer = self.exchange_code(shop, form)
                    self.token_calls["authorization_code"] += 1
                else:
                    raise TokenProblem("unsupported_grant_type", f"Unsupported grant_type {form.get('grant_type')}.")
            except TokenProblem as exc:
                self.token_calls["rejected"] += 1
                return _json({"error": exc.error, "error_description": exc.description}, exc.status)
            return _json(answer, 200)


def _json(body: Any, status: int, headers: dict | None = None) -> Response:
    response = Response(json.dumps(body), status=status, mimetype="application/json")
    response.headers["Cache-Control"] = "no-store"
    for key, value in (headers or {}).items():
        response.headers[key] = value
    return response


def _page(title: str, message: str) -> str:
    return (f"<!doctype html><title>{html.escape(title)}</title><h1>{html.escape(title)}</h1>"
            f"<p id='error'>{html.escape(message)}</p>")


_SCOPE_LABELS = {"read_marketing_events": "View marketing activities and events",
                 "read_orders": "View orders, transactions and fulfillments (last 60 days)",
                 "read_all_orders": "View all orders, including older than 60 days"}


def _consent_page(shop: SandboxShop, app_name: str, scopes: list[str], consent_id: str) -> str:
    items = "".join(f"<li><code>{html.escape(s)}</code> — {html.escape(_SCOPE_LABELS.get(s, s))}</li>" for s in scopes)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Install app - {html.escape(shop.name)} (Shopify sandbox)</title>
<style>body{{font-family:sans-serif;max-width:36rem;margin:3rem auto}}button{{padding:.5rem 1.5rem;margin-right:1rem}}</style>
</head><body>
<h1>Shopify (sandbox)</h1>
<p>Install <strong id="app-name">{html.escape(app_name)}</strong> on <strong id="shop">{html.escape(shop.name)}</strong>
(<code>{html.escape(shop.domain)}</code>)?</p>
<p>This app will be able to:</p><ul id="scopes">{items}</ul>
<form method="post" action="/shopify/{html.escape(shop.domain)}/admin/oauth/authorize/consent">
<input type="hidden" name="consent_id" value="{html.escape(consent_id)}">
<button type="submit" name="decision" value="deny" id="deny">Cancel</button>
<button type="submit" name="decision" value="allow" id="allow">Install app</button>
</form></body></html>"""


# =============================================================================================
# GraphQL Admin API
# =============================================================================================

SCHEMA_SDL = """
scalar DateTime
scalar Decimal
scalar URL

enum CurrencyCode { USD EUR GBP CAD AUD JPY KRW CHF SEK DKK NOK PLN }
enum MarketingActivityStatus { ACTIVE DELETED DELETED_EXTERNALLY DISCONNECTED DRAFT FAILED INACTIVE PAUSED PENDING SCHEDULED UNDEFINED }
enum MarketingChannel { DISPLAY EMAIL REFERRAL SEARCH SOCIAL }
enum MarketingTactic { ABANDONED_CART AD AFFILIATE DIRECT DISPLAY LINK LOYALTY MESSAGE NEWSLETTER NOTIFICATION POST RETARGETING SEO STOREFRONT_APP TRANSACTIONAL }
enum MarketingBudgetBudgetType { DAILY LIFETIME }
enum MarketingActivitySortKeys { CREATED_AT ID RELEVANCE TITLE }
enum OrderSortKeys { CREATED_AT ID PROCESSED_AT TOTAL_PRICE UPDATED_AT }
enum CountPrecision { AT_LEAST EXACT }

type Query {
  shop: Shop!
  marketingActivities(first: Int, after: String, last: Int, before: String, reverse: Boolean = false,
                      sortKey: MarketingActivitySortKeys = CREATED_AT, query: String): MarketingActivityConnection!
  orders(first: Int, after: String, last: Int, before: String, reverse: Boolean = false,
         sortKey: OrderSortKeys = PROCESSED_AT, query: String): OrderConnection!
}

type Shop {
  id: ID!
  name: String!
  email: String!
  myshopifyDomain: String!
  currencyCode: CurrencyCode!
  ianaTimezone: String!
  timezoneAbbreviation: String!
  timezoneOffset: String!
  timezoneOffsetMinutes: Int!
}

type MoneyV2 { amount: Decimal! currencyCode: CurrencyCode! }
type MoneyBag { shopMoney: MoneyV2! presentmentMoney: MoneyV2! }
type UTMParameters { campaign: String content: String medium: String source: String term: String }
type MarketingBudget { budgetType: MarketingBudgetBudgetType! total: MoneyV2! }
type PageInfo { hasNextPage: Boolean! hasPreviousPage: Boolean! startCursor: String endCursor: String }
type Count { count: Int! precision: CountPrecision! }

type MarketingEvent {
  id: ID!
  type: MarketingTactic!
  marketingChannelType: MarketingChannel
  remoteId: String
  startedAt: DateTime!
  endedAt: DateTime
  scheduledToEndAt: DateTime
  utmCampaign: String
  utmMedium: String
  utmSource: String
  sourceAndMedium: String!
}

type MarketingActivity {
  id: ID!
  title: String!
  status: MarketingActivityStatus!
  statusLabel: String!
  marketingChannelType: MarketingChannel!
  tactic: MarketingTactic!
  isExternal: Boolean!
  createdAt: DateTime!
  updatedAt: DateTime!
  sourceAndMedium: String!
  adSpend: MoneyV2
  budget: MarketingBudget
  utmParameters: UTMParameters
  marketingEvent: MarketingEvent
}
type MarketingActivityEdge { cursor: String! node: MarketingActivity! }
type MarketingActivityConnection { edges: [MarketingActivityEdge!]! nodes: [MarketingActivity!]! pageInfo: PageInfo! }

type CustomerVisit {
  id: ID!
  occurredAt: DateTime!
  source: String!
  landingPage: URL
  utmParameters: UTMParameters
}
type CustomerJourneySummary {
  ready: Boolean!
  customerOrderIndex: Int
  daysToConversion: Int
  firstVisit: CustomerVisit
  lastVisit: CustomerVisit
  momentsCount: Count
}
type Order {
  id: ID!
  name: String!
  createdAt: DateTime!
  processedAt: DateTime!
  cancelledAt: DateTime
  test: Boolean!
  currencyCode: CurrencyCode!
  totalPriceSet: MoneyBag!
  currentTotalPriceSet: MoneyBag!
  customerJourneySummary: CustomerJourneySummary
}
type OrderEdge { cursor: String! node: Order! }
type OrderConnection { edges: [OrderEdge!]! nodes: [Order!]! pageInfo: PageInfo! }
"""

#: root field -> scope it needs (any of)
_FIELD_SCOPES = {"marketingActivities": ("read_marketing_events", "write_marketing_events"),
                 "orders": ("read_orders", "write_orders", "read_all_orders")}
_SEARCH_TERM = re.compile(r"(?P<field>created_at|processed_at|updated_at):(?P<op><=|>=|<|>|=)?"
                          r"(?P<q>['\"]?)(?P<value>[^'\"\s]+)(?P=q)", re.I)


class GraphQLProblem(Exception):
    """A GraphQL-level error answered with HTTP 200 and ``errors``."""

    def __init__(self, message: str, code: str, path: list | None = None, **extensions):
        super().__init__(message)
        self.code, self.path, self.extensions = code, path, extensions

    def as_error(self) -> dict:
        error: dict[str, Any] = {"message": str(self), "extensions": {"code": self.code, **self.extensions}}
        if self.path:
            error["path"] = self.path
        return error


class _Bucket:
    """Shopify's leaky bucket for one (app, shop): ``available`` points, refilled at ``rate`` per second."""

    def __init__(self, maximum: float, rate: float):
        self.maximum, self.rate = float(maximum), float(rate)
        self.available = float(maximum)
        self.stamp = time.monotonic()

    def refill(self) -> None:
        now = time.monotonic()
        self.available = min(self.maximum, self.available + (now - self.stamp) * self.rate)
        self.stamp = now

    def status(self) -> dict:
        return {"maximumAvailable": self.maximum, "currentlyAvailable": int(self.available), "restoreRate": self.rate}


def _connection_page(items: list, first: int | None, last: int | None, after: str | None, before: str | None,
                     key_of) -> dict:
    """Relay connection over ``items`` (already sorted) with opaque cursors (base64 of the item key)."""
    def cursor(item) -> str:
        return base64.b64encode(json.dumps({"last_id": key_of(item)}).encode()).decode()

    def position(token: str) -> int:
        try:
            wanted = json.loads(base64.b64decode(token.encode()).decode())["last_id"]
        except Exception:
            raise GraphQLProblem("Invalid cursor for current pagination sort.", "BAD_REQUEST") from None
        for index, item in enumerate(items):
            if key_of(item) == wanted:
                return index
        raise GraphQLProblem("Invalid cursor for current pagination sort.", "BAD_REQUEST")

    start, stop = 0, len(items)
    if after:
        start = position(after) + 1
    if before:
        stop = position(before)
    window = items[start:stop]
    if first is not None:
        page = window[:first]
        has_next, has_prev = len(window) > first, start > 0
    else:
        page = window[-last:] if last else []
        has_next, has_prev = stop < len(items), len(window) > len(page)
    edges = [{"cursor": cursor(item), "node": item} for item in page]
    return {"edges": edges, "nodes": page,
            "pageInfo": {"hasNextPage": has_next, "hasPreviousPage": has_prev,
                         "startCursor": edges[0]["cursor"] if edges else None,
                         "endCursor": edges[-1]["cursor"] if edges else None}}


class ShopifyAdminApi:
    """The GraphQL Admin endpoint: auth, scopes, cost/throttle, execution. Thread-safe."""

    def __init__(self, sandbox: "ShopifySandbox"):
        from graphql import build_schema

        self.sandbox = sandbox
        self.data = sandbox.data
        self.schema = build_schema(SCHEMA_SDL)
        self._parsed: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._buckets: dict[str, _Bucket] = {}
        self.default_throttle = tuple(sandbox.options.get("throttle", DEFAULT_THROTTLE))
        self.calls: dict[str, int] = {}
        self.throttled = 0
        self.rate_limited = 0

    # ---- throttle knobs ------------------------------------------------------------------------
    def bucket(self, shop: str) -> _Bucket:
        """The shop's cost bucket (created full with the default throttle)."""
        with self._lock:
            bucket = self._buckets.get(shop)
            if bucket is None:
                bucket = self._buckets[shop] = _Bucket(*self.default_throttle)
            return bucket

    def set_throttle(self, maximum: float, restore_rate: float, shop: str | None = None) -> None:
        """Give one shop (or every shop) a fresh full bucket with these limits."""
        with self._lock:
            shops = [shop] if shop else [s.domain for s in self.data.shops()]
            for domain in shops:
                self._buckets[domain] = _Bucket(maximum, restore_rate)

    def reset(self) -> None:
        """Every bucket back to the default throttle (full)."""
        with self._lock:
            self._buckets.clear()

    def _count(self, name: str) -> None:
        with self._lock:
            self.calls[name] = self.calls.get(name, 0) + 1

    # ---- parsing and cost ----------------------------------------------------------------------
    def _document(self, text: str):
        from graphql import parse, validate
        from graphql.error import GraphQLError

        with self._lock:
            cached = self._parsed.get(text)
        if cached is not None:
            return cached
        try:
            document = parse(text)
        except GraphQLError as exc:
            return [{"message": exc.message, "locations": [l._asdict() for l in exc.locations or []],
                     "extensions": {"code": "parseError"}}]
        errors = validate(self.schema, document)
        result = [{"message": e.message, "locations": [l._asdict() for l in e.locations or []],
                   "extensions": {"code": "validationError"}} for e in errors] if errors else document
        with self._lock:
            if len(self._parsed) > 256:
                self._parsed.clear()
            self._parsed[text] = result
        return result

    def _cost(self, parent, selection_set, variables: dict, fragments: dict, data=None) -> int:
        """Shopify-style cost: objects 1, scalars/enums 0, connections 2 + first × node cost (requested)
        or 2 + returned nodes' cost (actual, when ``data`` is given)."""
        from graphql import GraphQLList, GraphQLNonNull, GraphQLObjectType, get_named_type
        from graphql.language import FieldNode, FragmentSpreadNode, InlineFragmentNode

        total = 0
        for selection in selection_set.selections if selection_set else []:
            if isinstance(selection, (InlineFragmentNode, FragmentSpreadNode)):
                inner = selection.selection_set if isinstance(selection, InlineFragmentNode) \
                    else fragments[selection.name.value].selection_set
                total += self._cost(parent, inner, variables, fragments, data)
                continue
            if not isinstance(selection, FieldNode) or selection.name.value.startswith("__"):
                continue
            field = parent.fields.get(selection.name.value)
            if field is None:
                continue
            named = get_named_type(field.type)
            if not isinstance(named, GraphQLObjectType):
                continue
            alias = selection.alias.value if selection.alias else selection.name.value
            value = data.get(alias) if isinstance(data, dict) else None
            if named.name.endswith("Connection"):
                args = _arguments(selection, variables)
                page = args.get("first") or args.get("last") or 0
                node_type = named.fields["nodes"].type
                node_type = get_named_type(node_type)
                per_item_requested = 0
                for sub in selection.selection_set.selections:
                    if isinstance(sub, FieldNode) and sub.name.value == "edges":
                        for inner in sub.selection_set.selections:
                            if isinstance(inner, FieldNode) and inner.name.value == "node":
                                per_item_requested += 1 + self._cost(node_type, inner.selection_set, variables, fragments)
                    elif isinstance(sub, FieldNode) and sub.name.value == "nodes":
                        per_item_requested += 1 + self._cost(node_type, sub.selection_set, variables, fragments)
                if data is None:
                    total += 2 + page * per_item_requested
                    continue
                total += 2
                if isinstance(value, dict):
                    for sub in selection.selection_set.selections:
                        if not isinstance(sub, FieldNode):
                            continue
                        key = sub.alias.value if sub.alias else sub.name.value
                        if sub.name.value == "edges":
                            for edge in value.get(key) or []:
                                for inner in sub.selection_set.selections:
                                    if isinstance(inner, FieldNode) and inner.name.value == "node":
                                        ikey = inner.alias.value if inner.alias else "node"
                                        total += 1 + self._cost(node_type, inner.selection_set, variables, fragments,
                                                                edge.get(ikey) or {})
                        elif sub.name.value == "nodes":
                            for node in value.get(key) or []:
                                total += 1 + self._cost(node_type, sub.selection_set, variables, fragments, node or {})
                continue
            is_list = isinstance(field.type, GraphQLList) or (
                isinstance(field.type, GraphQLNonNull) and isinstance(field.type.of_type, GraphQLList))
            if data is None:
                total += 1 + self._cost(named, selection.selection_set, variables, fragments)
            elif value is not None:
                items = value if is_list else [value]
                for item in items:
                    total += 1 + self._cost(named, selection.selection_set, variables, fragments, item)
        return total

    # ---- request handling ----------------------------------------------------------------------
    def handle(self, shop: str, version: str):
        """``POST /shopify/<shop>/admin/api/<version>/graphql.json``: token, faults, parse/validate, cost
        and throttle, execution; always Shopify's answer shapes (401/404/429/5xx, or 200 with ``errors``)."""
        sandbox = self.sandbox
        if self.data.shop(shop) is None:
            return _json({"errors": "Not Found"}, 404)
        if version not in SUPPORTED_VERSIONS:
            return _json({"errors": "Not Found"}, 404)
        sandbox.faults.delay()
        status, scope = sandbox.oauth.check_access_token(shop, request.headers.get("X-Shopify-Access-Token", ""))
        if status != "ok":
            self._count("unauthorized")
            return _json({"errors": "[API] Invalid API key or access token (unrecognized login or wrong password)"}, 401)
        fault = sandbox.faults.take("api")
        if fault is not None:
            if fault.kind == "HTTP_429":
                with self._lock:
                    self.rate_limited += 1
                return _json({"errors": "Exceeded 2 calls per second for api client. Reduce request rates to resume "
                                        "uninterrupted service."}, 429, {"Retry-After": f"{fault.retry_delay or 1.0:g}"})
            if fault.kind in ("INTERNAL", "UNAVAILABLE"):
                return _json({"errors": "Internal Server Error"}, 500 if fault.kind == "INTERNAL" else 503)
            if fault.kind == "THROTTLED":
                bucket = self.bucket(shop)
                with self._lock:
                    bucket.refill()
                    bucket.available = 0.0  # somebody else drained the bucket
        body = request.get_json(silent=True)
        if not isinstance(body, dict) or not isinstance(body.get("query"), str):
            return _json({"errors": {"query": "Required parameter missing or invalid"}}, 400)
        variables = body.get("variables") or {}
        document = self._document(body["query"])
        if isinstance(document, list):
            return _json({"errors": document}, 200)
        return self._execute(shop, scope, document, variables, body.get("operationName"))

    def _execute(self, shop: str, scope: str, document, variables: dict, operation_name: str | None):
        from graphql import execute
        from graphql.language import FragmentDefinitionNode, OperationDefinitionNode

        operations = [d for d in document.definitions if isinstance(d, OperationDefinitionNode)]
        fragments = {d.name.value: d for d in document.definitions if isinstance(d, FragmentDefinitionNode)}
        operation = next((o for o in operations if operation_name and o.name and o.name.value == operation_name),
                         operations[0] if operations else None)
        if operation is None or operation.operation.value != "query":
            return _json({"errors": [{"message": "Only queries are supported by the sandbox.",
                                      "extensions": {"code": "BAD_REQUEST"}}]}, 200)
        root = self.schema.query_type
        requested = self._cost(root, operation.selection_set, variables, fragments)
        granted = set(filter(None, re.split(r"[,\s]+", scope)))
        fields = [s.name.value for s in operation.selection_set.selections if hasattr(s, "name")]
        for name in fields:
            self._count(name)
        if requested > MAX_QUERY_COST:
            return _json({"errors": [{"message": f"Query cost is {requested}, which exceeds the single query max "
                                                 f"cost limit ({MAX_QUERY_COST}).",
                                      "extensions": {"code": "MAX_COST_EXCEEDED", "cost": requested,
                                                     "maxCost": MAX_QUERY_COST}}]}, 200)
        bucket = self.bucket(shop)
        with self._lock:
            bucket.refill()
            if bucket.available < requested:
                self.throttled += 1
                return _json({"errors": [{"message": "Throttled", "extensions": {"code": "THROTTLED",
                                                                                 "documentation": DOCS_RATE_LIMITS}}],
                              "extensions": {"cost": {"requestedQueryCost": requested, "actualQueryCost": None,
                                                      "throttleStatus": bucket.status()}}}, 200)
            bucket.available -= requested
        errors: list[dict] = []
        root_value = _RootResolver(self, shop, granted)
        result = execute(self.schema, document, root_value=root_value, variable_values=variables,
                         operation_name=operation_name)
        for error in result.errors or []:
            original = error.original_error
            if isinstance(original, GraphQLProblem):
                problem = original.as_error()
                problem["path"] = list(error.path or [])
                problem["locations"] = [l._asdict() for l in error.locations or []]
                errors.append(problem)
            else:
                log.warning("sandbox GraphQL error: %s", error.message)
                errors.append({"message": error.message, "path": list(error.path or []),
                               "extensions": {"code": "INTERNAL_SERVER_ERROR"}})
        actual = self._cost(root, operation.selection_set, variables, fragments, result.data or {})
        with self._lock:
            bucket.available = min(bucket.maximum, bucket.available + max(0, requested - actual))
            status = bucket.status()
        payload: dict[str, Any] = {}
        if errors:
            payload["errors"] = errors
        payload["data"] = result.data
        payload["extensions"] = {"cost": {"requestedQueryCost": requested, "actualQueryCost": actual,
                                          "throttleStatus": status}}
        return _json(payload, 200)


def _arguments(field_node, variables: dict) -> dict:
    from graphql.language import IntValueNode, StringValueNode, VariableNode

    args = {}
    for argument in field_node.arguments or []:
        value = argument.value
        if isinstance(value, VariableNode):
            args[argument.name.value] = variables.get(value.name.value)
        elif isinstance(value, IntValueNode):
            args[argument.name.value] = int(value.value)
        elif isinstance(value, StringValueNode):
            args[argument.name.value] = value.value
    return args


class _RootResolver(dict):
    """Root value for graphql-core: ``shop``, ``marketingActivities``, ``orders`` resolved from the data."""

    def __init__(self, api: ShopifyAdminApi, shop: str, granted: set[str]):
        super().__init__(shop=self.shop, marketingActivities=self.marketing_activities, orders=self.orders)
        self.api, self.domain, self.granted = api, shop, granted

    def _require(self, field: str) -> None:
        needed = _FIELD_SCOPES[field]
        if not self.granted.intersection(needed):
            raise GraphQLProblem(f"Access denied for {field} field. Required access: `{needed[0]}` access scope.",
                                 "ACCESS_DENIED", documentation="https://shopify.dev/api/usage/access-scopes",
                                 requiredAccess=f"`{needed[0]}` access scope.")

    @staticmethod
    def _page_args(first, last) -> None:
        if first is None and last is None:
            raise GraphQLProblem("you must provide one of first or last", "BAD_REQUEST")
        for value in (first, last):
            if value is not None and not 0 < value <= MAX_PAGE_SIZE:
                raise GraphQLProblem(f"The first/last argument must be between 1 and {MAX_PAGE_SIZE}.", "BAD_REQUEST")

    def shop(self, info):
        shop = self.api.data.shop(self.domain)
        now = dt.datetime.now(shop.zone)
        offset = now.utcoffset() or dt.timedelta(0)
        minutes = int(offset.total_seconds() // 60)
        return {"id": f"gid://shopify/Shop/{70_000_000 + shop.index}", "name": shop.name, "email": shop.email,
                "myshopifyDomain": shop.domain, "currencyCode": shop.currency, "ianaTimezone": shop.time_zone,
                "timezoneAbbreviation": now.tzname() or "", "timezoneOffsetMinutes": minutes,
                "timezoneOffset": f"{'+' if minutes >= 0 else '-'}{abs(minutes) // 60:02d}{abs(minutes) % 60:02d}"}

    def marketing_activities(self, info, first=None, after=None, last=None, before=None, reverse=False,
                             sortKey="CREATED_AT", query=None):
        self._require("marketingActivities")
        self._page_args(first, last)
        shop = self.api.data.shop(self.domain)
        activities = self.api.data.activities(self.domain)
        if sortKey == "ID":
            activities.sort(key=lambda a: a.id)
        elif sortKey == "TITLE":
            activities.sort(key=lambda a: (a.title, a.id))
        if reverse:
            activities.reverse()
        page = _connection_page(activities, first, last, after, before, key_of=lambda a: a.id)
        page["edges"] = [{"cursor": e["cursor"], "node": _activity_node(e["node"], shop)} for e in page["edges"]]
        page["nodes"] = [e["node"] for e in page["edges"]]
        return page

    def orders(self, info, first=None, after=None, last=None, before=None, reverse=False, sortKey="PROCESSED_AT",
               query=None):
        self._require("orders")
        self._page_args(first, last)
        start, end = _created_at_bounds(query or "")
        shop = self.api.data.shop(self.domain)
        if start is None:
            start = dt.datetime.combine(self.api.data.anchor - dt.timedelta(days=400), dt.time(0), dt.timezone.utc)
        if end is None:
            end = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=2)
        all_orders = "read_all_orders" in self.granted
        orders = list(self.api.data.orders_between(self.domain, start, end, all_orders=all_orders))
        if sortKey == "ID":
            orders.sort(key=lambda o: o.id)
        if reverse:
            orders.reverse()
        page = _connection_page(orders, first, last, after, before, key_of=lambda o: o.id)
        page["edges"] = [{"cursor": e["cursor"], "node": _order_node(e["node"], shop)} for e in page["edges"]]
        page["nodes"] = [e["node"] for e in page["edges"]]
        return page


def _created_at_bounds(query: str) -> tuple[dt.datetime | None, dt.datetime | None]:
    """``[start, end)`` UTC bounds from Shopify search terms ``created_at:>=…``/``>…``/``<…``/``<=…``."""
    start = end = None
    for match in _SEARCH_TERM.finditer(query):
        if match["field"].lower() != "created_at":
            continue
        raw = match["value"]
        try:
            if len(raw) == 10:
                moment = dt.datetime.fromisoformat(raw).replace(tzinfo=dt.timezone.utc)
            else:
                moment = dt.datetime.fromisoformat(raw.replace("Z", "+00:00"))
                if moment.tzinfo is None:
                    moment = moment.replace(tzinfo=dt.timezone.utc)
        except ValueError:
            raise GraphQLProblem(f"Invalid date in search query: {raw}", "BAD_REQUEST") from None
        op = match["op"] or "="
        if op in (">=", ">"):
            moment = moment + dt.timedelta(seconds=1) if op == ">" else moment
            start = moment if start is None else max(start, moment)
        elif op in ("<", "<="):
            moment = moment + dt.timedelta(seconds=1) if op == "<=" else moment
            end = moment if end is None else min(end, moment)
    return start, end


def _money_node(amount: Decimal, currency: str) -> dict:
    return {"amount": _amount(amount), "currencyCode": currency}


def _utm_node(utm: tuple[str, str, str] | None) -> dict | None:
    if not utm:
        return None
    return {"campaign": utm[0], "source": utm[1], "medium": utm[2], "content": None, "term": None}


def _activity_node(a: SandboxActivity, shop: SandboxShop) -> dict:
    event = None
    if a.event_id is not None:
        event = {"id": f"gid://shopify/MarketingEvent/{a.event_id}", "type": a.tactic,
                 "marketingChannelType": a.channel, "remoteId": f"remote-{a.event_id}",
                 "startedAt": _iso(a.started_at), "endedAt": _iso(a.ended_at),
                 "scheduledToEndAt": _iso(a.scheduled_to_end_at), "utmCampaign": a.utm_campaign,
                 "utmMedium": a.utm_medium, "utmSource": a.utm_source,
                 "sourceAndMedium": f"{a.utm_source} {a.utm_medium}"}
    return {
        "id": a.gid, "title": a.title, "status": a.status, "statusLabel": a.status.replace("_", " ").title(),
        "marketingChannelType": a.channel, "tactic": a.tactic, "isExternal": a.is_external,
        "createdAt": _iso(a.created_at), "updatedAt": _iso(a.ended_at or a.started_at or a.created_at),
        "sourceAndMedium": f"{a.utm_source} {a.utm_medium}",
        "adSpend": _money_node(a.ad_spend, shop.currency) if a.ad_spend is not None else None,
        "budget": {"budgetType": a.budget_type, "total": _money_node(a.budget, shop.currency)}
        if a.budget is not None else None,
        "utmParameters": _utm_node((a.utm_campaign, a.utm_source, a.utm_medium)),
        "marketingEvent": event,
    }


def _visit_node(order: SandboxOrder, visit: SandboxVisit | None, which: int) -> dict | None:
    if visit is None:
        return None
    return {"id": f"gid://shopify/CustomerVisit/{order.id * 10 + which}", "occurredAt": _iso(visit.occurred_at),
            "source": visit.source, "landingPage": "https://shop.example/", "utmParameters": _utm_node(visit.utm)}


def _order_node(o: SandboxOrder, shop: SandboxShop) -> dict:
    money = {"shopMoney": _money_node(o.total, o.currency), "presentmentMoney": _money_node(o.total, o.currency)}
    journey = None
    if o.journey is not None:
        ready, first, last = o.journey
        journey = {"ready": ready, "customerOrderIndex": 0 if ready else None,
                   "daysToConversion": (o.created_at - first.occurred_at).days if ready and first else None,
                   "firstVisit": _visit_node(o, first, 1), "lastVisit": _visit_node(o, last, 2),
                   "momentsCount": {"count": sum(1 for v in (first, last) if v), "precision": "EXACT"}}
    return {"id": f"gid://shopify/Order/{o.id}", "name": o.name, "createdAt": _iso(o.created_at),
            "processedAt": _iso(o.created_at), "cancelledAt": _iso(o.cancelled_at), "test": o.test,
            "currencyCode": o.currency, "totalPriceSet": money, "currentTotalPriceSet": money,
            "customerJourneySummary": journey}


# =============================================================================================
# the platform sandbox
# =============================================================================================

class ShopifySandbox:
    """Shopify OAuth + GraphQL Admin API stand-in (see the module docstring).

    Options (``SandboxServer(options={"shopify": {...}})``): ``shops`` (list of ``{domain, name, currency,
    time_zone, email}``), ``activities_per_shop`` (12), ``api_key``, ``api_secret``, ``app_name``,
    ``redirect_uris`` (exact list; default any loopback URI), ``access_token_ttl`` (3600 s),
    ``throttle`` (``(maximum points, restore points/s)``, default Plus-like ``(20000, 1000)``).
    """

    id = "shopify"

    def __init__(self, server, seed: int = 7, options: dict | None = None):
        options = dict(options or {})
        self.server = server
        self.seed = seed
        self.options = options
        self.data = ShopifySandboxData(seed, shops=options.get("shops"),
                                       activities_per_shop=int(options.get("activities_per_shop", 12)))
        self.api_key = options.get("api_key", f"sandbox{stable_int(seed, 'shopify-key'):x}"[:32])
        self.api_secret = options.get("api_secret", f"shpss_sandbox_{stable_int(seed, 'shopify-secret'):x}")
        self.faults = FaultInjector()
        self.oauth = ShopifyOAuthServer(
            self.data, {self.api_key: {"secret": self.api_secret, "name": options.get("app_name", "Unified Ads (sandbox)"),
                                       "redirect_uris": options.get("redirect_uris")}},
            self.faults, int(options.get("access_token_ttl", ACCESS_TOKEN_TTL)),
            state_file=Path(server.data_dir) / f"shopify-oauth-state-{seed}.json")
        self.api = ShopifyAdminApi(self)

    # ---- SandboxServer interface ---------------------------------------------------------------
    def register_routes(self, app) -> None:
        """Add OAuth, GraphQL and admin-knob routes to the shared sandbox app."""
        bp = Blueprint("shopify", __name__, url_prefix="/shopify")
        self.oauth.register(bp)
        bp.add_url_rule("/<shop>/admin/api/<version>/graphql.json", "graphql", self.api.handle, methods=["POST"])
        app.register_blueprint(bp)
        app.register_blueprint(self._admin_blueprint())

    def start(self) -> None:
        """Nothing beyond the shared HTTP server."""

    def stop(self) -> None:
        """Nothing beyond the shared HTTP server."""

    @property
    def admin_base_url(self) -> str:
        """The per-shop admin base URL template (``{shop}`` = ``<name>.myshopify.com``)."""
        return f"{self.server.base_url}/shopify/{{shop}}"

    def env(self) -> dict[str, str]:
        """``SHOPIFY_API_KEY``, ``SHOPIFY_API_SECRET`` and ``SHOPIFY_ADMIN_BASE_URL`` for the connector."""
        return {"SHOPIFY_API_KEY": self.api_key, "SHOPIFY_API_SECRET": self.api_secret,
                "SHOPIFY_ADMIN_BASE_URL": self.admin_base_url}

    # ---- truth in document form ----------------------------------------------------------------
    def connect_form_values(self) -> dict[str, str]:
        """What to type in the portal's connect form: the first shop's name."""
        return {"shop": self.data.shops()[0].domain}

    def expected_campaigns(self, account_id: str) -> Iterator[dict[str, Any]]:
        """Campaign documents a correct connector produces for a shop: one per marketing activity
        (``CREATED_AT`` order), then one per UTM-only campaign (``campaign_id = "utm:<name>"``)."""
        shop = self.data.shop(account_id)
        zone = shop.zone
        for a in self.data.activities(shop.domain):
            end = a.ended_at or a.scheduled_to_end_at
            yield {"account_id": shop.domain, "campaign_id": str(a.id), "name": a.title, "status": a.status,
                   "channel": a.channel, "tactic": a.tactic, "source": "marketing_activity",
                   "is_external": a.is_external, "currency": shop.currency, "budget": a.budget,
                   "budget_period": a.budget_type, "ad_spend": a.ad_spend, "utm_campaign": a.utm_campaign,
                   "utm_source": a.utm_source, "utm_medium": a.utm_medium,
                   "start_date": a.started_at.astimezone(zone).date().isoformat() if a.started_at else None,
                   "end_date": end.astimezone(zone).date().isoformat() if end else None}
        for name in sorted(self.data.utm_only_campaigns(shop.domain)):
            yield {"account_id": shop.domain, "campaign_id": f"utm:{name}", "name": name, "status": None,
                   "channel": None, "tactic": None, "source": "utm", "is_external": None,
                   "currency": shop.currency, "budget": None, "budget_period": None, "ad_spend": None,
                   "utm_campaign": name, "utm_source": None, "utm_medium": None, "start_date": None,
                   "end_date": None}

    def expected_metrics(self, account_id: str, start: dt.date, end: dt.date,
                         all_orders: bool = False) -> Iterator[dict[str, Any]]:
        """Metric documents for shop-local dates ``[start, end]``: ``{account_id, campaign_id, date, orders,
        revenue (Decimal, shop currency), currency}`` per (date, campaign) with attributed orders, ordered
        by date then campaign id. Only the visible 60 days unless ``all_orders``."""
        shop = self.data.shop(account_id)
        by_utm = {a.utm_campaign.lower(): str(a.id) for a in self.data.activities(shop.domain)}
        rows = []
        for (day, campaign), (orders, revenue) in self.data.daily_attribution(shop.domain, start, end,
                                                                               all_orders).items():
            rows.append({"account_id": shop.domain, "campaign_id": by_utm.get(campaign, f"utm:{campaign}"),
                         "date": day, "orders": orders, "revenue": revenue, "currency": shop.currency})
        rows.sort(key=lambda r: (r["date"], r["campaign_id"]))
        yield from rows

    # ---- knobs (Python) ------------------------------------------------------------------------
    def inject_fault(self, kind: str, count: int = 1, retry_after: float | None = None, target: str = "api") -> None:
        """Make the next ``count`` GraphQL calls (``target="api"``) or token requests (``"token"``) fail with
        ``kind``: THROTTLED (the shop's bucket is drained first, so the answer is a real THROTTLED with
        cost extensions), HTTP_429 (with ``Retry-After: retry_after``), INTERNAL (500), UNAVAILABLE (503)."""
        self.faults.inject(kind.upper(), count, retry_delay=retry_after, target=target)

    def set_latency(self, seconds: float) -> None:
        """Delay every GraphQL call by ``seconds``."""
        self.faults.set_latency(seconds)

    def set_throttle(self, maximum: float, restore_rate: float, shop: str | None = None) -> None:
        """Give one shop (or all) a fresh, full bucket of ``maximum`` points restoring ``restore_rate``/s."""
        self.api.set_throttle(maximum, restore_rate, shop)

    def set_clock_skew(self, seconds: int) -> None:
        """Shift callback timestamps by ``seconds`` (negative and over a day old: a stale callback)."""
        self.oauth.clock_skew = int(seconds)

    def revoke(self, shop: str | None = None, token: str | None = None) -> int:
        """Uninstall the app from the install ``token`` (access or refresh token) belongs to, else from
        ``shop``, else from every shop: refresh then fails with invalid_grant and API calls answer 401."""
        return self.oauth.revoke(shop, token)

    def expire_access_tokens(self, ttl: int | None = None, token: str | None = None) -> int:
        """Expire one access ``token`` (or every live one) now; ``ttl`` sets the lifetime of new ones (s)."""
        return self.oauth.expire_access_tokens(ttl, token)

    def reset(self) -> None:
        """Clear faults, latency, throttle buckets, clock skew and the token TTL. Installs stay."""
        self.faults.reset()
        self.oauth.reset()
        self.api.reset()

    def stats(self) -> dict[str, Any]:
        """GraphQL calls per root field, THROTTLED and 429 answers, token endpoint calls."""
        with self.api._lock:
            return {"calls": dict(self.api.calls), "throttled": self.api.throttled,
                    "rate_limited": self.api.rate_limited, "token": dict(self.oauth.token_calls)}

    # ---- knobs (HTTP) --------------------------------------------------------------------------
    def _admin_blueprint(self) -> Blueprint:
        bp = admin_blueprint("shopify_sandbox_admin", "/_sandbox/shopify")

        body = request_body

        @bp.post("/faults")
        def faults():
            payload = body()
            if "latency" in payload:
                self.set_latency(float(payload["latency"]))
            kind = payload.get("kind")
            if kind:
                kind = str(kind).upper()
                if kind not in ("THROTTLED", "HTTP_429", "INTERNAL", "UNAVAILABLE"):
                    return _json({"error": f"unknown fault kind {kind}"}, 400)
                retry = payload.get("retry_after")
                self.inject_fault(kind, payload.get("count", 1), float(retry) if retry is not None else None,
                                  payload.get("target", "api"))
            return jsonify({"pending": self.faults.pending(), "latency": self.faults.latency})

        @bp.post("/throttle")
        def throttle():
            payload = body()
            self.set_throttle(float(payload.get("maximum", DEFAULT_THROTTLE[0])),
                              float(payload.get("restore_rate", DEFAULT_THROTTLE[1])), payload.get("shop"))
            return jsonify({"ok": True})

        @bp.post("/revoke")
        def revoke():
            payload = body()
            return jsonify({"revoked": self.revoke(payload.get("shop"), payload.get("token"))})

        @bp.post("/expire-tokens")
        def expire_tokens():
            ttl = body().get("ttl")
            return jsonify({"expired": self.expire_access_tokens(int(ttl) if ttl is not None else None)})

        @bp.post("/clock-skew")
        def clock_skew():
            self.set_clock_skew(int(body().get("seconds", 0)))
            return jsonify({"seconds": self.oauth.clock_skew})

        @bp.post("/reset")
        def reset():
            self.reset()
            return jsonify({"reset": True})

        @bp.get("/stats")
        def stats():
            return jsonify(self.stats())

        return bp
