"""Per-platform Dagster assets and jobs, generated from the platform registry.

For a platform ``<p>`` this builds:

- ``<p>_connections``: ``DynamicPartitionsDefinition`` keyed by the user's ObjectId hex.
- asset ``<p>_token``: refresh the access token when it is about to expire, validate the grant by
  listing the accounts, record the status. ``ReauthRequired`` marks the connection ``needs_reauth``
  and fails the run without retries.
- asset ``<p>_campaigns`` (depends on the token asset): extract campaigns and daily metrics through
  the connector and load ``<p>_campaigns`` and ``<p>_campaign_metrics``; metadata reports rows
  inserted/updated/unchanged, accounts, date range and API calls, plus two checks.
- jobs ``<p>_sync_job`` (token + campaigns) and ``<p>_token_job`` (token only).

Both assets run in pool ``<p>_api`` (API concurrency; set a limit with
``dagster instance concurrency set <p>_api N``) and retry transient errors with exponential backoff.
"""

import dataclasses

from dagster import (AssetCheckResult, AssetCheckSeverity, AssetCheckSpec, AssetExecutionContext, AssetKey,
                     Backoff, Config, DynamicPartitionsDefinition, Failure, Jitter, MaterializeResult,
                     MetadataValue, RetryPolicy, asset, define_asset_job, in_process_executor)

from resources.platforms.base import (Connector, PlatformError, RateLimited, ReauthRequired,
                                      TransientPlatformError)
from resources.platforms.registry import connector_class
from resources.repositories import parse_user_id
from resources.store import metrics_collection
from resources.store.resource import MongoStoreResource
from resources.wording import count_of
from pipelines.sync import (ConnectionNeedsReauth, NotConnected, describe_rate_limit, refresh_connection,
                            sync_connection)

#: transient platform errors (5xx, network, short rate limits) retry with backoff: 15 s, 30 s, 60 s (±jitter)
RETRY_POLICY = RetryPolicy(max_retries=3, delay=15, backoff=Backoff.EXPONENTIAL, jitter=Jitter.PLUS_MINUS)


class TokenConfig(Config):
    """Run configuration of a token asset (Launchpad)."""

    force_refresh: bool = False
    """Refresh even if the access token is not about to expire."""


class SyncConfig(Config):
    """Run configuration of a campaigns asset (Launchpad). Zero means the project setting."""

    lookback_days: int = 0
    """Days re-read on each sync (default ``LOOKBACK_DAYS``, 14)."""
    history_days: int = 0
    """Days read on the first sync of a connection (default ``HISTORY_DAYS``, 90)."""


@dataclasses.dataclass(frozen=True)
class PlatformDefinitions:
    """Everything generated for one platform."""

    platform_id: str
    partitions: DynamicPartitionsDefinition
    token_asset: object
    campaigns_asset: object
    sync_job: object
    token_job: object

    @property
    def pool(self) -> str:
        return pool_name(self.platform_id)


def partitions_name(platform_id: str) -> str:
    """Name of a platform's dynamic partitions, e.g. ``google_connections``."""
    return f"{platform_id}_connections"


def pool_name(platform_id: str) -> str:
    """Concurrency pool of a platform's API calls, e.g. ``google_api``."""
    return f"{platform_id}_api"


def sync_job_name(platform_id: str) -> str:
    return f"{platform_id}_sync_job"


def token_job_name(platform_id: str) -> str:
    return f"{platform_id}_token_job"


def _user_id(context: AssetExecutionContext):
    user_id = parse_user_id(context.partition_key)
    if user_id is None:
        raise Failure(f"partition key {context.partition_key!r} is not a user id", allow_retries=False)
    return user_id


def _fail_reauth(connector: Connector, exc: Exception) -> Failure:
    return Failure(
        description=f"{connector.display_name} connection needs to be reconnected by the user: {exc}",
        metadata={"status": "needs_reauth"}, allow_retries=False,
    )


def build_platform_definitions(platform_id: str) -> PlatformDefinitions:
    """Generate partitions, assets and jobs for one registered platform."""
    connector_cls = connector_class(platform_id)
    display = connector_cls.display_name
    partitions = DynamicPartitionsDefinition(name=partitions_name(platform_id))
    token_key = AssetKey(f"{platform_id}_token")
    campaigns_key = AssetKey(f"{platform_id}_campaigns")
    tags = {"platform": platform_id}

    @asset(key=token_key, partitions_def=partitions, pool=pool_name(platform_id), retry_policy=RETRY_POLICY,
           group_name=platform_id, kinds={"python", platform_id}, op_tags=tags,
           description=f"{display} OAuth token of one connection: refreshed before it expires, grant validated "
                       f"by listing the accounts it reaches; revoked grants mark the connection needs_reauth.")
    def token_asset(context: AssetExecutionContext, config: TokenConfig, store: MongoStoreResource) -> MaterializeResult:
        return token_materialization(platform_id, store, _user_id(context), config.force_refresh, context.log)

    @asset(key=campaigns_key, deps=[token_key], partitions_def=partitions, pool=pool_name(platform_id),
           retry_policy=RETRY_POLICY, group_name=platform_id, kinds={"mongodb", platform_id}, op_tags=tags,
           check_specs=[
               AssetCheckSpec("metrics_reference_campaigns", asset=campaigns_key,
                              description="every daily metric row belongs to a stored campaign"),
               AssetCheckSpec("metrics_non_negative", asset=campaigns_key,
                              description="no negative impressions, clicks or spend"),
           ],
           description=f"{display} campaigns and daily metrics of one connection, loaded into "
                       f"{platform_id}_campaigns and {metrics_collection(platform_id)} (idempotent upserts on "
                       f"natural keys; account-local dates; money as exact decimals in the account currency).")
    def campaigns_asset(context: AssetExecutionContext, config: SyncConfig, store: MongoStoreResource) -> MaterializeResult:
        return campaigns_materialization(platform_id, store, _user_id(context), config.lookback_days,
                                         config.history_days, context.log)

    # The steps of a run are sequential (campaigns depend on the token): the in-process executor runs
    # them in the run's own process instead of starting one Python process per step.
    sync_job = define_asset_job(sync_job_name(platform_id), selection=[token_key, campaigns_key], tags=tags,
                                executor_def=in_process_executor,
                                description=f"Refresh the {display} token and sync campaigns + daily metrics.")
    token_job = define_asset_job(token_job_name(platform_id), selection=[token_key], tags=tags,
                                 executor_def=in_process_executor,
                                 description=f"Refresh and validate the {display} token.")
    return PlatformDefinitions(platform_id, partitions, token_asset, campaigns_asset, sync_job, token_job)


def token_materialization(platform_id: str, store: MongoStoreResource, user_id, force_refresh: bool,
                          log) -> MaterializeResult:
    """The work of a ``<p>_token`` materialization for one connection (asset and batch jobs share it).

    Raises:
        Failure: revoked grant (no retries) or a rate limit (deferred to the next schedule).
        TransientPlatformError: temporary; the caller retries.
    """
    connector = connector_class(platform_id)()
    settings = store.settings()
    try:
        outcome = refresh_connection(store.db(), store.cipher(), connector, user_id,
                                     margin_seconds=settings.token_refresh_margin_seconds, force=force_refresh)
    except NotConnected as exc:
        log.warning(str(exc))
        return MaterializeResult(metadata={"status": "disconnected"})
    except ReauthRequired as exc:
        raise _fail_reauth(connector, exc) from None
    except RateLimited as exc:
        raise Failure(description=describe_rate_limit(exc), allow_retries=False) from None
    except TransientPlatformError:
        raise
    except PlatformError as exc:  # e.g. permission or configuration: retrying would not help
        raise Failure(description=str(exc), allow_retries=False) from None
    log.info(f"{connector.display_name} token {'refreshed' if outcome.refreshed else 'still valid'}; "
             f"{count_of(outcome.accounts, 'account')} reachable")
    return MaterializeResult(metadata={
        "status": "connected",
        "refreshed": outcome.refreshed,
        "expires_at": MetadataValue.timestamp(outcome.expires_at) if outcome.expires_at else "never",
        "accounts": outcome.accounts,
    })


def campaigns_materialization(platform_id: str, store: MongoStoreResource, user_id, lookback_days: int,
                              history_days: int, log) -> MaterializeResult:
    """The work of a ``<p>_campaigns`` materialization for one connection (asset and batch jobs share
    it). ``lookback_days``/``history_days`` of 0 mean the project settings. The sync outcome is
    recorded on the connection (shown in the portal).

    Raises:
        Failure: the connection needs reauthorisation (no retries) or is rate limited (deferred).
        TransientPlatformError: temporary; the caller retries.
    """
    from resources.repositories import UserRepository

    connector = connector_class(platform_id)()
    settings = store.settings()
    db = store.db()
    users = UserRepository(db)
    try:
        outcome = sync_connection(
            db, store.cipher(), connector, user_id,
            lookback_days=lookback_days or settings.lookback_days,
            history_days=history_days or settings.history_days,
            progress=log.info,
        )
    except NotConnected as exc:
        log.warning(str(exc))
        return MaterializeResult(metadata={"status": "disconnected"}, check_results=[
            AssetCheckResult(check_name="metrics_reference_campaigns", passed=True),
            AssetCheckResult(check_name="metrics_non_negative", passed=True)])
    except (ReauthRequired, ConnectionNeedsReauth) as exc:
        users.record_sync(user_id, platform_id, status="failed", error=str(exc))
        raise _fail_reauth(connector, exc) from None
    except RateLimited as exc:
        message = describe_rate_limit(exc)
        users.record_sync(user_id, platform_id, status="deferred", error=message)
        raise Failure(description=message, allow_retries=False) from None
    except TransientPlatformError as exc:
        users.record_sync(user_id, platform_id, status="retrying", error=str(exc))
        raise
    except PlatformError as exc:  # e.g. permission or configuration: retrying would not help
        users.record_sync(user_id, platform_id, status="failed", error=str(exc))
        raise Failure(description=str(exc), allow_retries=False) from None
    users.record_sync(user_id, platform_id, status="success", rows=outcome.rows(), success=True)
    campaigns, metrics = outcome.campaigns, outcome.metrics
    starts = [a.start for a in outcome.accounts]
    ends = [a.end for a in outcome.accounts]
    checks = _checks(db, platform_id, user_id)
    return MaterializeResult(
        metadata={
            "dagster/row_count": campaigns.inserted + campaigns.updated + campaigns.unchanged
            + metrics.inserted + metrics.updated + metrics.unchanged,
            "accounts": len(outcome.accounts),
            "first_sync": outcome.first_sync,
            "date_range": f"{min(starts)}..{max(ends)}" if starts else "none",
            "campaigns_inserted": campaigns.inserted,
            "campaigns_updated": campaigns.updated,
            "campaigns_unchanged": campaigns.unchanged,
            "metric_rows_inserted": metrics.inserted,
            "metric_rows_updated": metrics.updated,
            "metric_rows_unchanged": metrics.unchanged,
            "metric_rows_deleted": outcome.metric_rows_deleted,
            "rows_upserted": campaigns.written + metrics.written,
            "api_calls": outcome.api_calls,
            "seconds": round(outcome.seconds, 3),
            "per_account": MetadataValue.md(_account_table(outcome)),
        },
        check_results=checks,
    )


def _account_table(outcome) -> str:
    lines = ["| account | currency | dates | campaigns written | metric rows read | metric rows inserted | "
             "metric rows updated | metric rows deleted | compared |",
             "|---|---|---|---|---|---|---|---|---|"]
    for a in outcome.accounts:
        lines.append(f"| {a.account_id} | {a.currency} | {a.start}..{a.end} | {a.campaigns.written} | "
                     f"{a.metric_rows} | {a.metrics.inserted} | {a.metrics.updated} | {a.metric_rows_deleted} | "
                     f"{a.compared} |")
    return "\n".join(lines)


def _checks(db, platform_id: str, user_id) -> list[AssetCheckResult]:
    campaigns = db[f"{platform_id}_campaigns"]
    metrics = db[metrics_collection(platform_id)]
    known = {(d["account_id"], d["campaign_id"]) for d in campaigns.find({"user_id": user_id},
                                                                          {"account_id": 1, "campaign_id": 1})}
    # one pass over the connection's metric rows answers both checks
    # a missing field (e.g. shops have no spend per day) is not negative: BSON orders null below numbers
    is_negative = {"$or": [{"$lt": [{"$ifNull": [f"${field}", 0]}, 0]} for field in ("impressions", "clicks", "spend")]}
    groups = list(metrics.aggregate([
        {"$match": {"user_id": user_id}},
        {"$group": {"_id": {"a": "$account_id", "c": "$campaign_id"},
                    "negative": {"$sum": {"$cond": [is_negative, 1, 0]}}}}]))
    orphans = {(r["_id"]["a"], r["_id"]["c"]) for r in groups} - known
    negative = sum(int(r["negative"]) for r in groups)
    return [
        AssetCheckResult(check_name="metrics_reference_campaigns", passed=not orphans,
                         severity=AssetCheckSeverity.WARN,
                         metadata={"orphan_campaigns": len(orphans), "campaigns": len(known)}),
        AssetCheckResult(check_name="metrics_non_negative", passed=negative == 0,
                         metadata={"negative_rows": negative}),
    ]
