"""The Dagster code location (``workspace.yaml`` → ``pipelines.definitions``): every object is
generated from the platform registry."""
from __future__ import annotations

from dagster import Definitions

from pipelines.assets import PlatformDefinitions, build_platform_definitions
from pipelines.batches import build_batch_jobs
from pipelines.schedules import build_schedules
from pipelines.sensors import build_connections_sensor, build_sync_request_sensors
from resources.platforms.registry import platform_ids
from resources.settings import get_settings
from resources.store.resource import MongoStoreResource


def build_definitions(store: MongoStoreResource | None = None, schedule_batch_size: int | None = None
                      ) -> tuple[Definitions, dict[str, PlatformDefinitions]]:
    """Build the Definitions and return them with the per-platform objects (for tests and tools).

    ``schedule_batch_size``: connections per scheduled run (default: the ``SCHEDULE_BATCH_SIZE``
    setting; 1 = one run per connection).
    """
    batch_size = schedule_batch_size or get_settings().schedule_batch_size
    platforms = {pid: build_platform_definitions(pid) for pid in platform_ids()}
    assets, jobs, sensors, schedules, sync_batch_jobs = [], [], [], [], []
    for platform in platforms.values():
        batch_jobs = build_batch_jobs(platform)
        sync_batch_jobs.append(batch_jobs[0])
        assets += [platform.token_asset, platform.campaigns_asset]
        jobs += [platform.sync_job, platform.token_job, *batch_jobs]
        sensors.append(build_connections_sensor(platform))
        schedules += build_schedules(platform, batch_jobs, batch_size)
    sensors += build_sync_request_sensors(list(platforms.values()), sync_batch_jobs)
    definitions = Definitions(assets=assets, jobs=jobs, sensors=sensors, schedules=schedules,
                              resources={"store": store or MongoStoreResource()})
    return definitions, platforms


defs, PLATFORMS = build_definitions()
