"""``make demo`` and ``make demo-once``: the whole product on one machine, offline.

``run_demo(once=False)`` starts the embedded store (unless ``MONGODB_URI`` is set), the sandbox, the
portal and ``dagster dev`` (webserver + daemon), creates a demo user and prints URLs and credentials;
Ctrl-C stops everything.

``run_demo(once=True)`` is the headless end-to-end check: it signs a new user up over HTTP, walks every
registered platform's OAuth consent over HTTP, lets the connections sensor add the partitions, runs each
platform's sync job through Dagster (instance under ``data/dagster_home``, so the runs show in the UI
later), prints accounts / campaigns / metric rows / spend (ad platforms) or orders and revenue (shops)
per currency and the shared campaign names joining spend to sales, and exits 0 only when the store
equals the sandbox truth for every campaign and day.
"""
from __future__ import annotations

import datetime as dt
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from decimal import Decimal
from pathlib import Path

from resources.money import format_amount
from resources.settings import PROJECT_ROOT, ConfigurationError, get_settings

DEMO_EMAIL = "demo@example.com"
DEMO_PASSWORD = "demo-password-2026"

DAGSTER_YAML = """\
# Written by `make demo`. Dagster's own storage is SQLite under this folder.
telemetry:
  enabled: false
concurrency:
  pools:
    default_limit: 2
run_monitoring:
  enabled: true
  # a run whose process was killed never gives back its pool slots itself: the daemon frees them this
  # long after the run is marked ended, so later runs of that platform do not queue forever
  free_slots_after_run_end_seconds: 15
"""


def _say(message: str) -> None:
    print(message, flush=True)


class Services:
    """Store + sandbox + portal started in this process (threads/children), stopped together."""

    def __init__(self, data_dir: Path, portal_port: int):
        self.data_dir = data_dir
        self.portal_port = portal_port
        self.store = None
        self.sandbox = None
        self.portal_server = None
        self.env: dict[str, str] = {}

    def start(self) -> dict[str, str]:
        from resources.store.embedded import EmbeddedStore
        from sandbox.server import SandboxServer

        settings = get_settings()
        env: dict[str, str] = {}
        if settings.mongodb_uri:
            _say("[store] using MONGODB_URI")
        else:
            self.store = EmbeddedStore(self.data_dir, publish=True, log=_say,
                                       cache_mb=settings.embedded_store_cache_mb)
            env["MONGODB_URI"] = self.store.start()
        self.sandbox = SandboxServer(self.data_dir / "sandbox")
        self.sandbox.start()
        env.update(self.sandbox.env)
        self.sandbox.write_env_file(self.data_dir / "sandbox.env")
        env["PORTAL_BASE_URL"] = f"http://127.0.0.1:{self.portal_port}"
        env["DATA_DIR"] = str(self.data_dir)
        os.environ.update(env)
        get_settings.cache_clear()
        self.env = env
        _say(f"[sandbox] {self.sandbox.base_url} (endpoints written to {self.data_dir / 'sandbox.env'})")
        self._start_portal()
        return env

    def _start_portal(self) -> None:
        from werkzeug.serving import make_server

        from oauth_portal import create_app

        app = create_app()
        self.portal_server = make_server("127.0.0.1", self.portal_port, app, threaded=True)
        threading.Thread(target=self.portal_server.serve_forever, daemon=True, name="portal").start()
        _say(f"[portal] {self.env['PORTAL_BASE_URL']}")

    def stop(self) -> None:
        if self.portal_server is not None:
            self.portal_server.shutdown()
        if self.sandbox is not None:
            self.sandbox.stop()
        if self.store is not None:
            self.store.stop()


def _dagster_home(data_dir: Path) -> Path:
    home = data_dir / "dagster_home"
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text(DAGSTER_YAML)
    return home


def _port_free(port: int) -> bool:
    """True when nothing listens on 127.0.0.1:``port`` (so our server can bind it)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def run_demo(once: bool = False, portal_port: int = 5000, dagster_port: int = 3000,
             dagster_log_level: str = "warning") -> int:
    """Entry point of ``unified-ads demo``; returns the process exit code. Ctrl-C or SIGTERM stops
    every service it started (store, sandbox, portal, ``dagster dev``). ``dagster_log_level`` is passed
    to ``dagster dev --log-level`` (its default, ``info``, prints a line per sensor tick)."""
    signal.signal(signal.SIGINT, _interrupt)  # also when started in the background with SIGINT ignored
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)  # the terminal closed or the ssh session dropped
    settings = get_settings()
    data_dir = settings.ensure_data_dir().resolve()
    busy = [f"{what} port {port} is in use (choose another with {flag})"
            for what, port, flag in (("portal", portal_port, "--portal-port"),
                                     ("Dagster UI", None if once else dagster_port, "--dagster-port"))
            if port is not None and not _port_free(port)]
    if busy:
        print("error: " + "; ".join(busy), file=sys.stderr)
        return 2
    try:  # a bad token key stops the demo before anything starts (one line, no traceback)
        from resources.crypto import TokenCipher

        TokenCipher.from_settings(settings.model_copy(update={"data_dir": data_dir}))
    except ConfigurationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    os.environ["DAGSTER_HOME"] = str(_dagster_home(data_dir))
    services = Services(data_dir, portal_port)
    try:
        services.start()
        from resources.store import check_store, get_database

        check_store(get_database())
    except (ConfigurationError, OSError) as exc:
        services.stop()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        if once:
            return run_once(services)
        return run_interactive(services, dagster_port, dagster_log_level)
    finally:
        services.stop()


def _stop_when_parent_dies(parent_pid: int):
    """A ``preexec_fn`` asking Linux to send the child SIGINT (what our clean stop sends) when the demo
    process dies without cleaning up (SIGKILL, a crash), so ``dagster dev`` and its daemon do not outlive
    it. Without ``prctl`` (not Linux) it returns None. libc is loaded here, in the parent: between fork
    and exec the child only makes system calls (the demo has threads running)."""
    try:
        import ctypes

        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig, sigint = 1, int(signal.SIGINT)

    def arrange() -> None:
        prctl(pr_set_pdeathsig, sigint)
        if os.getppid() != parent_pid:  # the demo died before prctl took effect
            os.kill(os.getpid(), sigint)
    return arrange


def run_interactive(services: Services, dagster_port: int, log_level: str = "warning") -> int:
    """Demo user + ``dagster dev``; blocks until Ctrl-C."""
    from resources.store import ensure_indexes, get_database

    db = get_database()
    ensure_indexes(db)
    _ensure_demo_user(db)
    env = {**os.environ, **services.env}
    venv_bin = Path(sys.executable).parent
    dagster = venv_bin / "dagster" if (venv_bin / "dagster").exists() else "dagster"
    proc = subprocess.Popen(  # its own session: Ctrl-C reaches it only through our clean stop below
        [str(dagster), "dev", "-w", str(PROJECT_ROOT / "workspace.yaml"), "-h", "127.0.0.1", "-p", str(dagster_port),
         "--log-level", log_level],
        cwd=PROJECT_ROOT, env=env, start_new_session=True, preexec_fn=_stop_when_parent_dies(os.getpid()),
    )
    portal = services.env["PORTAL_BASE_URL"]
    _say("")
    _say("=" * 72)
    _say(f"  Portal      {portal}   log in as {DEMO_EMAIL} / {DEMO_PASSWORD} (or sign up)")
    _say(f"  Dagster UI  http://127.0.0.1:{dagster_port}   (daemon included: sensors + schedules run)")
    _say(f"  Sandbox     {services.sandbox.base_url}   (offline Google/Meta/Shopify stand-ins)")
    _say(f"  Store       {os.environ.get('MONGODB_URI', '')}   database {get_settings().mongodb_db}")
    _say("  Connect a platform in the portal; the connections sensor starts the first sync within ~15 s.")
    _say(f"  Ctrl-C stops everything.  (Dagster's own log lines here: {log_level} and above; "
         "--dagster-log-level info shows more)")
    _say("=" * 72)
    try:
        while proc.poll() is None:
            time.sleep(1)
        _say(f"dagster dev exited with {proc.returncode}")
        return proc.returncode or 1
    except KeyboardInterrupt:
        _say("stopping…")
        return 0
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        if proc.poll() is None:
            _say("stopping dagster dev (up to 30 s)…")
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def _ensure_demo_user(db) -> None:
    import bcrypt

    from resources.repositories import UserRepository

    users = UserRepository(db)
    if users.find_by_email(DEMO_EMAIL) is None:
        users.create(DEMO_EMAIL, bcrypt.hashpw(DEMO_PASSWORD.encode(), bcrypt.gensalt()).decode())


# ---- headless end-to-end check -----------------------------------------------------------------
def signup_and_login(walker, portal: str, email: str, password: str) -> None:
    """Sign a user up through the portal's form (which logs them in)."""
    page = walker.get(f"{portal}/signup")
    form = walker.form(page, action_contains="/signup")
    fields = {name: password for name in form.fields if "password" in name}
    fields["email"] = email
    response = walker.submit(form, fields)
    if response.status_code != 200 or "/signup" in response.url:
        raise RuntimeError(f"sign-up failed: HTTP {response.status_code} at {response.url}")


def connect_platform(walker, portal: str, platform_id: str, form_values: dict[str, str] | None = None):
    """Press "Connect" for a platform, then "Allow" on the sandbox consent page; returns the final page."""
    page = walker.get(f"{portal}/connections")
    form = walker.form(page, action_contains=f"/connections/{platform_id}/connect")
    consent = walker.submit(form, form_values or {})
    if consent.url.startswith(portal):
        raise RuntimeError(f"connect {platform_id}: expected the sandbox consent page, got {consent.url} "
                           f"(HTTP {consent.status_code})")
    allow = walker.form(consent, button="allow")
    final = walker.submit(allow, button="allow")
    if final.status_code != 200 or not final.url.startswith(portal):
        raise RuntimeError(f"connect {platform_id}: callback failed with HTTP {final.status_code} at {final.url}")
    return final


def run_once(services: Services) -> int:
    from dagster import DagsterInstance, build_sensor_context

    from pipelines.definitions import PLATFORMS, defs
    from resources.repositories import UserRepository
    from resources.store import get_database
    from sandbox.walk import Walker

    portal = services.env["PORTAL_BASE_URL"]
    db = get_database()
    email = f"demo-once-{dt.datetime.now(dt.timezone.utc):%Y%m%d%H%M%S}-{secrets.token_hex(3)}@example.com"
    password = secrets.token_urlsafe(16)
    walker = Walker()
    _say(f"[1/4] signing up {email} through the portal")
    signup_and_login(walker, portal, email, password)
    user = UserRepository(db).find_by_email(email)
    user_id = str(user["_id"])

    platform_ids = [pid for pid in PLATFORMS if pid in services.sandbox.platforms]
    for pid in platform_ids:
        _say(f"[2/4] connecting {pid} through the sandbox consent page")
        connect_platform(walker, portal, pid, services.sandbox.platform(pid).connect_form_values())

    _say("[3/4] running the connections sensor and the sync jobs through Dagster")
    instance = DagsterInstance.get()
    failures = 0
    for pid in platform_ids:
        platform = PLATFORMS[pid]
        sensor = defs.resolve_sensor_def(f"{pid}_connections_sensor")
        with build_sensor_context(instance_ref=instance.get_ref(), definitions=defs, resources={"store": defs.resources["store"]}) as ctx:
            result = sensor.evaluate_tick(ctx)
        for request in result.dynamic_partitions_requests or []:
            if hasattr(request, "partition_keys") and type(request).__name__.startswith("Add"):
                instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
        if user_id not in instance.get_dynamic_partitions(platform.partitions.name):
            _say(f"  {pid}: the sensor did not add partition {user_id}")
            failures += 1
            continue
        job = defs.resolve_job_def(platform.sync_job.name)
        started = time.monotonic()
        outcome = job.execute_in_process(instance=instance, partition_key=user_id, raise_on_error=False,
                                         tags={"trigger": "demo-once"},
                                         run_config={"loggers": {"console": {"config": {"log_level": "INFO"}}}})
        _say(f"  {pid}: run {outcome.run_id[:8]} {'succeeded' if outcome.success else 'FAILED'} "
             f"in {time.monotonic() - started:.1f}s")
        failures += 0 if outcome.success else 1

    _say("[4/4] comparing the store with the sandbox truth")
    ok = failures == 0
    for pid in platform_ids:
        ok &= _report_and_verify(db, services.sandbox.platform(pid), pid, user["_id"])
    _report_join(db, platform_ids, user["_id"])
    _say("demo-once: " + ("OK — the store equals the sandbox truth" if ok else "FAILED"))
    return 0 if ok else 1


#: metric fields compared with the truth and summed in the report, when a platform's documents have them
_COMPARED_FIELDS = ("impressions", "clicks", "spend", "orders", "revenue")


def _plain(value):
    """A stored value as the truth has it (Decimal128 → Decimal)."""
    return value.to_decimal() if hasattr(value, "to_decimal") else value


def _report_and_verify(db, platform_sandbox, platform_id: str, user_id) -> bool:
    """Print one platform's accounts (campaigns, metric rows, spend and/or orders + revenue, dates) and
    compare every stored metric row and campaign id with the sandbox truth. The compared metric fields
    are those of ``_COMPARED_FIELDS`` the platform's truth documents carry (ad platforms: impressions,
    clicks, spend; Shopify: orders, revenue)."""
    from resources.store import campaigns_collection, metrics_collection

    campaigns = list(db[campaigns_collection(platform_id)].find({"user_id": user_id}))
    metrics = db[metrics_collection(platform_id)]
    rows = defaultdict(lambda: {"campaigns": 0, "metric_rows": 0, "spend": Decimal(0), "orders": 0,
                                "revenue": Decimal(0), "currency": "", "dates": set()})
    stored: dict[tuple, dict] = {}
    present: set[str] = set()
    for doc in metrics.find({"user_id": user_id}):
        row = rows[doc["account_id"]]
        row["metric_rows"] += 1
        values = {field: _plain(doc[field]) for field in _COMPARED_FIELDS if field in doc}
        present.update(values)
        row["spend"] += values.get("spend") or Decimal(0)
        row["orders"] += values.get("orders") or 0
        row["revenue"] += values.get("revenue") or Decimal(0)
        row["currency"] = doc["currency"]
        row["dates"].add(doc["date"])
        stored[(doc["account_id"], doc["campaign_id"], doc["date"])] = values
    for doc in campaigns:
        rows[doc["account_id"]]["campaigns"] += 1
        rows[doc["account_id"]]["currency"] = doc.get("currency", rows[doc["account_id"]]["currency"])
    sales = "revenue" in present
    money = "revenue" if sales else "spend"
    width = max([14] + [len(a) + 2 for a in rows])
    _say(f"  {platform_id}:")
    _say(f"    {'account':<{width}}{'currency':<10}{'campaigns':>10}{'metric rows':>13}"
         + (f"{'orders':>9}" if sales else "") + f"{money:>16}  dates")
    per_currency: dict[str, Decimal] = defaultdict(Decimal)
    ok = True
    for account_id, row in sorted(rows.items()):
        dates = sorted(row["dates"])
        span = f"{dates[0]}..{dates[-1]}" if dates else "-"
        _say(f"    {account_id:<{width}}{row['currency']:<10}{row['campaigns']:>10}{row['metric_rows']:>13}"
             + (f"{row['orders']:>9}" if sales else "") + f"{format_amount(row[money], row['currency']):>16}  {span}")
        per_currency[row["currency"]] += row[money]
        if not dates:
            continue
        start, end = dt.date.fromisoformat(dates[0]), dt.date.fromisoformat(dates[-1])
        expected, fields = {}, set()
        for m in platform_sandbox.expected_metrics(account_id, start, end):
            values = {f: m[f] for f in _COMPARED_FIELDS if f in m}
            fields.update(values)
            expected[(account_id, m["campaign_id"], m["date"])] = values
        actual = {k: {f: v.get(f) for f in fields} for k, v in stored.items() if k[0] == account_id}
        if expected != actual:
            ok = False
            missing = len(set(expected) - set(actual))
            extra = len(set(actual) - set(expected))
            differ = sum(1 for k in set(expected) & set(actual) if expected[k] != actual[k])
            _say(f"    MISMATCH in {account_id}: {missing} missing, {extra} unexpected, {differ} different rows")
        truth_campaigns = {c["campaign_id"] for c in platform_sandbox.expected_campaigns(account_id)}
        got_campaigns = {c["campaign_id"] for c in campaigns if c["account_id"] == account_id}
        if truth_campaigns != got_campaigns:
            ok = False
            _say(f"    MISMATCH in {account_id}: campaigns {len(got_campaigns)} stored vs {len(truth_campaigns)} in truth")
    for currency, total in sorted(per_currency.items()):
        _say(f"    total {money} {currency}: {format_amount(total, currency)}")
    return ok


def _report_join(db, platform_ids: list[str], user_id) -> None:
    """Print ad spend beside shop sales for the campaign names the sandboxes share
    (``sandbox.common.SHARED_CAMPAIGN_NAMES``): ad campaigns match by ``name``, shop campaigns by
    ``utm_campaign``. Amounts stay in their own currencies (no conversion)."""
    from resources.store import campaigns_collection, metrics_collection
    from sandbox.common import SHARED_CAMPAIGN_NAMES

    shared = set(SHARED_CAMPAIGN_NAMES)
    lines: dict[str, list[str]] = defaultdict(list)
    for pid in platform_ids:
        by_campaign: dict[tuple[str, str], str] = {}
        for doc in db[campaigns_collection(pid)].find({"user_id": user_id}):
            key = doc.get("utm_campaign") or doc.get("name")
            if key in shared:
                by_campaign[(doc["account_id"], doc["campaign_id"])] = key
        if not by_campaign:
            continue
        totals: dict[tuple[str, str], dict] = defaultdict(lambda: {"spend": Decimal(0), "orders": 0,
                                                                    "revenue": Decimal(0), "sales": False})
        for doc in db[metrics_collection(pid)].find({"user_id": user_id}):
            name = by_campaign.get((doc["account_id"], doc["campaign_id"]))
            if name is None:
                continue
            entry = totals[(name, doc["currency"])]
            entry["spend"] += _plain(doc.get("spend")) or Decimal(0)
            if "revenue" in doc:
                entry["sales"] = True
                entry["orders"] += doc.get("orders") or 0
                entry["revenue"] += _plain(doc["revenue"]) or Decimal(0)
        for (name, currency), entry in sorted(totals.items()):
            if entry["sales"]:
                lines[name].append(f"{pid} {entry['orders']} orders {format_amount(entry['revenue'], currency)} {currency}")
            else:
                lines[name].append(f"{pid} spend {format_amount(entry['spend'], currency)} {currency}")
    joined = {name: parts for name, parts in lines.items() if len({p.split()[0] for p in parts}) > 1}
    if not joined:
        return
    _say("  joined by campaign name (ad spend beside shop sales, each in its own currency):")
    for name in sorted(joined):
        _say(f"    {name:<22}" + " | ".join(joined[name]))
