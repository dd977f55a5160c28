"""P2, peers: the connectors people use today for Meta Ads, reading the same Meta sandbox data.

- ``airbyte``: ``airbyte-source-facebook-marketing`` (Airbyte's Python source), a ``custom_insights``
  stream at campaign level, one day per row;
- ``singer``: ``tap-facebook`` on PyPI (singer-io / Stitch), ``ads_insights`` (ad level; the sandbox
  has one ad per campaign, and rows are summed per campaign and day anyway);
- ``meltano``: ``meltano-tap-facebook`` (MeltanoLabs, singer-sdk), an ``insight_reports_list`` report at
  campaign level.

Each runs unchanged from its own virtual environment (``benchmarks.peers_install``), as a child
process whose ``PYTHONPATH`` holds one ``sitecustomize.py`` written here: it sets the facebook-business
SDK's ``FacebookSession.GRAPH`` and rewrites ``https://graph.facebook.com`` in ``requests`` to the local
sandbox (peers.md: neither has a setting for the host). ``HTTP(S)_PROXY`` point at a closed local port,
so any other host fails instead of being reached.

Rows are compared per (account, campaign, account-local date) after de-duplication with the
documents our sync stored for the same connection and window: impressions, clicks and spend must be
equal; every difference is counted and explained in the result.
"""
from __future__ import annotations

import collections
import datetime as dt
import json
import os
import subprocess
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

from benchmarks.harness import OFFLINE_ENV, say
from benchmarks.peers_install import PEERS, PEERS_DIR, executable, install

SITECUSTOMIZE = '''\
"""Written by the Unified Ads benchmark: send this peer's Graph API calls to the local sandbox."""
import os

_LOCAL = os.environ.get("BENCH_GRAPH_URL", "").rstrip("/")
if _LOCAL:
    try:
        from facebook_business.session import FacebookSession
        FacebookSession.GRAPH = _LOCAL
    except Exception:
        pass
    try:
        import requests.adapters

        _send = requests.adapters.HTTPAdapter.send

        def send(self, request, *args, **kwargs):
            if request.url.startswith("https://graph.facebook.com"):
                request.url = _LOCAL + request.url[len("https://graph.facebook.com"):]
            return _send(self, request, *args, **kwargs)

        requests.adapters.HTTPAdapter.send = send
    except Exception:
        pass
'''

#: what a difference between a peer and us usually means (shown in the table when it happens)
EXPLANATIONS = {
    "duplicates": "the peer emitted the same campaign-day more than once (overlapping windows); de-duplicated",
    "missing_deleted": "rows of ARCHIVED/DELETED campaigns: the peer asks for insights without an "
                       "effective_status filter, and Meta then leaves those campaigns out",
    "missing_other": "rows we have and the peer does not",
    "extra": "rows the peer has and we do not",
    "values": "same campaign-day, different impressions/clicks/spend",
}


def _write_sitecustomize() -> Path:
    folder = PEERS_DIR / "sitecustomize"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return folder


def _run(name: str, args: list[str], env: dict[str, str], cwd: Path, stdout_path: Path, timeout: float) -> float:
    started = time.perf_counter()
    with open(stdout_path, "wb") as out, open(cwd / f"{stdout_path.stem}.stderr", "wb") as err:
        proc = subprocess.run([str(executable(name)), *args], cwd=cwd, env=env, stdout=out, stderr=err,
                              timeout=timeout)
    if proc.returncode != 0:
        tail = (cwd / f"{stdout_path.stem}.stderr").read_text(errors="replace")[-800:]
        raise RuntimeError(f"{name} {args[0] if args else ''} exited with {proc.returncode}: {tail}")
    return time.perf_counter() - started


def _messages(path: Path):
    with open(path, "rb") as handle:
        for line in handle:
            line = line.strip()
            if line.startswith(b"{"):
                try:
                    yield json.loads(line)
                except ValueError:
                    continue


def _peer_env(graph_url: str) -> dict[str, str]:
    site = _write_sitecustomize()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GOOGLE_", "META_", "SHOPIFY_", "MONGODB"))}
    env.update(OFFLINE_ENV)
    env.update({"PYTHONPATH": str(site), "BENCH_GRAPH_URL": graph_url, "PYTHONDONTWRITEBYTECODE": "1"})
    return env


def _select_all(catalog: dict, streams: set[str]) -> dict:
    """Mark the wanted streams (and all their properties) selected in a Singer catalog."""
    chosen = []
    for stream in catalog.get("streams", []):
        if stream.get("tap_stream_id") not in streams and stream.get("stream") not in streams:
            continue
        for entry in stream.get("metadata", []):
            entry.setdefault("metadata", {})["selected"] = True
        chosen.append(stream)
    catalog["streams"] = chosen
    return catalog


# ---- the three peers -----------------------------------------------------------------------------

def run_airbyte(work: Path, env: dict, token: str, accounts: list[str], start: dt.date, end: dt.date,
                timeout: float) -> tuple[float, list[dict]]:
    config = {"account_ids": accounts, "credentials": {"auth_type": "Service", "access_token": token},
              "start_date": f"{start}T00:00:00Z", "end_date": f"{end}T23:59:59Z",
              "action_breakdowns_allow_empty": True,
              "custom_insights": [{"name": "customcampaign_daily", "level": "campaign", "time_increment": 1,
                                   "fields": ["campaign_id", "campaign_name", "impressions", "clicks", "spend",
                                              "date_start", "date_stop"],
                                   "breakdowns": [], "action_breakdowns": []}]}
    (work / "config.json").write_text(json.dumps(config))
    _run("airbyte", ["discover", "--config", "config.json"], env, work, work / "discover.jsonl", timeout)
    catalog = next(m["catalog"] for m in _messages(work / "discover.jsonl") if m.get("type") == "CATALOG")
    streams = []
    for stream in catalog["streams"]:
        if stream["name"] == "campaigns":
            streams.append({"stream": stream, "sync_mode": "full_refresh", "destination_sync_mode": "append"})
        elif "campaign" in stream["name"] and "daily" in stream["name"]:
            streams.append({"stream": stream, "sync_mode": "incremental", "cursor_field": ["date_start"],
                            "destination_sync_mode": "append"})
    (work / "catalog.json").write_text(json.dumps({"streams": streams}))
    seconds = _run("airbyte", ["read", "--config", "config.json", "--catalog", "catalog.json"], env, work,
                   work / "read.jsonl", timeout)
    rows = [m["record"]["data"] | {"_account": str(m["record"]["data"].get("account_id", ""))}
            for m in _messages(work / "read.jsonl")
            if m.get("type") == "RECORD" and m["record"]["stream"] != "campaigns"]
    return seconds, rows


def run_singer(work: Path, env: dict, token: str, accounts: list[str], start: dt.date, end: dt.date,
               timeout: float) -> tuple[float, list[dict]]:
    seconds, rows = 0.0, []
    for account in accounts:  # one account per run: the tap's config has one account_id
        folder = work / account
        folder.mkdir(exist_ok=True)
        config = {"account_id": account, "access_token": token, "start_date": f"{start}T00:00:00Z",
                  "end_date": f"{end}T23:59:59Z", "insights_buffer_days": 1}
        (folder / "config.json").write_text(json.dumps(config))
        seconds += _run("singer", ["--config", "config.json", "--discover"], env, folder, folder / "catalog.json",
                        timeout)
        catalog = _select_all(json.loads((folder / "catalog.json").read_text()), {"campaigns", "ads_insights"})
        (folder / "properties.json").write_text(json.dumps(catalog))
        seconds += _run("singer", ["--config", "config.json", "--properties", "properties.json"], env, folder,
                        folder / "read.jsonl", timeout)
        rows += [m["record"] | {"_account": account} for m in _messages(folder / "read.jsonl")
                 if m.get("type") == "RECORD" and m.get("stream") == "ads_insights"]
    return seconds, rows


def run_meltano(work: Path, env: dict, token: str, accounts: list[str], start: dt.date, end: dt.date,
                timeout: float) -> tuple[float, list[dict]]:
    seconds, rows = 0.0, []
    for account in accounts:
        folder = work / account
        folder.mkdir(exist_ok=True)
        config = {"account_id": account, "access_token": token, "start_date": f"{start}T00:00:00Z",
                  "end_date": f"{end}T23:59:59Z",
                  "insight_reports_list": [{"name": "campaign_daily", "level": "campaign", "time_increment_days": 1,
                                            "action_breakdowns": [], "breakdowns": [], "lookback_window": 1}]}
        (folder / "config.json").write_text(json.dumps(config))
        seconds += _run("meltano", ["--config", "config.json", "--discover"], env, folder, folder / "catalog.json",
                        timeout)
        catalog = _select_all(json.loads((folder / "catalog.json").read_text()), {"adsinsights_campaign_daily"})
        (folder / "selected.json").write_text(json.dumps(catalog))
        seconds += _run("meltano", ["--config", "config.json", "--catalog", "selected.json"], env, folder,
                        folder / "read.jsonl", timeout)
        rows += [m["record"] | {"_account": account} for m in _messages(folder / "read.jsonl")
                 if m.get("type") == "RECORD" and m.get("stream", "").startswith("adsinsights_")]
    return seconds, rows


RUNNERS = {"airbyte": run_airbyte, "singer": run_singer, "meltano": run_meltano}


# ---- comparison ------------------------------------------------------------------------------------

def _key_values(row: dict, default_account: str) -> tuple[tuple, tuple]:
    account = str(row.get("account_id") or row.get("_account") or default_account).removeprefix("act_")
    key = (account, str(row.get("campaign_id")), str(row.get("date_start"))[:10])
    values = (int(float(row.get("impressions") or 0)), int(float(row.get("clicks") or 0)),
              Decimal(str(row.get("spend") or 0)))
    return key, values


def compare(peer_rows: list[dict], ours: dict[tuple, tuple], windows: dict[str, tuple[str, str]],
            deleted_campaigns: set[str]) -> dict[str, Any]:
    """Peer rows summed per (account, campaign, date) (ad-level rows add up to the campaign), inside each
    account's window, against our stored documents."""
    per_key: dict[tuple, list] = collections.defaultdict(list)
    for row in peer_rows:
        key, values = _key_values(row, "")
        window = windows.get(key[0])
        if window is None or not window[0] <= key[2] <= window[1]:
            continue
        per_key[key].append((row.get("ad_id") or row.get("adset_id") or "", values))
    duplicates = 0
    theirs: dict[tuple, tuple] = {}
    for key, entries in per_key.items():
        distinct = {}
        for ident, values in entries:  # the same ad (or campaign) twice for one day = a duplicate
            if ident in distinct:
                duplicates += 1
                continue
            distinct[ident] = values
        theirs[key] = tuple(sum(v[i] for v in distinct.values()) for i in range(3))
    missing = set(ours) - set(theirs)
    missing_deleted = {k for k in missing if k[1] in deleted_campaigns}
    extra = set(theirs) - set(ours)
    different = [k for k in set(ours) & set(theirs) if ours[k] != theirs[k]]
    spend = lambda rows, keys: sum((rows[k][2] for k in keys), Decimal(0))  # noqa: E731
    common = set(ours) & set(theirs)
    result = {"rows_raw": len(peer_rows), "rows_in_window": sum(len(v) for v in per_key.values()),
              "campaign_days": len(theirs), "duplicates": duplicates,
              "missing": len(missing), "missing_deleted_or_archived": len(missing_deleted), "extra": len(extra),
              "value_differences": len(different), "equal": len(common) - len(different),
              "spend_ours_common": str(spend(ours, common)), "spend_peer_common": str(spend(theirs, common))}
    reasons = []
    if duplicates:
        reasons.append(f"{duplicates} duplicate rows: {EXPLANATIONS['duplicates']}")
    if missing_deleted:
        reasons.append(f"{len(missing_deleted)} missing: {EXPLANATIONS['missing_deleted']}")
    if len(missing) - len(missing_deleted):
        reasons.append(f"{len(missing) - len(missing_deleted)} {EXPLANATIONS['missing_other']}")
    if extra:
        reasons.append(f"{len(extra)} {EXPLANATIONS['extra']}")
    if different:
        sample = sorted(different)[:3]
        reasons.append(f"{len(different)} {EXPLANATIONS['values']} (e.g. {[(k, ours[k], theirs[k]) for k in sample]})")
    result["differences"] = reasons
    result["agrees"] = not (missing or extra or different)
    return result


def run_peer(name: str, work: Path, graph_url: str, token: str, accounts: list[str], start: dt.date, end: dt.date,
             timeout: float) -> dict[str, Any]:
    """Install (cached) and run one peer once; never raises: failures are returned as ``error``."""
    installed = install(name)
    if not installed["ok"]:
        return {"ok": False, "error": "install failed: " + installed.get("error", "")[-400:]}
    work.mkdir(parents=True, exist_ok=True)
    try:
        seconds, rows = RUNNERS[name](work, _peer_env(graph_url), token, accounts, start, end, timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"did not finish within {timeout:.0f}s"}
    except Exception as exc:  # a peer that cannot run here is reported, not fatal
        return {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[-600:]}"}
    return {"ok": True, "seconds": seconds, "rows": rows, "requirement": PEERS[name][0]}


def measure_p2(campaigns: int, days: int, runs: int = 3, peer_runs: int = 3, timeout: float = 1200,
               peers: list[str] | None = None) -> dict[str, Any]:
    """Our Meta sync (through Dagster, first sync of ``days`` days) and each peer on the same sandbox
    data and window: rows, rows per second, and agreement per campaign and day."""
    from bson import ObjectId

    from benchmarks.harness import Portal, SandboxProcess, Timer, environment, median
    from benchmarks.measures import (connect_one, materialization_metadata, reset_platform_data, sandbox_options)
    from pipelines.sync import sync_window
    from resources.platforms.base import Account
    from resources.repositories import UserRepository
    from resources.settings import get_settings
    from resources.store import ensure_indexes, get_client, get_database

    pid, db_name = "meta", "bench_p2"
    out: dict[str, Any] = {"campaigns": campaigns, "days": days}
    sandbox = SandboxProcess(sandbox_options([pid], campaigns), [pid]).start()
    try:
        with environment({**sandbox.env, "MONGODB_DB": db_name}):
            get_client(get_settings().resolved_mongodb_uri()).drop_database(db_name)
            db = get_database()
            ensure_indexes(db)
            portal = Portal(sandbox).start()
            try:
                conn = connect_one(pid, portal, db_name, "p2")
            finally:
                portal.stop()
            times, rows = [], 0
            for index in range(runs):
                reset_platform_data(db, pid, [conn.user_id])
                with Timer() as t:
                    result = conn.run_sync_job(days)
                times.append(t.seconds)
                rows = int(materialization_metadata(result, f"{pid}_campaigns").get("metric_rows_inserted", 0))
                say(f"P2 ours run {index + 1}/{runs}: {t.seconds:.2f}s, {rows} rows")
            ours_seconds = median(times)
            out["ours"] = {"seconds": ours_seconds, "rows": rows, "rows_per_s": rows / ours_seconds, "runs": times}
            oid = ObjectId(conn.user_id)
            ours = {(d["account_id"], d["campaign_id"], d["date"]): (d["impressions"], d["clicks"], d["spend"].to_decimal())
                    for d in db.meta_campaign_metrics.find({"user_id": oid})}
            deleted = {d["campaign_id"] for d in db.meta_campaigns.find(
                {"user_id": oid, "$or": [{"status": {"$in": ["ARCHIVED", "DELETED"]}},
                                         {"effective_status": {"$in": ["ARCHIVED", "DELETED"]}}]})}
            now = dt.datetime.now(dt.timezone.utc)
            accounts = [Account.from_doc(a) for a in UserRepository(db).connection(oid, pid)["accounts"]]
            windows = {a.id: tuple(d.isoformat() for d in sync_window(a, days, now)) for a in accounts}
            start = min(dt.date.fromisoformat(w[0]) for w in windows.values())
            end = max(dt.date.fromisoformat(w[1]) for w in windows.values())
            token = sandbox.admin(pid, "issue-token", {})["access_token"]
            graph_url = sandbox.env.get("META_GRAPH_URL", f"{sandbox.base_url}/meta/graph")
            out["window"] = {"start": str(start), "end": str(end), "accounts": len(accounts),
                             "deleted_or_archived_campaigns": len(deleted)}
            out["peers"] = {}
            for name in peers or list(PEERS):
                attempts, last = [], None
                for index in range(peer_runs):
                    work = PEERS_DIR / name / "runs" / f"{ObjectId()}"
                    last = run_peer(name, work, graph_url, token, [a.id for a in accounts], start, end, timeout)
                    if not last["ok"]:
                        say(f"P2 {name}: {last['error'][:300]}")
                        break
                    attempts.append(last["seconds"])
                    say(f"P2 {name} run {index + 1}/{peer_runs}: {last['seconds']:.1f}s, {len(last['rows'])} rows")
                    if last["seconds"] * (peer_runs - index - 1) > timeout:
                        say(f"P2 {name}: one run takes {last['seconds']:.0f}s; stopping after {index + 1} runs")
                        break
                if not attempts:
                    out["peers"][name] = {"ok": False, "error": last["error"] if last else "not run"}
                    continue
                comparison = compare(last["rows"], ours, windows, deleted)
                seconds = median(attempts)
                out["peers"][name] = {"ok": True, "requirement": PEERS[name][0], "seconds": seconds,
                                      "runs": attempts, "rows_per_s": comparison["campaign_days"] / seconds,
                                      **comparison}
            fastest = max((p["rows_per_s"] for p in out["peers"].values() if p.get("ok")), default=None)
            out["ratio_vs_fastest_peer"] = out["ours"]["rows_per_s"] / fastest if fastest else None
            conn.instance.dispose()
    finally:
        sandbox.stop()
    return out
