"""Sensors, generated per platform from the registry.

- ``<p>_connections_sensor``: keeps ``<p>_connections`` partitions equal to the users that have a
  ``<p>`` connection in ``users`` (adds and deletes in one tick) and requests the initial sync of
  every new connection. The run key includes ``connected_at``, so a reconnect syncs again.
- ``sync_requests_sensor``: launches the sync job for each "Sync now" request the portal wrote to
  ``sync_requests`` and marks it ``queued``. Run-status sensors then mark it ``running``
  (``sync_request_started_sensor``), ``success`` (``sync_request_success_sensor``), ``failed`` with the
  error and Dagster's failure reason (``sync_request_failure_sensor``, a ``run_failure_sensor``), or
  ``cancelled`` (``sync_request_canceled_sensor``, run status CANCELED), so every request ends in a
  terminal status the portal shows.

A killed run reaches FAILURE through Dagster itself: the code server marks a run whose process died
as failed, and run monitoring (enabled in the demo's ``dagster.yaml``) fails runs that never start or
exceed their time. The failure and cancel sensors also watch the batch sync jobs and settle a
connection left at ``sync.last_status: retrying`` by that run (a transient error, then the run ended
before the retry succeeded): it becomes ``failed`` or ``cancelled``.
"""

import datetime as dt

from bson import ObjectId
from dagster import (DagsterRunStatus, DefaultSensorStatus, RunFailureSensorContext, RunRequest,
                     RunStatusSensorContext, SensorEvaluationContext, SensorResult, SkipReason, run_failure_sensor,
                     run_status_sensor, sensor)

from pipelines.assets import PlatformDefinitions, sync_job_name
from pipelines.batches import batch_op_name
from resources.repositories import CONNECTED, UserRepository, parse_user_id, utcnow
from resources.store.resource import MongoStoreResource
from resources.wording import count_of

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
            return SensorResult(skip_reason=SkipReason(f"{count_of(len(wanted), pid + ' connection')}, no change"),
                                cursor=newest or None)
        context.log.info(f"{pid}: +{len(to_add)} / -{len(to_delete)} partitions, {len(run_requests)} initial syncs")
        return SensorResult(run_requests=run_requests, dynamic_partitions_requests=requests,
                            cursor=newest or None)

    return connections_sensor


def run_partition_keys(run) -> list[str]:
    """The connections (partition keys) a sync run works on: its partition, or a batch run's
    ``partition_keys`` from the run config."""
    key = run.tags.get("dagster/partition")
    if key:
        return [key]
    platform_id = run.tags.get("platform")
    ops = (run.run_config or {}).get("ops") or {}
    config = (ops.get(batch_op_name(platform_id or "")) or {}).get("config") or {}
    return [str(k) for k in config.get("partition_keys") or []]


def settle_retrying_connections(db, run, started: dt.datetime | None, ended: dt.datetime | None,
                                status: str) -> int:
    """Set ``sync.last_status`` to ``status`` on the run's connections still marked ``retrying`` by this
    run (recorded between its start and end), i.e. the run ended before a retry succeeded.
    Returns the number of connections changed.

    A later run's record (after ``ended``) is left alone. (A direct update of the one field:
    ``UserRepository.record_sync`` would also move ``last_run_at`` and clear ``last_error``, which
    still names the transient error that started the retries.)
    """
    platform_id = run.tags.get("platform")
    if not platform_id:
        return 0
    window: dict = {}
    if started is not None:
        window["$gte"] = started
    if ended is not None:
        window["$lte"] = ended
    changed = 0
    for key in run_partition_keys(run):
        user_id = parse_user_id(key)
        if user_id is None:
            continue
        query = {"_id": user_id, f"oauth.{platform_id}.sync.last_status": "retrying"}
        if window:
            query[f"oauth.{platform_id}.sync.last_run_at"] = window
        result = db.users.update_one(query, {"$set": {f"oauth.{platform_id}.sync.last_status": status}})
        changed += result.modified_count
    return changed


def _run_window(context: RunStatusSensorContext) -> tuple[dt.datetime | None, dt.datetime | None]:
    """When the run started (or was created) and ended, as UTC datetimes (None when unknown)."""
    record = context.instance.get_run_record_by_id(context.dagster_run.run_id)
    if record is None:
        return None, None

    def stamp(value):
        return dt.datetime.fromtimestamp(value, dt.timezone.utc) if value else None

    created = record.create_timestamp
    if created is not None and created.tzinfo is None:
        created = created.replace(tzinfo=dt.timezone.utc)  # Dagster's SQLite storage keeps naive UTC
    started = stamp(record.start_time) or created
    # the store keeps milliseconds: widen the window by one on each side
    slack = dt.timedelta(milliseconds=1)
    ended = stamp(record.end_time)
    return (started - slack if started else None), (ended + slack if ended else None)


def build_sync_request_sensors(platforms: list[PlatformDefinitions], batch_jobs: list | None = None):
    """The "Sync now" sensor and its run-status companions (shared by every platform).

    ``batch_jobs``: the ``<p>_sync_batch_job`` jobs; the failure and cancel sensors watch them too, to
    settle connections a batch run left ``retrying``.
    """
    by_id = {p.platform_id: p for p in platforms}
    jobs = [p.sync_job for p in platforms]
    ending_jobs = jobs + list(batch_jobs or [])

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

    @run_failure_sensor(name="sync_request_failure_sensor", monitored_jobs=ending_jobs,
                        default_status=DefaultSensorStatus.RUNNING, minimum_interval_seconds=5,
                        description="A failed (or killed) sync run: its 'Sync now' request becomes failed with "
                                    "the error; connections it left 'retrying' become failed.")
    def failed(context: RunFailureSensorContext, store: MongoStoreResource):
        event = context.failure_event
        message = (event.message or "").strip() or "the sync failed"
        data = event.event_specific_data
        reason = getattr(getattr(data, "failure_reason", None), "value", None)
        fields = {"status": "failed", "finished_at": utcnow(), "error": message[:500]}
        if reason:
            fields["failure_reason"] = reason
        _update(context, store, fields)
        started, ended = _run_window(context)
        settle_retrying_connections(store.db(), context.dagster_run, started, ended, "failed")

    @run_status_sensor(run_status=DagsterRunStatus.CANCELED, name="sync_request_canceled_sensor",
                       monitored_jobs=ending_jobs, default_status=DefaultSensorStatus.RUNNING,
                       minimum_interval_seconds=5,
                       description="A cancelled sync run (terminated, or removed from the queue): its 'Sync now' "
                                   "request becomes cancelled; connections it left 'retrying' become cancelled.")
    def canceled(context: RunStatusSensorContext, store: MongoStoreResource):
        message = (context.dagster_event.message or "").strip() or "the run was cancelled"
        _update(context, store, {"status": "cancelled", "finished_at": utcnow(), "error": message[:500]})
        started, ended = _run_window(context)
        settle_retrying_connections(store.db(), context.dagster_run, started, ended, "cancelled")

    return [sync_requests_sensor, started, succeeded, failed, canceled]
