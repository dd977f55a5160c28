"""Typed configuration for the portal and the pipelines, read from the environment and `.env`.

One `Settings` object holds what every part shares (store, token keys, portal, sync windows).
Each platform connector owns a settings class of its own (see `resources.platforms`), so adding a
platform never edits this file. Production endpoints are the defaults everywhere; sandbox mode is
nothing but other endpoint/key/certificate values in the environment (``sandbox`` writes them to
``data/sandbox.env``).
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class ConfigurationError(RuntimeError):
    """Raised when the configuration cannot work; the message says what to set or run."""


def _env_files() -> tuple[str, ...]:
    """`.env` in the working directory, then the sandbox's generated env file if present."""
    files = [".env"]
    extra = os.environ.get("UA_ENV_FILE")
    if extra:
        files.append(extra)
    return tuple(files)


class Settings(BaseSettings):
    """Shared settings. Environment variable names are the upper-cased field names.

    Fields:
        mongodb_uri: any MongoDB connection string. Empty means "the embedded store started by
            ``unified-ads store`` / ``make demo`` / the tests", found through ``data/store.uri``.
        mongodb_db: database name.
        data_dir: folder for the embedded store file, its jars, key files and the sandbox's
            certificate (default ``<project>/data``).
        token_encryption_keys: comma-separated Fernet keys, newest first (MultiFernet). Empty means
            the key file ``<data_dir>/token.keys`` (created once, mode 0600).
        secret_key: Flask session signing key. Empty means ``<data_dir>/flask.key`` (created once, 0600).
        portal_base_url: public URL of the portal; OAuth redirect URIs are built from it.
        local_mode: True on a developer machine (cookies are not marked Secure).
        lookback_days: each sync re-reads this many most recent days (platforms restate them).
        history_days: the first sync of a connection backfills this many days.
        token_refresh_margin_seconds: refresh an access token when it expires within this many seconds.
        schedule_batch_size: connections synced per scheduled Dagster run (1 = one run per connection;
            a deployment with many connections sets e.g. 25, see README "Performance").
        embedded_store_cache_mb: page cache of the embedded store (H2) in MB; only used when the
            project starts that store (``unified-ads store``, ``make demo``). See
            ``resources.store.embedded.EmbeddedStore``.
    """

    model_config = SettingsConfigDict(env_file=_env_files(), env_file_encoding="utf-8", extra="ignore",
                                      env_ignore_empty=True)

    mongodb_uri: str = ""
    mongodb_db: str = "unified_ads"
    data_dir: Path = Field(default=PROJECT_ROOT / "data")
    token_encryption_keys: str = ""
    secret_key: str = ""
    portal_base_url: str = "http://127.0.0.1:5000"
    local_mode: bool = True
    lookback_days: int = Field(default=14, ge=1, le=400)
    history_days: int = Field(default=90, ge=1, le=3650)
    token_refresh_margin_seconds: int = Field(default=600, ge=0)
    schedule_batch_size: int = Field(default=1, ge=1, le=1000)
    embedded_store_cache_mb: int = Field(default=512, ge=16, le=65536)

    @field_validator("mongodb_uri")
    @classmethod
    def _strip_uri(cls, value: str) -> str:
        return value.strip()  # only spaces means "not set": the embedded store

    @field_validator("mongodb_db")
    @classmethod
    def _database_name(cls, value: str) -> str:
        # MongoDB's rules for database names (pymongo would only fail later, on first use)
        if not value or len(value.encode()) >= 64 or any(c in value for c in '/\\. "$\x00'):
            raise ValueError("a MongoDB database name has 1–63 bytes and none of / \\ . space \" $")
        return value

    @field_validator("portal_base_url")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        return value.rstrip("/")

    def ensure_data_dir(self) -> Path:
        """Create the data folder if needed and return it."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        return self.data_dir

    def resolved_mongodb_uri(self) -> str:
        """The store to use: ``MONGODB_URI`` or the running embedded store's URI.

        Raises:
            ConfigurationError: neither is available; the message says what to do.
        """
        if self.mongodb_uri:
            return self.mongodb_uri
        uri_file = self.data_dir / "store.uri"
        if uri_file.exists():
            return uri_file.read_text().strip()
        raise ConfigurationError(
            "No store configured: set MONGODB_URI to a MongoDB connection string, or start the "
            "embedded store with `make store` (or `unified-ads store`) in another terminal."
        )

    def redirect_uri(self, platform_id: str) -> str:
        """OAuth redirect URI registered with a platform: ``<portal>/connections/<id>/callback``."""
        return f"{self.portal_base_url}/connections/{platform_id}/callback"


def load_settings(settings_class: type[BaseSettings]):
    """Instantiate a settings class from the environment and env files (variables named with the
    class's ``env_prefix``, e.g. ``META_``).

    Raises:
        ConfigurationError: a value is invalid; one line per variable, named as it is set
            (``EMBEDDED_STORE_CACHE_MB: Input should be greater than or equal to 16``). The value
            itself is never repeated (it may be a secret).
    """
    from pydantic import ValidationError

    try:
        return settings_class()
    except ValidationError as exc:
        prefix = settings_class.model_config.get("env_prefix") or ""  # only pydantic classes get here
        problems = "; ".join(f"{(prefix + str(err['loc'][0])).upper() if err['loc'] else 'settings'}: {err['msg']}"
                             for err in exc.errors())
        raise ConfigurationError(f"invalid setting — {problems} (environment or .env)") from None


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (read once). Call ``get_settings.cache_clear()`` after changing env.

    Raises:
        ConfigurationError: a setting is invalid (see ``load_settings``).
    """
    return load_settings(Settings)


def read_or_create_secret_file(path: Path, factory) -> str:
    """Return the text of a secret file, creating it with ``factory()`` and mode 0600 if missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as handle:
        value = factory()
        handle.write(value + "\n")
    return value
