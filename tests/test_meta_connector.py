"""The Meta Ads connector against the offline sandbox: the real authlib OAuth flow over HTTP and the
real facebook-business SDK over HTTP, compared with the sandbox's truth. No mocks (a recording
``sleep`` replaces waiting where a test only needs to see that the connector would wait)."""
from __future__ import annotations

import datetime as dt
import json
import re
import time
from decimal import Decimal
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from flask import Flask, request

from resources.platforms.base import (Account, OAuthCallbackError, PlatformError, RateLimited, ReauthRequired,
                                      TransientPlatformError)
from resources.platforms.meta import MetaAdsConnector, MetaAdsSession, MetaAdsSettings

REDIRECT_URI = "http://127.0.0.1:5000/callback"
JPY_ACCOUNT = "101000000000003"
USD_ACCOUNT = "101000000000001"


# ---- helpers: the real OAuth flow through authlib's Flask client ----------------------------------

def _portal_app(connector: MetaAdsConnector) -> Flask:
    from authlib.integrations.flask_client import OAuth

    app = Flask("test-portal")
    app.secret_key = "test"
    client = OAuth(app).register("meta", **connector.oauth_registration())

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
    """Open the (sandbox) Facebook Login dialog and press a button; returns the redirect Location."""
    page = requests.get(authorize_url, allow_redirects=False, timeout=10)
    assert page.status_code == 200, page.text
    assert "Unified Ads" in page.text and "ads_read" in page.text
    consent_id = re.search(r'name="consent_id" value="([^"]+)"', page.text)[1]
    action = re.search(r'<form method="post" action="([^"]+)"', page.text)[1]
    base = "{0.scheme}://{0.netloc}".format(urlsplit(authorize_url))
    answer = requests.post(base + action, data={"consent_id": consent_id, "decision": decision},
                           allow_redirects=False, timeout=10)
    assert answer.status_code == 302
    return answer.headers["Location"]


def connect(connector: MetaAdsConnector, decision: str = "allow", tamper=None):
    app = _portal_app(connector)
    with app.test_client() as browser:
        start = browser.get("/login")
        assert start.status_code == 302
        authorize_url = start.headers["Location"]
        query = parse_qs(urlsplit(authorize_url).query)
        assert query["scope"] == ["ads_read,business_management"] and query["state"]
        location = _consent(authorize_url, decision)
        assert location.startswith(REDIRECT_URI)
        callback = "/callback?" + urlsplit(location).query
        if tamper:
            callback = tamper(callback)
        answer = browser.get(callback)
        return answer.status_code, answer.get_json(), callback


@pytest.fixture(scope="module")
def meta(sandbox):
    return sandbox.platform("meta")


@pytest.fixture
def knobs(meta):
    meta.reset()
    yield meta
    meta.reset()


def fast(**overrides) -> MetaAdsSettings:
    """Sandbox settings with short backoffs (tests must not wait long)."""
    values = {"transient_backoff_seconds": 0.05, "pace_max_sleep_seconds": 0.5}
    values.update(overrides)
    return MetaAdsSettings(**values)


@pytest.fixture
def connector(sandbox) -> MetaAdsConnector:
    return MetaAdsConnector(fast())


@pytest.fixture(scope="module")
def token(sandbox):
    status, body, _ = connect(MetaAdsConnector(MetaAdsSettings()))
    assert status == 200, body
    return body["token"]


def account(meta, account_id: str) -> Account:
    a = meta.data.account(account_id)
    return Account(id=a.id, name=a.name, currency=a.currency, time_zone=a.time_zone)


class Sleeps(list):
    """A ``sleep`` that records instead of waiting."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


# ---- OAuth -----------------------------------------------------------------------------------------

def test_connect_exchanges_the_code_then_at_once_for_a_long_lived_token(token, meta):
    assert set(token) == {"access_token", "token_type", "expires_at", "long_lived"}
    assert token["access_token"].startswith("EAA") and token["long_lived"] is True
    assert abs(token["expires_at"] - (time.time() + 60 * 86400)) < 120  # about 60 days
    assert meta.tokens.get(token["access_token"]).kind == "long"


def test_denied_consent_forged_state_and_replayed_code_are_callback_errors(connector, sandbox):
    status, body, _ = connect(connector, decision="deny")
    assert status == 400 and "denied" in body["error"]

    status, body, _ = connect(connector, tamper=lambda url: re.sub(r"state=[^&]+", "state=forged", url))
    assert status == 400 and "state" in body["error"]

    status, body, callback = connect(connector)
    assert status == 200
    code = parse_qs(urlsplit(callback).query)["code"][0]
    s = connector.settings
    replay = requests.get(s.token_url, params={"client_id": s.app_id, "client_secret": s.app_secret,
                                               "redirect_uri": REDIRECT_URI, "code": code}, timeout=10)
    assert replay.status_code == 400 and replay.json()["error"]["code"] == 100
    assert replay.json()["error"]["error_subcode"] == 36009  # "This authorization code has been used."


def test_refresh_re_exchanges_a_valid_token_and_an_expired_one_needs_reauth(connector, knobs):
    _, body, _ = connect(connector)
    own = body["token"]
    now = dt.datetime.now(dt.timezone.utc)
    assert not connector.needs_refresh(own, now, 600)  # 60 days left
    assert connector.needs_refresh(dict(own, expires_at=now.timestamp() + 14 * 86400), now, 600)  # < 15 days
    assert not connector.needs_refresh({"access_token": "x"}, now, 600)  # no expiry (system user token)

    renewed = connector.refresh(own)
    assert renewed["access_token"] != own["access_token"] and renewed["expires_at"] >= own["expires_at"]

    # expired by the clock: nothing can renew it and nothing is called
    calls = knobs.stats().get("token", 0)
    with pytest.raises(ReauthRequired) as info:
        connector.refresh(dict(renewed, expires_at=int(time.time()) - 10))
    assert "reconnect" in str(info.value) and knobs.stats().get("token", 0) == calls

    # expired at Meta (the clock still says valid): the exchange meets 190/463
    knobs.expire_tokens(renewed["access_token"])
    with pytest.raises(ReauthRequired) as info:
        connector.refresh(renewed)
    assert "190/463" in str(info.value) and renewed["access_token"] not in str(info.value)


def test_token_endpoint_failure_is_transient(connector, token, knobs):
    knobs.inject_fault("transient", target="token")
    with pytest.raises(TransientPlatformError):
        connector.refresh(token)
    assert connector.refresh(token)["access_token"]


# ---- accounts and data ---------------------------------------------------------------------------

def test_list_accounts_gives_every_ad_account(connector, token, meta):
    accounts = {a.id: a for a in connector.list_accounts(token)}
    assert set(accounts) == {a.id for a in meta.data.accounts()}
    assert {a.currency for a in accounts.values()} == {"USD", "EUR", "JPY", "AUD"}
    jp = accounts[JPY_ACCOUNT]
    assert (jp.currency, jp.time_zone, jp.status, jp.manager) == ("JPY", "Asia/Tokyo", "ACTIVE", False)
    assert len({a.time_zone for a in accounts.values()}) == 4


def test_campaigns_of_every_status_equal_the_truth(connector, token, meta):
    session = connector.open_session(token)
    for a in meta.data.accounts():
        docs = list(session.fetch_campaigns(account(meta, a.id)))
        assert docs == list(meta.expected_campaigns(a.id))
        assert {d["status"] for d in docs} == {"ACTIVE", "PAUSED", "ARCHIVED", "DELETED"}
        assert {d["budget_period"] for d in docs} == {"DAILY", "LIFETIME", None}
        assert len({d["objective"] for d in docs}) == 6
        for doc in docs:
            assert doc["budget"] is None or isinstance(doc["budget"], Decimal)
        if a.currency == "JPY":  # zero-decimal currency: minor units are yen
            truth = {c.id: c for c in meta.data.campaigns(a.id)}
            for doc in docs:
                c = truth[doc["campaign_id"]]
                minor = c.daily_budget if c.daily_budget is not None else c.lifetime_budget
                assert doc["budget"] == (Decimal(minor) if minor is not None else None)
        else:
            daily = next(d for d in docs if d["budget_period"] == "DAILY")
            minor = meta.data.campaign(daily["campaign_id"]).daily_budget
            assert daily["budget"] == Decimal(minor) / 100
    session.close()


def test_daily_metrics_equal_the_truth_sync_and_async(connector, token, knobs):
    session = connector.open_session(token)
    total = 0
    for a in knobs.data.accounts():
        acct = account(knobs, a.id)
        end = knobs.data.local_today(a.id)
        for days, kind in ((14, "insights"), (90, "insights_async")):
            start = end - dt.timedelta(days=days - 1)
            before = knobs.stats()
            rows = session.fetch_daily_metrics(acct, start, end)
            assert iter(rows) is rows  # streamed
            docs = list(rows)
            assert docs == list(knobs.expected_metrics(a.id, start, end)), (a.id, days)
            after = knobs.stats()
            assert after.get(kind, 0) - before.get(kind, 0) == 1  # 14 days: synchronous; 90 days: a report run
            total += len(docs)
            campaigns = {c.id: c for c in knobs.data.campaigns(a.id)}
            statuses = {campaigns[d["campaign_id"]].status for d in docs}
            if days == 90:
                assert {"ARCHIVED", "DELETED"} & statuses or a.currency != "USD"
            if a.currency == "JPY":
                assert all(d["spend"] == d["spend"].to_integral_value() for d in docs)
            else:
                assert all(d["spend"] == d["spend"].quantize(Decimal("0.01")) for d in docs)
            assert all(isinstance(d["spend"], Decimal) and isinstance(d["conversions"], Decimal) for d in docs)
    assert total > 4000
    assert any(d["conversions"] > 0 for d in knobs.expected_metrics(USD_ACCOUNT, end - dt.timedelta(days=13), end))
    session.close()


def test_deleted_and_archived_campaigns_have_insights_only_when_asked_for(token, meta, sandbox):
    """The connector's rows include them; the plain Graph call (no status filter) leaves them out."""
    acct = meta.data.account(USD_ACCOUNT)
    hidden = {c.id for c in meta.data.campaigns(USD_ACCOUNT) if c.status in ("ARCHIVED", "DELETED")}
    end = meta.data.local_today(USD_ACCOUNT)
    start = end - dt.timedelta(days=400)
    truth = {m["campaign_id"] for m in meta.expected_metrics(USD_ACCOUNT, start, end)}
    assert hidden & truth
    plain = requests.get(f"{meta.graph_url}/v26.0/act_{acct.id}/insights", timeout=10, params={
        "access_token": token["access_token"], "level": "campaign", "fields": "campaign_id", "limit": 5000,
        "time_range": json.dumps({"since": str(start), "until": str(end)})}).json()["data"]
    assert not hidden & {r["campaign_id"] for r in plain}


def test_every_call_carries_appsecret_proof_and_no_global_sdk_state(connector, token, knobs):
    from facebook_business.api import FacebookAdsApi
    from facebook_business.session import FacebookSession

    knobs.set_require_proof(True)
    knobs.reset_stats()
    session = connector.open_session(token)
    assert len(list(session.fetch_campaigns(account(knobs, USD_ACCOUNT)))) == 30
    stats = knobs.stats()
    assert stats["proof_valid"] >= 1 and stats.get("proof_missing", 0) == 0 and stats.get("proof_invalid", 0) == 0
    assert FacebookAdsApi.get_default_api() is None
    assert FacebookSession.GRAPH == "https://graph.facebook.com"  # only the session instance points at the sandbox
    # a wrong app secret gives a wrong proof, which Meta refuses
    bad = MetaAdsConnector(fast(app_secret="0" * 32)).open_session(token)
    with pytest.raises(PlatformError) as info:
        list(bad.fetch_campaigns(account(knobs, USD_ACCOUNT)))
    assert "appsecret_proof" in str(info.value) and not isinstance(info.value, ReauthRequired)


def test_small_pages_follow_the_cursors(token, knobs):
    session = MetaAdsConnector(fast(page_size=7)).open_session(token)
    acct = account(knobs, JPY_ACCOUNT)
    assert list(session.fetch_campaigns(acct)) == list(knobs.expected_campaigns(JPY_ACCOUNT))
    end = knobs.data.local_today(JPY_ACCOUNT)
    start = end - dt.timedelta(days=5)
    docs = list(session.fetch_daily_metrics(acct, start, end))
    assert docs == list(knobs.expected_metrics(JPY_ACCOUNT, start, end))
    assert session.stats.api_calls >= 30 // 7 + len(docs) // 7


# ---- rate limits -----------------------------------------------------------------------------------

def test_long_regain_time_stops_with_rate_limited_and_no_retry_loop(connector, token, knobs):
    knobs.throttle(JPY_ACCOUNT, 600)
    sleeps = Sleeps()
    session = MetaAdsSession(connector.settings, token, sleep=sleeps)
    end = knobs.data.local_today(JPY_ACCOUNT)
    with pytest.raises(RateLimited) as info:
        list(session.fetch_daily_metrics(account(knobs, JPY_ACCOUNT), end - dt.timedelta(days=6), end))
    assert 480 <= info.value.retry_after <= 600 and "80000" in str(info.value)
    assert info.value.account_id == JPY_ACCOUNT  # a per-ad-account limit: only this account is deferred
    assert knobs.stats()["throttled"] == 1 and sleeps == []  # one call, no waiting, no loop
    assert session.usage[JPY_ACCOUNT].regain_minutes >= 8  # usage header read on the error answer
    # other accounts are not affected
    assert list(session.fetch_campaigns(account(knobs, USD_ACCOUNT)))


def test_short_regain_time_waits_then_succeeds(token, knobs):
    knobs.throttle(USD_ACCOUNT, 1.5)
    session = MetaAdsConnector(fast(transient_backoff_seconds=0.5)).open_session(token)
    started = time.monotonic()
    docs = list(session.fetch_campaigns(account(knobs, USD_ACCOUNT)))
    assert len(docs) == 30 and time.monotonic() - started >= 1.4
    assert session.stats.retries >= 1 and session.stats.throttled_seconds >= 1.4
    assert knobs.stats()["throttled"] >= 2


def test_user_rate_limit_with_a_minute_to_regain_waits_within_budget_or_defers(token, knobs):
    knobs.inject_fault("rate_limit", regain_minutes=1)
    sleeps = Sleeps()
    waiting = MetaAdsSession(fast(rate_limit_max_wait_seconds=60), token, sleep=sleeps)
    assert len(list(waiting.fetch_campaigns(account(knobs, USD_ACCOUNT)))) == 30
    assert sleeps == [60.0]

    knobs.inject_fault("rate_limit", regain_minutes=1)
    deferring = MetaAdsSession(fast(rate_limit_max_wait_seconds=30), token, sleep=Sleeps())
    with pytest.raises(RateLimited) as info:
        list(deferring.fetch_campaigns(account(knobs, USD_ACCOUNT)))
    assert info.value.retry_after == 60 and "code 17/2446079" in str(info.value)
    assert info.value.account_id is None  # a user-level limit stops the whole connection


def test_usage_past_the_high_water_mark_slows_down(token, knobs):
    sleeps = Sleeps()
    session = MetaAdsSession(fast(pace_max_sleep_seconds=4, usage_high_water_pct=75), token, sleep=sleeps)
    acct = account(knobs, USD_ACCOUNT)
    list(session.fetch_campaigns(acct))
    list(session.fetch_campaigns(acct))
    assert sleeps == []  # low usage: full speed
    knobs.set_usage(USD_ACCOUNT, 95)
    list(session.fetch_campaigns(acct))  # this answer reports 95 %
    list(session.fetch_campaigns(acct))  # so this call is paced
    assert sleeps and sleeps[0] == pytest.approx(4 * (95 - 75) / 25)
    assert session.usage[USD_ACCOUNT].pct == 95 and session.stats.throttled_seconds > 0


# ---- transient and token errors --------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["transient", "unknown", "http_503"])
def test_transient_errors_retry_with_backoff(connector, token, knobs, kind):
    knobs.inject_fault(kind, count=2, target="campaigns")
    session = connector.open_session(token)
    assert len(list(session.fetch_campaigns(account(knobs, USD_ACCOUNT)))) == 30
    assert session.stats.retries == 2


def test_transient_errors_give_up_after_the_retries(connector, token, knobs):
    knobs.inject_fault("transient", count=10, target="insights")
    session = connector.open_session(token)
    with pytest.raises(TransientPlatformError) as info:
        list(session.fetch_daily_metrics(account(knobs, USD_ACCOUNT), dt.date(2026, 1, 1), dt.date(2026, 1, 3)))
    assert "gave up after 3 retries" in str(info.value)


def test_expired_or_revoked_token_at_call_time_needs_reauth(connector, knobs):
    _, body, _ = connect(connector)
    own = body["token"]
    knobs.expire_tokens(own["access_token"])
    with pytest.raises(ReauthRequired) as info:
        connector.list_accounts(own)
    assert "190/463" in str(info.value) and own["access_token"] not in str(info.value)

    _, body, _ = connect(connector)
    other = body["token"]
    knobs.revoke(other["access_token"])
    with pytest.raises(ReauthRequired) as info:
        list(connector.open_session(other).fetch_campaigns(account(knobs, USD_ACCOUNT)))
    assert "190/458" in str(info.value)


def test_failed_report_run_is_split_and_too_much_data_switches_to_async(connector, token, knobs):
    session = connector.open_session(token)
    acct = account(knobs, JPY_ACCOUNT)
    end = knobs.data.local_today(JPY_ACCOUNT)
    start = end - dt.timedelta(days=59)
    knobs.inject_fault("async_failed")
    before = knobs.stats().get("insights_async", 0)
    assert list(session.fetch_daily_metrics(acct, start, end)) == list(knobs.expected_metrics(JPY_ACCOUNT, start, end))
    assert knobs.stats()["insights_async"] - before == 3  # the failed run, then two halves

    knobs.sync_cell_limit = 50  # Meta: "Please reduce the amount of data you're asking for"
    try:
        start = end - dt.timedelta(days=9)
        before = knobs.stats().get("insights_async", 0)
        docs = list(session.fetch_daily_metrics(acct, start, end))
        assert docs == list(knobs.expected_metrics(JPY_ACCOUNT, start, end))
        assert knobs.stats()["insights_async"] - before == 1
    finally:
        knobs.sync_cell_limit = 12_000


# ---- what peer connectors call ---------------------------------------------------------------------

def test_sandbox_answers_the_calls_peer_connectors_make(token, meta, knobs):
    graph, access = meta.graph_url, token["access_token"]
    accounts = requests.get(f"{graph}/v26.0/me/adaccounts", params={"access_token": access, "summary": "true"},
                            timeout=10).json()
    assert accounts["summary"]["total_count"] == 4 and {"account_id", "id"} <= set(accounts["data"][0])
    node = requests.get(f"{graph}/v25.0/act_{JPY_ACCOUNT}/", params={"access_token": access,
                                                                    "fields": "timezone_name"}, timeout=10).json()
    assert node == {"timezone_name": "Asia/Tokyo", "id": f"act_{JPY_ACCOUNT}"}
    # campaigns: absolute local paging.next URLs, followed as they are
    page = requests.get(f"{graph}/v25.0/act_{JPY_ACCOUNT}/campaigns",
                        params={"access_token": access, "fields": "updated_time,id", "limit": 10, "summary": "true"},
                        timeout=10).json()
    seen = [c["id"] for c in page["data"]]
    while "next" in page.get("paging", {}):
        assert page["paging"]["next"].startswith(graph + "/v25.0/act_")
        page = requests.get(page["paging"]["next"], timeout=10).json()
        seen += [c["id"] for c in page["data"]]
    assert len(seen) == len(set(seen)) == sum(1 for c in meta.data.campaigns(JPY_ACCOUNT) if c.status in ("ACTIVE", "PAUSED"))
    campaign = requests.get(f"{graph}/v25.0/{seen[0]}/", params={"access_token": access, "fields": "name,objective"},
                            timeout=10).json()
    assert campaign["name"] == meta.data.campaign(seen[0]).name
    # insights answers carry the throttle header (Airbyte reads it first)
    bare = requests.get(f"{graph}/v25.0/act_{JPY_ACCOUNT}/insights", params={"access_token": access}, timeout=10)
    assert bare.status_code == 200 and json.loads(bare.headers["x-fb-ads-insights-throttle"])["acc_id_util_pct"] >= 0
    assert JPY_ACCOUNT in json.loads(bare.headers["x-business-use-case-usage"])
    # async run, polled through a batch request, then its rows
    day = meta.data.local_today(JPY_ACCOUNT) - dt.timedelta(days=1)
    run = requests.post(f"{graph}/v25.0/act_{JPY_ACCOUNT}/insights", timeout=10, data={
        "access_token": access, "level": "ad", "fields": "ad_id,campaign_id,impressions,spend",
        "time_ranges": json.dumps([{"since": str(day), "until": str(day)}]), "time_increment": 1}).json()["report_run_id"]
    for _ in range(2):
        batch = requests.post(f"{graph}/v25.0/", timeout=10, data={
            "access_token": access, "batch": json.dumps([{"method": "GET", "relative_url": f"{run}/"}])}).json()
    assert batch[0]["code"] == 200 and json.loads(batch[0]["body"])["async_status"] == "Job Completed"
    rows = requests.get(f"{graph}/{run}/insights", params={"access_token": access, "limit": 100}, timeout=10).json()["data"]
    truth = [m for m in meta.expected_metrics(JPY_ACCOUNT, day, day)
             if meta.data.campaign(m["campaign_id"]).status in ("ACTIVE", "PAUSED")]
    assert sorted((r["campaign_id"], int(r["impressions"])) for r in rows) == \
        sorted((m["campaign_id"], m["impressions"]) for m in truth)
    assert all(r["ad_id"] == meta.data.campaign(r["campaign_id"]).ad_id for r in rows)


def test_http_knobs(token, sandbox, knobs):
    base = sandbox.base_url + "/_sandbox/meta"
    assert requests.post(base + "/throttle", json={"account_id": USD_ACCOUNT, "seconds": 300}, timeout=5).ok
    session = MetaAdsConnector(fast()).open_session(token)
    with pytest.raises(RateLimited):
        list(session.fetch_campaigns(account(knobs, USD_ACCOUNT)))
    assert requests.post(base + "/unthrottle", json={}, timeout=5).ok
    assert requests.post(base + "/faults", json={"kind": "transient", "count": 1}, timeout=5).json()["pending"] == 1
    assert len(list(session.fetch_campaigns(account(knobs, USD_ACCOUNT)))) == 30
    issued = requests.post(base + "/issue-token", timeout=5).json()
    assert issued["expires_in"] == 60 * 86400
    assert requests.get(base + "/stats", timeout=5).json()["calls"]["campaigns"] >= 2
    assert requests.post(base + "/reset", timeout=5).json() == {"reset": True}


def test_meta_tokens_survive_a_sandbox_restart(tmp_path):
    """The demo restarts the sandbox; a Meta connection made before keeps working."""
    from sandbox.server import SandboxServer

    with SandboxServer(tmp_path, seed=13, platforms=["meta"]) as first:
        meta = first.platform("meta")
        token, _ = meta.tokens.issue(meta.app_id, "long", ["ads_read"])
        revoked, _ = meta.tokens.issue(meta.app_id, "long", ["ads_read"])
        meta.tokens.revoke(revoked)
    with SandboxServer(tmp_path, seed=13, platforms=["meta"]) as second:
        assert second.platform("meta").tokens.check(token) == "ok"
        assert second.platform("meta").tokens.check(revoked) == "revoked"
