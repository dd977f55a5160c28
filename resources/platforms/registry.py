"""The platform registry: one line per platform. Adding a platform = a connector module, a sandbox
module and one line here; portal routes, Dagster partitions/assets/jobs/schedules and store indexes
are all generated from this list."""
from __future__ import annotations

import functools
import importlib

from resources.platforms.base import Connector

#: platform id -> "module:ConnectorClass"
PLATFORMS: dict[str, str] = {
    "google": "resources.platforms.google:GoogleAdsConnector",
    "meta": "resources.platforms.meta:MetaAdsConnector",
    "shopify": "resources.platforms.shopify:ShopifyConnector",
}


class UnknownPlatform(KeyError):
    """The platform id is not registered."""

    def __str__(self) -> str:
        return f"unknown platform {self.args[0]!r}"


def platform_ids() -> list[str]:
    """Registered platform ids, in registry order."""
    return list(PLATFORMS)


@functools.lru_cache(maxsize=None)
def connector_class(platform_id: str) -> type[Connector]:
    """The connector class for a platform id.

    Raises:
        UnknownPlatform: not registered.
    """
    try:
        target = PLATFORMS[platform_id]
    except KeyError:
        raise UnknownPlatform(platform_id) from None
    module_name, class_name = target.split(":")
    return getattr(importlib.import_module(module_name), class_name)


def get_connector(platform_id: str, settings=None) -> Connector:
    """A connector instance (its settings read from the environment unless given)."""
    return connector_class(platform_id)(settings)


def all_connectors() -> list[Connector]:
    """One instance of every registered connector."""
    return [get_connector(pid) for pid in platform_ids()]
