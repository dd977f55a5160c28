"""The portal over real HTTP: accounts, sessions, CSRF, rate limits, connections, dashboard.

Each test gets a fresh database (``db`` fixture) and its own served app. Most tests use an in-process
fake platform (``portal_helpers.FakeConnector``) so the portal's own rules are tested on their own;
the Google tests at the end run the real connector against the offline sandbox.
"""
from __future__ import annotations

import datetime as dt
import json
import re
from decimal import Decimal

import pytest
import requests
from bson import Decimal128

from portal_helpers import (FAKE_ACCESS_TOKEN_PREFIX, FakeConnector, find_form, parse_forms, query_of,
                            reset_fakes, serve)
from portal_helpers import Portal as PortalClient
from resources.crypto import TokenCipher
from resources.platforms import registry
from resources.platforms.base import TransientPlatformError
from resources.repositories import CampaignRepository, UserRepository
from resources.settings import get_settings

PASSWORD = "correct horse battery"
TEST_CONFIG = {"BCRYPT_ROUNDS": 4}


def _portal(db, monkeypatch, platforms: dict[str, str] | None, config: dict | None = None):
    if platforms is not None:
        monkeypatch.setattr(registry, "PLATFORMS", platforms)

    def create(url):
        from oauth_portal import create_app

        monkeypatch.setenv("PORTAL_BASE_URL", url)
        get_settings.cache_clear()
        return create_app({**TEST_CONFIG, **(config or {})})

    url, app, stop = serve(create)
    return PortalClient(url=url, app=app, db=db, http=requests.Session()), stop


FAKE_PLATFORMS = {"fake": "portal_helpers:FakeConnector", "offline": "portal_helpers:UnconfiguredConnector"}


@pytest.fixture
def portal(db, monkeypatch):
    """The portal with the in-process fake platforms only."""
    reset_fakes()
    client, stop = _portal(db, monkeypatch, FAKE_PLATFORMS)
    yield client
    stop()
    reset_fakes()


@pytest.fixture
def make_portal(db, monkeypatch):
    """Factory for a portal with custom Flask config (fake platforms)."""
    stops = []

    def factory(config: dict | None = None):
        client, stop = _portal(db, monkeypatch, FAKE_PLATFORMS, config)
        stops.append(stop)
        return client

    yield factory
    for stop in stops:
        stop()


def user_count(db) -> int:
    return db.users.count_documents({})


# ---- accounts and sessions ---------------------------------------------------------------------
def test_healthz_and_security_headers(portal):
    response = portal.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    page = portal.get("/login")
    assert page.status_code == 200
    csp = page.headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    assert page.headers["Referrer-Policy"]
    cookie = page.headers.get("Set-Cookie", "")
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie
    assert "<script" not in page.text.lower()
    css = portal.get("/static/style.css")
    assert css.status_code == 200 and "text/css" in css.headers["Content-Type"]


def test_home_redirects_to_login_then_dashboard(portal):
    response = portal.get("/", allow_redirects=False)
    assert response.status_code == 302 and response.headers["Location"].endswith("/login")
    assert portal.get("/dashboard", allow_redirects=False).status_code == 302
    portal.signup("Ann@Example.com ")
    response = portal.get("/", allow_redirects=False)
    assert response.status_code == 302 and response.headers["Location"].endswith("/dashboard")


def test_signup_login_logout(portal, db):
    response = portal.signup("  Ann@Example.COM ")
    assert response.status_code == 200
    assert response.url.endswith("/connections")
    assert "ann@example.com" in response.text
    doc = db.users.find_one({})
    assert doc["email"] == "ann@example.com"
    assert doc["password_hash"].startswith("$2") and PASSWORD not in json.dumps(doc, default=str)

    response = portal.logout()
    assert response.status_code == 200 and response.url.endswith("/login")
    assert portal.get("/dashboard", allow_redirects=False).status_code == 302

    bad = portal.login("ann@example.com", "wrong password here")
    assert bad.status_code == 401
    assert "Invalid email or password" in bad.text
    unknown = portal.login("nobody@example.com", PASSWORD)
    assert unknown.status_code == 401 and "Invalid email or password" in unknown.text

    good = portal.login("ANN@example.com", PASSWORD)
    assert good.status_code == 200 and good.url.endswith("/dashboard")
    assert portal.get("/dashboard", allow_redirects=False).status_code == 200


def test_logout_requires_post(portal):
    portal.signup("ann@example.com")
    response = portal.get("/logout")
    assert response.status_code == 405
    assert "not allowed" in response.text.lower()
    assert "Traceback" not in response.text
    assert portal.get("/dashboard", allow_redirects=False).status_code == 200


def test_duplicate_email_rejected_and_one_user(portal, db):
    portal.signup("ann@example.com")
    other = portal.new_browser()
    response = other.signup("ANN@example.com", "another long password")
    assert response.status_code == 400
    assert "already exists" in response.text
    assert user_count(db) == 1


@pytest.mark.parametrize("password, reason", [
    ("short1", "at least 10 characters"),
    ("password123", "too common"),
    ("aaaaaaaaaaaa", "too common"),
])
def test_weak_password_rejected(portal, db, password, reason):
    response = portal.signup("bob@example.com", password)
    assert response.status_code == 400
    assert reason in response.text
    assert user_count(db) == 0


def test_signup_mismatched_and_invalid_email(portal, db):
    response = portal.submit("/signup", "/signup", {"email": "bob@example.com", "password": PASSWORD,
                                                    "password_confirm": PASSWORD + "x"})
    assert response.status_code == 400 and "do not match" in response.text
    response = portal.signup("not-an-email")
    assert response.status_code == 400 and "valid email" in response.text
    assert user_count(db) == 0


@pytest.mark.parametrize("email", [
    "a\x00b@example.com",        # NUL (Cc)
    "a\x7fb@example.com",        # DEL (Cc)
    "e\u202ef@example.com",      # RIGHT-TO-LEFT OVERRIDE (Cf)
    "ann\u200b@example.com",     # ZERO WIDTH SPACE (Cf)
    "ann@exam\u2066ple.com",     # LEFT-TO-RIGHT ISOLATE (Cf)
    "\ufeffann@example.com",     # ZERO WIDTH NO-BREAK SPACE / BOM (Cf)
    "c\nd@example.com",          # newline, refused by the pattern already
])
def test_signup_refuses_control_and_format_characters_in_email(portal, db, email):
    response = portal.signup(email, allow_redirects=False)
    assert response.status_code == 400
    assert response.text.count("Enter a valid email address.") == 1
    assert user_count(db) == 0
    assert portal.get("/dashboard", allow_redirects=False).status_code == 302  # not logged in
    # the same address without the character is accepted
    clean = "".join(ch for ch in email if ch.isprintable())
    assert portal.signup(clean, allow_redirects=False).status_code == 302
    assert [doc["email"] for doc in db.users.find({})] == [clean.lower()]


def test_missing_csrf_token_is_400_and_nothing_written(portal, db):
    response = portal.post("/signup", {"email": "eve@example.com", "password": PASSWORD, "password_confirm": PASSWORD})
    assert response.status_code == 400
    assert "CSRF" in response.text or "security token" in response.text
    assert "Traceback" not in response.text
    assert user_count(db) == 0

    portal.signup("ann@example.com")
    before = db.sync_requests.count_documents({})
    response = portal.post("/logout", {})
    assert response.status_code == 400
    assert portal.get("/dashboard", allow_redirects=False).status_code == 200  # still logged in
    response = portal.post("/connections/fake/disconnect", {"csrf_token": "forged"})
    assert response.status_code == 400
    assert db.sync_requests.count_documents({}) == before


def test_json_error_when_client_wants_json(portal):
    response = portal.get("/nowhere", headers={"Accept": "application/json"})
    assert response.status_code == 404
    body = response.json()
    assert body["error"]["status"] == 404 and body["error"]["message"]
    html = portal.get("/nowhere")
    assert html.status_code == 404 and html.headers["Content-Type"].startswith("text/html")


def test_login_rate_limited(portal, db):
    portal.signup("ann@example.com")
    portal.logout()
    statuses = [portal.login("ann@example.com", "wrong password %d" % i).status_code for i in range(10)]
    assert statuses == [401] * 10
    response = portal.login("ann@example.com", PASSWORD)
    assert response.status_code == 429
    assert "Too many attempts" in response.text
    assert "Traceback" not in response.text


def test_next_only_to_local_paths(portal):
    portal.signup("ann@example.com")
    portal.logout()
    response = portal.login("ann@example.com", next_="https://evil.example/steal", allow_redirects=False)
    assert response.status_code == 302
    location = response.headers["Location"]
    assert "evil" not in location and location.endswith("/dashboard")
    portal.logout()
    for target in ("//evil.example/x", "/\\evil.example", "javascript:alert(1)"):
        response = portal.login("ann@example.com", next_=target, allow_redirects=False)
        assert response.status_code == 302 and "evil" not in response.headers["Location"]
        assert response.headers["Location"].endswith("/dashboard")
        portal.logout()
    response = portal.login("ann@example.com", next_="/connections?x=1", allow_redirects=False)
    assert response.headers["Location"].endswith("/connections?x=1")


def test_login_redirect_keeps_local_next(portal):
    portal.signup("ann@example.com")
    portal.logout()
    response = portal.get("/connections", allow_redirects=False)
    assert response.status_code == 302 and "next=" in response.headers["Location"]
    page = portal.get(response.headers["Location"])
    form = find_form(page.text, "/login")
    assert form.fields["next"] == "/connections"
    response = portal.http.post(portal.abs(form.action), data={**form.fields, "email": "ann@example.com",
                                                                "password": PASSWORD})
    assert response.url.endswith("/connections")


def test_session_renewed_on_login(portal):
    portal.get("/login")
    before = portal.http.cookies.get("ua_session")
    portal.signup("ann@example.com")
    portal.logout()
    portal.get("/login")
    anonymous = portal.http.cookies.get("ua_session")
    portal.login("ann@example.com")
    assert portal.http.cookies.get("ua_session") not in (before, anonymous)


def test_logout_everywhere_ends_other_sessions(portal, db):
    portal.signup("ann@example.com")
    other = portal.new_browser()
    other.login("ann@example.com")
    assert other.get("/dashboard", allow_redirects=False).status_code == 200
    portal.submit("/account", "/logout-everywhere")
    assert other.get("/dashboard", allow_redirects=False).status_code == 302
    assert db.users.find_one({})["session_epoch"] == 1
    other.login("ann@example.com")
    assert other.get("/dashboard", allow_redirects=False).status_code == 200


# ---- connections with the fake platform --------------------------------------------------------
def start_connect(portal: PortalClient, platform: str = "fake") -> dict[str, str]:
    """Press Connect; returns the query of the consent-page redirect (state, redirect_uri...)."""
    response = portal.submit("/connections", f"/connections/{platform}/connect", allow_redirects=False)
    assert response.status_code == 302, response.text
    return query_of(response.headers["Location"])


def test_unknown_platform_404(portal):
    portal.signup("ann@example.com")
    for path in ("/connections/nope/callback?code=x&state=y",):
        response = portal.get(path)
        assert response.status_code == 404
        assert "no platform called" in response.text
    csrf = portal.csrf_from("/connections", "/connections/fake/connect")
    for path in ("/connections/nope/connect", "/connections/nope/disconnect", "/sync/nope"):
        response = portal.post(path, {"csrf_token": csrf})
        assert response.status_code == 404, path
        assert "no platform called" in response.text


def test_connections_page_lists_platforms(portal):
    portal.signup("ann@example.com")
    page = portal.get("/connections")
    assert "Fake Ads" in page.text and "Offline Ads" in page.text
    assert re.search(r'data-platform="offline" data-status="not_connected" data-configured="no"', page.text)
    assert "Not configured" in page.text
    forms = [f.action for f in parse_forms(page.text)]
    assert "/connections/fake/connect" in forms
    assert "/connections/offline/connect" not in forms
    csrf = find_form(page.text, "/connections/fake/connect").fields["csrf_token"]
    response = portal.post("/connections/offline/connect", {"csrf_token": csrf})
    assert response.status_code == 400 and "not configured" in response.text


def test_connect_flow_stores_encrypted_token(portal, db, settings):
    portal.signup("ann@example.com")
    query = start_connect(portal)
    assert query["redirect_uri"] == f"{portal.url}/connections/fake/callback"
    assert query["code_challenge_method"] == "S256" and query["client_id"] == "fake-client"
    code = FakeConnector.issue_code()
    response = portal.get(f"/connections/fake/callback?code={code}&state={query['state']}")
    assert response.status_code == 200 and response.url.endswith("/connections")
    assert "Fake Ads connected: 2 accounts" in response.text
    assert "Fake Shop EU" in response.text and "Asia/Tokyo" in response.text and "JPY" in response.text

    doc = db.users.find_one({})
    connection = doc["oauth"]["fake"]
    assert connection["status"] == "connected"
    assert connection["scopes"] == ["ads.read"]
    assert connection["expires_at"] > dt.datetime.now(dt.timezone.utc)
    assert [a["id"] for a in connection["accounts"]] == ["1001", "1002"]
    token = TokenCipher.from_settings(settings).decrypt(connection["token"])
    assert token["access_token"].startswith(FAKE_ACCESS_TOKEN_PREFIX)
    raw = json.dumps(doc, default=str)
    assert token["access_token"] not in raw and token["refresh_token"] not in raw
    for path in ("/connections", "/dashboard"):
        text = portal.get(path).text
        assert token["access_token"] not in text and token["refresh_token"] not in text
        assert connection["token"] not in text
    assert "Disconnect Fake Ads" in portal.get("/connections").text


def test_forged_state_400_nothing_written(portal, db):
    portal.signup("ann@example.com")
    start_connect(portal)
    code = FakeConnector.issue_code()
    response = portal.get(f"/connections/fake/callback?code={code}&state=forged-state")
    assert response.status_code == 400
    assert "could not be completed" in response.text
    response = portal.get(f"/connections/fake/callback?code={code}")
    assert response.status_code == 400
    assert db.users.find_one({}).get("oauth") == {}


def test_state_from_another_browser_rejected(portal, db):
    portal.signup("ann@example.com")
    query = start_connect(portal)
    mallory = portal.new_browser()
    mallory.signup("mallory@example.com")
    code = FakeConnector.issue_code()
    response = mallory.get(f"/connections/fake/callback?code={code}&state={query['state']}")
    assert response.status_code == 400
    assert all(not u.get("oauth") for u in db.users.find({}))


def test_provider_error_access_denied_400(portal, db):
    portal.signup("ann@example.com")
    query = start_connect(portal)
    response = portal.get(f"/connections/fake/callback?error=access_denied&state={query['state']}")
    assert response.status_code == 400
    assert "access was denied" in response.text
    assert db.users.find_one({}).get("oauth") == {}


def test_replayed_code_400_connection_unchanged(portal, db):
    portal.signup("ann@example.com")
    query = start_connect(portal)
    callback = f"/connections/fake/callback?code={FakeConnector.issue_code()}&state={query['state']}"
    assert portal.get(callback).status_code == 200
    stored = db.users.find_one({})["oauth"]["fake"]
    response = portal.get(callback)
    assert response.status_code == 400
    assert db.users.find_one({})["oauth"]["fake"] == stored


def test_list_accounts_failure_502_nothing_written(portal, db):
    portal.signup("ann@example.com")
    FakeConnector.accounts_error = TransientPlatformError("the accounts service is down (HTTP 503)")
    query = start_connect(portal)
    response = portal.get(f"/connections/fake/callback?code={FakeConnector.issue_code()}&state={query['state']}")
    assert response.status_code == 502
    assert "listing your accounts failed" in response.text and "HTTP 503" in response.text
    assert db.users.find_one({}).get("oauth") == {}


def test_unexpected_error_is_generic_500(portal, db):
    portal.signup("ann@example.com")
    FakeConnector.accounts_error = RuntimeError("internal detail that must not leak")
    query = start_connect(portal)
    response = portal.get(f"/connections/fake/callback?code={FakeConnector.issue_code()}&state={query['state']}")
    assert response.status_code == 500
    assert "Something went wrong" in response.text
    assert "internal detail" not in response.text and "Traceback" not in response.text
    assert db.users.find_one({}).get("oauth") == {}


def test_secure_cookie_outside_local_mode(db, monkeypatch):
    monkeypatch.setenv("LOCAL_MODE", "false")
    client, stop = _portal(db, monkeypatch, FAKE_PLATFORMS)
    try:
        cookie = client.get("/login").headers.get("Set-Cookie", "")
        assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=Lax" in cookie
    finally:
        stop()


def test_callback_requires_login(portal, db):
    response = portal.get("/connections/fake/callback?code=x&state=y", allow_redirects=False)
    assert response.status_code == 302 and "/login" in response.headers["Location"]
    assert user_count(db) == 0


def connect_fake(portal: PortalClient) -> None:
    query = start_connect(portal)
    response = portal.get(f"/connections/fake/callback?code={FakeConnector.issue_code()}&state={query['state']}")
    assert response.status_code == 200, response.text


def seed_campaigns(db, user_id, platform="fake", n=3, currency="EUR", account_id="1001", prefix="c"):
    repo = CampaignRepository(db, platform)
    repo.upsert_campaigns(user_id, [
        {"account_id": account_id, "campaign_id": f"{prefix}{i:03d}", "name": f"Campaign {prefix}{i:03d}",
         "status": "ENABLED" if i % 2 == 0 else "PAUSED", "currency": currency,
         "budget": Decimal("12.50") * (i + 1), "budget_period": "DAILY"} for i in range(n)])
    repo.upsert_metrics(user_id, [
        {"account_id": account_id, "campaign_id": f"{prefix}{i:03d}", "date": (dt.datetime.now(dt.timezone.utc).date() - dt.timedelta(days=d)).isoformat(),
         "impressions": 100, "clicks": 7, "spend": Decimal("0.10"), "currency": currency}
        for i in range(n) for d in range(3)])


def test_disconnect_keeps_data_unless_purged(portal, db):
    portal.signup("ann@example.com")
    connect_fake(portal)
    user_id = db.users.find_one({})["_id"]
    seed_campaigns(db, user_id)
    response = portal.submit("/connections", "/connections/fake/disconnect")
    assert response.status_code == 200 and "disconnected" in response.text
    assert "fake" not in db.users.find_one({})["oauth"]
    assert db.fake_campaigns.count_documents({"user_id": user_id}) == 3

    connect_fake(portal)
    response = portal.submit("/connections", "/connections/fake/disconnect", {"purge": "1"})
    assert response.status_code == 200
    assert "fake" not in db.users.find_one({})["oauth"]
    assert db.fake_campaigns.count_documents({"user_id": user_id}) == 0
    assert db.fake_campaign_metrics.count_documents({"user_id": user_id}) == 0


def test_needs_reauth_and_sync_status_shown(portal, db):
    portal.signup("ann@example.com")
    connect_fake(portal)
    user_id = db.users.find_one({})["_id"]
    users = UserRepository(db)
    users.record_sync(user_id, "fake", status="success", rows={"campaigns": 12}, success=True)
    users.mark_needs_reauth(user_id, "fake", "invalid_grant: the refresh token was revoked")
    page = portal.get("/connections").text
    assert "Needs reconnection" in page and "the refresh token was revoked" in page
    assert "campaigns: 12" in page and "success" in page
    assert "Reconnect Fake Ads" in page


# ---- dashboard ---------------------------------------------------------------------------------
def test_dashboard_lists_campaigns_with_totals_per_currency(portal, db):
    portal.signup("ann@example.com")
    connect_fake(portal)
    user_id = db.users.find_one({})["_id"]
    seed_campaigns(db, user_id, n=3, currency="EUR", account_id="1001", prefix="e")
    seed_campaigns(db, user_id, n=2, currency="JPY", account_id="1002", prefix="j")
    # another user's data never shows
    other = UserRepository(db).create("zed@example.com", "x")
    seed_campaigns(db, other["_id"], n=4, currency="USD", account_id="9", prefix="z")

    page = portal.get("/dashboard")
    assert page.status_code == 200
    text = page.text
    assert "5 campaigns" in text
    assert "Campaign e000" in text and "Campaign j001" in text and "Campaign z000" not in text
    assert "Fake Shop EU" in text
    totals = dict(re.findall(r'data-currency="(\w+)"><td>\w+</td><td class="num">([\d.,]+)</td>', text))
    assert totals == {"EUR": "0.90", "JPY": "0.60"}  # 3 days x 0.10 per campaign, per currency
    assert "USD" not in totals
    assert db.fake_campaign_metrics.find_one({})["spend"] == Decimal128("0.10")

    paused = portal.get("/dashboard?status=PAUSED").text
    assert "2 campaigns" in paused and "Campaign e001" in paused and "Campaign e000" not in paused
    none = portal.get("/dashboard?platform=offline").text
    assert "0 campaigns" in none
    assert portal.get("/dashboard?platform=nope").status_code == 404
    assert portal.get("/dashboard?start=yesterday").status_code == 400
    assert portal.get("/dashboard?start=2026-02-01&end=2026-01-01").status_code == 400


def test_dashboard_paginates(make_portal, db):
    portal = make_portal({"DASHBOARD_PAGE_SIZE": 4})
    portal.signup("ann@example.com")
    user_id = db.users.find_one({})["_id"]
    seed_campaigns(db, user_id, n=10, prefix="p")
    first = portal.get("/dashboard").text
    assert "Page 1 of 3" in first
    names = lambda html: re.findall(r"<td><a [^>]*>Campaign (p\d+)</a></td>", html)  # noqa: E731
    seen = names(first) + names(portal.get("/dashboard?page=2").text) + names(portal.get("/dashboard?page=3").text)
    assert seen == [f"p{i:03d}" for i in range(10)]
    assert portal.get("/dashboard?page=x").status_code == 400


def test_sync_now_inserts_request(portal, db):
    portal.signup("ann@example.com")
    csrf = portal.csrf_from("/connections", "/connections/fake/connect")
    response = portal.post("/sync/fake", {"csrf_token": csrf})
    assert response.status_code == 400 and "not connected" in response.text
    assert db.sync_requests.count_documents({}) == 0
    connect_fake(portal)
    response = portal.submit("/dashboard", "/sync/fake")
    assert response.status_code == 200 and "Sync of Fake Ads requested" in response.text
    request_doc = db.sync_requests.find_one({})
    user_id = db.users.find_one({})["_id"]
    assert request_doc["user_id"] == user_id and request_doc["platform"] == "fake"
    assert request_doc["status"] == "requested" and request_doc["requested_at"]
    response = portal.submit("/dashboard", "/sync/fake")
    assert "already requested" in response.text
    assert db.sync_requests.count_documents({}) == 1
    assert portal.post("/sync/fake", {}).status_code == 400  # no CSRF token


# ---- Google Ads through the offline sandbox ----------------------------------------------------
def _google_available() -> bool:
    try:
        registry.connector_class("google")
    except ImportError:
        return False
    return True


google_only = pytest.mark.skipif(not _google_available(),
                                 reason="resources/platforms/google.py is not importable yet")


@pytest.fixture
def google_portal(sandbox, db, monkeypatch):
    """The portal with the real registry (Google connector) against the sandbox."""
    client, stop = _portal(db, monkeypatch, None)
    yield client
    stop()


def google_consent(portal: PortalClient, decision: str = "allow") -> str:
    """Press "Connect Google Ads", load the sandbox consent page, answer it; returns the callback URL."""
    response = portal.submit("/connections", "/connections/google/connect", allow_redirects=False)
    assert response.status_code == 302, response.text
    authorize_url = response.headers["Location"]
    query = query_of(authorize_url)
    assert query["redirect_uri"] == f"{portal.url}/connections/google/callback"
    assert query.get("access_type") == "offline"
    assert query["state"]
    consent = portal.http.get(authorize_url)
    assert consent.status_code == 200, consent.text
    form = parse_forms(consent.text)[0]
    assert any(b["value"] == "allow" for b in form.buttons)
    answer = portal.http.post(requests.compat.urljoin(authorize_url, form.action),
                              data={**form.fields, "decision": decision}, allow_redirects=False)
    assert answer.status_code == 302, answer.text
    callback = answer.headers["Location"]
    assert callback.startswith(f"{portal.url}/connections/google/callback?")
    return callback


@google_only
def test_google_connect_flow(google_portal, db, settings, sandbox):
    portal = google_portal
    portal.signup("ann@example.com")
    page = portal.get("/connections")
    assert re.search(r'data-platform="google" data-status="not_connected" data-configured="yes"', page.text)
    assert "Connect Google Ads" in page.text
    # the Connect form may redirect only to the configured consent host
    assert f"form-action 'self' {sandbox.base_url}" in page.headers["Content-Security-Policy"]
    callback = google_consent(portal)
    response = portal.http.get(callback)
    assert response.status_code == 200, response.text
    assert response.url.endswith("/connections")
    assert "connected" in response.text

    doc = db.users.find_one({})
    connection = doc["oauth"]["google"]
    assert connection["status"] == "connected"
    assert connection["expires_at"] > dt.datetime.now(dt.timezone.utc)
    token = TokenCipher.from_settings(settings).decrypt(connection["token"])
    access, refresh = token["access_token"], token.get("refresh_token")
    assert access and refresh  # offline access → a refresh token
    raw = json.dumps(doc, default=str)
    assert access not in raw and refresh not in raw

    truth = sandbox.platform("google").data
    stored = {a["id"]: a for a in connection["accounts"]}
    for customer in truth.customers():
        assert customer.id in stored
        assert stored[customer.id]["currency"] == customer.currency
        assert stored[customer.id]["time_zone"] == customer.time_zone
    page = portal.get("/connections").text
    for customer in truth.clients():
        assert customer.name in page and customer.time_zone in page
    for path in ("/connections", "/dashboard", "/connections/google/callback"):
        text = portal.get(path).text
        assert access not in text and refresh not in text and connection["token"] not in text


@google_only
def test_google_forged_state_400_nothing_written(google_portal, db):
    portal = google_portal
    portal.signup("ann@example.com")
    callback = google_consent(portal)
    forged = re.sub(r"state=[^&]+", "state=forged", callback)
    response = portal.http.get(forged)
    assert response.status_code == 400
    assert db.users.find_one({}).get("oauth") == {}
    without_state = re.sub(r"[&?]state=[^&]+", "", callback)
    assert portal.http.get(without_state).status_code == 400
    assert db.users.find_one({}).get("oauth") == {}


@google_only
def test_google_access_denied_400(google_portal, db):
    portal = google_portal
    portal.signup("ann@example.com")
    callback = google_consent(portal, decision="deny")
    assert "error=access_denied" in callback
    response = portal.http.get(callback)
    assert response.status_code == 400
    assert "access was denied" in response.text
    assert db.users.find_one({}).get("oauth") == {}


@google_only
def test_google_replayed_code_400_connection_unchanged(google_portal, db):
    portal = google_portal
    portal.signup("ann@example.com")
    callback = google_consent(portal)
    assert portal.http.get(callback).status_code == 200
    stored = db.users.find_one({})["oauth"]["google"]
    response = portal.http.get(callback)
    assert response.status_code == 400
    assert db.users.find_one({})["oauth"]["google"] == stored
    # the same code under a fresh, valid state: the provider refuses it (codes are single-use)
    fresh_state = query_of(google_consent(portal))["state"]
    old_code = query_of(callback)["code"]
    response = portal.get(f"/connections/google/callback?code={requests.utils.quote(old_code, safe='')}"
                          f"&state={fresh_state}")
    assert response.status_code == 400
    assert "rejected the authorization code" in response.text
    assert db.users.find_one({})["oauth"]["google"] == stored


@google_only
def test_google_disconnect_removes_token(google_portal, db):
    portal = google_portal
    portal.signup("ann@example.com")
    assert portal.http.get(google_consent(portal)).status_code == 200
    assert "token" in db.users.find_one({})["oauth"]["google"]
    response = portal.submit("/connections", "/connections/google/disconnect")
    assert response.status_code == 200
    assert "google" not in db.users.find_one({})["oauth"]
    assert re.search(r'data-platform="google" data-status="not_connected"', response.text)


def test_meta_cancel_returns_the_state_and_is_access_denied_400(google_portal, db):
    """The Meta sandbox's Cancel answers like Facebook: ``error=access_denied`` with the request's
    ``state``; the portal says access was denied (400) and stores nothing."""
    portal = google_portal
    portal.signup("ann@example.com")
    response = portal.submit("/connections", "/connections/meta/connect", allow_redirects=False)
    assert response.status_code == 302, response.text
    dialog_url = response.headers["Location"]
    sent_state = query_of(dialog_url)["state"]
    assert sent_state and query_of(dialog_url)["redirect_uri"] == f"{portal.url}/connections/meta/callback"
    dialog = portal.http.get(dialog_url)
    assert dialog.status_code == 200, dialog.text
    form = parse_forms(dialog.text)[0]
    assert {b["value"] for b in form.buttons} == {"allow", "deny"}
    answer = portal.http.post(requests.compat.urljoin(dialog_url, form.action),
                              data={**form.fields, "decision": "deny"}, allow_redirects=False)
    assert answer.status_code == 302, answer.text
    callback = answer.headers["Location"]
    assert callback.startswith(f"{portal.url}/connections/meta/callback?")
    query = query_of(callback)
    assert query["error"] == "access_denied" and query["error_reason"] == "user_denied"
    assert query["state"] == sent_state
    response = portal.http.get(callback)
    assert response.status_code == 400
    assert "access was denied" in response.text
    assert db.users.find_one({}).get("oauth") == {}
