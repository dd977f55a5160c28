"""P3, scale: many users × every platform, synced by the product's schedules through a real Dagster
deployment on this machine — ``dagster-daemon`` (scheduler + run queue) over the project's code
location (``workspace.yaml``), QueuedRunCoordinator, DefaultRunLauncher (one process per run),
per-platform pools — with its SQLite instance under ``data/bench/dagster``.

How the schedule is made to fire now: the daemon evaluates a schedule's ticks between the start time
stored in its state and now. Before the daemon starts, each ``<p>_campaign_sync_schedule`` gets a
RUNNING state that started one second before its latest cron time, so the daemon's first scheduler
iteration evaluates exactly that tick (the same code path as a tick on time). Every other schedule
and sensor gets a STOPPED state, so nothing else launches runs; partitions are added by the
connections sensors' own evaluation (ticked in this process) before the daemon starts.

Wall time is from the first run's creation to the last run's end (both from Dagster's run records),
so the daemon's start-up and the wait for its first iteration are not counted.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import math
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bson import ObjectId

from benchmarks import floors
from benchmarks.harness import (BENCH_DIR, OFFLINE_ENV, Portal, SandboxGroup, Timer, environment, median, say)
from resources.settings import PROJECT_ROOT

DAGSTER_YAML = """\
telemetry:
  enabled: false
run_coordinator:
  module: dagster._core.run_coordinator
  class: QueuedRunCoordinator
  config:
    dequeue_interval_seconds: 1
concurrency:
  runs:
    max_concurrent_runs: {max_runs}
  pools:
    default_limit: {pool_limit}
run_monitoring:
  enabled: false
"""


def _last_cron_time(cron: str, now: dt.datetime) -> dt.datetime:
    from dagster._utils.schedules import cron_string_iterator

    start = (now - dt.timedelta(days=2)).timestamp()
    last = None
    for moment in cron_string_iterator(start, cron, "UTC"):
        if moment.timestamp() > now.timestamp():
            break
        last = moment
    return last


@contextlib.contextmanager
def _stdout_to_stderr():
    """The code server started to read the code location logs to stdout: keep stdout for the table."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _set_instigator_states(instance, fire: set[str]) -> dict[str, Any]:
    """Stop every sensor and schedule of the code location except the schedules in ``fire``, which
    are set RUNNING from just before their latest cron time. Returns those remote schedules."""
    from dagster._core.scheduler.instigation import (InstigatorState, InstigatorStatus, InstigatorType,
                                                     ScheduleInstigatorData, SensorInstigatorData)
    from dagster._core.workspace.context import WorkspaceProcessContext
    from dagster._core.workspace.load_target import WorkspaceFileTarget

    now = dt.datetime.now(dt.timezone.utc)
    fired = {}
    with _stdout_to_stderr(), WorkspaceProcessContext(instance, WorkspaceFileTarget([str(PROJECT_ROOT / "workspace.yaml")])) as process:
        context = process.create_request_context()
        for entry in context.get_code_location_entries().values():
            if entry.code_location is None:
                raise RuntimeError(f"code location failed to load: {entry.load_error}")
            for repo in entry.code_location.get_repositories().values():
                for sensor in repo.get_sensors():
                    instance.add_instigator_state(InstigatorState(
                        sensor.get_remote_origin(), InstigatorType.SENSOR, InstigatorStatus.STOPPED,
                        SensorInstigatorData(min_interval=sensor.min_interval_seconds, sensor_type=sensor.sensor_type)))
                for schedule in repo.get_schedules():
                    if schedule.name in fire:
                        tick = _last_cron_time(schedule.cron_schedule, now)
                        instance.add_instigator_state(InstigatorState(
                            schedule.get_remote_origin(), InstigatorType.SCHEDULE, InstigatorStatus.RUNNING,
                            ScheduleInstigatorData(schedule.cron_schedule, tick.timestamp() - 1)))
                        fired[schedule.name] = (schedule.get_remote_origin_id(), schedule.selector_id)
                    else:
                        instance.add_instigator_state(InstigatorState(
                            schedule.get_remote_origin(), InstigatorType.SCHEDULE, InstigatorStatus.STOPPED,
                            ScheduleInstigatorData(schedule.cron_schedule, None)))
    missing = fire - set(fired)
    if missing:
        raise RuntimeError(f"schedules not found in the code location: {sorted(missing)}")
    return fired


def _add_partitions(defs, instance, platform_ids: list[str]) -> None:
    """Evaluate each platform's connections sensor once and apply its partition requests (what the
    daemon would do); its initial-sync run requests are dropped: the schedule syncs here."""
    from dagster import build_sensor_context

    for pid in platform_ids:
        sensor = defs.resolve_sensor_def(f"{pid}_connections_sensor")
        with build_sensor_context(instance_ref=instance.get_ref(), definitions=defs, resources={"store": defs.resources["store"]}) as ctx:
            result = sensor.evaluate_tick(ctx)
        for request in result.dynamic_partitions_requests or []:
            if type(request).__name__.startswith("Add"):
                instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))


def run_schedules_through_daemon(platform_ids: list[str], db_name: str, env: dict[str, str], label: str,
                                 max_runs: int = 4, pool_limit: int = 2, timeout: float = 1800) -> dict[str, Any]:
    """Fire every ``<p>_campaign_sync_schedule`` once through ``dagster-daemon`` and wait for its runs."""
    from dagster import DagsterInstance, DagsterRunStatus, RunsFilter
    from dagster._core.instance.ref import InstanceRef

    from pipelines.definitions import build_definitions
    from resources.store.resource import MongoStoreResource

    home = BENCH_DIR / "dagster" / f"{label}-{ObjectId()}"
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text(DAGSTER_YAML.format(max_runs=max_runs, pool_limit=pool_limit))
    child_env = {**os.environ, **env, **OFFLINE_ENV, "DAGSTER_HOME": str(home), "MONGODB_DB": db_name}
    out: dict[str, Any] = {}
    with environment({"DAGSTER_HOME": str(home), "MONGODB_DB": db_name}):
        instance = DagsterInstance.from_ref(InstanceRef.from_dir(str(home)))
        defs, _ = build_definitions(MongoStoreResource(database=db_name))
        _add_partitions(defs, instance, platform_ids)
        wanted = {f"{pid}_campaign_sync_schedule" for pid in platform_ids}
        fired = _set_instigator_states(instance, wanted)
        log = open(home / "daemon.log", "wb")
        daemon = subprocess.Popen([str(Path(sys.executable).parent / "dagster-daemon"), "run", "-w", "workspace.yaml"],
                                  cwd=PROJECT_ROOT, env=child_env, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        try:
            deadline = time.monotonic() + timeout
            run_ids: set[str] = set()
            done_ticks: set[str] = set()
            while time.monotonic() < deadline:
                if daemon.poll() is not None:
                    raise RuntimeError(f"dagster-daemon exited with {daemon.returncode}; see {home / 'daemon.log'}")
                for name, (origin_id, selector_id) in fired.items():
                    if name in done_ticks:
                        continue
                    ticks = instance.get_ticks(origin_id, selector_id, limit=1)
                    if ticks and ticks[0].status.value in ("SUCCESS", "SKIPPED", "FAILURE"):
                        if ticks[0].status.value == "FAILURE":
                            raise RuntimeError(f"{name} tick failed: {ticks[0].error}")
                        done_ticks.add(name)
                        run_ids.update(ticks[0].run_ids)
                if len(done_ticks) == len(fired):
                    records = instance.get_run_records(RunsFilter(run_ids=list(run_ids)))
                    if len(records) == len(run_ids) and all(r.dagster_run.is_finished for r in records):
                        break
                time.sleep(1)
            else:
                raise RuntimeError(f"runs did not finish within {timeout:.0f}s")
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(daemon.pid, signal.SIGTERM)
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(daemon.pid, signal.SIGKILL)
                daemon.wait()
            log.close()
        records = instance.get_run_records(RunsFilter(run_ids=list(run_ids)))
        created = min(r.create_timestamp.timestamp() for r in records)
        ended = max(r.end_time for r in records if r.end_time)
        durations = [r.end_time - r.start_time for r in records if r.end_time and r.start_time]
        failed = [r.dagster_run.run_id for r in records if r.dagster_run.status != DagsterRunStatus.SUCCESS]
        out.update({"runs": len(records), "failed_runs": len(failed), "wall_s": ended - created,
                    "run_seconds_median": median(durations), "run_seconds_sum": sum(durations),
                    "dagster_home": str(home)})
        instance.dispose()
    return out


def floor_for_connections(db, cipher, connections: list[tuple[str, str]], days: int, workers: int = 2) -> float:
    """The floor of P3: every (platform, user) read by the bare SDK loop and written with one
    ``bulk_write`` per collection, ``workers`` at a time (the machine's cores). Returns seconds."""
    for pid in {pid for pid, _ in connections}:
        floors.floor_collections(db, pid)
    with Timer() as t, ThreadPoolExecutor(max_workers=workers) as pool:
        for future in [pool.submit(floors.floor_for(pid), db, cipher, ObjectId(uid), days) for pid, uid in connections]:
            future.result()
    return t.seconds


def plain_sync_loop(db_name: str, connections: list[tuple[str, str]], days: int, workers: int = 2) -> float:
    """The same work as the batch runs — ``token_materialization`` then ``campaigns_materialization`` per
    connection (token check, sync, checks, sync record) — in plain Python threads, without Dagster.
    Returns seconds. The difference to the Dagster wall time is Dagster's own share."""
    import logging

    from bson import ObjectId as _Oid

    from pipelines.assets import campaigns_materialization, token_materialization
    from resources.store.resource import MongoStoreResource

    store = MongoStoreResource(database=db_name)
    log = logging.getLogger("benchmarks.plain")

    def one(pid: str, uid: str) -> None:
        token_materialization(pid, store, _Oid(uid), False, log)
        campaigns_materialization(pid, store, _Oid(uid), 0, days, log)

    with Timer() as t, ThreadPoolExecutor(max_workers=workers) as pool:
        for future in [pool.submit(one, pid, uid) for pid, uid in connections]:
            future.result()
    return t.seconds


def measure_p3(platform_ids: list[str], users: int, campaigns: int, days: int, runs: int = 3,
               max_runs: int = 4, pool_limit: int = 2, batch_sizes: tuple[int, ...] = (25,),
               budget_seconds: float | None = None, plain_loop: bool = True) -> dict[str, Any]:
    """P3 for ``users`` users connected to every platform in ``platform_ids``, once per schedule mode in
    ``batch_sizes`` (``SCHEDULE_BATCH_SIZE``: 1 = one run per connection). With ``budget_seconds``,
    repetitions stop early when the next one would end past the budget (the result says how many ran)."""
    from benchmarks.measures import reset_platform_data, sandbox_options
    from resources.crypto import TokenCipher
    from resources.settings import get_settings
    from resources.store import ensure_indexes, get_client, get_database, metrics_collection

    db_name = "bench_p3"
    out: dict[str, Any] = {"platforms": platform_ids, "users": users, "campaigns": campaigns, "days": days,
                           "connections": users * len(platform_ids)}
    sandbox = SandboxGroup(sandbox_options(platform_ids, campaigns), platform_ids).start()
    try:
        env = {**sandbox.env, "MONGODB_DB": db_name, "HISTORY_DAYS": str(days)}
        with environment(env):
            get_client(get_settings().resolved_mongodb_uri()).drop_database(db_name)
            db = get_database()
            ensure_indexes(db)
            cipher = TokenCipher.from_settings(get_settings())
            with Timer() as t:
                portal = Portal(sandbox).start()
                try:
                    user_ids = [portal.connect_user(f"p3-{i}-{ObjectId()}@bench.example.com", platform_ids)
                                for i in range(users)]
                finally:
                    portal.stop()
            say(f"P3: {users} users connected to {', '.join(platform_ids)} through the portal in {t.seconds:.0f}s")
            connections = [(pid, uid) for uid in user_ids for pid in platform_ids]
            with_floor = True
            modes: dict[str, dict[str, Any]] = {}
            walls: dict[int, list[float]] = {size: [] for size in batch_sizes}
            plain_times: list[float] = []
            results: dict[int, list[dict]] = {size: [] for size in batch_sizes}
            floor_times: list[float] = []
            measure_started = time.monotonic()
            for index in range(runs):
                spent = time.monotonic() - measure_started
                if index and budget_seconds and spent / index * (index + 1) > budget_seconds:
                    say(f"P3: one repetition takes ~{spent / index:.0f}s; stopping after {index} (budget {budget_seconds:.0f}s)")
                    break
                if with_floor:
                    floor_times.append(floor_for_connections(db, cipher, connections, days))
                    say(f"P3 floor {index + 1}/{runs}: {floor_times[-1]:.1f}s")
                if plain_loop:
                    for pid in platform_ids:
                        reset_platform_data(db, pid, user_ids)
                    plain_times.append(plain_sync_loop(db_name, connections, days))
                    say(f"P3 same work without Dagster {index + 1}/{runs}: {plain_times[-1]:.1f}s")
                for size in batch_sizes:
                    for pid in platform_ids:
                        reset_platform_data(db, pid, user_ids)
                    result = run_schedules_through_daemon(platform_ids, db_name, {**env, "SCHEDULE_BATCH_SIZE": str(size)},
                                                          f"p3-b{size}-{index}", max_runs=max_runs, pool_limit=pool_limit)
                    result["rows"] = sum(db[metrics_collection(pid)].count_documents({}) for pid in platform_ids)
                    results[size].append(result)
                    walls[size].append(result["wall_s"])
                    say(f"P3 batch size {size}, run {index + 1}/{runs}: {result['runs']} Dagster runs "
                        f"({result['failed_runs']} failed), wall {result['wall_s']:.1f}s, {result['rows']} metric rows")
            floor = median(floor_times) if floor_times else None
            plain = median(plain_times) if plain_times else None
            for size in batch_sizes:
                wall = median(walls[size])
                last = results[size][-1]
                modes[str(size)] = {
                    "batch_size": size, "wall_s": wall, "rows": last["rows"], "dagster_runs": last["runs"],
                    "failed_runs": max(r["failed_runs"] for r in results[size]),
                    "overhead_per_connection_s": (wall - floor) / len(connections) if floor is not None else None,
                    "dagster_share_per_connection_s": (wall - plain) / len(connections) if plain is not None else None,
                    "run_seconds_median": median([r["run_seconds_median"] for r in results[size]]),
                    "wall_runs": walls[size]}
            out.update({"floor_s": floor, "floor_runs": floor_times, "modes": modes,
                        "without_dagster_s": plain, "without_dagster_runs": plain_times,
                        "floor": {pid: floors.floor_for(pid).kind for pid in platform_ids},
                        "settings": {"max_concurrent_runs": max_runs, "pool_default_limit": pool_limit,
                                     "floor_workers": 2}})
    finally:
        sandbox.stop()
    return out
