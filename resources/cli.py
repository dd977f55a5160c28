"""``unified-ads`` console script: one entry point for the store, the sandbox, the portal and the demo.

    unified-ads store            run the embedded MongoDB-wire store (foreground)
    unified-ads sandbox          run the offline platform sandbox (foreground)
    unified-ads portal           run the portal (development server)
    unified-ads demo [--once]    everything together; --once runs the headless end-to-end check
    unified-ads rotate-keys      re-encrypt every stored token under the newest key
                                 (from TOKEN_ENCRYPTION_KEYS, else the key file data/token.keys)
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="unified-ads", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("store", help="run the embedded MongoDB-wire store in the foreground")
    sub.add_parser("sandbox", help="run the offline platform sandbox in the foreground")
    portal = sub.add_parser("portal", help="run the portal (Flask development server)")
    portal.add_argument("--port", type=int, default=5000,
                        help="port to listen on; without PORTAL_BASE_URL the OAuth redirect URIs use it too")
    demo = sub.add_parser("demo", help="store + sandbox + portal + Dagster UI; --once: headless check")
    demo.add_argument("--once", action="store_true", help="sign up, connect, sync through Dagster, verify, exit")
    demo.add_argument("--portal-port", type=int, default=5000)
    demo.add_argument("--dagster-port", type=int, default=3000)
    demo.add_argument("--dagster-log-level", default="warning",
                      choices=("critical", "error", "warning", "info", "debug"),
                      help="log level of dagster dev's webserver and daemon in this terminal (default warning: "
                           "'info' adds a line per sensor tick; runs and their logs are in the Dagster UI either way)")
    sub.add_parser(
        "rotate-keys", help="re-encrypt stored tokens under the newest key (TOKEN_ENCRYPTION_KEYS or data/token.keys)",
        description="Re-encrypt every stored token under the newest key. The keys come from "
                    "TOKEN_ENCRYPTION_KEYS (comma-separated, newest first) when it is set, else from the key "
                    "file <DATA_DIR>/token.keys (default data/token.keys; one key per line, newest first). "
                    "Put the new key first in whichever of the two you use, run this, then drop the old key.")
    args = parser.parse_args(argv)
    from resources.settings import ConfigurationError

    try:
        return _run(args)
    except ConfigurationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _run(args) -> int:
    if args.command == "store":
        from resources.store.embedded import main as store_main

        return store_main()
    if args.command == "sandbox":
        from sandbox.server import main as sandbox_main

        return sandbox_main([])
    if args.command == "portal":
        from oauth_portal import create_app
        from resources.store import check_store, get_database

        base_url, warning = portal_base_url_for_port(args.port)
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
        print(f"[portal] OAuth redirect URIs: {base_url}/connections/<platform>/callback", flush=True)
        check_store(get_database())
        create_app().run(host="127.0.0.1", port=args.port)
        return 0
    if args.command == "demo":
        from sandbox.demo import run_demo

        return run_demo(once=args.once, portal_port=args.portal_port, dagster_port=args.dagster_port,
                        dagster_log_level=args.dagster_log_level)
    if args.command == "rotate-keys":
        return _rotate_keys()
    return 2


def portal_base_url_for_port(port: int) -> tuple[str, str | None]:
    """Make the portal's public URL agree with the port it listens on.

    When ``PORTAL_BASE_URL`` is not set (neither in the environment nor in ``.env`` / ``UA_ENV_FILE``),
    it becomes ``http://127.0.0.1:<port>`` for this process (so OAuth redirect URIs lead back to this
    server). When it is set, it is kept as it is.

    Returns:
        (the base URL in effect, a warning when an explicit ``PORTAL_BASE_URL`` names another port
        than ``port`` — OAuth redirects would then land elsewhere unless a proxy forwards them —,
        else None).
    """
    import os
    from urllib.parse import urlsplit

    from resources.settings import get_settings

    settings = get_settings()
    if "portal_base_url" not in settings.model_fields_set:
        os.environ["PORTAL_BASE_URL"] = f"http://127.0.0.1:{port}"
        get_settings.cache_clear()
        return get_settings().portal_base_url, None
    base_url = settings.portal_base_url
    parts = urlsplit(base_url)
    try:
        named = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError:  # a port that is not a number
        named = None
    if named != port:
        return base_url, (
            f"PORTAL_BASE_URL is {base_url} (port {named if named is not None else 'unknown'}) but the "
            f"portal listens on port {port}: OAuth redirects will go to {base_url}/connections/… — "
            f"unset PORTAL_BASE_URL or make it name port {port}, unless a proxy forwards that address here")
    return base_url, None


def _rotate_keys() -> int:
    """Re-encrypt every stored token under the newest key; exit 1 when some token cannot be decrypted
    with any configured key (those are left as they are and listed without their content)."""
    from resources.crypto import TokenCipher, TokenDecryptionError
    from resources.settings import get_settings
    from resources.store import check_store, get_database

    settings = get_settings()
    cipher = TokenCipher.from_settings(settings)
    db = get_database(settings)
    check_store(db)
    count = 0
    undecryptable: list[str] = []
    for user in db.users.find({"oauth": {"$exists": True}}, {"oauth": 1}):
        for platform_id, connection in (user.get("oauth") or {}).items():
            if connection.get("token"):
                try:
                    rotated = cipher.rotate(connection["token"])
                except TokenDecryptionError:
                    undecryptable.append(f"user {user['_id']} {platform_id}")
                    continue
                db.users.update_one({"_id": user["_id"]}, {"$set": {f"oauth.{platform_id}.token": rotated}})
                count += 1
    print(f"re-encrypted {count} {'token' if count == 1 else 'tokens'} under the newest key")
    if undecryptable:
        one = len(undecryptable) == 1
        print(f"error: {len(undecryptable)} stored {'token' if one else 'tokens'} cannot be decrypted with "
              f"any configured key and {'was' if one else 'were'} left unchanged "
              f"({', '.join(undecryptable[:10])}{', …' if len(undecryptable) > 10 else ''}); add the key "
              f"{'it was' if one else 'they were'} encrypted with after the newest one and run "
              "rotate-keys again", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
