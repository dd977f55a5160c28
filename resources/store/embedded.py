"""The embedded MongoDB-wire store: mongo-java-server 1.47.0 with its H2 file backend.

Used when ``MONGODB_URI`` is not set. The jars come from Maven Central through ``mvn`` (the small
``pom.xml`` beside this file) and are cached under ``<data_dir>/store/jars``; the server runs on the
machine's Java (17+) from the single-file launcher ``EmbeddedMongo.java``, bound to 127.0.0.1 on a free
port. It announces MongoDB 5.0 (wire version 13) so pymongo 4.x accepts it. The Java process exits when
our stdin pipe closes, so it never outlives the process that started it.
"""
from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from resources.settings import ConfigurationError, Settings

HERE = Path(__file__).resolve().parent
LAUNCHER = HERE / "EmbeddedMongo.java"
POM = HERE / "pom.xml"
#: H2 page cache of the embedded store in MB (see ``EmbeddedStore``): the setting's default
DEFAULT_CACHE_MB: int = Settings.model_fields["embedded_store_cache_mb"].default
REQUIRED_JARS = ("mongo-java-server-1.47.0.jar", "mongo-java-server-h2-backend-1.47.0.jar")


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (closed again before returning)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ensure_jars(jar_dir: Path, log=print) -> Path:
    """Fetch the server jars into ``jar_dir`` once (idempotent); returns ``jar_dir``.

    Raises:
        ConfigurationError: jars missing and Maven/Java unavailable, or the download failed.
    """
    jar_dir = Path(jar_dir).resolve()
    if all((jar_dir / name).exists() for name in REQUIRED_JARS):
        return jar_dir
    if not shutil.which("java"):
        raise ConfigurationError(
            "The embedded store needs Java 17+ and none was found. Install it "
            "(Debian: apt-get install openjdk-17-jre-headless) or set MONGODB_URI to a MongoDB server."
        )
    if not shutil.which("mvn"):
        raise ConfigurationError(
            "The embedded store's jars are not cached and Maven is not installed to fetch them. Install "
            "Maven (Debian: apt-get install maven) or set MONGODB_URI to a MongoDB server."
        )
    jar_dir.mkdir(parents=True, exist_ok=True)
    log(f"[store] fetching mongo-java-server 1.47.0 from Maven Central into {jar_dir} (once)")
    result = subprocess.run(
        ["mvn", "-q", "-B", "-f", str(POM), "dependency:copy-dependencies", f"-DoutputDirectory={jar_dir}"],
        capture_output=True, text=True,
    )
    if result.returncode != 0 or not all((jar_dir / name).exists() for name in REQUIRED_JARS):
        tail = (result.stdout + result.stderr)[-2000:]
        raise ConfigurationError(f"Fetching the embedded store's jars with Maven failed:\n{tail}")
    return jar_dir


class EmbeddedStore:
    """A running mongo-java-server process.

    Args:
        data_dir: project data folder; jars go to ``<data_dir>/store/jars``.
        db_file: H2 MVStore file, or ``":memory:"``. Default ``<data_dir>/store/unified_ads.mv``.
        port: TCP port on 127.0.0.1; 0 picks a free one.
        publish: write the URI to ``<data_dir>/store.uri`` while running, so other processes with no
            ``MONGODB_URI`` find it (removed on stop).
        cache_mb: the H2 page cache in MB (setting ``EMBEDDED_STORE_CACHE_MB``). The server answers a
            query from an index only when it names every field of a unique index; other queries scan
            the collection, and a cache smaller than the collection makes each scan decode it from the
            file again (measured: 3 s instead of 75 ms per scan of 150,000 metric rows at H2's default
            16 MB). Capped by the launcher at half the JVM's maximum heap.

    Use as a context manager, or ``start()``/``stop()``. ``uri`` is ``mongodb://127.0.0.1:<port>/``.
    """

    def __init__(self, data_dir: Path, db_file: str | Path | None = None, port: int = 0,
                 publish: bool = False, log=print, cache_mb: int = DEFAULT_CACHE_MB):
        self.data_dir = Path(data_dir)
        self.db_file = str(db_file) if db_file else str(self.data_dir / "store" / "unified_ads.mv")
        self.port = port
        self.publish = publish
        self.log = log
        self.cache_mb = cache_mb
        self.cache_in_effect = ""  # "cache <MB> MB" as the server reports it (capped by its heap)
        self.process: subprocess.Popen | None = None
        self.uri = ""

    def start(self, timeout: float = 60.0) -> str:
        """Start the server and wait until it accepts connections; returns its URI.

        Raises:
            ConfigurationError: Java/jars unavailable, or the server did not come up (log tail included).
        """
        jar_dir = ensure_jars(self.data_dir / "store" / "jars", self.log)
        if self.db_file != ":memory:":
            Path(self.db_file).parent.mkdir(parents=True, exist_ok=True)
        port = self.port or free_port()
        log_path = self.data_dir / "store" / "server.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(log_path, "ab")
        log_start = self._log_file.tell()
        self.process = subprocess.Popen(
            ["java", "-Xss4m", f"-Dstore.cacheMb={int(self.cache_mb)}", "-cp", f"{jar_dir}/*", str(LAUNCHER),
             "127.0.0.1", str(port), self.db_file],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log_file,
            start_new_session=True,
        )
        ready = threading.Event()

        def _watch_stdout():
            for line in self.process.stdout:
                if line.startswith(b"READY"):
                    words = line.decode(errors="replace").split()
                    self.cache_in_effect = " ".join(words[2:5]) if len(words) >= 5 else "cache ?"
                    ready.set()
            ready.set()

        threading.Thread(target=_watch_stdout, daemon=True).start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            if ready.is_set() and _accepts(port):
                self.uri = f"mongodb://127.0.0.1:{port}/"
                self.port = port
                if self.publish:
                    (self.data_dir / "store.uri").write_text(self.uri + "\n")
                self.log(f"[store] mongo-java-server on {self.uri} (data: {self.db_file}; page {self.cache_in_effect})")
                return self.uri
            time.sleep(0.1)
        self.stop()
        with open(log_path, "rb") as handle:  # only what this start wrote
            handle.seek(log_start)
            tail = handle.read().decode(errors="replace")[-2000:]
        if "file is locked" in tail.lower():
            raise ConfigurationError(
                f"The store file {self.db_file} is in use by another embedded store (another `make demo`, "
                f"`make store` or test run on the same data folder). Stop it first, or use another DATA_DIR.")
        raise ConfigurationError(f"The embedded store did not start within {timeout:.0f}s. Log tail:\n{tail}")

    def stop(self) -> None:
        """Stop the server (flushes the H2 file through its shutdown hook); idempotent."""
        if self.publish:
            uri_file = self.data_dir / "store.uri"
            if uri_file.exists() and uri_file.read_text().strip() == self.uri:
                uri_file.unlink()
        proc, self.process = self.process, None
        if proc is None:
            return
        try:
            if proc.stdin:
                proc.stdin.close()
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        finally:
            self._log_file.close()

    def __enter__(self) -> "EmbeddedStore":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    """``unified-ads store``: run the embedded store in the foreground until Ctrl-C."""
    from resources.settings import get_settings

    settings = get_settings()
    store = EmbeddedStore(settings.ensure_data_dir(), publish=True, cache_mb=settings.embedded_store_cache_mb)
    try:
        store.start()
    except ConfigurationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"MONGODB_URI={store.uri}  (Ctrl-C to stop)")

    stopping: list[int] = []

    def _interrupt(signum, frame):
        if not stopping:  # only the first signal interrupts; later ones must not cut the stop short
            stopping.append(signum)
            raise KeyboardInterrupt

    import signal

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)
    try:
        while store.process and store.process.poll() is None:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        store.stop()
    return 0
