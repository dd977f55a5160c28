"""Schedules, generated per platform: token refresh and campaign sync, one RunRequest per connected
partition (Dagster cannot build partitioned schedules over dynamic partitions itself) — or, with
``SCHEDULE_BATCH_SIZE`` > 1, one RunRequest of the platform's batch job per that many connected
partitions (``pipelines.batches``: same work, reported per partition, one process per batch).

Cron strings are data here; times are UTC. Connections marked ``needs_reauth`` are skipped: nothing is
called for them until the user reconnects.
"""

from dagster import DefaultScheduleStatus, RunRequest, ScheduleEvaluationContext, SkipReason, schedule

from pipelines.assets import PlatformDefinitions
from resources.repositories import CONNECTED, UserRepository
from resources.store.resource import MongoStoreResource

TOKEN_REFRESH_CRON = "*/30 * * * *"
CAMPAIGN_SYNC_CRON = "15 */6 * * *"


def _connected_partitions(context: ScheduleEvaluationContext, store: MongoStoreResource,
                          platform: PlatformDefinitions) -> list[str]:
    partitions = set(context.instance.get_dynamic_partitions(platform.partitions.name))
    users = UserRepository(store.db())
    pid = platform.platform_id
    return sorted(str(doc["_id"]) for doc in users.connections(pid, {"_id": 1, f"oauth.{pid}.status": 1})
                  if doc["oauth"][pid].get("status") == CONNECTED and str(doc["_id"]) in partitions)


def _per_partition_schedule(platform: PlatformDefinitions, name: str, cron: str, job, description: str):
    """A schedule asking for one run of ``job`` per connected partition of ``platform``."""
    pid = platform.platform_id

    @schedule(name=name, cron_schedule=cron, job=job, default_status=DefaultScheduleStatus.RUNNING,
              description=description)
    def per_partition(context: ScheduleEvaluationContext, store: MongoStoreResource):
        keys = _connected_partitions(context, store, platform)
        if not keys:
            return SkipReason(f"no connected {pid} users")
        stamp = context.scheduled_execution_time.isoformat() if context.scheduled_execution_time else ""
        return [RunRequest(run_key=f"{stamp}:{key}", partition_key=key, tags={"platform": pid, "trigger": "schedule"})
                for key in keys]

    return per_partition


def _batched_schedule(platform: PlatformDefinitions, name: str, cron: str, job, op_name: str, batch_size: int,
                      description: str):
    """A schedule asking for one run of the batch ``job`` per ``batch_size`` connected partitions."""
    pid = platform.platform_id

    @schedule(name=name, cron_schedule=cron, job=job, default_status=DefaultScheduleStatus.RUNNING,
              description=description)
    def batched_schedule(context: ScheduleEvaluationContext, store: MongoStoreResource):
        keys = _connected_partitions(context, store, platform)
        if not keys:
            return SkipReason(f"no connected {pid} users")
        stamp = context.scheduled_execution_time.isoformat() if context.scheduled_execution_time else ""
        requests = []
        for start in range(0, len(keys), batch_size):
            chunk = keys[start:start + batch_size]
            requests.append(RunRequest(
                run_key=f"{stamp}:{chunk[0]}+{len(chunk)}",
                run_config={"ops": {op_name: {"config": {"partition_keys": chunk}}}},
                tags={"platform": pid, "trigger": "schedule", "connections": str(len(chunk))}))
        return requests

    return batched_schedule


def build_schedules(platform: PlatformDefinitions, batch_jobs: tuple | None = None, batch_size: int = 1) -> list:
    """``<p>_token_refresh_schedule`` and ``<p>_campaign_sync_schedule``: one run per connection, or with
    ``batch_size`` > 1 and ``batch_jobs`` (``pipelines.batches.build_batch_jobs``) one per batch."""
    pid = platform.platform_id
    token_text = f"Refresh {pid} tokens that are about to expire, for every connected user."
    sync_text = f"Sync {pid} campaigns and daily metrics (lookback window) for every connected user."
    if batch_jobs and batch_size > 1:
        from pipelines.batches import batch_op_name

        sync_batch_job, token_batch_job = batch_jobs
        return [
            _batched_schedule(platform, f"{pid}_token_refresh_schedule", TOKEN_REFRESH_CRON, token_batch_job,
                              batch_op_name(pid, with_campaigns=False), batch_size,
                              f"{token_text} {batch_size} connections per run."),
            _batched_schedule(platform, f"{pid}_campaign_sync_schedule", CAMPAIGN_SYNC_CRON, sync_batch_job,
                              batch_op_name(pid), batch_size, f"{sync_text} {batch_size} connections per run."),
        ]
    return [
        _per_partition_schedule(platform, f"{pid}_token_refresh_schedule", TOKEN_REFRESH_CRON, platform.token_job,
                                token_text),
        _per_partition_schedule(platform, f"{pid}_campaign_sync_schedule", CAMPAIGN_SYNC_CRON, platform.sync_job,
                                sync_text),
    ]
