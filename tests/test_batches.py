"""Batch runs (``SCHEDULE_BATCH_SIZE`` > 1): the schedules ask for one run per batch of connections,
and a batch run syncs each one as the single-partition assets would, reported per partition.

Same set-up as ``test_pipelines``: users connect Google Ads through the served portal and the sandbox
consent page; runs go through Dagster on a test instance with the real SDK and store.
"""
from __future__ import annotations

import datetime as dt

import pytest
from dagster import AssetKey, DagsterEventType, build_schedule_context, instance_for_test

import pipelines.batches as batches
from pipelines.definitions import build_definitions
from resources.crypto import TokenCipher
from resources.repositories import NEEDS_REAUTH, UserRepository
from resources.settings import get_settings
from resources.store.resource import MongoStoreResource
from test_pipelines import _store_equals_truth, connect_user, google, portal, tick  # noqa: F401 (fixtures)

PID = "google"


@pytest.fixture
def batched(settings):
    """(definitions with 2 connections per scheduled run, per-platform objects, instance)."""
    defs, platforms = build_definitions(MongoStoreResource(database=settings.mongodb_db), schedule_batch_size=2)
    with instance_for_test() as instance:
        yield defs, platforms, instance


def _schedule_requests(defs, instance, name: str):
    schedule = defs.resolve_schedule_def(name)
    with build_schedule_context(instance=instance, resources={"store": defs.resources["store"]},
                                repository_def=defs.get_repository_def(),
                                scheduled_execution_time=dt.datetime(2026, 11, 30, 6, 15, tzinfo=dt.timezone.utc)) as ctx:
        return schedule.evaluate_tick(ctx).run_requests


def _run(defs, instance, request):
    job = defs.resolve_job_def(request.job_name or f"{PID}_sync_batch_job")
    return job.execute_in_process(instance=instance, run_config=request.run_config, tags=request.tags,
                                  raise_on_error=False)


def _users(portal, db, count: int) -> list[str]:
    emails = [f"batch{i}@example.com" for i in range(count)]
    for email in emails:
        connect_user(portal, email)
    return [str(UserRepository(db).find_by_email(email)["_id"]) for email in emails]


def test_schedules_ask_for_one_run_per_batch_and_a_batch_syncs_each_connection_per_partition(portal, db, google, batched):
    defs, platforms, instance = batched
    ids = _users(portal, db, 3)
    tick(defs, instance, "google_connections_sensor")

    requests = _schedule_requests(defs, instance, "google_campaign_sync_schedule")
    assert [r.job_name or defs.resolve_schedule_def("google_campaign_sync_schedule").job_name for r in requests] == \
        ["google_sync_batch_job"] * 2
    chunks = [r.run_config["ops"]["google_sync_batch"]["config"]["partition_keys"] for r in requests]
    assert [len(c) for c in chunks] == [2, 1] and sorted(sum(chunks, [])) == sorted(ids)
    assert all(r.tags["trigger"] == "schedule" and r.tags["platform"] == PID for r in requests)
    token_requests = _schedule_requests(defs, instance, "google_token_refresh_schedule")
    assert sorted(sum((r.run_config["ops"]["google_token_batch"]["config"]["partition_keys"]
                       for r in token_requests), [])) == sorted(ids)

    results = [_run(defs, instance, r) for r in requests]
    assert all(r.success for r in results)
    for key in ("google_token", "google_campaigns"):
        assert instance.get_materialized_partitions(AssetKey(key)) == set(ids)
    for user_id in ids:  # the same metadata a single-partition run records, and the store equals the truth
        event = instance.get_latest_materialization_event(AssetKey("google_campaigns"))
        assert event is not None
        _store_equals_truth(db, google, UserRepository(db).get(user_id)["_id"])
        assert UserRepository(db).connection(user_id, PID)["sync"]["last_status"] == "success"
    checks = [e for r in results for e in r.all_events if e.event_type == DagsterEventType.ASSET_CHECK_EVALUATION]
    assert len(checks) == 2 * 3 and all(e.event_specific_data.passed for e in checks)
    assert {e.event_specific_data.partition for e in checks} == set(ids)
    metadata = [e.event_specific_data.materialization.metadata for r in results for e in r.all_events
                if e.event_type == DagsterEventType.ASSET_MATERIALIZATION
                and e.event_specific_data.materialization.asset_key == AssetKey("google_campaigns")]
    assert len(metadata) == 3 and all(m["first_sync"].value is True and m["metric_rows_inserted"].value > 0
                                      for m in metadata)

    # a second tick: re-syncs write nothing
    again = [_run(defs, instance, r) for r in _schedule_requests(defs, instance, "google_campaign_sync_schedule")]
    written = [e.event_specific_data.materialization.metadata["rows_upserted"].value for r in again
               for e in r.all_events if e.event_type == DagsterEventType.ASSET_MATERIALIZATION
               and e.event_specific_data.materialization.asset_key == AssetKey("google_campaigns")]
    assert written == [0, 0, 0]


def test_one_failing_connection_does_not_stop_the_batch(portal, db, google, batched, monkeypatch):
    defs, platforms, instance = batched
    ids = _users(portal, db, 3)
    tick(defs, instance, "google_connections_sensor")
    # the second user removed the app's access: refresh fails with invalid_grant
    cipher = TokenCipher.from_settings(get_settings())
    revoked = ids[1]
    google.revoke(cipher.decrypt(UserRepository(db).connection(revoked, PID)["token"])["refresh_token"])
    # and the API fails once, transiently: retried within the run (no wait in this test)
    monkeypatch.setattr(batches, "_retry_delay", lambda round_number: 0)
    google.inject_fault("UNAVAILABLE", count=1)
    job = defs.resolve_job_def("google_sync_batch_job")
    config = {"ops": {"google_sync_batch": {"config": {"partition_keys": ids, "force_refresh": True}}}}
    result = job.execute_in_process(instance=instance, run_config=config, raise_on_error=False)

    assert not result.success  # red in the UI, with the failed connection named
    failure = [e for e in result.all_events if e.event_type == DagsterEventType.STEP_FAILURE][0]
    assert "1 of 3" in failure.event_specific_data.error.message or \
        "1 of 3" in str(failure.event_specific_data.user_failure_data.description)
    assert revoked in str(failure.event_specific_data.user_failure_data.metadata["failed"].value)
    assert UserRepository(db).connection(revoked, PID)["status"] == NEEDS_REAUTH
    synced = [i for i in ids if i != revoked]
    assert instance.get_materialized_partitions(AssetKey("google_campaigns")) == set(synced)
    for user_id in synced:
        _store_equals_truth(db, google, UserRepository(db).get(user_id)["_id"])
    assert db.google_campaign_metrics.count_documents({"user_id": UserRepository(db).get(revoked)["_id"]}) == 0


def test_batch_run_whose_retries_run_out_leaves_no_connection_retrying(portal, db, google, batched, monkeypatch):
    """The campaigns step meets a transient API error in every retry round: the run fails, and the
    run-failure sensor turns the connection's ``retrying`` (recorded by each attempt) into ``failed``."""
    import threading
    import time

    defs, platforms, instance = batched
    [user_id] = _users(portal, db, 1)
    tick(defs, instance, "google_connections_sensor")
    tick(defs, instance, "sync_request_failure_sensor")  # run-status sensors start from "now"
    monkeypatch.setattr(batches, "_retry_delay", lambda round_number: 0)  # no waiting between rounds here
    google.set_latency(0.5)  # room to make the API fail once the token is done
    job = defs.resolve_job_def("google_sync_batch_job")
    config = {"ops": {"google_sync_batch": {"config": {"partition_keys": [user_id]}}}}
    results = []
    worker = threading.Thread(target=lambda: results.append(
        job.execute_in_process(instance=instance, run_config=config, raise_on_error=False)))
    worker.start()
    deadline = time.monotonic() + 60
    while not instance.get_materialized_partitions(AssetKey("google_token")) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert instance.get_materialized_partitions(AssetKey("google_token")) == {user_id}
    google.inject_fault("UNAVAILABLE", count=1000)  # every campaigns attempt from now on fails transiently
    worker.join(timeout=120)
    [result] = results
    assert not result.success
    sync = UserRepository(db).connection(user_id, PID)["sync"]
    assert sync["last_status"] == "retrying"  # what the last attempt recorded, with the run already over

    tick(defs, instance, "sync_request_failure_sensor")
    sync = UserRepository(db).connection(user_id, PID)["sync"]
    assert sync["last_status"] == "failed" and "temporary failure" in sync["last_error"]
