"""What every measure needs: its own store, a sandbox in a child process, connected users, a Dagster
instance, timing helpers and the machine's facts.

Nothing here contacts a real platform host: the sandbox is on loopback, and ``HTTP(S)_PROXY`` point
at a closed local port (``NO_PROXY`` = loopback) for this process and every child, so a stray
outside call fails instead of leaving the machine.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform as py_platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from resources.settings import PROJECT_ROOT, get_settings

BENCH_DIR = PROJECT_ROOT / "data" / "bench"
RUNS = 3

#: the environment as it was when the benchmark modules were first imported (before ``OFFLINE_ENV``)
STARTUP_ENV = dict(os.environ)
#: outside hosts are unreachable for the benchmark and everything it starts
OFFLINE_ENV = {"HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
               "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
               "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}


def say(message: str) -> None:
    print(f"[bench {dt.datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


# ---- timing ------------------------------------------------------------------------------------

def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


class Timer:
    """``with Timer() as t: ...`` then ``t.seconds`` (wall clock, monotonic)."""

    def __enter__(self) -> "Timer":
        self.started = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.started


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def rss_mb() -> float:
    """Current resident set size of this process, MB."""
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    """Peak resident set size of this process since it started (``VmHWM``), MB."""
    return _status_mb("VmHWM")


# ---- machine facts ---------------------------------------------------------------------------------

def machine_facts() -> dict[str, Any]:
    memory_kb = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_kb = int(line.split()[1])
    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    versions = {}
    for dist in ("dagster", "pymongo", "google-ads", "grpcio", "facebook-business", "protobuf"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[dist] = metadata.version(dist)
    java = ""
    with contextlib.suppress(Exception):
        java = subprocess.run(["java", "-version"], capture_output=True, text=True, timeout=30).stderr.splitlines()[0]
    commit = ""
    with contextlib.suppress(Exception):
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT_ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip()
    load = os.getloadavg() if hasattr(os, "getloadavg") else ()
    return {"cores": os.cpu_count(), "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "cpu_model": cpu_model, "memory_gb": round(memory_kb / 1024 / 1024, 1), "python": py_platform.python_version(),
            "os": f"{py_platform.system()} {py_platform.release()}", "java": java, "versions": versions,
            "git_commit": commit, "load_average_at_start": [round(x, 2) for x in load]}


# ---- store -----------------------------------------------------------------------------------------

class Store:
    """The benchmark's store: ``MONGODB_URI`` when set (any MongoDB), else a fresh embedded
    mongo-java-server with its H2 file under ``data/bench/store`` (deleted first)."""

    def __init__(self, bench_dir: Path = BENCH_DIR):
        self.bench_dir = bench_dir
        self.embedded = None
        self.uri = ""
        self.kind = ""

    def start(self) -> str:
        if os.environ.get("MONGODB_URI"):
            self.uri, self.kind = os.environ["MONGODB_URI"], "MongoDB at MONGODB_URI"
            return self.uri
        from resources.store.embedded import EmbeddedStore, ensure_jars

        jar_dir = ensure_jars(PROJECT_ROOT / "data" / "store" / "jars")  # shared cache, fetched once
        link = self.bench_dir / "store" / "jars"
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(jar_dir)
        db_file = self.bench_dir / "store" / "bench.mv"
        for stale in self.bench_dir.glob("store/bench.mv*"):
            stale.unlink()
        self.embedded = EmbeddedStore(self.bench_dir, db_file=db_file, log=lambda m: say(m.strip()))
        self.uri = self.embedded.start()
        self.kind = "embedded mongo-java-server 1.47.0 (H2 file)"
        return self.uri

    def stop(self) -> None:
        if self.embedded is not None:
            self.embedded.stop()
            self.embedded = None


# ---- sandbox in a child process -------------------------------------------------------------------

class SandboxProcess:
    """``sandbox.server.SandboxServer`` in a child process (see ``benchmarks.sandbox_proc``)."""

    def __init__(self, options: dict | None = None, platforms: list[str] | None = None, seed: int = 7,
                 data_dir: Path = BENCH_DIR / "sandbox"):
        self.spec = {"data_dir": str(data_dir), "seed": seed, "options": options or {}, "platforms": platforms}
        self.process: subprocess.Popen | None = None
        self.env: dict[str, str] = {}
        self.base_url = ""
        self.connect_form_values: dict[str, dict] = {}

    def start(self, timeout: float = 120) -> "SandboxProcess":
        self.process = subprocess.Popen([sys.executable, "-m", "benchmarks.sandbox_proc", json.dumps(self.spec)],
                                        cwd=PROJECT_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        env={**os.environ, **OFFLINE_ENV}, text=True, start_new_session=True)
        deadline = time.monotonic() + timeout
        line = ""
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line or line.startswith("READY "):
                break
        if not line.startswith("READY "):
            self.stop()
            raise RuntimeError("the sandbox child process did not start")
        info = json.loads(line[len("READY "):])
        self.env, self.base_url = info["env"], info["base_url"]
        self.connect_form_values = info.get("connect_form_values") or {}
        return self

    def stop(self) -> None:
        proc, self.process = self.process, None
        if proc is None:
            return
        with contextlib.suppress(Exception):
            proc.stdin.close()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.terminate()
            proc.wait(timeout=10)

    def admin(self, platform_id: str, path: str, body: dict | None = None) -> dict:
        import requests

        url = f"{self.base_url}/_sandbox/{platform_id}/{path}"
        answer = requests.post(url, json=body or {}, timeout=30) if body is not None else requests.get(url, timeout=30)
        answer.raise_for_status()
        return answer.json()


class SandboxGroup:
    """One sandbox child process per platform (each with its own interpreter, so the platforms' stand-ins
    do not share one GIL), seen as one: merged ``env`` and ``connect_form_values``."""

    def __init__(self, options: dict | None = None, platforms: list[str] | None = None, seed: int = 7):
        self.members = {pid: SandboxProcess({pid: (options or {}).get(pid) or {}}, [pid], seed=seed)
                        for pid in platforms or []}
        self.env: dict[str, str] = {}
        self.connect_form_values: dict[str, dict] = {}

    def start(self) -> "SandboxGroup":
        try:
            for member in self.members.values():
                member.start()
                self.env.update(member.env)
                self.connect_form_values.update(member.connect_form_values)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for member in self.members.values():
            member.stop()

    def admin(self, platform_id: str, path: str, body: dict | None = None) -> dict:
        return self.members[platform_id].admin(platform_id, path, body)


@contextlib.contextmanager
def environment(values: dict[str, str]):
    """Put ``values`` in ``os.environ`` (and refresh the cached settings) for the block."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    get_settings.cache_clear()
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        get_settings.cache_clear()


# ---- connected users through the real portal ------------------------------------------------------

class Portal:
    """The real portal served on loopback; users sign up and connect through the sandbox consent pages
    exactly as ``make demo-once`` does (authlib, PKCE, encrypted tokens, account listing).

    Build it after the sandbox's environment is in place: the connectors read their endpoints when
    the app is created. bcrypt cost and the sign-up rate limit are lowered (setup, not measured).
    """

    def __init__(self, sandbox: "SandboxProcess | SandboxGroup | None" = None):
        self.url = ""
        self._server = None
        self._env = None
        self.forms = sandbox.connect_form_values if sandbox is not None else {}

    def start(self) -> "Portal":
        from werkzeug.serving import make_server

        from oauth_portal import create_app
        from resources.store.embedded import free_port

        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self._env = environment({"PORTAL_BASE_URL": self.url})
        self._env.__enter__()
        app = create_app({"BCRYPT_ROUNDS": 4, "SIGNUP_RATE_LIMIT": "100000 per minute",
                          "LOGIN_RATE_LIMIT": "100000 per minute", "RATELIMIT_ENABLED": False})
        self._server = make_server("127.0.0.1", port, app, threaded=True)
        threading.Thread(target=self._server.serve_forever, daemon=True, name="bench-portal").start()
        return self

    def connect_user(self, email: str, platform_ids: list[str]) -> str:
        """Sign a user up and connect every platform in ``platform_ids``; returns the user id (hex)."""
        from resources.repositories import UserRepository
        from resources.store import get_database
        from sandbox.demo import connect_platform, signup_and_login
        from sandbox.walk import Walker

        walker = Walker()
        signup_and_login(walker, self.url, email, "bench-password-" + uuid.uuid4().hex[:12])
        for pid in platform_ids:
            connect_platform(walker, self.url, pid, self.forms.get(pid) or {})
        return str(UserRepository(get_database()).find_by_email(email)["_id"])

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._env is not None:
            self._env.__exit__(None, None, None)
            self._env = None


# ---- Dagster instance --------------------------------------------------------------------------------

def dagster_instance(name: str):
    """A persistent (SQLite) Dagster instance in a fresh folder under ``data/bench/dagster``: the event
    log, runs and partitions are written to disk as in a deployment."""
    from dagster import DagsterInstance

    home = BENCH_DIR / "dagster" / f"{name}-{uuid.uuid4().hex[:6]}"
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    return DagsterInstance.local_temp(tempdir=str(home))


def clean_dagster_dirs() -> None:
    shutil.rmtree(BENCH_DIR / "dagster", ignore_errors=True)
