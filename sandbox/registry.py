"""The sandbox registry: one line per platform, mirroring ``resources/platforms/registry.py``.

A platform sandbox class is built as ``cls(server, seed, options)`` and provides:

- ``id``: the platform id (class attribute);
- ``register_routes(app)``: add its HTTP routes to the shared Flask app, under ``/<id>/...`` for the
  platform's own endpoints and ``/_sandbox/<id>/...`` for admin knobs;
- ``start()`` / ``stop()``: start/stop any extra servers (Google: a gRPC server), called after/before
  the shared HTTP server;
- ``env() -> dict[str, str]``: the environment variables the platform's connector reads;
- ``connect_form_values() -> dict``: what to type in the portal's connect form (e.g. a shop name);
- ``expected_campaigns(account_id)`` / ``expected_metrics(account_id, start, end)``: the truth as the
  documents a correct connector produces (see ``resources/platforms/base.py``), for tests and the demo;
- ``inject_fault(kind, count=1, ...)``, ``revoke(...)``, ``reset()``: fault knobs (also over HTTP).
"""
from __future__ import annotations

import importlib

#: platform id -> "module:SandboxClass"
SANDBOXES: dict[str, str] = {
    "google": "sandbox.google:GoogleSandbox",
    "meta": "sandbox.meta:MetaSandbox",
    "shopify": "sandbox.shopify:ShopifySandbox",
}


def sandbox_ids() -> list[str]:
    """Registered sandbox platform ids, in registry order."""
    return list(SANDBOXES)


def sandbox_class(platform_id: str):
    """The sandbox class for a platform id (KeyError when unknown)."""
    module_name, class_name = SANDBOXES[platform_id].split(":")
    return getattr(importlib.import_module(module_name), class_name)
