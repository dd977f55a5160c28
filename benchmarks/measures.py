"""P1 (floor ratio), P4 (re-sync) and the memory measure, per platform.

Every timed thing runs ``RUNS`` (3) times after one untimed warm-up, interleaved with what it is
compared to (so a slow moment of the machine hits both sides), and the median is reported.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import os
import subprocess
import sys
import time
from typing import Any

from bson import ObjectId

from benchmarks import floors
from benchmarks.harness import (BENCH_DIR, OFFLINE_ENV, RUNS, Portal, SandboxProcess, Timer, dagster_instance,
                                environment, median, say)
from resources.settings import PROJECT_ROOT
from resources.store import campaigns_collection, ensure_indexes, get_client, metrics_collection

#: per platform: sandbox options giving one connection ``n`` campaigns (the sandbox's own knobs)
SANDBOX_SHAPES: dict[str, Any] = {
    # the Google sandbox user reaches one manager with two client customers
    "google": lambda n: {"campaigns_per_client": max(5, n // 2)},
    # four ad accounts; report runs complete on the first poll (the report's latency is Meta's, not ours)
    "meta": lambda n: {"campaigns_per_account": max(6, n // 4), "async_polls": 1},
    # one shop per connection; every benchmark user connects the same shop, so its query-cost bucket
    # is made large (each real shop has its own)
    "shopify": lambda n: {"activities_per_shop": max(6, n), "throttle": [1_000_000.0, 1_000_000.0]},
}


def sandbox_options(platform_ids: list[str], campaigns: int) -> dict[str, dict]:
    return {pid: SANDBOX_SHAPES[pid](campaigns) for pid in platform_ids if pid in SANDBOX_SHAPES}


def reset_platform_data(db, platform_id: str, user_ids: list[str]) -> None:
    """Forget a connection's synced data (rows and day digests) so the next sync is a first sync again."""
    from resources.sync_state import SyncStateRepository

    for name in (campaigns_collection(platform_id), metrics_collection(platform_id)):
        db[name].drop()
    ensure_indexes(db, [platform_id])
    for user_id in user_ids:
        SyncStateRepository(db).delete(ObjectId(user_id), platform_id)
        db.users.update_one({"_id": ObjectId(user_id)}, {"$unset": {f"oauth.{platform_id}.sync": ""}})


def snapshot(db, platform_id: str, user_id: str) -> dict:
    """``{_id: (content hash, last_synced)}`` of every document of the connection (to count modified ones)."""
    oid = ObjectId(user_id)
    out = {}
    for name in (campaigns_collection(platform_id), metrics_collection(platform_id)):
        for doc in db[name].find({"user_id": oid}, {"_h": 1, "last_synced": 1}):
            out[doc["_id"]] = (doc.get("_h"), doc.get("last_synced"))
    return out


def modified_between(before: dict, after: dict) -> int:
    return sum(1 for key, value in after.items() if before.get(key) != value)


def sync_run_config(platform_id: str, days: int) -> dict:
    """Run config of a sync job reading ``days`` days (first sync and re-sync alike). The console
    logger is set to WARNING (the event log still records every event, as in a deployment)."""
    return {"ops": {f"{platform_id}_campaigns": {"config": {"history_days": days, "lookback_days": days}}},
            "loggers": {"console": {"config": {"log_level": "WARNING"}}}}


def materialization_metadata(result, asset: str) -> dict:
    from dagster import DagsterEventType

    for event in result.all_events:
        if event.event_type == DagsterEventType.ASSET_MATERIALIZATION:
            materialization = event.event_specific_data.materialization
            if materialization.asset_key.to_user_string() == asset:
                return {k: v.value for k, v in materialization.metadata.items()}
    return {}


@dataclasses.dataclass
class Connection:
    """One connected user for a platform, with everything needed to sync it through Dagster."""

    platform_id: str
    user_id: str
    db_name: str
    defs: Any
    platforms: Any
    instance: Any

    @property
    def db(self):
        from resources.store import get_database

        return get_database()

    def run_sync_job(self, days: int):
        job = self.defs.resolve_job_def(self.platforms[self.platform_id].sync_job.name)
        result = job.execute_in_process(instance=self.instance, partition_key=self.user_id, raise_on_error=False,
                                        run_config=sync_run_config(self.platform_id, days))
        if not result.success:
            raise RuntimeError(f"{self.platform_id} sync run failed: {result.run_id}")
        return result


def connect_one(platform_id: str, portal: Portal, db_name: str, label: str) -> Connection:
    from pipelines.assets import partitions_name
    from pipelines.definitions import build_definitions
    from resources.store.resource import MongoStoreResource

    user_id = portal.connect_user(f"{label}-{platform_id}-{ObjectId()}@bench.example.com", [platform_id])
    defs, platforms = build_definitions(MongoStoreResource(database=db_name))
    instance = dagster_instance(f"{label}-{platform_id}")
    instance.add_dynamic_partitions(partitions_name(platform_id), [user_id])
    return Connection(platform_id, user_id, db_name, defs, platforms, instance)


#: fetch-only / re-sync alternations per P4 run (their mean is the run's figure for each side); a
#: quick run takes 2 (each side starts with a gc.collect(), ~0.2 s in a process with Dagster loaded)
P4_PAIRS = 6


# ---- P1 + P4 ---------------------------------------------------------------------------------------

def measure_p1_p4(platform_id: str, campaigns: int, days: int, runs: int = RUNS,
                  memory_days: tuple[int, int] | None = None, p4_pairs: int = P4_PAIRS,
                  memory_runs: int | None = None) -> dict[str, Any]:
    """P1: real path (token + campaigns assets through Dagster) vs the floor, ``runs`` times each.
    P4: the same connection re-synced with nothing changed (same window): modified documents and
    time, against reading the same rows only. Each P4 run times one whole Dagster re-sync, then
    ``p4_pairs`` alternations of fetch-only and the asset's work (``sync_connection``), averaged per side."""
    from resources.crypto import TokenCipher
    from resources.settings import get_settings
    from resources.store import get_database

    out: dict[str, Any] = {"platform": platform_id, "campaigns": campaigns, "days": days}
    db_name = f"bench_p1_{platform_id}"
    sandbox = SandboxProcess(sandbox_options([platform_id], campaigns), [platform_id]).start()
    try:
        with environment({**sandbox.env, "MONGODB_DB": db_name}):
            get_client(get_settings().resolved_mongodb_uri()).drop_database(db_name)
            db = get_database()
            ensure_indexes(db)
            cipher = TokenCipher.from_settings(get_settings())
            portal = Portal(sandbox).start()
            try:
                conn = connect_one(platform_id, portal, db_name, "p1")
            finally:
                portal.stop()
            floor_fn = floors.floor_for(platform_id)
            real_times, floor_times, sync_seconds, rows, floor_rows = [], [], [], 0, 0
            # one untimed warm-up of each side first (imports, the SDK clients' first calls, Dagster's
            # first run in this process), then ``runs`` timed pairs
            for index in range(-1, runs):
                if floor_fn is not None:
                    floors.floor_collections(db, platform_id)
                    gc.collect()
                    with Timer() as floor_t:
                        floor_rows = floor_fn(db, cipher, ObjectId(conn.user_id), days)
                reset_platform_data(db, platform_id, [conn.user_id])
                gc.collect()
                with Timer() as t:
                    result = conn.run_sync_job(days)
                meta = materialization_metadata(result, f"{platform_id}_campaigns")
                rows = int(meta.get("metric_rows_inserted", 0))
                if index < 0:
                    say(f"P1 {platform_id} warm-up: real {t.seconds:.2f}s"
                        + (f", floor {floor_t.seconds:.2f}s" if floor_fn is not None else ""))
                    continue
                if floor_fn is not None:
                    floor_times.append(floor_t.seconds)
                real_times.append(t.seconds)
                sync_seconds.append(float(meta.get("seconds", 0)))
                say(f"P1 {platform_id} run {index + 1}/{runs}: real {real_times[-1]:.2f}s "
                    f"(sync body {sync_seconds[-1]:.2f}s, {rows} metric rows)"
                    + (f", floor {floor_times[-1]:.2f}s ({floor_rows} rows)" if floor_times else ""))
            if floor_fn is not None and floor_rows != rows:
                out["p1_warning"] = f"floor read {floor_rows} metric rows, the real path {rows}"
            out["p1"] = {"rows": rows, "real_s": median(real_times), "floor_s": median(floor_times) if floor_times else None,
                         "sync_body_s": median(sync_seconds), "real_runs": real_times, "floor_runs": floor_times,
                         "ratio": median(real_times) / median(floor_times) if floor_times else None,
                         "floor": floor_fn.kind}

            # ---- P4: nothing changed since the last sync ----
            from pipelines.sync import sync_connection
            from resources.platforms.registry import get_connector

            resync_job, resync_body, fetch_times, modified = [], [], [], []
            for index in range(runs):
                gc.collect()  # each side starts without the previous run's garbage
                with Timer() as t:
                    fetched = floors.fetch_only(db, cipher, platform_id, ObjectId(conn.user_id), days)
                fetch_times.append(t.seconds)
                before = snapshot(db, platform_id, conn.user_id)
                with Timer() as t:
                    result = conn.run_sync_job(days)
                resync_job.append(t.seconds)
                meta = materialization_metadata(result, f"{platform_id}_campaigns")
                # the asset's work alone, alternated with fetch-only p4_pairs times and summed per side:
                # single sub-second timings on this machine swing by ±30 %
                fetch_s = body_s = 0.0
                for _ in range(p4_pairs):
                    gc.collect()
                    with Timer() as t:
                        floors.fetch_only(db, cipher, platform_id, ObjectId(conn.user_id), days)
                    fetch_s += t.seconds
                    gc.collect()
                    with Timer() as t:
                        outcome = sync_connection(db, cipher, get_connector(platform_id), ObjectId(conn.user_id),
                                                  lookback_days=days, history_days=days)
                    body_s += t.seconds
                fetch_times[-1] = fetch_s / p4_pairs
                resync_body.append(body_s / p4_pairs)
                after = snapshot(db, platform_id, conn.user_id)
                modified.append(modified_between(before, after))
                say(f"P4 {platform_id} run {index + 1}/{runs}: fetch-only {fetch_times[-1]:.2f}s ({fetched} rows), "
                    f"re-sync body {resync_body[-1]:.2f}s, re-sync job {resync_job[-1]:.2f}s, "
                    f"modified {modified[-1]} (reported written {meta.get('rows_upserted')}+{outcome.rows()['written']})")
            breakdown = p4_breakdown(db, cipher, platform_id, conn.user_id, days)
            out["p4"] = {"rows": fetched, "modified": max(modified), "fetch_only_s": median(fetch_times),
                         "breakdown": breakdown,
                         "resync_body_s": median(resync_body), "resync_job_s": median(resync_job),
                         "ratio": median(resync_body) / median(fetch_times),
                         "ratio_job": median(resync_job) / median(fetch_times),
                         "fetch_runs": fetch_times, "body_runs": resync_body, "job_runs": resync_job}
            conn.instance.dispose()

            # ---- memory: one materialization in a fresh process, short and long history ----
            if memory_days:
                out["memory"] = measure_memory(db, conn, memory_days, memory_runs or runs)
    finally:
        sandbox.stop()
    return out


def p4_breakdown(db, cipher, platform_id: str, user_id: str, days: int) -> dict[str, float]:
    """Where a re-sync's time goes beyond fetching, each part timed alone: reading the accounts' day
    digests (``sync_state``), digesting the fetched rows, and reading the stored campaigns (totals and
    hashes), one query each per account."""
    import datetime as dt

    from pipelines.sync import sync_window
    from resources.platforms.base import Account
    from resources.platforms.registry import get_connector
    from resources.repositories import CampaignRepository, UserRepository
    from resources.sync_state import DayDigests

    oid = ObjectId(user_id)
    connection = UserRepository(db).connection(oid, platform_id)
    accounts = [Account.from_doc(a) for a in connection["accounts"]]
    session = get_connector(platform_id).open_session(cipher.decrypt(connection["token"]))
    repo = CampaignRepository(db, platform_id)
    now = dt.datetime.now(dt.timezone.utc)
    parts = {"day_digests_read_s": 0.0, "rows_digested_s": 0.0, "stored_campaigns_read_s": 0.0}
    try:
        for account in accounts:
            if not session.syncable(account):
                continue
            start, end = sync_window(account, days, now)
            docs = list(session.fetch_daily_metrics(account, start, end))
            with Timer() as t:
                repo.states.get(oid, platform_id, account.id)
            parts["day_digests_read_s"] += t.seconds
            with Timer() as t:
                digests = DayDigests()
                for doc in docs:
                    digests.add(doc)
            parts["rows_digested_s"] += t.seconds
            with Timer() as t:
                repo.stored_campaigns(oid, account.id)
            parts["stored_campaigns_read_s"] += t.seconds
    finally:
        session.close()
    return parts


def _child_peak(spec: dict) -> dict:
    """Run ``benchmarks.memory_child`` and return its JSON line (its own peak RSS included)."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.memory_child", json.dumps(spec)], cwd=PROJECT_ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env={**os.environ, **OFFLINE_ENV})
    output = proc.stdout.decode()
    lines = [line for line in output.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"memory child failed ({proc.returncode}): {output[-500:]}")
    return json.loads(lines[-1])


def measure_memory(db, conn: Connection, days_list: tuple[int, int], runs: int) -> dict[str, Any]:
    """Peak RSS of one first-sync materialization (token + campaigns through Dagster) at each history
    length in ``days_list``, each in a fresh process, ``runs`` times (median)."""
    result: dict[str, Any] = {}
    for days in days_list:
        peaks, rows, growth = [], 0, []
        for index in range(runs):
            reset_platform_data(db, conn.platform_id, [conn.user_id])
            child = _child_peak({"platform": conn.platform_id, "user_id": conn.user_id, "db": conn.db_name,
                                 "days": days})
            peaks.append(child["peak_rss_mb"])
            growth.append(child["peak_rss_mb"] - child["rss_before_mb"])
            rows = child["rows"]
            say(f"memory {conn.platform_id} {days} days run {index + 1}/{runs}: peak {peaks[-1]:.0f} MB "
                f"(before the run {child['rss_before_mb']:.0f} MB), {rows} metric rows")
        result[str(days)] = {"days": days, "rows": rows, "peak_rss_mb": median(peaks),
                             "growth_during_run_mb": median(growth), "runs": peaks}
    short, long = (result[str(d)] for d in days_list)
    result["ratio"] = long["peak_rss_mb"] / short["peak_rss_mb"]
    return result
