"""Batch jobs: many connections of one platform synced in one Dagster run.

One run per connection costs a Python process per run (imports, code location, SDK clients, event
log set-up): seconds of CPU before the first API call. A deployment with thousands of connections
cannot pay that for each one, so the schedules can ask for one run per *batch* of connections
(``SCHEDULE_BATCH_SIZE`` > 1, see ``pipelines.schedules``). For a platform ``<p>`` this builds:

- ``<p>_sync_batch_job``: one op, config ``partition_keys`` (user ids); for each connection, in order,
  the same work as the ``<p>_token`` then ``<p>_campaigns`` materializations (shared functions in
  ``pipelines.assets``), reported as *per-partition* ``AssetMaterialization`` and
  ``AssetCheckEvaluation`` events of those assets, so partitions, metadata and checks show in the UI
  exactly as after single runs.
- ``<p>_token_batch_job``: the same for the token asset alone.

Failure isolation: one connection failing does not stop the others. Transient errors are retried
inside the run with the assets' retry policy (delay and exponential backoff, a round at a time, only
the connections that failed); a revoked grant or a rate limit is recorded on the connection (as the
single-run assets do) and not retried. If any connection still failed at the end, the run fails
with their list (after every other connection was synced), so it shows red in the UI.

The op runs in the platform's pool ``<p>_api`` like the assets, on the in-process executor.
"""

import random
import time

from dagster import (AssetCheckEvaluation, AssetKey, AssetMaterialization, Config, Failure, MetadataValue,
                     OpExecutionContext, in_process_executor, job, op)

from pipelines.assets import (RETRY_POLICY, PlatformDefinitions, campaigns_materialization, pool_name,
                              token_materialization)
from resources.platforms.base import TransientPlatformError
from resources.repositories import parse_user_id
from resources.store.resource import MongoStoreResource
from resources.wording import count_of


class SyncBatchConfig(Config):
    """Run configuration of a batch job (the schedules fill it in)."""

    partition_keys: list[str]
    """The connections (``<p>_connections`` partition keys = user ids) this run syncs, in order."""
    lookback_days: int = 0
    """Days re-read on each sync (0: the project setting ``LOOKBACK_DAYS``)."""
    history_days: int = 0
    """Days read on the first sync of a connection (0: ``HISTORY_DAYS``)."""
    force_refresh: bool = False
    """Refresh tokens even if they are not about to expire."""


def batch_op_name(platform_id: str, with_campaigns: bool = True) -> str:
    return f"{platform_id}_sync_batch" if with_campaigns else f"{platform_id}_token_batch"


def sync_batch_job_name(platform_id: str) -> str:
    return f"{platform_id}_sync_batch_job"


def token_batch_job_name(platform_id: str) -> str:
    return f"{platform_id}_token_batch_job"


def _retry_delay(round_number: int) -> float:
    """Seconds before retry round ``round_number`` (1-based), as ``RETRY_POLICY`` would wait."""
    delay = (RETRY_POLICY.delay or 0) * (2 ** (round_number - 1))
    return max(0.0, delay * (1 + random.uniform(-0.5, 0.5))) if delay else 0.0


def _emit(context: OpExecutionContext, asset_key: str, partition: str, result) -> None:
    context.log_event(AssetMaterialization(asset_key=asset_key, partition=partition, metadata=result.metadata))
    for check in result.check_results or []:
        context.log_event(AssetCheckEvaluation(asset_key=check.asset_key or AssetKey(asset_key), check_name=check.check_name,
                                               passed=check.passed, metadata=check.metadata,
                                               severity=check.severity, partition=partition))


def run_batch(context: OpExecutionContext, platform_id: str, store: MongoStoreResource, config: SyncBatchConfig,
              with_campaigns: bool, sleep=time.sleep) -> dict:
    """Sync every connection of ``config.partition_keys``; returns ``{"synced": [...], "failed": {key: error}}``.

    Raises:
        Failure: at least one connection failed (after all the others were done).
    """
    token_key, campaigns_key = f"{platform_id}_token", f"{platform_id}_campaigns"
    pending = list(dict.fromkeys(config.partition_keys))  # in order, once each
    total = len(pending)
    synced: list[str] = []
    failed: dict[str, str] = {}
    token_done: set[str] = set()
    for round_number in range(RETRY_POLICY.max_retries + 1):
        if round_number:
            delay = _retry_delay(round_number)
            context.log.info(f"retry round {round_number}: {count_of(len(pending), 'connection')} after {delay:.0f}s")
            sleep(delay)
        transient: list[str] = []
        for key in pending:
            user_id = parse_user_id(key)
            if user_id is None:
                failed[key] = "partition key is not a user id"
                continue
            try:
                if key not in token_done:
                    result = token_materialization(platform_id, store, user_id, config.force_refresh, context.log)
                    _emit(context, token_key, key, result)
                    token_done.add(key)
                if with_campaigns:
                    result = campaigns_materialization(platform_id, store, user_id, config.lookback_days,
                                                       config.history_days, context.log)
                    _emit(context, campaigns_key, key, result)
                synced.append(key)
                failed.pop(key, None)
            except TransientPlatformError as exc:
                transient.append(key)
                failed[key] = f"{type(exc).__name__}: {exc}"
            except Failure as exc:
                failed[key] = exc.description or str(exc)
            except Exception as exc:  # one connection's bug must not stop the others
                context.log.exception(f"connection {key} failed")
                failed[key] = f"{type(exc).__name__}: {exc}"
        if not transient:
            break
        pending = transient
    summary = {"synced": synced, "failed": failed}
    context.log.info(f"{platform_id}: {count_of(len(synced), 'connection')} synced, {len(failed)} failed")
    if failed:
        lines = "\n".join(f"- {key}: {error[:300]}" for key, error in sorted(failed.items()))
        raise Failure(description=f"{len(failed)} of {total} {platform_id} "
                                  f"connections failed (the others were synced)",
                      metadata={"failed": MetadataValue.md(lines), "synced": len(synced)}, allow_retries=False)
    return summary


def build_batch_jobs(platform: PlatformDefinitions) -> tuple:
    """``(<p>_sync_batch_job, <p>_token_batch_job)`` for one platform."""
    pid = platform.platform_id
    tags = {"platform": pid}

    @op(name=batch_op_name(pid), pool=pool_name(pid), tags=tags,
        description=f"Token refresh + campaigns sync of many {pid} connections, one after the other.")
    def sync_batch(context: OpExecutionContext, config: SyncBatchConfig, store: MongoStoreResource) -> None:
        run_batch(context, pid, store, config, with_campaigns=True)

    @op(name=batch_op_name(pid, with_campaigns=False), pool=pool_name(pid), tags=tags,
        description=f"Token refresh of many {pid} connections, one after the other.")
    def token_batch(context: OpExecutionContext, config: SyncBatchConfig, store: MongoStoreResource) -> None:
        run_batch(context, pid, store, config, with_campaigns=False)

    @job(name=sync_batch_job_name(pid), tags=tags, executor_def=in_process_executor,
         description=f"Sync many {pid} connections in one run (reported per partition of {pid}_token/{pid}_campaigns).")
    def sync_batch_job():
        sync_batch()

    @job(name=token_batch_job_name(pid), tags=tags, executor_def=in_process_executor,
         description=f"Refresh the tokens of many {pid} connections in one run (reported per partition of {pid}_token).")
    def token_batch_job():
        token_batch()

    return sync_batch_job, token_batch_job
