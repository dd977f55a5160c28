""""Sync now" requests as the user sees them: waiting, queued, running, done, or failed in plain words.

The portal writes ``sync_requests`` documents (``status: requested``); Dagster's
``sync_requests_sensor`` launches the run and sets ``queued``, and the run-status sensors set
``running`` / ``success`` / ``failed`` (with ``error`` and Dagster's ``failure_reason``) /
``cancelled`` (the run was terminated or removed from the queue in Dagster), with ``run_id``. A run
whose process was killed ends as ``failed`` (Dagster marks it so); the page then says the sync was
interrupted and to try again. The portal reads them back here;
``static/sync-status.js`` polls ``/sync/status`` (JSON) while one is pending, with backoff, and stops
when none is.
"""
from __future__ import annotations

import datetime as dt
import re
from typing import Any

from bson import ObjectId
from pymongo.database import Database

from resources.wording import count_of

#: statuses of a request that has not finished yet
PENDING = ("requested", "queued", "running")

_LABELS = {"requested": "Waiting to start", "queued": "Queued", "running": "Running", "success": "Done",
           "failed": "Failed", "cancelled": "Cancelled", "stale": "No news"}

#: Dagster failure reasons of a run that was stopped from outside rather than by an error of the sync
_INTERRUPTED_REASONS = frozenset({"UNEXPECTED_TERMINATION", "START_TIMEOUT", "RUN_WORKER_RESTART"})
#: Dagster's own messages for a run failed from outside (its process died, run monitoring, timeouts)
_INTERRUPTED_MESSAGES = re.compile(
    r"marked as failed from outside the execution context|Detected run worker status|"
    r"Run execution process for .* (?:exited|was terminated)|forcibly marked as failed|"
    r"taking longer than .* seconds to start|Exceeded maximum runtime|Execution was interrupted", re.I)


def latest_requests(db: Database, user_id: ObjectId, platform_ids: list[str]) -> dict[str, dict[str, Any]]:
    """The newest ``sync_requests`` document of each platform for the user (platforms without one are absent)."""
    latest: dict[str, dict[str, Any]] = {}
    for platform_id in platform_ids:
        doc = db.sync_requests.find_one({"user_id": user_id, "platform": platform_id},
                                        sort=[("requested_at", -1)])
        if doc:
            latest[platform_id] = doc
    return latest


def is_stale(doc: dict[str, Any], now: dt.datetime, stale_seconds: float) -> bool:
    """True for a request still pending after ``stale_seconds`` (e.g. no Dagster daemon evaluated the
    run-status sensors that end it)."""
    moment = doc.get("started_at") or doc.get("queued_at") or doc.get("requested_at")
    return bool(doc.get("status") in PENDING and moment and (now - moment).total_seconds() > stale_seconds)


def plain_error(doc: dict[str, Any], connection: dict[str, Any] | None, platform_name: str) -> str:
    """The failure of a request in plain words.

    A run stopped from outside (its process killed, a start or run timeout) says so and asks to try
    again. Otherwise the connection's own record (written by the sync itself: a revoked grant, a rate
    limit, a platform error) is preferred over Dagster's run-level message, which only names the failed
    steps.
    """
    error = str(doc.get("error") or "").strip()
    if error == "not connected":
        return f"{platform_name} was no longer connected when the sync was about to start. Connect it again, then sync."
    if connection and connection.get("status") == "needs_reauth":
        return f"{platform_name} no longer accepts the saved authorization. Reconnect {platform_name}, then sync again."
    if doc.get("failure_reason") in _INTERRUPTED_REASONS or _INTERRUPTED_MESSAGES.search(error):
        return (f"The {platform_name} sync was interrupted before it finished (its run stopped in Dagster). "
                "Nothing already saved was lost; press Sync now to try again.")
    sync = (connection or {}).get("sync") or {}
    requested = doc.get("requested_at")  # (the sensors stamp started_at later than the run itself)
    recorded = sync.get("last_run_at")
    if sync.get("last_error") and recorded and requested and recorded >= requested:
        return f"{platform_name} sync failed: {sync['last_error']}"
    if not error or re.match(r"^Execution of run for .* failed", error) or "Steps failed" in error:
        return (f"The {platform_name} sync stopped with an error. Nothing already saved was lost; "
                "the next scheduled sync tries again, or press Sync now.")
    return f"{platform_name} sync failed: {error}"


def describe(doc: dict[str, Any] | None, connection: dict[str, Any] | None, platform_name: str,
             now: dt.datetime, stale_seconds: float) -> dict[str, Any] | None:
    """What the page and the JSON endpoint show for one platform's newest request (None without one).

    Returns:
        ``{state, label, message, pending, requested_at, finished_at}`` with ISO-8601 UTC times;
        ``state`` is one of requested, queued, running, success, failed, cancelled, stale.
    """
    if doc is None:
        return None
    state = str(doc.get("status") or "requested")
    if state not in _LABELS:
        state = "failed"
    if is_stale(doc, now, stale_seconds):
        state = "stale"
    rows = ((connection or {}).get("sync") or {}).get("rows") or {}
    if state == "requested":
        message = f"Sync of {platform_name} requested; it starts within a few seconds."
    elif state == "queued":
        message = f"Sync of {platform_name} is queued."
    elif state == "running":
        message = f"Sync of {platform_name} is running."
    elif state == "success":
        counted = ", ".join(count_of(v, {"campaigns": "campaign", "metric_rows": "metric row"}[k])
                            for k, v in rows.items() if k in ("campaigns", "metric_rows") and isinstance(v, int))
        message = f"Sync of {platform_name} finished." + (f" {counted}." if counted else "")
    elif state == "cancelled":
        message = (f"The {platform_name} sync was cancelled in Dagster before it finished. Nothing already saved "
                   "was lost; press Sync now to try again.")
    elif state == "stale":
        message = (f"The {platform_name} sync requested at {_hm(doc.get('requested_at'))} has not reported back. "
                   "You can ask again.")
    else:
        message = plain_error(doc, connection, platform_name)
    return {"state": state, "label": _LABELS[state], "message": message, "pending": state in PENDING,
            "requested_at": _iso(doc.get("requested_at")), "finished_at": _iso(doc.get("finished_at"))}


def _iso(moment: dt.datetime | None) -> str | None:
    return moment.astimezone(dt.timezone.utc).isoformat(timespec="seconds") if moment else None


def _hm(moment: dt.datetime | None) -> str:
    return moment.astimezone(dt.timezone.utc).strftime("%H:%M UTC") if moment else "?"
