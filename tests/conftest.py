"""Shared fixtures: a real MongoDB-wire store, the offline sandbox, and settings pointing at them.

- ``store_uri`` (session): ``MONGODB_URI`` when set (any MongoDB), else an embedded mongo-java-server
  started for the session with its data in a temporary H2 file, stopped at the end.
- ``db`` (function): a fresh, uniquely named database with every index, dropped afterwards.
- ``sandbox`` (session): the offline Google/Meta/Shopify sandbox (HTTP OAuth + platform APIs)
  started in-process on free loopback ports; its endpoint variables are put in ``os.environ`` for the
  whole session, so connectors built from the environment talk to it.
- ``settings`` (function): ``Settings`` for the test database.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from resources.settings import PROJECT_ROOT, Settings, get_settings
from resources.store import ensure_indexes, get_client

#: Tests must never contact real platform hosts: any proxy-honouring client fails fast instead.
os.environ.setdefault("HTTP_PROXY", "http://127.0.0.1:9")
os.environ.setdefault("HTTPS_PROXY", "http://127.0.0.1:9")
os.environ["NO_PROXY"] = "127.0.0.1,localhost"
os.environ["no_proxy"] = "127.0.0.1,localhost"


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A per-session data folder; the store's jar cache is shared with the project's data folder."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def store_uri(data_dir) -> str:
    if os.environ.get("MONGODB_URI"):
        yield os.environ["MONGODB_URI"]
        return
    from resources.store.embedded import EmbeddedStore, ensure_jars

    jar_dir = ensure_jars(PROJECT_ROOT / "data" / "store" / "jars")
    store_dir = data_dir / "store"
    (store_dir / "store").mkdir(parents=True, exist_ok=True)
    link = store_dir / "store" / "jars"
    if not link.exists():
        link.symlink_to(jar_dir)
    store = EmbeddedStore(store_dir, db_file=data_dir / "test-store.mv")
    store.start()
    os.environ["MONGODB_URI"] = store.uri
    get_settings.cache_clear()
    yield store.uri
    os.environ.pop("MONGODB_URI", None)
    store.stop()


@pytest.fixture(scope="session")
def sandbox(data_dir, store_uri):
    from sandbox.server import SandboxServer

    server = SandboxServer(data_dir / "sandbox", seed=7)
    server.start()
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    get_settings.cache_clear()
    yield server
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    get_settings.cache_clear()


@pytest.fixture
def db_name() -> str:
    return f"test_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def settings(store_uri, db_name, data_dir, monkeypatch) -> Settings:
    monkeypatch.setenv("MONGODB_DB", db_name)
    monkeypatch.setenv("DATA_DIR", str(data_dir))
    get_settings.cache_clear()
    yield get_settings()
    get_settings.cache_clear()


@pytest.fixture
def db(settings, store_uri):
    database = get_client(store_uri)[settings.mongodb_db]
    ensure_indexes(database)
    yield database
    get_client(store_uri).drop_database(settings.mongodb_db)
