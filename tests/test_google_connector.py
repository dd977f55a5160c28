"""The Google Ads connector against the offline sandbox: real authlib OAuth flow over HTTP, the real
google-ads SDK over gRPC/TLS, compared with the sandbox's truth. No mocks."""
from __future__ import annotations

import datetime as dt
import re
from decimal import Decimal
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from flask import Flask, request

from resources.platforms.base import (
    Account,
    OAuthCallbackError,
    PlatformError,
    RateLimited,
    ReauthRequired,
    TransientPlatformError,
)
from resources.platforms.google import GoogleAdsConnector, GoogleAdsSettings

MANAGER_ID = "1234567890"
REDIRECT_URI = "http://127.0.0.1:5000/callback"


# ---- helpers: the real OAuth flow through authlib's Flask client --------------------------------

def _portal_app(connector: GoogleAdsConnector) -> Flask:
    """A minimal portal: /login redirects to Google's consent page, /callback finishes the flow."""
    from authlib.integrations.flask_client import OAuth

    app = Flask("test-portal")
    app.secret_key = "test"
    oauth = OAuth(app)
    client = oauth.register("google", **connector.oauth_registration())

    @app.get("/login")
    def login():
        return connector.begin_authorization(client, REDIRECT_URI, {})

    @app.get("/callback")
    def callback():
        try:
            return {"token": connector.finish_authorization(client, request)}
        except OAuthCallbackError as exc:
            return {"error": str(exc)}, 400

    return app


def _consent(authorize_url: str, decision: str = "allow") -> str:
    """Open Google's (sandbox) consent page and press a button; returns the redirect Location."""
    page = requests.get(authorize_url, allow_redirects=False, timeout=10)
    assert page.status_code == 200, page.text
    assert "Unified Ads" in page.text and "https://www.googleapis.com/auth/adwords" in page.text
    consent_id = re.search(r'name="consent_id" value="([^"]+)"', page.text)[1]
    action = re.search(r'<form method="post" action="([^"]+)"', page.text)[1]
    base = "{0.scheme}://{0.netloc}".format(urlsplit(authorize_url))
    answer = requests.post(base + action, data={"consent_id": consent_id, "decision": decision},
                           allow_redirects=False, timeout=10)
    assert answer.status_code == 302
    return answer.headers["Location"]


def connect(connector: GoogleAdsConnector, decision: str = "allow", tamper=None):
    """Run the whole flow; returns (status code, JSON) of the portal's callback."""
    app = _portal_app(connector)
    with app.test_client() as browser:
        start = browser.get("/login")
        assert start.status_code == 302
        authorize_url = start.headers["Location"]
        query = parse_qs(urlsplit(authorize_url).query)
        assert query["code_challenge_method"] == ["S256"] and query["access_type"] == ["offline"]
        assert query["prompt"] == ["consent"]
        location = _consent(authorize_url, decision)
        assert location.startswith(REDIRECT_URI)
        callback = "/callback?" + urlsplit(location).query
        if tamper:
            callback = tamper(callback)
        answer = browser.get(callback)
        return answer.status_code, answer.get_json(), callback, browser


@pytest.fixture(scope="module")
def google(sandbox):
    return sandbox.platform("google")


@pytest.fixture
def connector(sandbox) -> GoogleAdsConnector:
    return GoogleAdsConnector(GoogleAdsSettings())


@pytest.fixture(scope="module")
def token(sandbox):
    status, body, _, _ = connect(GoogleAdsConnector(GoogleAdsSettings()))
    assert status == 200, body
    return body["token"]


@pytest.fixture
def knobs(google):
    google.reset()
    yield google
    google.reset()


def _client(google, customer_id: str) -> Account:
    c = google.data.customer(customer_id)
    return Account(id=c.id, name=c.name, currency=c.currency, time_zone=c.time_zone, manager_id=MANAGER_ID)


# ---- OAuth ---------------------------------------------------------------------------------------

def test_authorization_flow_returns_a_normalised_token(token):
    assert token["access_token"].startswith("ya29.") and token["refresh_token"]
    assert token["scope"] == "https://www.googleapis.com/auth/adwords"
    assert abs(token["expires_at"] - (dt.datetime.now().timestamp() + 3600)) < 60


def test_denied_consent_forged_state_and_replayed_code_are_callback_errors(connector):
    status, body, _, _ = connect(connector, decision="deny")
    assert status == 400 and "denied" in body["error"]

    status, body, _, _ = connect(connector, tamper=lambda url: re.sub(r"state=[^&]+", "state=forged", url))
    assert status == 400 and "state" in body["error"]

    status, body, callback, browser = connect(connector)
    assert status == 200
    # the code is single-use: replaying the same callback cannot get a second token
    answer = requests.post(connector.settings.token_url, data={
        "grant_type": "authorization_code", "code": parse_qs(urlsplit(callback).query)["code"][0],
        "redirect_uri": REDIRECT_URI, "client_id": connector.settings.client_id,
        "client_secret": connector.settings.client_secret}, timeout=10)
    assert answer.status_code == 400 and answer.json()["error"] == "invalid_grant"


def test_refresh_keeps_the_refresh_token_and_revoked_grant_needs_reauth(connector, knobs):
    status, body, _, _ = connect(connector)
    own = body["token"]
    refreshed = connector.refresh(own)
    assert refreshed["access_token"] != own["access_token"]
    assert refreshed["refresh_token"] == own["refresh_token"]  # Google sends no new refresh token

    knobs.revoke(own["refresh_token"])
    with pytest.raises(ReauthRequired) as info:
        connector.refresh(own)
    assert own["refresh_token"] not in str(info.value) and "invalid_grant" in str(info.value)
    # its access tokens stop working too
    session = connector.open_session(refreshed)
    with pytest.raises(ReauthRequired) as info:
        list(session.fetch_campaigns(_client(knobs, "2345678901")))
    assert refreshed["access_token"] not in str(info.value)


def test_refresh_on_a_failing_token_endpoint_is_transient(connector, token, knobs):
    knobs.inject_fault("INTERNAL", target="token")
    with pytest.raises(TransientPlatformError):
        connector.refresh(token)
    assert connector.refresh(token)["access_token"]


# ---- accounts and data -----------------------------------------------------------------------

def test_list_accounts_gives_the_manager_and_its_clients(connector, token, google):
    accounts = {a.id: a for a in connector.list_accounts(token)}
    assert set(accounts) == {c.id for c in google.data.customers()}
    manager = accounts[MANAGER_ID]
    assert manager.manager and manager.manager_id is None and manager.name == "Sandbox Agency MCC"
    us, de = accounts["2345678901"], accounts["3456789012"]
    assert (us.currency, us.time_zone, us.manager_id, us.manager) == ("USD", "America/New_York", MANAGER_ID, False)
    assert (de.currency, de.time_zone, de.manager_id) == ("EUR", "Europe/Berlin", MANAGER_ID)
    session = connector.open_session(token)
    assert not session.syncable(manager) and session.syncable(us)


def test_fetch_campaigns_matches_the_truth(connector, token, google):
    session = connector.open_session(token)
    for customer in google.data.clients():
        account = _client(google, customer.id)
        docs = {d["campaign_id"]: d for d in session.fetch_campaigns(account)}
        truth = google.data.campaigns(customer.id)
        assert set(docs) == {str(c.id) for c in truth}
        for c in truth:
            doc = docs[str(c.id)]
            micros = c.budget_amount_micros if c.budget_period == "DAILY" else c.budget_total_micros
            assert doc["budget"] == Decimal(micros) / Decimal(1_000_000) and isinstance(doc["budget"], Decimal)
            assert (doc["name"], doc["status"], doc["channel_type"], doc["budget_period"]) == \
                (c.name, c.status, c.channel_type, c.budget_period)
            assert doc["currency"] == customer.currency and doc["account_id"] == customer.id
            assert doc["start_date"] == c.start_date.isoformat()
            assert doc["end_date"] == (c.end_date.isoformat() if c.end_date else None)
        statuses = {d["status"] for d in docs.values()}
        assert statuses == {"ENABLED", "PAUSED", "REMOVED"}
        assert {"SEARCH", "DISPLAY", "VIDEO", "SHOPPING", "PERFORMANCE_MAX"} <= {d["channel_type"] for d in docs.values()}
    assert session.stats.api_calls == len(google.data.clients())
    session.close()


def test_fetch_daily_metrics_equals_the_truth_for_30_days(connector, token, google):
    session = connector.open_session(token)
    total = 0
    for customer in google.data.clients():
        account = _client(google, customer.id)
        end = google.data.local_today(customer.id) - dt.timedelta(days=1)
        start = end - dt.timedelta(days=29)
        rows = session.fetch_daily_metrics(account, start, end)
        assert iter(rows) is rows  # a generator: streamed, not a list
        docs = {(d["campaign_id"], d["date"]): d for d in rows}
        truth = {(str(t["campaign_id"]), t["date"].isoformat()): t
                 for t in google.data.daily_metrics(customer.id, start, end)}
        assert docs.keys() == truth.keys() and len(truth) > 100
        for key, t in truth.items():
            d = docs[key]
            assert d["impressions"] == t["impressions"] and d["clicks"] == t["clicks"]
            assert d["spend"] == Decimal(t["cost_micros"]) / 1_000_000 and isinstance(d["spend"], Decimal)
            assert d["spend"] == d["spend"].quantize(Decimal("0.01"))  # to the cent
            assert d["conversions"] == Decimal(repr(t["conversions"]))
            assert d["currency"] == customer.currency and d["account_id"] == customer.id
        total += len(docs)
    assert total > 0 and session.stats.api_calls == 2


# ---- errors ----------------------------------------------------------------------------------

def test_resource_exhausted_is_rate_limited_with_the_retry_delay(connector, token, knobs):
    knobs.inject_fault("RESOURCE_EXHAUSTED", retry_delay=17)
    session = connector.open_session(token)
    with pytest.raises(RateLimited) as info:
        list(session.fetch_campaigns(_client(knobs, "2345678901")))
    assert info.value.retry_after == 17
    assert len(list(session.fetch_campaigns(_client(knobs, "2345678901")))) == 50


@pytest.mark.parametrize("kind", ["INTERNAL", "UNAVAILABLE"])
def test_internal_and_unavailable_are_transient(connector, token, knobs, kind):
    knobs.inject_fault(kind)
    session = connector.open_session(token)
    with pytest.raises(TransientPlatformError):
        list(session.fetch_daily_metrics(_client(knobs, "3456789012"), dt.date(2026, 1, 1), dt.date(2026, 1, 3)))


def test_client_without_its_manager_as_login_customer_is_a_permission_error(connector, token, google):
    session = connector.open_session(token)
    lonely = Account(id="2345678901", name="x", currency="USD", time_zone="America/New_York")  # no manager_id
    with pytest.raises(PlatformError) as info:
        list(session.fetch_campaigns(lonely))
    assert not isinstance(info.value, ReauthRequired)
    assert "USER_PERMISSION_DENIED" in str(info.value)


def test_metrics_on_a_manager_are_refused_by_the_api(connector, token):
    session = connector.open_session(token)
    manager = Account(id=MANAGER_ID, name="MCC", currency="USD", time_zone="America/New_York", manager=False)
    with pytest.raises(PlatformError) as info:
        list(session.fetch_daily_metrics(manager, dt.date(2026, 1, 1), dt.date(2026, 1, 2)))
    assert "REQUESTED_METRICS_FOR_MANAGER" in str(info.value)


def test_expired_access_token_is_refreshed_once_transparently(connector, token, knobs):
    session = connector.open_session(dict(token))
    knobs.expire_access_tokens()
    assert len(list(session.fetch_campaigns(_client(knobs, "2345678901")))) == 50
    assert session.stats.retries == 1


def test_revoked_grant_at_call_time_needs_reauth(connector, knobs):
    _, body, _, _ = connect(connector)
    own = dict(body["token"], expires_at=0)  # the SDK will refresh before its first call
    knobs.revoke(own["refresh_token"])
    session = connector.open_session(own)
    with pytest.raises(ReauthRequired) as info:
        list(session.fetch_campaigns(_client(knobs, "2345678901")))
    assert own["refresh_token"] not in str(info.value)


def test_http_fault_knob(connector, token, sandbox, knobs):
    answer = requests.post(sandbox.base_url + "/_sandbox/google/faults",
                           json={"kind": "RESOURCE_EXHAUSTED", "count": 1, "retry_delay": 3}, timeout=5)
    assert answer.status_code == 200 and answer.json()["pending"] == 1
    with pytest.raises(RateLimited) as info:
        connector.list_accounts(token)
    assert info.value.retry_after == 3
    # bad knob values answer 400 with a reason and queue nothing (every platform's knobs share this)
    for url, bad in (("/_sandbox/google/faults", {"latency": "abc"}), ("/_sandbox/google/faults", {"latency": 1e9}),
                     ("/_sandbox/google/faults", {"kind": "INTERNAL", "count": -1}),
                     ("/_sandbox/google/restate", {"days": "x"}), ("/_sandbox/meta/restate", {"days": 1e9}),
                     ("/_sandbox/meta/faults", {"kind": "transient", "count": 0}),
                     ("/_sandbox/google/faults", {"kind": "INTERNAL", "count": 1.5}),
                     ("/_sandbox/shopify/faults", {"kind": "INTERNAL", "count": True}),
                     ("/_sandbox/shopify/faults", {"latency": -1})):
        refused = requests.post(sandbox.base_url + url, json=bad, timeout=5)
        assert refused.status_code == 400 and refused.json()["error"].startswith("bad knob value"), (url, bad)
    not_json = requests.post(sandbox.base_url + "/_sandbox/google/faults", data="not json",
                             headers={"Content-Type": "text/plain"}, timeout=5)
    assert not_json.status_code == 400
    knobs_now = requests.post(sandbox.base_url + "/_sandbox/google/faults", json={}, timeout=5).json()
    assert knobs_now == {"pending": 0, "latency": 0.0}
    assert requests.post(sandbox.base_url + "/_sandbox/google/reset", timeout=5).status_code == 200


def test_connector_documents_equal_the_sandbox_expected_documents(connector, token, google):
    session = connector.open_session(token)
    account = _client(google, "3456789012")
    assert list(session.fetch_campaigns(account)) == list(google.expected_campaigns(account.id))
    end = google.data.local_today(account.id)
    start = end - dt.timedelta(days=6)
    assert list(session.fetch_daily_metrics(account, start, end)) == list(google.expected_metrics(account.id, start, end))
