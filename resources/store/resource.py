"""The store as a Dagster resource (used by every asset, sensor and schedule)."""
from __future__ import annotations

from dagster import ConfigurableResource
from pymongo.database import Database

from resources.crypto import TokenCipher
from resources.settings import Settings, get_settings
from resources.store import ensure_indexes, get_client


class MongoStoreResource(ConfigurableResource):
    """MongoDB database handle for Dagster code.

    Attributes:
        uri: connection string; empty means the project settings (``MONGODB_URI`` or the embedded store).
        database: database name; empty means ``MONGODB_DB`` (default ``unified_ads``).
    """

    uri: str = ""
    database: str = ""

    def settings(self) -> Settings:
        return get_settings()

    def db(self) -> Database:
        """The database (shared pooled client). Raises ``ConfigurationError`` if no store is set."""
        settings = self.settings()
        uri = self.uri or settings.resolved_mongodb_uri()
        return get_client(uri)[self.database or settings.mongodb_db]

    def cipher(self) -> TokenCipher:
        """The token cipher from ``TOKEN_ENCRYPTION_KEYS`` / the data folder key file."""
        return TokenCipher.from_settings(self.settings())

    def ensure_indexes(self) -> None:
        ensure_indexes(self.db())
