"""The offline sandbox: one process-local server hosting every registered platform's stand-in.

``SandboxServer`` runs one Flask app (werkzeug ``make_server``, threaded, in a daemon thread) on a
loopback port. Each platform sandbox listed in ``sandbox.registry`` adds its routes under
``/<platform>/...`` (OAuth pages, HTTP APIs) and admin knobs under ``/_sandbox/<platform>/...``, and
may start servers of its own (Google: a gRPC server over TLS). ``env`` is what connectors need to talk
to it (endpoints, client ids, certificate path); ``write_env_file`` saves it as ``KEY=VALUE`` lines.

    with SandboxServer(Path("data/sandbox"), seed=7) as server:
        os.environ.update(server.env)
        server.platform("google").inject_fault("INTERNAL")

Console: ``unified-ads sandbox`` (or ``python -m sandbox.server``) → ``main(argv)``.
"""
from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path
from typing import Any

from flask import Flask, jsonify
from werkzeug.serving import WSGIRequestHandler, make_server

from resources import redaction
from sandbox.common import ensure_certificate
from sandbox.registry import sandbox_class, sandbox_ids

log = logging.getLogger(__name__)
redaction.install(__name__)


class _QuietHandler(WSGIRequestHandler):
    """Request handler that logs through ``logging`` at DEBUG instead of printing every request."""

    def log_request(self, code="-", size="-"):
        log.debug("%s %s", self.requestline, code)


class SandboxServer:
    """Every platform sandbox behind one loopback HTTP server.

    Args:
        data_dir: folder for the certificate and generated files (created if missing).
        seed: seed of every platform's data generator (same seed → same accounts, campaigns, metrics).
        host: interface to bind (loopback by default).
        http_port: HTTP port; 0 picks a free one.
        options: per-platform options, ``{"google": {...}}`` (see each platform's sandbox class).
        platforms: subset of registered platform ids to run (default: all).
    """

    def __init__(self, data_dir: Path, seed: int = 7, host: str = "127.0.0.1", http_port: int = 0,
                 options: dict | None = None, platforms: list[str] | None = None):
        self.data_dir = Path(data_dir)
        self.seed = seed
        self.host = host
        self.options = dict(options or {})
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.cert_path, self.key_path = ensure_certificate(self.data_dir)
        self.app = Flask("sandbox")
        self.app.config["JSON_SORT_KEYS"] = False
        self._platforms: dict[str, Any] = {}
        for pid in platforms or sandbox_ids():
            instance = sandbox_class(pid)(self, seed, self.options.get(pid) or {})
            instance.register_routes(self.app)
            self._platforms[pid] = instance
        self.app.add_url_rule("/_sandbox/health", "sandbox_health", self._health)
        self._http = make_server(host, http_port, self.app, threaded=True, request_handler=_QuietHandler)
        self.http_port = self._http.server_port
        self._thread: threading.Thread | None = None
        self._started = False

    # ---- lifecycle -----------------------------------------------------------------------------
    def start(self) -> "SandboxServer":
        """Start the HTTP server thread, then every platform's own servers. Idempotent."""
        if self._started:
            return self
        self._thread = threading.Thread(target=self._http.serve_forever, name="sandbox-http", daemon=True)
        self._thread.start()
        started = []
        try:
            for platform in self._platforms.values():
                platform.start()
                started.append(platform)
        except BaseException:
            for platform in reversed(started):
                platform.stop()
            self._http.shutdown()
            raise
        self._started = True
        return self

    def stop(self) -> None:
        """Stop every platform's servers and the HTTP server. Idempotent."""
        if not self._started:
            return
        for platform in reversed(list(self._platforms.values())):
            try:
                platform.stop()
            except Exception:  # pragma: no cover - best effort on shutdown
                log.exception("stopping sandbox platform failed")
        self._http.shutdown()
        self._http.server_close()
        if self._thread:
            self._thread.join(timeout=5)
        self._started = False

    def __enter__(self) -> "SandboxServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- accessors -----------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT`` (no trailing slash)."""
        return f"http://{self.host}:{self.http_port}"

    @property
    def env(self) -> dict[str, str]:
        """Environment variables the connectors read, merged over every platform."""
        values: dict[str, str] = {}
        for platform in self._platforms.values():
            values.update({k: str(v) for k, v in platform.env().items()})
        return values

    def platform(self, platform_id: str):
        """The per-platform sandbox object (KeyError when not running)."""
        return self._platforms[platform_id]

    @property
    def platforms(self) -> dict[str, Any]:
        return dict(self._platforms)

    def write_env_file(self, path: Path) -> Path:
        """Write ``env`` as ``KEY=VALUE`` lines (mode 0600: it holds the sandbox client secrets)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        body = "".join(f"{k}={v}\n" for k, v in sorted(self.env.items()))
        path.write_text("# generated by the Unified Ads sandbox; endpoints change on every start\n" + body)
        path.chmod(0o600)
        return path

    def _health(self):
        return jsonify({"status": "ok", "platforms": list(self._platforms)})


def main(argv: list[str] | None = None) -> int:
    """Run the sandbox in the foreground until Ctrl-C (console: ``unified-ads sandbox``).

    Writes ``<data_dir>/sandbox.env`` (point ``UA_ENV_FILE`` at it, or source it) and prints the URLs;
    the certificate lives in ``<data_dir>/sandbox/`` (the same place ``unified-ads demo`` uses).
    """
    parser = argparse.ArgumentParser(prog="unified-ads sandbox", description=main.__doc__)
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="folder for the certificate and sandbox.env (default: DATA_DIR, i.e. ./data)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="HTTP port (0 = any free port)")
    parser.add_argument("--campaigns-per-client", type=int, default=None,
                        help="Google campaigns per client customer (default 50)")
    args = parser.parse_args(argv)
    data_dir = args.data_dir
    if data_dir is None:
        from resources.settings import get_settings
        data_dir = get_settings().data_dir
    options: dict[str, dict] = {}
    if args.campaigns_per_client:
        options["google"] = {"campaigns_per_client": args.campaigns_per_client}
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = SandboxServer(Path(data_dir) / "sandbox", seed=args.seed, host=args.host, http_port=args.port, options=options)
    stop = threading.Event()
    server.start()
    try:
        env_path = server.write_env_file(Path(data_dir) / "sandbox.env")
        print(f"sandbox HTTP   {server.base_url}")
        for key, value in sorted(server.env.items()):
            if key.endswith(("_URL", "_ENDPOINT", "_FILE")):
                print(f"  {key}={value}")
        print(f"env file       {env_path}  (export UA_ENV_FILE={env_path})")
        print("Ctrl-C to stop", flush=True)
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                signal.signal(sig, lambda *_: stop.set())
            except ValueError:  # not the main thread
                pass
        stop.wait()
    finally:
        server.stop()
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
