"""How a "Sync now" request ends when its Dagster run does not succeed: failed, cancelled, killed.

A user connects Google Ads through the served portal and the sandbox consent page, presses Sync now
in the portal, and ``sync_requests_sensor`` turns the request into a run request. Then:

- a run that fails (revoked grant) is executed in-process, as in ``test_pipelines``;
- runs that are cancelled or killed are launched for real with ``dagster job launch`` (the instance's
  default run launcher: a code server process starts the run in its own process), stopped while the
  campaigns step waits to retry a transient API error (the connection says ``retrying``), either with
  Dagster's own termination (``run_coordinator.cancel_run``, the UI's Terminate) or by killing the
  run's process (the code server then marks the run failed).

The run-status sensors are evaluated as the daemon would, and the request, the connection and the
portal's ``/sync/status`` must all show a terminal state.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from types import SimpleNamespace

import pytest
import yaml
from dagster import (DagsterEventType, DagsterRunStatus, SensorEvaluationContext, build_sensor_context,
                     instance_for_test)
from dagster._daemon.monitoring.concurrency import execute_concurrency_slots_iteration

from pipelines.definitions import build_definitions
from resources.repositories import UserRepository
from resources.settings import PROJECT_ROOT
from resources.store.resource import MongoStoreResource
from sandbox.demo import DAGSTER_YAML
from test_pipelines import PID, connect_user, google, portal, tick  # noqa: F401 (fixtures)

RUN_STATUS_SENSORS = ("sync_request_started_sensor", "sync_request_success_sensor", "sync_request_failure_sensor",
                      "sync_request_canceled_sensor")


@pytest.fixture
def dagster(settings):
    """(definitions, instance): a SQLite instance in a temporary ``DAGSTER_HOME`` (also set in the
    environment, so ``dagster job launch`` in a child process uses the same instance). Runs are
    launched at once (no queue: no daemon runs here) by the default run launcher."""
    defs, _platforms = build_definitions(MongoStoreResource(database=settings.mongodb_db))
    # the demo's instance settings (pools, run monitoring), with runs launched at once
    overrides = {key: value for key, value in yaml.safe_load(DAGSTER_YAML).items() if key != "telemetry"}
    overrides["run_coordinator"] = {"module": "dagster._core.run_coordinator", "class": "DefaultRunCoordinator"}
    with instance_for_test(overrides=overrides) as instance:
        yield defs, instance


def _press_sync_now(walker, portal: str) -> None:
    page = walker.get(f"{portal}/connections")
    response = walker.submit(walker.form(page, action_contains=f"/sync/{PID}"))
    assert response.status_code == 200


def _status(walker, portal: str) -> dict:
    return walker.get(f"{portal}/sync/status").json()["platforms"][PID]


_CURSORS: dict[tuple[int, str], str | None] = {}


def _tick_run_status(defs, instance, name: str, run=None) -> None:
    """Evaluate a run-status sensor once, keeping its cursor, as the daemon does for the code location
    the sensor lives in: a run launched from the ``workspace.yaml`` location is matched by location and
    repository name, so the context carries that run's location (an in-process run has none)."""
    origin = run.remote_job_origin.repository_origin if run is not None and run.remote_job_origin else None
    sensor = defs.resolve_sensor_def(name)
    with SensorEvaluationContext(
            instance_ref=instance.get_ref(), cursor=_CURSORS.get((id(instance), name)), definitions=defs,
            resources=build_sensor_context(resources={"store": defs.resources["store"]}).resource_defs,
            repository_name=origin.repository_name if origin else None,
            code_location_origin=origin.code_location_origin if origin else None) as ctx:
        result = sensor.evaluate_tick(ctx)
    _CURSORS[(id(instance), name)] = result.cursor


def _start_watching(defs, instance) -> None:
    for name in RUN_STATUS_SENSORS:  # run-status sensors start from "now" on their first tick
        _tick_run_status(defs, instance, name)


def _settle(defs, instance, run_id: str | None = None) -> None:
    run = instance.get_run_by_id(run_id) if run_id else None
    for name in RUN_STATUS_SENSORS:
        _tick_run_status(defs, instance, name, run)


def _wait(what: str, predicate, timeout: float = 180.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _connected_and_watched(portal, db, defs, instance, email: str) -> tuple:
    """A user connected to Google through the portal, its partition added by the connections sensor,
    and the run-status sensors' cursors set (they only see runs that start later). Returns
    ``(walker, user_id hex)``."""
    walker = connect_user(portal, email)
    user_id = str(UserRepository(db).find_by_email(email)["_id"])
    tick(defs, instance, "google_connections_sensor")
    _start_watching(defs, instance)
    return walker, user_id


def test_failed_run_fails_the_request_with_dagster_failure(portal, db, google, dagster):
    defs, instance = dagster
    walker, user_id = _connected_and_watched(portal, db, defs, instance, "failing@example.com")

    _press_sync_now(walker, portal)
    [request] = tick(defs, instance, "sync_requests_sensor").run_requests
    google.revoke()  # the user removed the app's access meanwhile: the token step fails without retries
    job = defs.resolve_job_def(request.job_name)
    result = job.execute_in_process(instance=instance, partition_key=request.partition_key, tags=request.tags,
                                    raise_on_error=False)
    assert not result.success
    _settle(defs, instance)

    doc = db.sync_requests.find_one({})
    assert doc["status"] == "failed" and doc["run_id"] == result.run_id
    assert doc["failure_reason"] == "STEP_FAILURE"
    assert doc["error"] == "Execution of run for \"google_sync_job\" failed. Steps failed: ['google_token']."
    status = _status(walker, portal)
    assert status["state"] == "failed" and status["pending"] is False and status["label"] == "Failed"
    assert status["message"] == ("Google Ads no longer accepts the saved authorization. Reconnect Google Ads, "
                                 "then sync again.")
    assert UserRepository(db).connection(user_id, PID)["status"] == "needs_reauth"


class _LaunchedRun:
    """A sync run launched through the instance's run launcher by ``dagster job launch``."""

    def __init__(self, instance, request):
        self.instance = instance
        self.run_id = str(uuid.uuid4())
        self.output: str | None = None
        tags = {**request.tags, "dagster/partition": request.partition_key}
        self.cli = subprocess.Popen(
            [sys.executable, "-m", "dagster", "job", "launch", "-w", "workspace.yaml", "-j", request.job_name,
             "--run-id", self.run_id, "--tags", json.dumps(tags)],
            cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def events(self, event_type):
        return [e for e in self.instance.all_logs(self.run_id, of_type=event_type)]

    def status(self):
        run = self.instance.get_run_by_id(self.run_id)
        return run.status if run else None

    def wait(self, what: str, predicate, timeout: float = 180.0):
        """``_wait`` that, on a timeout, says where the run is (for a slow or loaded machine)."""
        try:
            return _wait(what, predicate, timeout)
        except AssertionError as exc:
            messages = [e.message for e in self.instance.all_logs(self.run_id)][-8:]
            finished = self.cli.poll() is not None
            raise AssertionError(f"{exc}; run status {self.status()}; last events {messages}; dagster job launch "
                                 f"{'said:' + chr(10) + self.close()[-3000:] if finished else 'still running'}"
                                 ) from None

    def wait_for_status(self, status: DagsterRunStatus) -> None:
        self.wait(f"run {self.run_id} to be {status.value}", lambda: self.status() == status)

    def pid(self) -> int:
        started = self.wait("the run's process", lambda: [e for e in self.events(DagsterEventType.ENGINE_EVENT)
                                                          if e.message.startswith("Started process for run")])
        return int(started[0].message.split("pid: ")[1].rstrip(")."))

    def close(self, timeout: float = 60) -> str:
        """Wait for ``dagster job launch`` to end (it waits for the code server it started) and return
        what it printed."""
        if self.output is None:
            try:
                self.output, _ = self.cli.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.cli.kill()
                self.output, _ = self.cli.communicate()
        return self.output


@pytest.fixture
def launched(dagster):
    """Runs launched by the test; any still going at the end (a failed assertion) is cancelled and its
    ``dagster job launch`` process ended."""
    runs: list[_LaunchedRun] = []
    yield runs
    _defs, instance = dagster
    for run in runs:
        if run.status() not in (None, DagsterRunStatus.CANCELED, DagsterRunStatus.FAILURE, DagsterRunStatus.SUCCESS):
            try:
                instance.run_coordinator.cancel_run(run.run_id)
            except Exception:  # noqa: BLE001 — best effort; the process is killed below anyway
                pass
        run.close(timeout=30)


def _launch_until_retrying(instance, google, db, request, user_id: str, launched: list) -> _LaunchedRun:
    """Launch the run and return once its campaigns step met a transient API error and waits to retry."""
    google.set_latency(1.0)  # every Ads API call takes a second: room to inject faults after the token step
    run = _LaunchedRun(instance, request)
    launched.append(run)
    run.wait("the token step's materialization",
             lambda: run.events(DagsterEventType.ASSET_MATERIALIZATION) or run.cli.poll() not in (None, 0))
    assert run.cli.poll() in (None, 0), run.close()
    # from now on every Ads API call fails (the campaigns step makes several, a second each): the step
    # records "retrying" and Dagster waits 15 s (± half) before the next attempt
    google.inject_fault("UNAVAILABLE", count=1000)
    run.wait("the connection to say retrying",
             lambda: (UserRepository(db).connection(user_id, PID).get("sync") or {}).get("last_status") == "retrying")
    assert run.status() == DagsterRunStatus.STARTED
    return run


def test_cancelled_and_killed_runs_end_their_requests_and_the_retrying_status(portal, db, google, dagster,
                                                                              launched):
    defs, instance = dagster
    walker, user_id = _connected_and_watched(portal, db, defs, instance, "stopped@example.com")

    # ---- cancelled in Dagster (Terminate) while waiting to retry
    _press_sync_now(walker, portal)
    [request] = tick(defs, instance, "sync_requests_sensor").run_requests
    run = _launch_until_retrying(instance, google, db, request, user_id, launched)
    _settle(defs, instance, run.run_id)
    assert db.sync_requests.find_one({})["status"] == "running"
    assert instance.run_coordinator.cancel_run(run.run_id)  # what the UI's Terminate button calls
    run.wait_for_status(DagsterRunStatus.CANCELED)
    run.close()
    _settle(defs, instance, run.run_id)

    doc = db.sync_requests.find_one({})
    assert doc["status"] == "cancelled" and doc["run_id"] == run.run_id and doc["finished_at"] >= doc["started_at"]
    status = _status(walker, portal)
    assert status["state"] == "cancelled" and status["label"] == "Cancelled" and status["pending"] is False
    assert status["message"] == ("The Google Ads sync was cancelled in Dagster before it finished. Nothing already "
                                 "saved was lost; press Sync now to try again.")
    sync = UserRepository(db).connection(user_id, PID)["sync"]
    assert sync["last_status"] == "cancelled" and "temporary failure" in sync["last_error"]

    # ---- the run's process killed while waiting to retry: the code server marks the run failed
    google.reset()
    _press_sync_now(walker, portal)  # not pending any more: a new request
    assert db.sync_requests.count_documents({}) == 2
    [request] = tick(defs, instance, "sync_requests_sensor").run_requests
    run = _launch_until_retrying(instance, google, db, request, user_id, launched)
    os.kill(run.pid(), signal.SIGKILL)
    run.wait_for_status(DagsterRunStatus.FAILURE)
    run.close()
    _settle(defs, instance, run.run_id)

    doc = db.sync_requests.find_one({"_id": {"$ne": db.sync_requests.find_one({"status": "cancelled"})["_id"]}})
    assert doc["status"] == "failed" and doc["run_id"] == run.run_id
    assert doc["error"] == "This run has been marked as failed from outside the execution context."
    status = _status(walker, portal)
    assert status["state"] == "failed" and status["label"] == "Failed" and status["pending"] is False
    assert status["message"] == ("The Google Ads sync was interrupted before it finished (its run stopped in "
                                 "Dagster). Nothing already saved was lost; press Sync now to try again.")
    assert UserRepository(db).connection(user_id, PID)["sync"]["last_status"] == "failed"
    assert dt.datetime.now(dt.timezone.utc) - doc["finished_at"] < dt.timedelta(minutes=5)

    # a run killed while its campaigns step runs keeps that step's google_api pool slot; the daemon's
    # slot monitor (with the demo's settings) gives it back once the run has been over for
    # free_slots_after_run_end_seconds, so later runs of the platform do not queue forever
    killed = [run.run_id]
    google.reset()
    _press_sync_now(walker, portal)
    [request] = tick(defs, instance, "sync_requests_sensor").run_requests
    google.set_latency(2.0)  # every Ads API call takes two seconds: the step is still running when killed
    run = _LaunchedRun(instance, request)
    launched.append(run)
    pool = f"{PID}_api"
    run.wait("the campaigns step to hold a pool slot",
             lambda: len(run.events(DagsterEventType.ASSET_MATERIALIZATION)) >= 1
             and run.run_id in instance.event_log_storage.get_concurrency_info(pool).active_run_ids)
    os.kill(run.pid(), signal.SIGKILL)
    run.wait_for_status(DagsterRunStatus.FAILURE)
    run.close()
    google.reset()
    killed.append(run.run_id)
    # (whether Dagster already gave a killed run's slot back when it marked the run failed depends on
    # timing; the daemon's monitor must leave none held)
    wait = instance.run_monitoring_settings["free_slots_after_run_end_seconds"]
    assert 0 < wait <= 60
    time.sleep(wait + 1.5)
    list(execute_concurrency_slots_iteration(SimpleNamespace(instance=instance), logging.getLogger("test")))
    assert not set(killed) & instance.event_log_storage.get_concurrency_info(pool).active_run_ids
