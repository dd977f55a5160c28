"""Meta Ads end to end: portal → sandbox Facebook Login dialog → Dagster sensor, token and campaigns
assets with the real facebook-business SDK over HTTP → the real MongoDB-wire store, compared with the
sandbox truth. Same style as ``test_pipelines.py`` (whose platform-independent helpers are reused)."""
from __future__ import annotations

import datetime as dt
import time
from collections import Counter

import pytest
from dagster import DagsterEventType, build_schedule_context, instance_for_test

from oauth_portal import create_app
from pipelines.definitions import build_definitions
from resources.crypto import TokenCipher
from resources.repositories import CONNECTED, NEEDS_REAUTH, UserRepository
from resources.settings import get_settings
from resources.store.resource import MongoStoreResource
from sandbox.demo import connect_platform, signup_and_login
from sandbox.walk import Walker
from portal_helpers import serve
from test_pipelines import _metadata, tick

PID = "meta"
JPY_ACCOUNT = "101000000000003"


@pytest.fixture
def meta(sandbox):
    platform = sandbox.platform(PID)
    platform.reset()
    yield platform
    platform.reset()


@pytest.fixture
def portal(settings, db, meta, monkeypatch):
    def create(url):
        monkeypatch.setenv("PORTAL_BASE_URL", url)
        get_settings.cache_clear()
        return create_app({"TESTING": False})

    url, _app, stop = serve(create)
    yield url
    stop()


@pytest.fixture
def dagster(settings):
    defs, platforms = build_definitions(MongoStoreResource(database=settings.mongodb_db))
    with instance_for_test() as instance:
        yield defs, platforms, instance


def connect_user(portal: str, email: str) -> Walker:
    walker = Walker()
    signup_and_login(walker, portal, email, "a-long-test-password-1")
    connect_platform(walker, portal, PID)
    return walker


def run(defs, platforms, instance, user_id: str, job: str = "sync", run_config=None):
    platform = platforms[PID]
    job_def = defs.resolve_job_def(platform.sync_job.name if job == "sync" else platform.token_job.name)
    return job_def.execute_in_process(instance=instance, partition_key=user_id, raise_on_error=False,
                                      run_config=run_config)


def restarts(instance, result) -> list:
    return [e for e in instance.all_logs(result.run_id)
            if e.dagster_event and e.dagster_event.event_type == DagsterEventType.STEP_RESTARTED]


def store_equals_truth(db, meta, user_id) -> tuple[int, int]:
    """Every stored metric row and campaign equals the sandbox truth, nothing missing, nothing twice."""
    docs = list(db.meta_campaign_metrics.find({"user_id": user_id}))
    keys = Counter((m["account_id"], m["campaign_id"], m["date"]) for m in docs)
    assert max(keys.values()) == 1  # no duplicates
    stored = {(m["account_id"], m["campaign_id"], m["date"]): (m["impressions"], m["clicks"], m["spend"].to_decimal(),
                                                                m["currency"], m["conversions"].to_decimal())
              for m in docs}
    dates: dict[str, list[str]] = {}
    for account_id, _, day in stored:
        dates.setdefault(account_id, []).append(day)
    assert sorted(dates) == sorted(a.id for a in meta.data.accounts())
    expected = {}
    for account_id, days in dates.items():
        start, end = dt.date.fromisoformat(min(days)), dt.date.fromisoformat(max(days))
        for m in meta.expected_metrics(account_id, start, end):
            expected[(account_id, m["campaign_id"], m["date"])] = (m["impressions"], m["clicks"], m["spend"],
                                                                    m["currency"], m["conversions"])
    assert stored == expected  # every campaign and day, exact money (JPY in whole yen)
    campaigns = {(c["account_id"], c["campaign_id"]): c for c in db.meta_campaigns.find({"user_id": user_id})}
    truth = {(a.id, c["campaign_id"]): c for a in meta.data.accounts() for c in meta.expected_campaigns(a.id)}
    assert set(campaigns) == set(truth)
    for key, doc in truth.items():
        got = campaigns[key]
        for field in ("name", "status", "objective", "currency", "budget_period", "start_date", "end_date"):
            assert got.get(field) == doc[field], (key, field)
        budget = got.get("budget")
        assert (budget.to_decimal() if budget is not None else None) == doc["budget"]
    assert {c["status"] for c in campaigns.values()} == {"ACTIVE", "PAUSED", "ARCHIVED", "DELETED"}
    return len(campaigns), len(stored)


def test_meta_connect_sync_equals_truth_and_resync_writes_nothing(portal, db, meta, dagster):
    defs, platforms, instance = dagster
    walker = connect_user(portal, "meta-sync@example.com")
    user = UserRepository(db).find_by_email("meta-sync@example.com")
    user_id = str(user["_id"])
    connection = UserRepository(db).connection(user_id, PID)
    assert connection["status"] == CONNECTED
    assert sorted(a["currency"] for a in connection["accounts"]) == ["AUD", "EUR", "JPY", "USD"]
    assert connection["scopes"] == ["ads_read", "business_management"]
    days_left = (connection["expires_at"] - dt.datetime.now(dt.timezone.utc)).total_seconds() / 86400
    assert 59 < days_left <= 60  # the long-lived token was stored, not the short-lived one
    token = TokenCipher.from_settings(get_settings()).decrypt(connection["token"])
    assert meta.tokens.get(token["access_token"]).kind == "long"

    tick(defs, instance, "meta_connections_sensor")
    assert instance.get_dynamic_partitions("meta_connections") == [user_id]
    meta.reset_stats()
    first = run(defs, platforms, instance, user_id)
    assert first.success
    meta_data = _metadata(first, "meta_campaigns")
    campaigns, rows = store_equals_truth(db, meta, user["_id"])
    assert meta_data["first_sync"] is True and meta_data["accounts"] == 4
    assert meta_data["campaigns_inserted"] == campaigns and meta_data["metric_rows_inserted"] == rows
    stats = meta.stats()
    assert stats["insights_async"] == 4 and stats.get("proof_missing", 0) == 0  # 90 days: report runs
    dates = sorted(db.meta_campaign_metrics.distinct("date", {"user_id": user["_id"]}))
    assert 85 <= (dt.date.fromisoformat(dates[-1]) - dt.date.fromisoformat(dates[0])).days + 1 <= 91

    meta.reset_stats()
    second = run(defs, platforms, instance, user_id)
    assert second.success
    again = _metadata(second, "meta_campaigns")
    assert again["first_sync"] is False and again["rows_upserted"] == 0
    assert meta.stats()["insights"] == 4 and "insights_async" not in meta.stats()  # 14 days: synchronous

    # late attribution restates recent days: the lookback window overwrites them
    meta.restate(days=2)
    third = run(defs, platforms, instance, user_id)
    assert third.success and _metadata(third, "meta_campaigns")["metric_rows_updated"] > 0
    store_equals_truth(db, meta, user["_id"])

    page = walker.get(f"{portal}/connections").text
    assert "59 days left" in page and "Reconnect Meta Ads" in page
    assert token["access_token"] not in str(UserRepository(db).get(user["_id"]))


def test_meta_throttled_account_defers_and_a_later_sync_completes(portal, db, meta, dagster):
    defs, platforms, instance = dagster
    connect_user(portal, "meta-throttle@example.com")
    user = UserRepository(db).find_by_email("meta-throttle@example.com")
    user_id = str(user["_id"])
    tick(defs, instance, "meta_connections_sensor")

    meta.throttle(JPY_ACCOUNT, 900)  # 15 minutes to regain access: far beyond the connector's wait budget
    started = time.monotonic()
    deferred = run(defs, platforms, instance, user_id)
    assert not deferred.success and time.monotonic() - started < 60
    assert restarts(instance, deferred) == []  # no retry loop: the next schedule resumes
    sync = UserRepository(db).connection(user_id, PID)["sync"]
    assert sync["last_status"] == "deferred" and "rate limited" in sync["last_error"]
    assert f"1 of 4 accounts rate limited ({JPY_ACCOUNT})" in sync["last_error"]
    assert "last_success_at" not in sync
    assert meta.stats()["throttled"] == 1
    # a per-ad-account limit defers only that account: the accounts before and after it were loaded
    partial = set(db.meta_campaign_metrics.distinct("account_id", {"user_id": user["_id"]}))
    assert partial == {a.id for a in meta.data.accounts()} - {JPY_ACCOUNT}

    meta.unthrottle()
    resumed = run(defs, platforms, instance, user_id)
    assert resumed.success
    assert _metadata(resumed, "meta_campaigns")["first_sync"] is True  # still the full history
    store_equals_truth(db, meta, user["_id"])  # nothing lost, nothing twice
    assert UserRepository(db).connection(user_id, PID)["sync"]["last_status"] == "success"


def test_meta_token_is_re_exchanged_expired_token_needs_reauth_and_reconnect_replaces_it(portal, db, meta, dagster):
    defs, platforms, instance = dagster
    walker = connect_user(portal, "meta-expiry@example.com")
    user = UserRepository(db).find_by_email("meta-expiry@example.com")
    user_id = str(user["_id"])
    users = UserRepository(db)
    cipher = TokenCipher.from_settings(get_settings())
    tick(defs, instance, "meta_connections_sensor")

    # under 15 days left: the token asset re-exchanges the still-valid token and records the new expiry
    original = cipher.decrypt(users.connection(user_id, PID)["token"])
    soon = dict(original, expires_at=int(time.time()) + 10 * 86400)
    users.update_token(user["_id"], PID, cipher.encrypt(soon),
                       dt.datetime.fromtimestamp(soon["expires_at"], dt.timezone.utc))
    refreshed = run(defs, platforms, instance, user_id, job="token")
    assert refreshed.success and _metadata(refreshed, "meta_token")["refreshed"] is True
    connection = users.connection(user_id, PID)
    renewed = cipher.decrypt(connection["token"])
    assert renewed["access_token"] != original["access_token"]
    assert (connection["expires_at"] - dt.datetime.now(dt.timezone.utc)).days >= 59

    # the token expires at Meta: the token asset meets 190/463 and marks the connection needs_reauth
    meta.expire_tokens()
    failed = run(defs, platforms, instance, user_id, job="token")
    assert not failed.success and restarts(instance, failed) == []
    connection = users.connection(user_id, PID)
    assert connection["status"] == NEEDS_REAUTH and "190/463" in connection["last_error"]
    assert renewed["access_token"] not in connection["last_error"]
    page = walker.get(f"{portal}/connections").text
    assert "Needs reconnection" in page and "Reconnect Meta Ads" in page
    schedule = defs.resolve_schedule_def("meta_campaign_sync_schedule")
    with build_schedule_context(instance=instance, resources={"store": defs.resources["store"]},
                                repository_def=defs.get_repository_def(),
                                scheduled_execution_time=dt.datetime.now(dt.timezone.utc)) as ctx:
        assert not schedule.evaluate_tick(ctx).run_requests  # nothing is called until the user reconnects

    # reconnect through the portal: a new token replaces the old one and a new initial sync is requested
    connect_platform(walker, portal, PID)
    connection = users.connection(user_id, PID)
    assert connection["status"] == CONNECTED
    replaced = cipher.decrypt(connection["token"])
    assert replaced["access_token"] not in (renewed["access_token"], original["access_token"])
    assert meta.tokens.check(replaced["access_token"]) == "ok"
    again = tick(defs, instance, "meta_connections_sensor")
    assert [r.partition_key for r in again.run_requests] == [user_id]
    assert run(defs, platforms, instance, user_id).success
    assert db.meta_campaign_metrics.count_documents({"user_id": user["_id"]}) > 0
