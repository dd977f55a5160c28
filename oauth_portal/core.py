"""Per-app portal state (store, cipher, connectors, OAuth clients) and the logged-in user model."""
from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

from authlib.integrations.flask_client import OAuth
from bson import ObjectId
from flask import abort, current_app
from flask_login import UserMixin
from pymongo.database import Database

from resources.crypto import TokenCipher
from resources.platforms.base import Connector
from resources.repositories import UserRepository
from resources.settings import Settings

EXTENSION_KEY = "unified_ads"


@dataclasses.dataclass
class PortalState:
    """Everything a request handler needs, built once in ``create_app``.

    Attributes:
        settings: shared settings.
        db: the project database.
        users: repository over ``users``.
        cipher: token cipher (tokens are encrypted before they are stored).
        connectors: every registered connector by platform id, configured or not.
        oauth: authlib registry holding one client per *configured* platform.
    """

    settings: Settings
    db: Database
    users: UserRepository
    cipher: TokenCipher
    connectors: dict[str, Connector]
    oauth: OAuth

    def is_configured(self, platform_id: str) -> bool:
        """True when the platform has an OAuth client registered (client id/secret set)."""
        return self.oauth.create_client(platform_id) is not None

    def connector_or_404(self, platform_id: str) -> Connector:
        """The connector for a registered platform id; aborts with 404 otherwise."""
        connector = self.connectors.get(platform_id)
        if connector is None:
            abort(404, description=f"There is no platform called “{platform_id}”. "
                                   f"Known platforms: {', '.join(self.connectors) or 'none'}.")
        return connector


def portal_state() -> PortalState:
    """The current app's ``PortalState``."""
    return current_app.extensions[EXTENSION_KEY]


class PortalUser(UserMixin):
    """The logged-in user, wrapping the ``users`` document (never exposes the password hash or tokens
    to templates unless a view passes them explicitly — views never do)."""

    def __init__(self, doc: dict[str, Any]):
        self.doc = doc
        self.id = str(doc["_id"])
        self.email: str = doc["email"]

    @property
    def oid(self) -> ObjectId:
        """The user's ObjectId (the ``user_id`` everywhere in the store)."""
        return self.doc["_id"]

    def connection(self, platform_id: str) -> dict[str, Any] | None:
        """The stored ``oauth.<platform>`` sub-document, or None."""
        return (self.doc.get("oauth") or {}).get(platform_id)


def utc_from_epoch(value: Any) -> dt.datetime | None:
    """An aware UTC datetime (millisecond precision) from epoch seconds; None when absent/invalid."""
    if value in (None, ""):
        return None
    try:
        moment = dt.datetime.fromtimestamp(float(value), tz=dt.timezone.utc)
    except (TypeError, ValueError, OverflowError, OSError):
        return None
    return moment.replace(microsecond=(moment.microsecond // 1000) * 1000)
