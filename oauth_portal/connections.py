"""Blueprint ``connections``: connect, reconnect and disconnect any registered platform.

Connect → the platform's consent page (authlib keeps state/PKCE verifier in the session) → callback
→ code exchanged for a token → accounts listed → token encrypted and stored with the accounts.
Nothing is written unless every step succeeded. The portal never calls Dagster: a sensor notices the
new connection in ``users`` and starts the first sync.
"""
from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from authlib.common.errors import AuthlibBaseError
from flask import Blueprint, abort, current_app, flash, redirect, render_template, request, url_for
from flask_login import current_user, login_required

from oauth_portal.core import portal_state, utc_from_epoch
from resources.platforms.base import OAuthCallbackError, PlatformError
from resources.repositories import CONNECTED, NEEDS_REAUTH, CampaignRepository
from resources.wording import count_of

bp = Blueprint("connections", __name__, url_prefix="/connections")
log = logging.getLogger(__name__)
#: a token that cannot be renewed without the user is flagged on the page when fewer days remain
TOKEN_WARN_DAYS = 15


def _scopes(token: dict[str, Any], registration: dict[str, Any]) -> list[str]:
    """Granted scopes: the token's ``scope`` (str or list), else the requested ones."""
    scope = token.get("scope")
    if scope is None:
        scope = (registration.get("client_kwargs") or {}).get("scope", "")
    if isinstance(scope, str):
        return [s for s in scope.replace(",", " ").split() if s]
    return [str(s) for s in scope or []]


def _humanize_delta(moment: dt.datetime | None, now: dt.datetime) -> str:
    if moment is None:
        return ""
    seconds = int((moment - now).total_seconds())
    past = seconds < 0
    seconds = abs(seconds)
    if seconds < 90:
        text = count_of(seconds, "second")
    elif seconds < 90 * 60:
        text = count_of(seconds // 60, "minute")
    elif seconds < 36 * 3600:
        text = count_of(seconds // 3600, "hour")
    else:
        text = count_of(seconds // 86400, "day")
    return f"{text} ago" if past else f"in {text}"


def _days_left(moment: dt.datetime | None, now: dt.datetime) -> int | None:
    """Whole days until a token expires, for tokens that live for days (Meta's ~60-day tokens); None
    when there is no expiry or less than a day remains (short-lived access tokens renewed every hour)."""
    if moment is None:
        return None
    seconds = (moment - now).total_seconds()
    return int(seconds // 86400) if seconds >= 86400 else None


def connection_view(platform_id: str, connection: dict[str, Any] | None, now: dt.datetime) -> dict[str, Any]:
    """What the templates may show about a connection — explicitly picked fields, never the token."""
    if not connection:
        return {"status": "not_connected"}
    sync = connection.get("sync") or {}
    expires_at = connection.get("expires_at")
    return {
        "status": connection.get("status") or CONNECTED,
        "last_error": connection.get("last_error"),
        "expires_at": expires_at,
        "expires_in": _humanize_delta(expires_at, now),
        "expired": bool(expires_at and expires_at <= now),
        "days_left": _days_left(expires_at, now),
        "connected_at": connection.get("connected_at"),
        "refreshed_at": connection.get("refreshed_at"),
        "scopes": list(connection.get("scopes") or []),
        "shop": connection.get("shop"),
        "accounts": [
            {"id": a.get("id"), "name": a.get("name"), "currency": a.get("currency"),
             "time_zone": a.get("time_zone"), "manager": bool(a.get("manager")), "status": a.get("status")}
            for a in connection.get("accounts") or []
        ],
        "sync": {
            "last_status": sync.get("last_status"), "last_run_at": sync.get("last_run_at"),
            "last_success_at": sync.get("last_success_at"), "last_error": sync.get("last_error"),
            "rows": dict(sync.get("rows") or {}),
        },
    }


def platform_views(user) -> list[dict[str, Any]]:
    """One entry per registered platform: id, name, configured?, connect form fields, connection view."""
    state = portal_state()
    now = dt.datetime.now(dt.timezone.utc)
    views = []
    for platform_id, connector in state.connectors.items():
        views.append({
            "id": platform_id,
            "name": connector.display_name,
            "configured": state.is_configured(platform_id),
            "form_fields": list(connector.connect_form_fields),
            "connection": connection_view(platform_id, user.connection(platform_id), now),
        })
    return views


@bp.get("")
@login_required
def index():
    """Every registered platform with its connection status, accounts, token expiry and last sync."""
    from oauth_portal.dashboard import sync_views

    platforms = platform_views(current_user)
    syncs = sync_views(current_user, {p["id"]: p["name"] for p in platforms})
    return render_template("connections.html", platforms=platforms, NEEDS_REAUTH=NEEDS_REAUTH,
                           syncs=syncs, any_pending=any(v["pending"] for v in syncs.values()),
                           poll_ms=int(current_app.config.get("SYNC_STATUS_POLL_MS", 3000)),
                           TOKEN_WARN_DAYS=TOKEN_WARN_DAYS)


@bp.post("/<platform_id>/connect")
@login_required
def connect(platform_id: str):
    """Start the OAuth flow: redirect to the platform's consent page."""
    state = portal_state()
    connector = state.connector_or_404(platform_id)
    client = state.oauth.create_client(platform_id)
    if client is None:
        abort(400, description=f"{connector.display_name} is not configured on this server yet "
                               "(its OAuth client id and secret are missing), so it cannot be connected.")
    form = {name: (request.form.get(name) or "").strip() for name in connector.connect_form_fields}
    try:
        return connector.begin_authorization(client, redirect_uri=state.settings.redirect_uri(platform_id),
                                             form=form)
    except OAuthCallbackError as exc:
        abort(400, description=f"Cannot connect {connector.display_name}: {exc}")


@bp.get("/<platform_id>/callback")
@login_required
def callback(platform_id: str):
    """Finish the OAuth flow: exchange the code, list accounts, store the encrypted token.

    Forged/missing state, a provider error (``error=access_denied``) or a replayed code → 400;
    the platform failing while listing accounts → 502. In every failure nothing is written.
    """
    state = portal_state()
    connector = state.connector_or_404(platform_id)
    client = state.oauth.create_client(platform_id)
    if client is None:
        abort(400, description=f"{connector.display_name} is not configured on this server.")
    name = connector.display_name
    provider_error = request.args.get("error")
    try:
        token = connector.finish_authorization(client, request)
    except (OAuthCallbackError, AuthlibBaseError) as exc:
        log.info("OAuth callback for %s refused: %s", platform_id, exc)
        if provider_error == "access_denied":
            message = f"{name} was not connected: access was denied on the consent page."
        else:
            message = (f"{name} was not connected: the authorization could not be completed ({exc}). "
                       "This happens when the link is reused, expired, or did not come from this portal. "
                       "Please start again with Connect.")
        abort(400, description=message)
    except PlatformError as exc:
        log.warning("token exchange for %s failed: %s", platform_id, exc)
        abort(502, description=f"{name} did not complete the connection: {exc}. Please try again later.")
    if not isinstance(token, dict) or not token.get("access_token"):
        abort(502, description=f"{name} returned no access token. Please try again.")

    try:
        accounts = connector.list_accounts(token)
    except PlatformError as exc:
        log.warning("listing accounts for %s failed: %s", platform_id, exc)
        abort(502, description=f"{name} accepted the connection, but listing your accounts failed: {exc}. "
                               "Nothing was saved; please try again.")

    extra_hook = getattr(connector, "connection_extra", None)
    extra = extra_hook(token) if callable(extra_hook) else None
    state.users.save_connection(
        current_user.oid, platform_id, state.cipher.encrypt(token),
        scopes=_scopes(token, connector.oauth_registration()),
        expires_at=utc_from_epoch(token.get("expires_at")),
        accounts=[account.to_doc() for account in accounts],
        extra=extra,
    )
    count = len(accounts)
    flash(f"{name} connected: {count} account{'s' if count != 1 else ''} found. "
          "The first sync starts shortly.", "success")
    return redirect(url_for("connections.index"))


@bp.post("/<platform_id>/disconnect")
@login_required
def disconnect(platform_id: str):
    """Remove the connection and its token. Campaign data is kept unless ``purge=1``."""
    state = portal_state()
    connector = state.connector_or_404(platform_id)
    removed = state.users.clear_connection(current_user.oid, platform_id)
    purge = request.form.get("purge") == "1"
    deleted = 0
    if purge:
        deleted = CampaignRepository(state.db, platform_id).delete_user(current_user.oid)
    if removed:
        message = f"{connector.display_name} disconnected; its token was deleted."
    else:
        message = f"{connector.display_name} was not connected."
    if purge:
        message += f" {deleted} stored campaign and metric records were deleted."
    elif removed:
        message += " Your synced campaign data is kept."
    flash(message, "success" if removed or purge else "info")
    return redirect(url_for("connections.index"))
