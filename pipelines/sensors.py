"""Sensors, generated per platform from the registry.

- ``<p>_connections_sensor``: keeps ``<p>_connections`` partitions equal to the users that have a
  ``<p>`` connection in ``users`` (adds and deletes in one tick) and requests the initial sync of
  every new connection. The run key includes ``connected_at``, so a reconnect syncs again.
- ``sync_requests_sensor``: launches the sync job for each "Sync now" request the portal wrote to
  ``sync_requests`` and marks it ``queued``; ``sync_request_status_sensor`` (run status) marks it
  ``running``/``success``/``failed`` with the error.
"""

import datetime as dt

from bson import ObjectId
from dagster import (DagsterRunStatus, DefaultSensorStatus, RunRequest, RunStatusSensorContext,
                     SensorEvaluationContext, SensorResult, SkipReason, run_status_sensor, sensor)

from pipelines.assets import PlatformDefinitions, sync_job_name
from resources.repositories import CONNECTED, UserRepository, utcnow
from resources.store.resource import MongoStoreResource

SENSOR_INTERVAL_SECONDS = 15
#: Dagster guidance: at most ~25,000 partition add/delete requests per evaluation
MAX_PARTITION_CHANGES = 20_000


def build_connections_sensor(platform: PlatformDefinitions):
    """The partitions + initial-sync sensor of one platform."""
    pid = platform.platform_id

    @sensor(name=f"{pid}_connections_sensor", job=platform.sync_job, minimum_interval_seconds=SENSOR_INTERVAL_SECONDS,
            default_status=DefaultSensorStatus.RUNNING,
            description=f"Keeps {pid}_connections partitions equal to the connected users and asks for the "
                        f"initial sync of each new (or re-made) connection.")
    def connections_sensor(context: SensorEvaluationContext, store: MongoStoreResource):
        users = UserRepository(store.db())
        wanted: dict[str, dict] = {}
        for doc in users.connections(pid, {"_id": 1, f"oauth.{pid}.status": 1, f"oauth.{pid}.connected_at": 1,
                                           f"oauth.{pid}.sync.last_success_at": 1}):
            wanted[str(doc["_id"])] = doc["oauth"][pid]
        existing = set(context.instance.get_dynamic_partitions(platform.partitions.name))
        to_add = sorted(set(wanted) - existing)[:MAX_PARTITION_CHANGES]
        to_delete = sorted(existing - set(wanted))[:MAX_PARTITION_CHANGES]

        # Cursor: the newest ``connected_at`` already requested. A connection made (or re-made) after it
        # gets its initial sync; the run key makes a repeated request a no-op.
        since = context.cursor or ""
        newest = since
        run_requests, deferred = [], False
        for key, connection in wanted.items():
            connected_at = connection.get("connected_at")
            stamp = connected_at.isoformat() if isinstance(connected_at, dt.datetime) else str(connected_at or "")
            if stamp <= since or connection.get("status") != CONNECTED:
                continue
            if (connection.get("sync") or {}).get("last_success_at"):
                continue  # already synced since it was (re)connected, e.g. by `make demo-once`
            if key not in existing and key not in to_add:
                deferred = True  # over this tick's partition budget: handled next tick
                continue
            newest = max(newest, stamp)
            run_requests.append(RunRequest(run_key=f"{pid}:{key}:{stamp}", partition_key=key,
                                           tags={"platform": pid, "trigger": "new_connection"}))
        if deferred:
            newest = since  # re-scan next tick; already-requested run keys are skipped by Dagster
        requests = []
        if to_add:
            requests.append(platform.partitions.build_add_request(to_add))
        if to_delete:
            requests.append(platform.partitions.build_delete_request(to_delete))
        if not requests and not run_requests:
            return SensorResult(skip_reason=SkipReason(f"{len(wanted)} {pid} connections, no change"),
                                cursor=newest or None)
        context.log.info(f"{pid}: +{len(to_add)} / -{len(to_delete)} partitions, {len(run_requests)} initial syncs")
        return SensorResult(run_requests=run_requests, dynamic_partitions_requests=requests,
                            cursor=newest or None)

    return connections_sensor


def build_sync_request_sensors(platforms: list[PlatformDefinitions]):
    """The "Sync now" sensor and its run-status companions (shared by every platform)."""
    by_id = {p.platform_id: p for p in platforms}
    jobs = [p.sync_job for p in platforms]

    @sensor(name="sync_requests_sensor", jobs=jobs, minimum_interval_seconds=5,
            default_status=DefaultSensorStatus.RUNNING,
            description="Launches the sync job for each 'Sync now' request written by the portal.")
    def sync_requests_sensor(context: SensorEvaluationContext, store: MongoStoreResource):
        db = store.db()
        requests = []
        for request in db.sync_requests.find({"status": "requested"}).sort("requested_at", 1).limit(500):
            platform = by_id.get(request.get("platform"))
            key = str(request.get("user_id"))
            if platform is None or key not in set(context.instance.get_dynamic_partitions(platform.partitions.name)):
                db.sync_requests.update_one({"_id": request["_id"]}, {"$set": {
                    "status": "failed", "error": "not connected", "finished_at": utcnow()}})
                continue
            requests.append(RunRequest(run_key=f"sync-request:{request['_id']}", job_name=sync_job_name(platform.platform_id),
                                       partition_key=key, tags={"platform": platform.platform_id,
                                                                "trigger": "sync_now",
                                                                "sync_request_id": str(request["_id"])}))
            db.sync_requests.update_one({"_id": request["_id"]}, {"$set": {"status": "queued", "queued_at": utcnow()}})
        if not requests:
            return SkipReason("no sync requests")
        return requests

    def _update(context: RunStatusSensorContext, store: MongoStoreResource, fields: dict):
        request_id = context.dagster_run.tags.get("sync_request_id")
        if not request_id or not ObjectId.is_valid(request_id):
            return
        fields = {**fields, "run_id": context.dagster_run.run_id}
        store.db().sync_requests.update_one({"_id": ObjectId(request_id)}, {"$set": fields})

    @run_status_sensor(run_status=DagsterRunStatus.STARTED, name="sync_request_started_sensor", monitored_jobs=jobs,
                       default_status=DefaultSensorStatus.RUNNING, minimum_interval_seconds=5)
    def started(context: RunStatusSensorContext, store: MongoStoreResource):
        _update(context, store, {"status": "running", "started_at": utcnow()})

    @run_status_sensor(run_status=DagsterRunStatus.SUCCESS, name="sync_request_success_sensor", monitored_jobs=jobs,
                       default_status=DefaultSensorStatus.RUNNING, minimum_interval_seconds=5)
    def succeeded(context: RunStatusSensorContext, store: MongoStoreResource):
        _update(context, store, {"status": "success", "finished_at": utcnow()})

    @run_status_sensor(run_status=DagsterRunStatus.FAILURE, name="sync_request_failure_sensor", monitored_jobs=jobs,
                       default_status=DefaultSensorStatus.RUNNING, minimum_interval_seconds=5)
    def failed(context: RunStatusSensorContext, store: MongoStoreResource):
        message = "the sync failed"
        failure = context.failure_event if hasattr(context, "failure_event") else None
        if failure is not None and failure.message:
            message = failure.message
        _update(context, store, {"status": "failed", "finished_at": utcnow(), "error": message[:500]})

    return [sync_requests_sensor, started, succeeded, failed]
