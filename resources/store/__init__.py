"""The store: one MongoClient factory and the index set, in plain pymongo (portable to MongoDB).

``MONGODB_URI`` selects any MongoDB; without it the embedded mongo-java-server (see ``embedded``) is
used through the URI it publishes. Collections:

- ``users``: identity and OAuth credentials only (unique ``email``).
- ``<platform>_campaigns``: one document per (user_id, account_id, campaign_id), unique.
- ``<platform>_campaign_metrics``: one per (user_id, account_id, campaign_id, date), unique.
- ``sync_state``: day digests per (user_id, platform, account_id), unique (``resources.sync_state``).
- ``sync_requests``: the portal's "Sync now" requests.
"""
from __future__ import annotations

import threading

from pymongo import ASCENDING, MongoClient
from pymongo.database import Database

from resources.settings import Settings, get_settings

CAMPAIGN_KEY = ("user_id", "account_id", "campaign_id")
METRIC_KEY = ("user_id", "account_id", "campaign_id", "date")

_clients: dict[str, MongoClient] = {}
_lock = threading.Lock()


def campaigns_collection(platform_id: str) -> str:
    """Name of a platform's campaigns collection, e.g. ``google_campaigns``."""
    return f"{platform_id}_campaigns"


def metrics_collection(platform_id: str) -> str:
    """Name of a platform's daily metrics collection, e.g. ``google_campaign_metrics``."""
    return f"{platform_id}_campaign_metrics"


def get_client(uri: str) -> MongoClient:
    """A shared MongoClient per URI (pymongo clients are thread-safe and pool connections).

    ``tz_aware=True``: datetimes come back as UTC-aware values.
    """
    with _lock:
        client = _clients.get(uri)
        if client is None:
            from pymongo.errors import ConfigurationError as MongoURIError, InvalidURI

            from resources.settings import ConfigurationError

            try:
                client = MongoClient(uri, tz_aware=True, serverSelectionTimeoutMS=10_000, appname="unified-ads")
            except (InvalidURI, MongoURIError, ValueError) as exc:
                raise ConfigurationError(f"MONGODB_URI is not a valid MongoDB connection string: {exc}") from None
            _clients[uri] = client
            from resources import redaction

            redaction.install("pymongo.command")  # its DEBUG log prints whole documents
        return client


def get_database(settings: Settings | None = None) -> Database:
    """The project database from settings (``MONGODB_URI``/embedded store, ``MONGODB_DB``).

    Raises:
        resources.settings.ConfigurationError: no store configured.
    """
    settings = settings or get_settings()
    return get_client(settings.resolved_mongodb_uri())[settings.mongodb_db]


def check_store(db: Database, timeout_ms: int = 5000) -> None:
    """Ping the store once so an unreachable one fails early with a clear message.

    Raises:
        resources.settings.ConfigurationError: the server cannot be reached or the URI is invalid; the
            message names the host (never credentials) and says what to do.
    """
    from pymongo.errors import PyMongoError

    from resources.settings import ConfigurationError

    hosts = ", ".join(f"{h}:{p}" for h, p in (db.client.topology_description.server_descriptions() or {}))
    try:
        db.client.get_database(db.name).command("ping", maxTimeMS=timeout_ms)
    except PyMongoError as exc:
        raise ConfigurationError(
            f"Cannot reach the MongoDB store at {hosts or 'the configured address'} ({type(exc).__name__}). "
            "Check MONGODB_URI, or start the embedded store with `make store` (it replaces a data/store.uri "
            "left behind by a store that was killed)."
        ) from None


def ensure_indexes(db: Database, platform_ids=None) -> None:
    """Create every index the product relies on (idempotent; called at start-up).

    Args:
        platform_ids: platforms whose campaign collections get indexes; default every registered one.
    """
    if platform_ids is None:
        from resources.platforms import registry

        platform_ids = registry.platform_ids()
    db.users.create_index([("email", ASCENDING)], unique=True, name="email_unique")
    for platform_id in platform_ids:
        db[campaigns_collection(platform_id)].create_index(
            [(field, ASCENDING) for field in CAMPAIGN_KEY], unique=True, name="natural_key"
        )
        db[metrics_collection(platform_id)].create_index(
            [(field, ASCENDING) for field in METRIC_KEY], unique=True, name="natural_key"
        )
    from resources.sync_state import COLLECTION as SYNC_STATE, KEY as SYNC_STATE_KEY

    db[SYNC_STATE].create_index([(field, ASCENDING) for field in SYNC_STATE_KEY], unique=True, name="natural_key")
    db.sync_requests.create_index([("user_id", ASCENDING), ("platform", ASCENDING)], name="user_platform")
