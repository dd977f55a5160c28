"""Dagster assets, sensors and schedules on a test instance, over the real portal, sandbox and store.

A user signs up in the served portal and connects Google Ads through the sandbox consent page (real
authlib flow, real HTTP); the sensor adds the partition; the job materializes the token and campaigns
assets with the real google-ads SDK over gRPC/TLS into the real MongoDB-wire store.
"""
from __future__ import annotations

import datetime as dt
import logging
import os
import subprocess
import sys
from collections import defaultdict
from decimal import Decimal

import pytest
from dagster import (DagsterEventType, DagsterInstance, Definitions, build_schedule_context, build_sensor_context,
                     instance_for_test)

from oauth_portal import create_app
from pipelines.definitions import build_definitions
from resources.crypto import TokenCipher
from resources.repositories import CONNECTED, NEEDS_REAUTH, UserRepository
from resources.settings import PROJECT_ROOT, get_settings
from resources.store.resource import MongoStoreResource
from sandbox.demo import connect_platform, signup_and_login
from sandbox.walk import Walker
from portal_helpers import serve

PID = "google"


@pytest.fixture
def google(sandbox):
    platform = sandbox.platform(PID)
    platform.reset()
    yield platform
    platform.reset()


@pytest.fixture
def portal(settings, db, google, monkeypatch):
    """The portal served over HTTP for this test's database."""

    def create(url):
        monkeypatch.setenv("PORTAL_BASE_URL", url)
        get_settings.cache_clear()
        return create_app({"TESTING": False})

    url, _app, stop = serve(create)
    yield url
    stop()


@pytest.fixture
def dagster(settings):
    """(definitions, per-platform objects, instance) with the store resource on the test database."""
    defs, platforms = build_definitions(MongoStoreResource(database=settings.mongodb_db))
    with instance_for_test() as instance:
        yield defs, platforms, instance


def connect_user(portal: str, email: str) -> Walker:
    walker = Walker()
    signup_and_login(walker, portal, email, "a-long-test-password-1")
    connect_platform(walker, portal, PID)
    return walker


_CURSORS: dict[tuple[int, str], str | None] = {}


def tick(defs: Definitions, instance: DagsterInstance, name: str):
    """Evaluate a sensor once, keep its cursor and apply its partition requests, as the daemon does."""
    sensor = defs.resolve_sensor_def(name)
    with build_sensor_context(instance_ref=instance.get_ref(), definitions=defs, resources={"store": defs.resources["store"]},
                              cursor=_CURSORS.get((id(instance), name))) as ctx:
        result = sensor.evaluate_tick(ctx)
    _CURSORS[(id(instance), name)] = result.cursor
    for request in result.dynamic_partitions_requests or []:
        if type(request).__name__.startswith("Add"):
            instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
        else:
            for key in request.partition_keys:
                instance.delete_dynamic_partition(request.partitions_def_name, key)
    return result


def run_sync(defs, platforms, instance, user_id: str, job: str = "sync", run_config=None):
    platform = platforms[PID]
    job_def = defs.resolve_job_def(platform.sync_job.name if job == "sync" else platform.token_job.name)
    return job_def.execute_in_process(instance=instance, partition_key=user_id, raise_on_error=False,
                                      run_config=run_config)


def _metadata(result, asset: str) -> dict:
    for event in result.all_events:
        if event.event_type == DagsterEventType.ASSET_MATERIALIZATION:
            materialization = event.event_specific_data.materialization
            if materialization.asset_key.to_user_string() == asset:
                return {k: v.value for k, v in materialization.metadata.items()}
    raise AssertionError(f"no materialization of {asset}")


def _store_equals_truth(db, google, user_id) -> tuple[int, int]:
    """Compare every stored metric row and campaign with the sandbox truth; returns (campaigns, rows)."""
    stored = {(m["account_id"], m["campaign_id"], m["date"]): (m["impressions"], m["clicks"], m["spend"].to_decimal(),
                                                                m["currency"])
              for m in db.google_campaign_metrics.find({"user_id": user_id})}
    accounts = defaultdict(list)
    for key in stored:
        accounts[key[0]].append(key[2])
    assert sorted(accounts) == sorted(c.id for c in google.data.clients())
    expected = {}
    for account_id, dates in accounts.items():
        start, end = dt.date.fromisoformat(min(dates)), dt.date.fromisoformat(max(dates))
        for m in google.expected_metrics(account_id, start, end):
            expected[(account_id, m["campaign_id"], m["date"])] = (m["impressions"], m["clicks"], m["spend"],
                                                                    m["currency"])
    assert stored == expected  # every campaign and day, spend to the cent (exact Decimal)
    campaigns = {(c["account_id"], c["campaign_id"]): c for c in db.google_campaigns.find({"user_id": user_id})}
    truth = {(a, c["campaign_id"]): c for a in accounts for c in google.expected_campaigns(a)}
    assert set(campaigns) == set(truth)
    for key, doc in truth.items():
        got = campaigns[key]
        assert (got["name"], got["status"], got["currency"]) == (doc["name"], doc["status"], doc["currency"])
        budget = got.get("budget")
        assert (budget.to_decimal() if budget is not None else None) == doc.get("budget")
    statuses = {c["status"] for c in campaigns.values()}
    assert {"ENABLED", "PAUSED", "REMOVED"} <= statuses
    assert "PERFORMANCE_MAX" in {c.get("channel_type") for c in campaigns.values()}
    return len(campaigns), len(stored)


def test_definitions_load_and_validate():
    defs, platforms = build_definitions()
    Definitions.validate_loadable(defs)
    assert set(platforms) >= {PID}
    assert platforms[PID].partitions.name == "google_connections"
    result = subprocess.run([sys.executable, "-m", "dagster", "definitions", "validate", "-w", "workspace.yaml"],
                            cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


def test_connect_sync_equals_truth_and_resync_writes_nothing(portal, db, google, dagster, caplog):
    defs, platforms, instance = dagster
    caplog.set_level(logging.DEBUG)
    connect_user(portal, "sync@example.com")
    user = UserRepository(db).find_by_email("sync@example.com")
    user_id = str(user["_id"])

    result = tick(defs, instance, "google_connections_sensor")
    assert instance.get_dynamic_partitions("google_connections") == [user_id]
    assert [r.partition_key for r in result.run_requests] == [user_id]

    first = run_sync(defs, platforms, instance, user_id)
    assert first.success
    meta = _metadata(first, "google_campaigns")
    campaigns, rows = _store_equals_truth(db, google, user["_id"])
    assert meta["first_sync"] is True and meta["accounts"] == 2
    assert meta["campaigns_inserted"] == campaigns and meta["metric_rows_inserted"] == rows
    # the first sync backfills the configured history (90 days by default) in each account's time zone
    dates = sorted(db.google_campaign_metrics.distinct("date", {"user_id": user["_id"]}))
    span = (dt.date.fromisoformat(dates[-1]) - dt.date.fromisoformat(dates[0])).days + 1
    assert 85 <= span <= 91

    before = {d["_id"]: d["last_synced"] for d in db.google_campaign_metrics.find({"user_id": user["_id"]})}
    second = run_sync(defs, platforms, instance, user_id)
    assert second.success
    meta2 = _metadata(second, "google_campaigns")
    assert meta2["first_sync"] is False
    assert meta2["rows_upserted"] == 0 and meta2["metric_rows_updated"] == 0 and meta2["campaigns_updated"] == 0
    assert {d["_id"]: d["last_synced"] for d in db.google_campaign_metrics.find({"user_id": user["_id"]})} == before
    assert UserRepository(db).connection(user["_id"], PID)["sync"]["last_status"] == "success"

    # restated recent days overwrite the stored values on the next sync (lookback window)
    google.restate(days=3)
    third = run_sync(defs, platforms, instance, user_id)
    assert third.success and _metadata(third, "google_campaigns")["metric_rows_updated"] > 0
    _store_equals_truth(db, google, user["_id"])

    # no token text anywhere: the users document, the Python logs, Dagster's event log
    connection = UserRepository(db).connection(user["_id"], PID)
    token = TokenCipher.from_settings(get_settings()).decrypt(connection["token"])
    secrets_ = [token["access_token"], token["refresh_token"]]
    assert not any(s in str(UserRepository(db).get(user["_id"])) for s in secrets_)
    logs = caplog.text + "".join(str(e) for e in instance.all_logs(first.run_id)) + \
        "".join(str(e) for e in instance.all_logs(second.run_id))
    assert not any(s in logs for s in secrets_)


def test_revoked_grant_needs_reauth_without_retries_and_reconnect_syncs_again(portal, db, google, dagster):
    defs, platforms, instance = dagster
    walker = connect_user(portal, "revoked@example.com")
    user = UserRepository(db).find_by_email("revoked@example.com")
    user_id = str(user["_id"])
    tick(defs, instance, "google_connections_sensor")
    first_connected_at = UserRepository(db).connection(user_id, PID)["connected_at"]

    google.revoke()  # the user removed the app's access in their Google account
    # the token refresh meets invalid_grant: needs_reauth, the run fails once, no retry
    result = run_sync(defs, platforms, instance, user_id, job="token",
                      run_config={"ops": {"google_token": {"config": {"force_refresh": True}}}})
    assert not result.success
    connection = UserRepository(db).connection(user_id, PID)
    assert connection["status"] == NEEDS_REAUTH and "invalid_grant" in connection["last_error"]
    restarts = [e for e in instance.all_logs(result.run_id) if e.dagster_event and
                e.dagster_event.event_type == DagsterEventType.STEP_RESTARTED]
    assert restarts == []  # no retries for a revoked grant
    # the sync job stops at the token asset too: no API call for the campaigns, nothing stored
    result = run_sync(defs, platforms, instance, user_id)
    assert not result.success
    assert db.google_campaign_metrics.count_documents({"user_id": user["_id"]}) == 0

    # the portal shows it
    page = walker.get(f"{portal}/connections")
    assert "needs" in page.text.lower() and "reconnect" in page.text.lower()

    # the schedules skip it until the user reconnects
    schedule = defs.resolve_schedule_def("google_campaign_sync_schedule")
    with build_schedule_context(instance=instance, resources={"store": defs.resources["store"]}, repository_def=defs.get_repository_def(),
                                scheduled_execution_time=dt.datetime.now(dt.timezone.utc)) as ctx:
        data = schedule.evaluate_tick(ctx)
    assert not data.run_requests

    # reconnect: a new grant, a new connected_at, a new initial sync request, and the sync succeeds
    connect_platform(walker, portal, PID)
    connection = UserRepository(db).connection(user_id, PID)
    assert connection["status"] == CONNECTED and connection["connected_at"] > first_connected_at
    again = tick(defs, instance, "google_connections_sensor")
    assert [r.partition_key for r in again.run_requests] == [user_id]
    assert run_sync(defs, platforms, instance, user_id).success
    assert db.google_campaign_metrics.count_documents({"user_id": user["_id"]}) > 0


def test_permission_denied_fails_the_run_at_once_without_retries(portal, db, google, dagster):
    defs, platforms, instance = dagster
    connect_user(portal, "denied@example.com")
    user = UserRepository(db).find_by_email("denied@example.com")
    user_id = str(user["_id"])
    tick(defs, instance, "google_connections_sensor")
    google.inject_fault("PERMISSION_DENIED", count=50)  # the Google user lost access to the accounts
    result = run_sync(defs, platforms, instance, user_id)
    google.reset()
    assert not result.success
    restarts = [e for e in instance.all_logs(result.run_id) if e.dagster_event and
                e.dagster_event.event_type == DagsterEventType.STEP_RESTARTED]
    assert restarts == []  # retrying would not give access back
    failures = [e.dagster_event.step_failure_data.error.message for e in instance.all_logs(result.run_id)
                if e.dagster_event and e.dagster_event.event_type == DagsterEventType.STEP_FAILURE]
    assert len(failures) == 1 and "authorization_error.USER_PERMISSION_DENIED" in failures[0]
    assert UserRepository(db).connection(user_id, PID)["status"] == CONNECTED  # reconnecting would not help


def test_sensor_tracks_connections_and_schedules_request_one_run_per_partition(portal, db, dagster):
    defs, platforms, instance = dagster
    walkers = {email: connect_user(portal, email) for email in ("a@example.com", "b@example.com")}
    ids = {email: str(UserRepository(db).find_by_email(email)["_id"]) for email in walkers}
    UserRepository(db).create("nobody@example.com", "x")  # no connection: no partition

    first = tick(defs, instance, "google_connections_sensor")
    assert sorted(instance.get_dynamic_partitions("google_connections")) == sorted(ids.values())
    assert sorted(r.partition_key for r in first.run_requests) == sorted(ids.values())
    assert len({r.run_key for r in first.run_requests}) == 2

    for name in ("google_token_refresh_schedule", "google_campaign_sync_schedule"):
        schedule = defs.resolve_schedule_def(name)
        with build_schedule_context(instance=instance, resources={"store": defs.resources["store"]}, repository_def=defs.get_repository_def(),
                                    scheduled_execution_time=dt.datetime(2026, 11, 30, 6, 15, tzinfo=dt.timezone.utc)) as ctx:
            data = schedule.evaluate_tick(ctx)
        assert sorted(r.partition_key for r in data.run_requests) == sorted(ids.values())

    # disconnect b in the portal: its partition goes away on the next tick, a's stays
    walker = walkers["b@example.com"]
    page = walker.get(f"{portal}/connections")
    walker.submit(walker.form(page, action_contains="/connections/google/disconnect"))
    tick(defs, instance, "google_connections_sensor")
    assert instance.get_dynamic_partitions("google_connections") == [ids["a@example.com"]]


def test_account_deleted_during_a_sync_leaves_no_rows(portal, db, google):
    """A sync still running when the user deletes their account must not write their data back."""
    from pipelines.sync import NotConnected, sync_connection
    from resources.platforms.registry import get_connector, platform_ids
    from resources.repositories import delete_user_everywhere

    connect_user(portal, "leaving@example.com")
    user = UserRepository(db).find_by_email("leaving@example.com")
    deleted = []

    def delete_after_first_account(message: str) -> None:
        if not deleted:
            deleted.append(delete_user_everywhere(db, user["_id"], platform_ids()))

    with pytest.raises(NotConnected, match="deleted their account"):
        sync_connection(db, TokenCipher.from_settings(get_settings()), get_connector(PID), user["_id"],
                        history_days=7, progress=delete_after_first_account)
    assert deleted and UserRepository(db).get(user["_id"]) is None
    assert db.google_campaigns.count_documents({"user_id": user["_id"]}) == 0
    assert db.google_campaign_metrics.count_documents({"user_id": user["_id"]}) == 0
