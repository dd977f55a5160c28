"""``python -m benchmarks [--quick]`` (``make bench`` / ``make bench QUICK=1``).

Starts its own store (embedded mongo-java-server, or ``MONGODB_URI``) and sandboxes (child
processes), runs every measure, prints one table and writes the figures with the machine's facts to
``data/bench/results-<time>.json`` and ``data/bench/latest.json`` (``--commit-copy`` also to
``benchmarks/results/latest.json`` and ``latest.md``, which the README quotes).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks.harness import (BENCH_DIR, OFFLINE_ENV, RUNS, Store, clean_dagster_dirs, environment, machine_facts,
                                say)

HERE = Path(__file__).resolve().parent

#: sizes of each measure, full and quick
PLANS = {
    "full": {"p1": {"campaigns": 200, "days": 90,
                    # a shop's reading time follows its orders (computed per day by the sandbox's GraphQL
                    # executor), not its campaigns: Shopify is measured at a size that fits the run
                    "sizes": {"shopify": {"campaigns": 50, "days": 30}}},
             "memory": {"campaigns": 200, "days": (90, 900),
                                                                 "platforms": ["google", "meta"]},
             "p2": {"campaigns": 100, "days": 30, "peer_runs": RUNS},
             "p3": {"users": 100, "campaigns": 50, "days": 30, "batch_size": 25, "max_runs": 4,
                    "baseline_users": 10, "budget_seconds": 1500, "plain_loop": True}},
    "quick": {"p1": {"campaigns": 40, "days": 14, "p4_pairs": 2, "sizes": {"shopify": {"campaigns": 20, "days": 14}}},
              # one fresh process per memory run (~6 s of imports each): one run per size in a quick run
              "memory": {"campaigns": 40, "days": (14, 140), "runs": 1,
                                                                 "platforms": ["google"]},
              "p2": {"campaigns": 40, "days": 7, "peer_runs": 1},
              "p3": {"users": 6, "campaigns": 20, "days": 14, "batch_size": 25, "max_runs": 4,
                     "baseline_users": 0, "budget_seconds": None, "plain_loop": False}},
}

TARGETS = {"p1": 1.5, "p4": 1.1, "p2": 3.0, "p3": 1.0, "memory": 1.5}


def platforms_with_sandbox() -> list[str]:
    from benchmarks.measures import SANDBOX_SHAPES
    from resources.platforms.registry import platform_ids
    from sandbox.registry import sandbox_ids

    return [pid for pid in platform_ids() if pid in sandbox_ids() and pid in SANDBOX_SHAPES]


def _guard(results: dict, name: str, fn, *args, **kwargs):
    """Run one measure; a failure is recorded (and shown in the table), not fatal."""
    started = time.monotonic()
    try:
        results[name] = fn(*args, **kwargs)
    except Exception as exc:
        say(f"{name} FAILED: {type(exc).__name__}: {exc}")
        results[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
    results[name]["measure_seconds"] = round(time.monotonic() - started, 1)


def run(quick: bool, only: set[str] | None = None, plain_loop: bool = True) -> dict[str, Any]:
    from benchmarks.measures import P4_PAIRS, measure_p1_p4
    from benchmarks.peers import measure_p2
    from benchmarks.scale import measure_p3

    plan = PLANS["quick" if quick else "full"]
    platforms = platforms_with_sandbox()
    results: dict[str, Any] = {"mode": "quick" if quick else "full", "plan": plan, "platforms": platforms,
                               "started_at": dt.datetime.now(dt.timezone.utc).isoformat(), "machine": machine_facts(),
                               "measures": {}}
    measures = results["measures"]
    store = Store()
    uri = store.start()
    results["store"] = store.kind
    try:
        with environment({"MONGODB_URI": uri, "DATA_DIR": str(BENCH_DIR), **OFFLINE_ENV}):
            _warm_store()
            for pid in platforms if not only or "p1" in only else []:
                memory = plan["memory"]["days"] if pid in plan["memory"]["platforms"] else None
                size = {"campaigns": plan["p1"]["campaigns"], "days": plan["p1"]["days"],
                        **plan["p1"].get("sizes", {}).get(pid, {})}
                _guard(measures, f"p1_{pid}", measure_p1_p4, pid, size["campaigns"], size["days"], RUNS, memory,
                       plan["p1"].get("p4_pairs", P4_PAIRS), plan["memory"].get("runs"))
            if only and "p2" not in only:
                pass
            elif "meta" in platforms:
                p2 = plan["p2"]
                _guard(measures, "p2", measure_p2, p2["campaigns"], p2["days"], RUNS, p2["peer_runs"])
            else:
                measures["p2"] = {"error": "no Meta platform with a sandbox is registered"}
            p3 = plan["p3"]
            if only and "p3" not in only:
                return results
            _guard(measures, "p3", measure_p3, platforms, p3["users"], p3["campaigns"], p3["days"], RUNS,
                   max_runs=p3["max_runs"], batch_sizes=(p3["batch_size"],), budget_seconds=p3["budget_seconds"],
                   plain_loop=p3["plain_loop"] and plain_loop)
            if p3["baseline_users"] and (not only or "p3base" in only):
                _guard(measures, "p3_per_partition", measure_p3, platforms, p3["baseline_users"], p3["campaigns"],
                       p3["days"], 1, max_runs=p3["max_runs"], batch_sizes=(1,), plain_loop=False)
    finally:
        store.stop()
        clean_dagster_dirs()
    results["finished_at"] = dt.datetime.now(dt.timezone.utc).isoformat()
    return results


def _warm_store() -> None:
    """Let the store's JVM compile its hot paths before anything is timed (writes, upserts, reads)."""
    from pymongo import InsertOne, UpdateOne

    from resources.store import get_database

    db = get_database()
    col = db["bench_warmup"]
    col.drop()
    col.create_index([("k", 1), ("d", 1)], unique=True)
    docs = [{"k": i % 100, "d": i, "v": i} for i in range(20_000)]
    col.bulk_write([InsertOne(d) for d in docs], ordered=False)
    col.bulk_write([UpdateOne({"k": d["k"], "d": d["d"]}, {"$set": {"v": -1}}, upsert=True) for d in docs[:5000]],
                   ordered=False)
    list(col.find({"k": {"$in": list(range(50))}, "d": {"$gte": 0}}))
    list(col.aggregate([{"$match": {"k": 1}}, {"$group": {"_id": "$k", "s": {"$sum": "$v"}}}]))
    col.drop()


# ---- the table -------------------------------------------------------------------------------------

def _met(ok: bool | None) -> str:
    return "—" if ok is None else ("met" if ok else "**missed**")


def _s(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f} s"


def table(results: dict[str, Any]) -> str:
    """The results as one Markdown table (also what the README shows)."""
    m = results["measures"]
    rows = [("measure", "platform", "figures (median of 3 runs unless said)", "target", "result")]
    for pid in results["platforms"]:
        r = m.get(f"p1_{pid}", {})
        if "error" in r:
            rows.append(("P1 floor ratio", pid, f"failed: {r['error'][:120]}", "≤ 1.5×", "**failed**"))
            continue
        p1 = r["p1"]
        ratio = p1["ratio"]
        rows.append(("P1 floor ratio", pid,
                     f"{p1['rows']:,} metric rows ({r['campaigns']} campaigns × {r['days']} days): real path (token + "
                     f"campaigns through Dagster) {_s(p1['real_s'])} vs floor ({p1['floor']}) {_s(p1['floor_s'])} "
                     f"= **{ratio:.2f}×**", "≤ 1.5×", _met(ratio <= TARGETS["p1"])))
        p4 = r["p4"]
        parts = p4.get("breakdown") or {}
        extra = (f"; beyond the fetch: day digests read {_s(parts.get('day_digests_read_s'))}, rows digested "
                 f"{_s(parts.get('rows_digested_s'))}, stored campaigns read {_s(parts.get('stored_campaigns_read_s'))}"
                 ) if "rows_digested_s" in parts else ""
        rows.append(("P4 re-sync, nothing changed", pid,
                     f"{p4['modified']} documents modified ({p4['rows']:,} rows re-read); re-sync (the asset's work) "
                     f"{_s(p4['resync_body_s'])} vs fetch-only {_s(p4['fetch_only_s'])} = **{p4['ratio']:.2f}×** (the "
                     f"whole Dagster run: {_s(p4['resync_job_s'])} = {p4['ratio_job']:.2f}×){extra}", "0; ≤ 1.1×",
                     _met(p4["modified"] == 0 and p4["ratio"] <= TARGETS["p4"])))
        if "memory" in r:
            mem = r["memory"]
            (a, b) = [mem[k] for k in mem if k.isdigit()]
            rows.append(("Memory, one materialization", pid,
                         f"peak RSS {a['days']} days ({a['rows']:,} rows) {a['peak_rss_mb']:.0f} MB vs {b['days']} days "
                         f"({b['rows']:,} rows) {b['peak_rss_mb']:.0f} MB = **{mem['ratio']:.2f}×** (growth during "
                         f"the run {a['growth_during_run_mb']:.0f} → {b['growth_during_run_mb']:.0f} MB)"
                         + (f"; {len(a['runs'])} run per size" if len(a.get("runs", [])) == 1 else ""), "< 1.5×",
                         _met(mem["ratio"] < TARGETS["memory"])))
    p2 = m.get("p2", {})
    if "error" in p2:
        rows.append(("P2 peers", "meta", f"not measured: {p2['error'][:160]}", "≥ 3×", "**failed**"))
    elif p2:
        ours = p2["ours"]
        rows.append(("P2 peers: ours", "meta", f"{ours['rows']:,} rows ({p2['campaigns']} campaigns × {p2['days']} days, "
                     f"{p2['window']['accounts']} ad accounts) in {_s(ours['seconds'])} = **{ours['rows_per_s']:.0f} rows/s** "
                     f"(through Dagster)", "", ""))
        for name, peer in p2["peers"].items():
            if not peer.get("ok"):
                rows.append((f"P2 peer {name}", "meta", f"could not run here: {peer['error'][:200]}", "", "—"))
                continue
            agreement = (f"{peer['equal']:,} campaign-days equal to ours on impressions, clicks and spend, "
                         f"{peer['value_differences']} differ")
            if peer["differences"]:
                agreement += "; " + "; ".join(peer["differences"])[:400]
            rows.append((f"P2 peer {name}", "meta",
                         f"{peer['requirement']}: {peer['campaign_days']:,} campaign-days ({peer['rows_raw']:,} rows "
                         f"emitted) in {_s(peer['seconds'])} ({len(peer['runs'])} run{'s' if len(peer['runs']) != 1 else ''}) "
                         f"= {peer['rows_per_s']:.0f} rows/s; {agreement}", "", ""))
        ratio = p2.get("ratio_vs_fastest_peer")
        rows.append(("P2 ours vs fastest peer", "meta", f"**{ratio:.1f}×** the fastest peer's rows/s" if ratio else "—",
                     "≥ 3×", _met(ratio >= TARGETS["p2"]) if ratio else "—"))
    for key, label in (("p3", "P3 scale (schedules → daemon)"), ("p3_per_partition", "P3 baseline: one run per connection")):
        p3 = m.get(key)
        if not p3:
            continue
        if "error" in p3:
            rows.append((label, "all", f"failed: {p3['error'][:160]}", "≤ 1 s/connection", "**failed**"))
            continue
        for mode in p3["modes"].values():
            over = mode["overhead_per_connection_s"]
            runs_note = "" if len(mode["wall_runs"]) == RUNS else f" (median of {len(mode['wall_runs'])} run{'s' if len(mode['wall_runs']) != 1 else ''})"
            rows.append((label, "+".join(p3["platforms"]),
                         f"{p3['users']} users × {len(p3['platforms'])} platforms = {p3['connections']} connections "
                         f"({p3['campaigns']} campaigns × {p3['days']} days each), SCHEDULE_BATCH_SIZE={mode['batch_size']}: "
                         f"{mode['dagster_runs']} Dagster runs, wall {_s(mode['wall_s'])}{runs_note}, {mode['rows']:,} "
                         f"metric rows; floor {_s(p3['floor_s'])} → **{over:.2f} s overhead per connection**"
                         + _without_dagster(p3, mode),
                         "≤ 1 s", _met(over <= TARGETS["p3"]) if key == "p3" else "—"))
    widths = [max(len(str(r[i])) for r in rows) for i in range(5)]
    lines = ["| " + " | ".join(str(c) for c in rows[0]) + " |", "|" + "|".join("---" for _ in widths) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows[1:]]
    return "\n".join(lines)


def _without_dagster(p3: dict, mode: dict) -> str:
    share = mode.get("dagster_share_per_connection_s")
    if share is None:
        return ""
    text = f"; the same work without Dagster (same functions, one process, 2 threads) {_s(p3['without_dagster_s'])}"
    if share >= 0:
        return text + f" → Dagster's own share {share:.2f} s per connection"
    return text + (" — slower than Dagster's run processes (one GIL for both threads), so Dagster's own cost is "
                   "smaller than what its process-level parallelism gains here")


def facts_line(results: dict[str, Any]) -> str:
    f = results["machine"]
    v = f["versions"]
    return (f"{results['mode']} run {results['started_at'][:16]}Z on {f['cores']} cores ({f['cpu_model'] or 'cpu'}), "
            f"{f['memory_gb']} GB, load average at start {f['load_average_at_start']}; Python {f['python']}, "
            f"dagster {v.get('dagster')}, google-ads {v.get('google-ads')}, facebook-business {v.get('facebook-business')}, "
            f"pymongo {v.get('pymongo')}; store: {results.get('store')}; commit {f['git_commit']}")


def _install_peers() -> None:
    """Install the P2 peers into their cached virtual environments before anything is timed (a first run
    downloads them from the package registry; later runs reuse them). Failures are reported by P2."""
    from benchmarks.peers_install import PEERS, install

    for name in PEERS:
        result = install(name)
        if not result["cached"]:
            say(f"peer {name}: " + ("installed" if result["ok"] else "install failed (see P2)")
                + f" in {result['seconds']:.0f}s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (under three minutes)")
    parser.add_argument("--only", default="", help="comma-separated measures to run (p1,p2,p3,p3base); the others are "
                                                   "taken from data/bench/latest.json (latest-quick.json with "
                                                   "--quick) and marked as such")
    parser.add_argument("--table", action="store_true", help="only print the table of data/bench/latest.json (latest-quick.json "
                                                           "with --quick)")
    parser.add_argument("--commit-copy", action="store_true",
                        help="also write benchmarks/results/latest.json and latest.md")
    parser.add_argument("--skip-plain-loop", action="store_true",
                        help="P3 without its informative no-Dagster comparison (saves ~10 minutes)")
    parser.add_argument("--skip-peer-install", action="store_true",
                        help="do not install the P2 peers first (make bench installs them before timing)")
    args = parser.parse_args(argv)
    # a quick run keeps its own file, so it never replaces (or mixes into) the full run's figures
    latest = BENCH_DIR / ("latest-quick.json" if args.quick else "latest.json")
    if args.table:
        print(table(json.loads(latest.read_text())))
        return 0
    only = {x.strip() for x in args.only.split(",") if x.strip()} or None
    if not args.skip_peer_install and (not only or "p2" in only):
        _install_peers()
    started = time.monotonic()
    results = run(args.quick, only, plain_loop=not args.skip_plain_loop)
    results["total_seconds"] = round(time.monotonic() - started, 1)
    if only and latest.exists():
        previous = json.loads(latest.read_text())
        for name, value in previous.get("measures", {}).items():
            if name not in results["measures"]:
                value["from_run_started_at"] = value.get("from_run_started_at") or previous.get("started_at")
                results["measures"][name] = value
        results["merged"] = sorted(name for name, value in results["measures"].items()
                                   if value.get("from_run_started_at"))
        results["merged_from"] = previous.get("started_at")
        results["merged_commit"] = previous.get("machine", {}).get("git_commit")
    text = table(results)
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    body = json.dumps(results, indent=1, default=str)
    for path in (BENCH_DIR / f"results-{results['mode']}-{stamp}.json", latest):
        path.write_text(body)
    note = ("\nQuick mode: small sizes, where fixed per-run costs (Dagster run, token check) dominate; the "
            "targets are for the full sizes (`make bench`).\n" if args.quick else "")
    if results.get("merged_from"):
        note += (f"\nMeasures not re-run this time ({', '.join(results.get('merged', []))}"
                 f") come from the run started {results['merged_from'][:16]}Z (commit {results.get('merged_commit', '?')}).\n")
    md = f"{text}\n{note}\n{facts_line(results)}; {results['total_seconds']:.0f} s in all.\n"
    latest.with_suffix(".md").write_text(md)
    if args.commit_copy and not args.quick:
        (HERE / "results").mkdir(exist_ok=True)
        (HERE / "results" / "latest.json").write_text(body)
        (HERE / "results" / "latest.md").write_text(md)
    print(md)
    print(f"figures: {latest}", file=sys.stderr)
    failed = [k for k, v in results["measures"].items() if "error" in v]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
