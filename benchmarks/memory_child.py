"""One campaigns materialization in a fresh process, for the memory measure (the parent reads this
process's peak resident memory from ``wait4``).

    python -m benchmarks.memory_child '{"platform": "google", "user_id": "...", "db": "...", "days": 90}'

Prints one JSON line: resident memory before the run (everything imported, definitions built), after,
and the peak (``VmHWM`` of this process: not ``wait4``'s ``ru_maxrss``, which on Linux keeps the
parent's resident size from before ``exec``), the metric rows written and whether the run succeeded.
"""
from __future__ import annotations

import json
import sys


def main() -> int:
    spec = json.loads(sys.argv[1])
    from benchmarks.harness import dagster_instance, peak_rss_mb, rss_mb
    from benchmarks.measures import materialization_metadata, sync_run_config
    from pipelines.assets import partitions_name
    from pipelines.definitions import build_definitions
    from resources.store.resource import MongoStoreResource

    pid = spec["platform"]
    defs, platforms = build_definitions(MongoStoreResource(database=spec["db"]))
    instance = dagster_instance(f"memory-{pid}-{spec['days']}")
    instance.add_dynamic_partitions(partitions_name(pid), [spec["user_id"]])
    job = defs.resolve_job_def(platforms[pid].sync_job.name)
    import facebook_business  # noqa: F401  every SDK the code location may load, before the baseline
    import google.ads.googleads.client  # noqa: F401

    before = rss_mb()
    result = job.execute_in_process(instance=instance, partition_key=spec["user_id"], raise_on_error=False,
                                    run_config=sync_run_config(pid, int(spec["days"])))
    meta = materialization_metadata(result, f"{pid}_campaigns")
    print(json.dumps({"rss_before_mb": before, "rss_after_mb": rss_mb(), "peak_rss_mb": peak_rss_mb(),
                      "success": result.success,
                      "rows": int(meta.get("metric_rows_inserted", 0))}), flush=True)
    instance.dispose()
    return 0 if result.success else 1


if __name__ == "__main__":
    raise SystemExit(main())
