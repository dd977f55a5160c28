"""Schedules, generated per platform: token refresh and campaign sync, one RunRequest per connected
partition (Dagster cannot build partitioned schedules over dynamic partitions itself).

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


def build_schedules(platform: PlatformDefinitions) -> list:
    """``<p>_token_refresh_schedule`` and ``<p>_campaign_sync_schedule``."""
    pid = platform.platform_id
    return [
        _per_partition_schedule(platform, f"{pid}_token_refresh_schedule", TOKEN_REFRESH_CRON, platform.token_job,
                                f"Refresh {pid} tokens that are about to expire, for every connected user."),
        _per_partition_schedule(platform, f"{pid}_campaign_sync_schedule", CAMPAIGN_SYNC_CRON, platform.sync_job,
                                f"Sync {pid} campaigns and daily metrics (lookback window) for every connected user."),
    ]
