"""Shopify against the offline sandbox, through the real libraries (authlib, ShopifyAPI, pymongo,
Dagster): the portal's connect flow and its refusals, the stored data equal to the sandbox truth,
refresh-token rotation surviving a crash between receiving and saving, and throttle pacing. No mocks;
the crash is injected by making the store's token save raise once."""
from __future__ import annotations

import datetime as dt
import json
import re
import time
from decimal import Decimal
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit, urlunsplit

import pytest
import requests
from dagster import DagsterEventType, build_sensor_context, instance_for_test
from flask import Flask, request

from portal_helpers import Portal as PortalClient
from portal_helpers import parse_forms, query_of, serve
from resources.crypto import TokenCipher
from resources.platforms import registry
from resources.platforms.base import (Account, OAuthCallbackError, PlatformError, RateLimited, ReauthRequired,
                                      TransientPlatformError)
from resources.platforms.shopify import ShopifyConnector, ShopifySettings, normalise_shop
from resources.repositories import NEEDS_REAUTH, UserRepository
from resources.settings import get_settings
from sandbox.common import SHARED_CAMPAIGN_NAMES
from sandbox.shopify import shopify_hmac

PID = "shopify"
REDIRECT_URI = "http://127.0.0.1:5000/callback"
SHOPIFY_ONLY = {PID: "resources.platforms.shopify:ShopifyConnector"}


# ---- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shopify(sandbox):
    return sandbox.platform(PID)


@pytest.fixture
def knobs(shopify):
    shopify.reset()
    yield shopify
    shopify.reset()


@pytest.fixture
def connector(sandbox) -> ShopifyConnector:
    return ShopifyConnector(ShopifySettings())


def _first_shop(shopify) -> str:
    return shopify.data.shops()[0].domain


def _account(shopify, domain: str) -> Account:
    shop = shopify.data.shop(domain)
    return Account(id=shop.domain, name=shop.name, currency=shop.currency, time_zone=shop.time_zone)


# ---- the OAuth flow without the portal (connector-level tests) -----------------------------------

def _mini_portal(connector: ShopifyConnector) -> Flask:
    from authlib.integrations.flask_client import OAuth

    app = Flask("test-shopify-portal")
    app.secret_key = "test"
    client = OAuth(app).register(PID, **connector.oauth_registration())

    @app.get("/login")
    def login():
        try:
            return connector.begin_authorization(client, REDIRECT_URI, {"shop": request.args.get("shop", "")})
        except OAuthCallbackError as exc:
            return {"error": str(exc)}, 400

    @app.get("/callback")
    def callback():
        try:
            return {"token": connector.finish_authorization(client, request)}
        except OAuthCallbackError as exc:
            return {"error": str(exc)}, 400

    return app


def _consent(authorize_url: str, decision: str = "allow") -> str:
    """Open the sandbox's install page, press a button; returns the redirect Location (the callback)."""
    page = requests.get(authorize_url, timeout=10)
    assert page.status_code == 200, page.text
    form = parse_forms(page.text)[0]
    assert {b["value"] for b in form.buttons} == {"allow", "deny"}
    answer = requests.post(urljoin(authorize_url, form.action), data={**form.fields, "decision": decision},
                           allow_redirects=False, timeout=10)
    assert answer.status_code == 302, answer.text
    return answer.headers["Location"]


def connect_shop(connector: ShopifyConnector, shop: str) -> dict:
    """The whole install flow for one shop; returns the normalised token."""
    with _mini_portal(connector).test_client() as browser:
        start = browser.get(f"/login?shop={shop}")
        assert start.status_code == 302, start.get_json()
        location = _consent(start.headers["Location"])
        answer = browser.get("/callback?" + urlsplit(location).query)
        assert answer.status_code == 200, answer.get_json()
        return answer.get_json()["token"]


@pytest.fixture(scope="module")
def tokens(sandbox, shopify):
    """One token per sandbox shop (a connection reaches exactly one shop)."""
    connector = ShopifyConnector(ShopifySettings())
    return {shop.domain: connect_shop(connector, shop.domain) for shop in shopify.data.shops()}


# ---- unit-sized checks ---------------------------------------------------------------------------

def test_shop_names_are_normalised_and_validated():
    assert normalise_shop("my-shop") == "my-shop.myshopify.com"
    assert normalise_shop("  My-Shop.myshopify.com ") == "my-shop.myshopify.com"
    assert normalise_shop("https://my-shop.myshopify.com/") == "my-shop.myshopify.com"
    for bad in ("", "evil.com", "-shop", "shop.myshopify.com.evil.com", "a_b", "shop.myshopify.com/admin",
                "sh op", "shop.myshopify.com?x=1", "x" * 300):
        with pytest.raises(OAuthCallbackError):
            normalise_shop(bad)


def test_settings_pin_a_quarterly_version_and_production_urls(monkeypatch):
    for key in ("SHOPIFY_ADMIN_BASE_URL", "SHOPIFY_API_VERSION", "SHOPIFY_SCOPES"):
        monkeypatch.delenv(key, raising=False)
    settings = ShopifySettings(_env_file=None)
    assert re.fullmatch(r"\d{4}-(01|04|07|10)", settings.api_version)
    assert settings.admin_url("a.myshopify.com", "/admin/oauth/access_token") == \
        "https://a.myshopify.com/admin/oauth/access_token"
    assert ShopifyConnector(settings).consent_origins()[0] == "https://*.myshopify.com"
    sandboxed = ShopifySettings(_env_file=None, admin_base_url="http://127.0.0.1:8080/shopify/{shop}")
    assert ShopifyConnector(sandboxed).consent_origins() == ["http://127.0.0.1:8080"]
    assert set(settings.scopes.split(",")) >= {"read_marketing_events", "read_orders"}
    with pytest.raises(ValueError):
        ShopifySettings(_env_file=None, admin_base_url="https://example.com")


# ---- OAuth and tokens ----------------------------------------------------------------------------

def test_install_flow_returns_an_expiring_rotating_token(connector, shopify):
    shop = shopify.data.shops()[1].domain
    with _mini_portal(connector).test_client() as browser:
        start = browser.get("/login?shop=" + shop.split(".")[0])  # a bare name is normalised
        authorize_url = start.headers["Location"]
        parts = urlsplit(authorize_url)
        assert parts.path == f"/shopify/{shop}/admin/oauth/authorize"
        query = query_of(authorize_url)
        assert query["client_id"] == connector.settings.api_key and query["state"]
        assert query["scope"] == "read_marketing_events,read_orders"
        callback = _consent(authorize_url)
        params = query_of(callback)
        assert {"code", "hmac", "host", "shop", "state", "timestamp"} <= set(params)
        token = browser.get("/callback?" + urlsplit(callback).query).get_json()["token"]
    assert token["shop"] == shop and token["access_token"] and token["refresh_token"]
    assert abs(token["expires_at"] - (time.time() + 3600)) < 60
    assert abs(token["refresh_token_expires_at"] - (time.time() + 90 * 86400)) < 60
    assert connector.connection_extra(token) == {"shop": shop}

    refreshed = connector.refresh(token)
    assert refreshed["access_token"] != token["access_token"]
    assert refreshed["refresh_token"] != token["refresh_token"]  # rotation
    assert refreshed["shop"] == shop and refreshed["expires_at"] >= token["expires_at"]
    # using the replacement retires the predecessor for good
    again = connector.refresh(refreshed)
    with pytest.raises(ReauthRequired) as info:
        connector.refresh(token)
    assert token["refresh_token"] not in str(info.value) and "invalid_grant" in str(info.value)
    assert connector.list_accounts(again)[0].id == shop


def test_needs_refresh_keeps_a_one_hour_token_fresh_across_the_30_minute_schedule(connector):
    now = dt.datetime.now(dt.timezone.utc)
    token = {"expires_at": now.timestamp() + 31 * 60}
    assert connector.needs_refresh(token, now, margin_seconds=600)  # would expire before the next run
    assert not connector.needs_refresh({"expires_at": now.timestamp() + 3500}, now, margin_seconds=600)


def test_refused_refresh_and_uninstalled_app_need_reauth(connector, knobs):
    token = connect_shop(connector, _first_shop(knobs))
    knobs.revoke(token=token["refresh_token"])
    with pytest.raises(ReauthRequired):
        connector.refresh(token)
    with pytest.raises(ReauthRequired) as info:
        connector.list_accounts(token)
    assert token["access_token"] not in str(info.value)


def test_token_endpoint_faults_are_transient_or_rate_limited(connector, knobs):
    token = connect_shop(connector, _first_shop(knobs))
    knobs.inject_fault("INTERNAL", target="token")
    with pytest.raises(TransientPlatformError):
        connector.refresh(token)
    knobs.inject_fault("HTTP_429", retry_after=7, target="token")
    with pytest.raises(RateLimited) as info:
        connector.refresh(token)
    assert info.value.retry_after == 7
    assert connector.refresh(token)["access_token"]  # the stored refresh token still works afterwards


# ---- rotation survives a crash between receiving and saving --------------------------------------

def test_refresh_rotation_survives_a_crash_between_receiving_and_saving(connector, knobs, db, settings, monkeypatch):
    from pipelines.sync import refresh_connection, sync_connection

    shop = _first_shop(knobs)
    token = connect_shop(connector, shop)
    cipher = TokenCipher.from_settings(settings)
    users = UserRepository(db)
    user = users.create("crash@example.com", "x")
    users.save_connection(user["_id"], PID, cipher.encrypt(token), scopes=["read_orders"], expires_at=None,
                          accounts=[a.to_doc() for a in connector.list_accounts(token)], extra={"shop": shop})

    lost = []
    real_update = UserRepository.update_token

    def crash_once(self, user_id, platform_id, ciphertext, expires_at, accounts=None):
        if not lost:
            lost.append(cipher.decrypt(ciphertext))  # what the process received and never saved
            raise RuntimeError("injected crash between receiving and saving the rotated token")
        return real_update(self, user_id, platform_id, ciphertext, expires_at, accounts)

    monkeypatch.setattr(UserRepository, "update_token", crash_once)
    with pytest.raises(RuntimeError, match="injected crash"):
        refresh_connection(db, cipher, connector, user["_id"], force=True)
    stored = cipher.decrypt(users.connection(user["_id"], PID)["token"])
    assert stored["refresh_token"] == token["refresh_token"]  # the store still holds the used token
    assert lost and lost[0]["refresh_token"] != token["refresh_token"]  # Shopify did rotate

    # a later run recovers with the stored (already used) refresh token: the connection is not lost
    outcome = refresh_connection(db, cipher, connector, user["_id"], force=True)
    assert outcome.refreshed and outcome.accounts == 1
    connection = users.connection(user["_id"], PID)
    recovered = cipher.decrypt(connection["token"])
    assert connection["status"] == "connected"
    assert recovered["refresh_token"] not in (token["refresh_token"], lost[0]["refresh_token"])
    # the next scheduled refresh uses the saved replacement, which retires the original token and the
    # lost answer for good: rotation is real, only the saved chain lives on
    assert refresh_connection(db, cipher, connector, user["_id"], force=True).refreshed
    for dead in (token, lost[0]):
        with pytest.raises(ReauthRequired):
            connector.refresh(dead)
    # and the connection keeps syncing
    result = sync_connection(db, cipher, connector, user["_id"], history_days=3)
    assert result.metrics.inserted > 0
    assert users.connection(user["_id"], PID)["status"] == "connected"


def test_concurrent_refreshes_keep_whichever_answer_was_saved(connector, knobs):
    token = connect_shop(connector, _first_shop(knobs))
    first, second = connector.refresh(token), connector.refresh(token)  # two runs raced on one stored token
    assert first["refresh_token"] != second["refresh_token"]
    kept = connector.refresh(second)  # the answer that was saved last is the one used next
    with pytest.raises(ReauthRequired):
        connector.refresh(first)  # the other answer died when its sibling was used
    assert connector.list_accounts(connector.refresh(kept))[0].id == _first_shop(knobs)


def test_rejected_refresh_marks_the_connection_needs_reauth(connector, knobs, db, settings):
    from pipelines.sync import refresh_connection

    shop = _first_shop(knobs)
    token = connect_shop(connector, shop)
    cipher = TokenCipher.from_settings(settings)
    users = UserRepository(db)
    user = users.create("revoked@example.com", "x")
    users.save_connection(user["_id"], PID, cipher.encrypt(token), scopes=[], expires_at=None, accounts=[],
                          extra={"shop": shop})
    knobs.revoke(token=token["access_token"])
    with pytest.raises(ReauthRequired):
        refresh_connection(db, cipher, connector, user["_id"], force=True)
    connection = users.connection(user["_id"], PID)
    assert connection["status"] == NEEDS_REAUTH and "invalid_grant" in connection["last_error"]
    assert token["refresh_token"] not in connection["last_error"]


# ---- data ----------------------------------------------------------------------------------------

def test_accounts_campaigns_and_metrics_equal_the_truth_for_every_shop(connector, shopify, tokens):
    currencies, zones = set(), set()
    for shop in shopify.data.shops():
        token = tokens[shop.domain]
        account = connector.list_accounts(token)[0]
        assert account == _account(shopify, shop.domain)
        currencies.add(account.currency)
        zones.add(account.time_zone)
        session = connector.open_session(token)
        end = shopify.data.local_today(shop.domain)
        start = end - dt.timedelta(days=20)
        metrics = session.fetch_daily_metrics(account, start, end)
        assert iter(metrics) is metrics  # a generator
        metrics = list(metrics)
        assert metrics == list(shopify.expected_metrics(shop.domain, start, end)) and len(metrics) > 50
        assert all(isinstance(m["revenue"], Decimal) and m["orders"] > 0 for m in metrics)
        exponent = 0 if shop.currency == "JPY" else -2
        assert all(m["revenue"] == m["revenue"].quantize(Decimal(1).scaleb(exponent)) for m in metrics)
        campaigns = list(session.fetch_campaigns(account))
        assert campaigns == list(shopify.expected_campaigns(shop.domain))
        statuses = {c["status"] for c in campaigns}
        assert {"ACTIVE", "PAUSED", "INACTIVE", "SCHEDULED", "DRAFT"} <= statuses
        assert {"SOCIAL", "SEARCH", "EMAIL", "DISPLAY", "REFERRAL"} <= {c["channel"] for c in campaigns}
        assert any(c["ad_spend"] for c in campaigns) and any(c["budget_period"] == "LIFETIME" for c in campaigns)
        utm_only = [c for c in campaigns if c["source"] == "utm"]
        assert utm_only and all(c["campaign_id"] == "utm:" + c["utm_campaign"] for c in utm_only)
        # shop sales join Google/Meta spend by campaign name: matched activities and UTM-only ones
        names = {c["utm_campaign"] for c in campaigns}
        assert len(names & set(SHARED_CAMPAIGN_NAMES)) >= 3
        sold = {m["campaign_id"] for m in metrics}
        assert any(c["campaign_id"] in sold for c in campaigns if c["source"] == "marketing_activity"
                   and c["utm_campaign"] in SHARED_CAMPAIGN_NAMES)
        assert session.stats.api_calls >= 3
    assert len(currencies) == 3 and "USD" in currencies and "JPY" in currencies and len(zones) == 3


def test_local_dates_follow_the_shop_time_zone(connector, shopify, tokens):
    shop = shopify.data.shops()[2]  # Asia/Tokyo: UTC+9, a UTC day would split its local days
    account = _account(shopify, shop.domain)
    session = connector.open_session(tokens[shop.domain])
    day = shopify.data.local_today(shop.domain) - dt.timedelta(days=3)
    rows = list(session.fetch_daily_metrics(account, day, day))
    assert rows and {r["date"] for r in rows} == {day.isoformat()}
    orders = shopify.data.orders_on(shop.domain, day)
    counted = [o for o in orders if o.counts and o.attributed_campaign]
    assert sum(r["orders"] for r in rows) == len(counted)
    assert sum(r["revenue"] for r in rows) == sum(o.total for o in counted)
    assert {o.created_at.astimezone(shop.zone).date() for o in orders} == {day}
    assert any(o.created_at.date() != day for o in orders)  # some fall on the previous UTC date


def test_token_for_one_shop_cannot_read_another(connector, shopify, tokens):
    first, second = shopify.data.shops()[:2]
    session = connector.open_session(tokens[first.domain])
    with pytest.raises(PlatformError):
        list(session.fetch_campaigns(_account(shopify, second.domain)))


def test_missing_scope_is_a_platform_error_not_reauth(sandbox, shopify, monkeypatch):
    monkeypatch.setenv("SHOPIFY_SCOPES", "read_orders")
    narrow = ShopifyConnector(ShopifySettings())
    shop = _first_shop(shopify)
    token = connect_shop(narrow, shop)
    session = narrow.open_session(token)
    with pytest.raises(PlatformError) as info:
        list(session.fetch_campaigns(_account(shopify, shop)))
    assert not isinstance(info.value, ReauthRequired) and "read_marketing_events" in str(info.value)


def test_expired_access_token_is_transient_until_the_token_asset_refreshes(connector, knobs):
    token = connect_shop(connector, _first_shop(knobs))
    knobs.expire_access_tokens(token=token["access_token"])
    session = connector.open_session(dict(token, expires_at=int(time.time()) - 5))
    with pytest.raises(TransientPlatformError):
        session.shop_account()
    assert connector.list_accounts(connector.refresh(token))[0].id == _first_shop(knobs)


# ---- throttling ----------------------------------------------------------------------------------

def test_throttling_paces_the_queries_instead_of_failing(connector, knobs, tokens):
    shop = _first_shop(knobs)
    account = _account(knobs, shop)
    knobs.set_throttle(maximum=1000, restore_rate=1000, shop=shop)  # one orders page (~802 points) per bucket
    session = connector.open_session(tokens[shop])
    end = knobs.data.local_today(shop)
    start = end - dt.timedelta(days=25)
    before = knobs.stats()
    started = time.monotonic()
    rows = list(session.fetch_daily_metrics(account, start, end))
    elapsed = time.monotonic() - started
    assert rows == list(knobs.expected_metrics(shop, start, end))
    stats = knobs.stats()
    assert stats["calls"]["orders"] - before["calls"].get("orders", 0) >= 3
    assert stats["throttled"] == before["throttled"]  # paced: the bucket never ran dry
    assert session.stats.throttled_seconds > 0.5 and elapsed >= session.stats.throttled_seconds * 0.9
    assert session.stats.retries == 0


def test_throttled_answers_wait_for_the_restore_rate_then_continue(connector, knobs, tokens):
    shop = _first_shop(knobs)
    account = _account(knobs, shop)
    knobs.set_throttle(maximum=2000, restore_rate=2000, shop=shop)
    knobs.inject_fault("THROTTLED", count=2)  # the bucket is drained twice, as by another app
    session = connector.open_session(tokens[shop])
    before = knobs.stats()["throttled"]
    campaigns = list(session.fetch_campaigns(account))
    assert [c for c in campaigns if c["source"] == "marketing_activity"] == \
        [c for c in knobs.expected_campaigns(shop) if c["source"] == "marketing_activity"]
    assert knobs.stats()["throttled"] - before == 2 and session.stats.retries == 2
    # each wait is (requested cost − available) / restore rate: ~302 points at 2000/s
    assert 0.2 < session.stats.throttled_seconds < 2


def test_http_429_honours_retry_after(connector, knobs, tokens):
    shop = _first_shop(knobs)
    knobs.inject_fault("HTTP_429", retry_after=0.6)
    session = connector.open_session(tokens[shop])
    started = time.monotonic()
    assert session.shop_account().id == shop
    assert time.monotonic() - started >= 0.6 and session.stats.retries == 1
    knobs.inject_fault("HTTP_429", retry_after=3600)  # longer than max_wait_seconds: defer the run
    with pytest.raises(RateLimited) as info:
        session.shop_account()
    assert info.value.retry_after == 3600


def test_http_knobs(sandbox, knobs):
    base = sandbox.base_url + "/_sandbox/shopify"
    assert requests.post(base + "/faults", json={"kind": "HTTP_429", "retry_after": 1}, timeout=5).json()["pending"] == 1
    assert requests.post(base + "/faults", json={"kind": "NOPE"}, timeout=5).status_code == 400
    assert requests.post(base + "/throttle", json={"maximum": 100, "restore_rate": 10}, timeout=5).status_code == 200
    assert requests.post(base + "/clock-skew", json={"seconds": -10}, timeout=5).json()["seconds"] == -10
    assert "calls" in requests.get(base + "/stats", timeout=5).json()
    assert requests.post(base + "/reset", timeout=5).json() == {"reset": True}


# ---- the portal: connect and its refusals --------------------------------------------------------

@pytest.fixture
def portal(sandbox, db, monkeypatch, knobs):
    """The portal over HTTP with Shopify as its only platform, against the sandbox."""
    monkeypatch.setattr(registry, "PLATFORMS", SHOPIFY_ONLY)

    def create(url):
        from oauth_portal import create_app

        monkeypatch.setenv("PORTAL_BASE_URL", url)
        get_settings.cache_clear()
        return create_app({"BCRYPT_ROUNDS": 4})

    url, app, stop = serve(create)
    client = PortalClient(url=url, app=app, db=db, http=requests.Session())
    response = client.signup("shop-owner@example.com")
    assert response.status_code == 200 and "/signup" not in response.url, response.text[-3000:]
    yield client
    stop()


def start_install(portal: PortalClient, shop: str) -> str:
    """Type the shop and press Connect; returns the authorize URL the portal redirected to."""
    response = portal.submit("/connections", "/connections/shopify/connect", {"shop": shop}, allow_redirects=False)
    assert response.status_code == 302, response.text
    return response.headers["Location"]


def _with_query(url: str, **changes) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    for key, value in changes.items():
        if value is None:
            query.pop(key, None)
        else:
            query[key] = value
    return urlunsplit(parts._replace(query=urlencode(query)))


def test_portal_connects_a_shop_and_stores_its_encrypted_token(portal, db, settings, shopify, sandbox):
    shop = shopify.data.shops()[1]
    page = portal.get("/connections")
    assert 'name="shop"' in page.text
    # the Connect form may redirect only to the shops' admin host (here the sandbox's)
    assert f"form-action 'self' {sandbox.base_url}" in page.headers["Content-Security-Policy"]
    authorize_url = start_install(portal, shop.domain.split(".")[0])
    assert urlsplit(authorize_url).path == f"/shopify/{shop.domain}/admin/oauth/authorize"
    assert query_of(authorize_url)["redirect_uri"] == f"{portal.url}/connections/shopify/callback"
    response = portal.http.get(_consent(authorize_url))
    assert response.status_code == 200 and response.url.endswith("/connections"), response.text
    connection = db.users.find_one({})["oauth"][PID]
    assert connection["status"] == "connected" and connection["shop"] == shop.domain
    assert connection["accounts"] == [{"id": shop.domain, "name": shop.name, "currency": "EUR",
                                       "time_zone": "Europe/Berlin", "manager": False}]
    assert set(connection["scopes"]) == {"read_marketing_events", "read_orders"}
    assert dt.timedelta(minutes=55) < connection["expires_at"] - dt.datetime.now(dt.timezone.utc) <= dt.timedelta(hours=1)
    token = TokenCipher.from_settings(settings).decrypt(connection["token"])
    raw = json.dumps(db.users.find_one({}), default=str)
    assert token["access_token"] not in raw and token["refresh_token"] not in raw
    text = portal.get("/connections").text
    assert shop.domain in text and token["access_token"] not in text


def _refused(portal, db, response, words: str):
    assert response.status_code == 400, response.text
    assert words in response.text.lower()
    assert db.users.find_one({}).get("oauth") == {}


def test_tampered_hmac_is_400_and_nothing_written(portal, db, shopify):
    callback = _consent(start_install(portal, _first_shop(shopify)))
    code = query_of(callback)["code"]
    tampered = _with_query(callback, code=code[:-1] + ("0" if code[-1] != "0" else "1"))
    _refused(portal, db, portal.http.get(tampered), "hmac")
    forged_hmac = _with_query(callback, hmac="0" * 64)
    _refused(portal, db, portal.http.get(forged_hmac), "hmac")
    _refused(portal, db, portal.http.get(_with_query(callback, hmac=None)), "not signed")


def test_stale_timestamp_is_400_and_nothing_written(portal, db, knobs):
    knobs.set_clock_skew(-25 * 3600)  # Shopify signed it 25 hours ago: a replayed old callback
    callback = _consent(start_install(portal, _first_shop(knobs)))
    assert int(query_of(callback)["timestamp"]) < time.time() - 24 * 3600
    _refused(portal, db, portal.http.get(callback), "stale")


def test_foreign_shop_is_400_and_nothing_written(portal, db, shopify):
    mine, other = (s.domain for s in shopify.data.shops()[:2])
    authorize_url = start_install(portal, mine)
    # the browser is steered to another shop's install page with this session's state: Shopify signs a
    # perfectly valid callback for the other shop, which is not the shop the user asked for
    foreign = authorize_url.replace(f"/shopify/{mine}/", f"/shopify/{other}/")
    callback = _consent(foreign)
    assert query_of(callback)["shop"] == other
    _refused(portal, db, portal.http.get(callback), "different shop")


def test_missing_state_is_400_and_nothing_written(portal, db, shopify):
    authorize_url = start_install(portal, _first_shop(shopify))
    callback = _consent(_with_query(authorize_url, state=None))  # Shopify signs a callback without state
    assert "state" not in query_of(callback)
    _refused(portal, db, portal.http.get(callback), "no state")
    # and a state this browser never started is refused too (signed by the test, as Shopify would)
    params = dict(query_of(_consent(start_install(portal, _first_shop(shopify)))), state="forged")
    params["hmac"] = shopify_hmac(params, shopify.api_secret)
    response = portal.get("/connections/shopify/callback?" + urlencode(params))
    _refused(portal, db, response, "state does not match")


def test_malformed_shop_name_is_400_and_nothing_written(portal, db):
    for bad in ("evil.example.com", "shop.myshopify.com.evil.com", "-shop", "shop/../x", ""):
        response = portal.submit("/connections", "/connections/shopify/connect", {"shop": bad})
        _refused(portal, db, response, "myshopify.com")


def test_denied_install_and_replayed_callback_are_400(portal, db, shopify):
    denied = _consent(start_install(portal, _first_shop(shopify)), decision="deny")
    assert "error=access_denied" in denied
    response = portal.http.get(denied)
    assert response.status_code == 400 and "denied" in response.text
    assert db.users.find_one({}).get("oauth") == {}
    callback = _consent(start_install(portal, _first_shop(shopify)))
    assert portal.http.get(callback).status_code == 200
    stored = db.users.find_one({})["oauth"][PID]
    assert portal.http.get(callback).status_code == 400  # state is single-use
    assert db.users.find_one({})["oauth"][PID] == stored


# ---- end to end: portal + sensor + Dagster job + store == truth ----------------------------------

def _materialization(result, asset: str) -> dict:
    for event in result.all_events:
        if event.event_type == DagsterEventType.ASSET_MATERIALIZATION:
            materialization = event.event_specific_data.materialization
            if materialization.asset_key.to_user_string() == asset:
                return {k: v.value for k, v in materialization.metadata.items()}
    raise AssertionError(f"no materialization of {asset}")


def _store_equals_truth(db, shopify, user_id) -> tuple[int, int]:
    stored = {(m["account_id"], m["campaign_id"], m["date"]): (m["orders"], m["revenue"].to_decimal(), m["currency"])
              for m in db.shopify_campaign_metrics.find({"user_id": user_id})}
    shops = {key[0] for key in stored}
    expected = {}
    for shop in shops:
        dates = [key[2] for key in stored if key[0] == shop]
        start, end = dt.date.fromisoformat(min(dates)), dt.date.fromisoformat(max(dates))
        for m in shopify.expected_metrics(shop, start, end):
            expected[(shop, m["campaign_id"], m["date"])] = (m["orders"], m["revenue"], m["currency"])
    assert stored == expected and stored  # every campaign and day, revenue exact
    campaigns = {(c["account_id"], c["campaign_id"]): c for c in db.shopify_campaigns.find({"user_id": user_id})}
    truth = {(shop, c["campaign_id"]): c for shop in shops for c in shopify.expected_campaigns(shop)}
    assert set(campaigns) == set(truth)
    for key, doc in truth.items():
        got = campaigns[key]
        for field, value in doc.items():
            have = got.get(field)
            assert (have.to_decimal() if hasattr(have, "to_decimal") else have) == value, (key, field)
    return len(campaigns), len(stored)


def test_shopify_end_to_end_through_portal_sensor_and_dagster(portal, db, shopify, settings):
    from pipelines.definitions import build_definitions
    from resources.store.resource import MongoStoreResource
    from sandbox.demo import connect_platform
    from sandbox.walk import Walker

    walker = Walker()
    walker.http.cookies.update(portal.http.cookies)  # the signed-up browser session
    connect_platform(walker, portal.url, PID, shopify.connect_form_values())
    user = db.users.find_one({})
    user_id = str(user["_id"])
    shop = _first_shop(shopify)
    assert user["oauth"][PID]["shop"] == shop

    defs, platforms = build_definitions(MongoStoreResource(database=settings.mongodb_db))
    with instance_for_test() as instance:
        sensor = defs.resolve_sensor_def("shopify_connections_sensor")
        with build_sensor_context(instance_ref=instance.get_ref(), definitions=defs,
                                  resources={"store": defs.resources["store"]}) as ctx:
            tick = sensor.evaluate_tick(ctx)
        for req in tick.dynamic_partitions_requests or []:
            instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
        assert [r.partition_key for r in tick.run_requests] == [user_id]
        job = defs.resolve_job_def(platforms[PID].sync_job.name)

        first = job.execute_in_process(instance=instance, partition_key=user_id, raise_on_error=False)
        assert first.success
        meta = _materialization(first, "shopify_campaigns")
        campaigns, rows = _store_equals_truth(db, shopify, user["_id"])
        assert meta["first_sync"] is True and meta["accounts"] == 1
        assert meta["campaigns_inserted"] == campaigns and meta["metric_rows_inserted"] == rows
        checks = {c.check_name: c.passed for c in first.get_asset_check_evaluations()}
        assert checks == {"metrics_reference_campaigns": True, "metrics_non_negative": True}
        # the first sync asks for 90 days; Shopify returns 60 days of orders without read_all_orders
        dates = sorted(db.shopify_campaign_metrics.distinct("date", {"user_id": user["_id"]}))
        assert dates[0] == (shopify.data.local_today(shop) - dt.timedelta(days=59)).isoformat()
        assert dates[-1] == shopify.data.local_today(shop).isoformat()

        page = portal.get("/dashboard")
        assert page.status_code == 200
        assert any(c["name"] in page.text for c in shopify.expected_campaigns(shop) if c["source"] == "marketing_activity")

        second = job.execute_in_process(instance=instance, partition_key=user_id, raise_on_error=False)
        assert second.success
        meta2 = _materialization(second, "shopify_campaigns")
        assert meta2["first_sync"] is False and meta2["rows_upserted"] == 0

        # the token job with force_refresh rotates the refresh token and saves the new one
        cipher = TokenCipher.from_settings(get_settings())
        before = cipher.decrypt(UserRepository(db).connection(user_id, PID)["token"])
        token_job = defs.resolve_job_def(platforms[PID].token_job.name)
        refreshed = token_job.execute_in_process(
            instance=instance, partition_key=user_id, raise_on_error=False,
            run_config={"ops": {"shopify_token": {"config": {"force_refresh": True}}}})
        assert refreshed.success and _materialization(refreshed, "shopify_token")["refreshed"] is True
        after = cipher.decrypt(UserRepository(db).connection(user_id, PID)["token"])
        assert after["refresh_token"] != before["refresh_token"] and after["shop"] == shop

        # an uninstalled app: needs_reauth, no retries
        shopify.revoke(token=after["refresh_token"])
        failed = token_job.execute_in_process(
            instance=instance, partition_key=user_id, raise_on_error=False,
            run_config={"ops": {"shopify_token": {"config": {"force_refresh": True}}}})
        assert not failed.success
        assert UserRepository(db).connection(user_id, PID)["status"] == NEEDS_REAUTH
        restarts = [e for e in instance.all_logs(failed.run_id)
                    if e.dagster_event and e.dagster_event.event_type == DagsterEventType.STEP_RESTARTED]
        assert restarts == []


def test_installs_and_rotating_tokens_survive_a_sandbox_restart(tmp_path, monkeypatch):
    """The demo restarts the sandbox; a shop connected before keeps refreshing and syncing."""
    from sandbox.server import SandboxServer

    with SandboxServer(tmp_path, seed=11, platforms=[PID]) as first:
        for key, value in first.env.items():
            monkeypatch.setenv(key, value)
        connector = ShopifyConnector(ShopifySettings())
        shop = first.platform(PID).data.shops()[0].domain
        token = connector.refresh(connect_shop(connector, shop))
    with SandboxServer(tmp_path, seed=11, platforms=[PID]) as second:
        for key, value in second.env.items():
            monkeypatch.setenv(key, value)
        connector = ShopifyConnector(ShopifySettings())
        assert connector.list_accounts(token)[0].id == shop  # the access token is still live
        rotated = connector.refresh(token)
        assert connector.list_accounts(rotated)[0].id == shop
    assert (tmp_path / "shopify-oauth-state-11.json").stat().st_mode & 0o777 == 0o600
