"""The OAuth portal: sign up, connect ad platforms, see campaigns, ask for a sync.

``create_app()`` builds the Flask app from ``resources.settings``. The portal only reads and writes
the store; Dagster sensors react to what it writes (new connections, ``sync_requests``).
"""
from __future__ import annotations

import logging
import secrets
from typing import Any
from urllib.parse import urlsplit

from authlib.integrations.flask_client import OAuth
from flask import Flask, jsonify, make_response, render_template, request, session
from werkzeug.exceptions import HTTPException, InternalServerError

from oauth_portal.core import EXTENSION_KEY, PortalState, PortalUser
from oauth_portal.extensions import csrf, limiter, login_manager
from oauth_portal.security import init_input_guard
from resources import redaction
from resources.crypto import TokenCipher
from resources.platforms import registry
from resources.repositories import UserRepository, session_is_valid
from resources.settings import get_settings, read_or_create_secret_file
from resources.store import ensure_indexes, get_database

log = logging.getLogger(__name__)

#: Error statuses answered with the portal's own small page (or JSON).
ERROR_MESSAGES = {
    400: "The request could not be processed.",
    403: "You are not allowed to do that.",
    404: "This page does not exist.",
    405: "This action is not allowed on this address.",
    429: "Too many attempts. Please wait a minute and try again.",
    500: "Something went wrong on our side. Please try again later.",
    502: "The ad platform did not answer as expected. Please try again later.",
    503: "The service is temporarily unavailable.",
}


def create_app(config: dict[str, Any] | None = None) -> Flask:
    """Build the portal.

    Args:
        config: Flask config values applied last (override everything, e.g. in tests:
            ``BCRYPT_ROUNDS``, ``LOGIN_RATE_LIMIT``).

    Raises:
        resources.settings.ConfigurationError: no store configured, or the token keys are not usable
            (``resources.crypto.KeyConfigurationError``, naming the env var entry or key-file line).
    """
    settings = get_settings()
    redaction.install("werkzeug", "authlib", "oauth_portal")  # no OAuth codes/state/tokens in logs
    app = Flask(__name__)
    secret_key = settings.secret_key or read_or_create_secret_file(
        settings.ensure_data_dir() / "flask.key", lambda: secrets.token_urlsafe(48))
    app.config.update(
        SECRET_KEY=secret_key,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=not settings.local_mode,
        SESSION_COOKIE_NAME="ua_session",
        REMEMBER_COOKIE_HTTPONLY=True,
        REMEMBER_COOKIE_SAMESITE="Lax",
        REMEMBER_COOKIE_SECURE=not settings.local_mode,
        MAX_CONTENT_LENGTH=64 * 1024,
        RATELIMIT_STORAGE_URI="memory://",
        RATELIMIT_HEADERS_ENABLED=True,
        LOGIN_RATE_LIMIT="10 per minute; 50 per hour",
        SIGNUP_RATE_LIMIT="5 per minute; 30 per hour",
        BCRYPT_ROUNDS=12,
        DASHBOARD_PAGE_SIZE=50,
        DASHBOARD_DEFAULT_DAYS=30,
        DASHBOARD_CACHE_SECONDS=300,
        SYNC_STATUS_POLL_MS=3000,
        SYNC_REQUEST_STALE_SECONDS=3600,
    )
    app.config.update(config or {})
    cipher = TokenCipher.from_settings(settings)  # a bad key stops here, before anything else starts

    db = get_database(settings)
    ensure_indexes(db)

    connectors = {connector.id: connector for connector in registry.all_connectors()}
    oauth = OAuth(app)
    for platform_id, connector in connectors.items():
        if connector.is_configured():
            oauth.register(platform_id, **connector.oauth_registration())
        else:
            log.warning("platform %s is not configured: it is shown as 'not configured'", platform_id)

    app.extensions[EXTENSION_KEY] = PortalState(
        settings=settings, db=db, users=UserRepository(db), cipher=cipher,
        connectors=connectors, oauth=oauth,
    )

    csrf.init_app(app)
    limiter.init_app(app)
    init_input_guard(app)
    _init_login(app)

    from oauth_portal import auth, connections, dashboard

    app.register_blueprint(auth.bp)
    app.register_blueprint(connections.bp)
    app.register_blueprint(dashboard.bp)

    _init_security_headers(app, _form_action_origins(app, connectors))
    _init_errors(app)

    @app.get("/healthz")
    @limiter.exempt
    def healthz():
        """Liveness and store reachability: ``{"status": "ok"}`` after a store ping."""
        try:
            db.command("ping")
        except Exception:  # noqa: BLE001 — any store failure means "not healthy"
            log.exception("store ping failed")
            return jsonify(status="error", detail="store unreachable"), 503
        return jsonify(status="ok")

    return app


def _init_login(app: Flask) -> None:
    login_manager.init_app(app)
    login_manager.login_view = "auth.login"
    login_manager.login_message = "Please log in to continue."
    login_manager.login_message_category = "info"

    @login_manager.user_loader
    def load_user(user_id: str):
        state: PortalState = app.extensions[EXTENSION_KEY]
        doc = state.users.get(user_id)
        if doc is None:
            return None
        # Sessions carry the epoch they were issued under; bumping the user's epoch ends them all.
        if session.get("epoch") != int(doc.get("session_epoch", 0)):
            return None
        # ...and a server-side session id, renewed at each login and forgotten at logout.
        if not session_is_valid(doc, session.get("sid")):
            return None
        return PortalUser(doc)


def _form_action_origins(app: Flask, connectors) -> list[str] | None:
    """Origins the Connect forms may end up at (their redirects are checked against ``form-action``).

    A connector whose consent host is not fixed (per-shop URLs) may name its CSP sources itself with
    an optional ``consent_origins()`` method (e.g. ``https://*.myshopify.com``). Returns None when
    some configured platform's consent host is neither fixed nor named that way, in which case
    ``form-action`` is left out of the policy rather than breaking that platform.
    """
    origins: list[str] = []
    state: PortalState = app.extensions[EXTENSION_KEY]
    for platform_id, connector in connectors.items():
        if not state.is_configured(platform_id):
            continue
        named = getattr(connector, "consent_origins", None)
        if callable(named):
            for origin in named():
                if origin not in origins:
                    origins.append(origin)
            continue
        url = connector.oauth_registration().get("authorize_url") or ""
        parts = urlsplit(url)
        if connector.connect_form_fields or not parts.scheme or not parts.netloc or "{" in url:
            return None
        origin = f"{parts.scheme}://{parts.netloc}"
        if origin not in origins:
            origins.append(origin)
    return origins


def _init_security_headers(app: Flask, form_action: list[str] | None) -> None:
    policy = ["default-src 'self'", "script-src 'self'", "style-src 'self'", "img-src 'self' data:",
              "object-src 'none'", "base-uri 'none'", "frame-ancestors 'none'"]
    if form_action is not None:
        policy.append("form-action " + " ".join(["'self'", *form_action]))
    csp = "; ".join(policy)

    @app.after_request
    def security_headers(response):
        response.headers.setdefault("Content-Security-Policy", csp)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        response.headers.setdefault("X-Frame-Options", "DENY")
        if request.endpoint != "static":
            response.headers.setdefault("Cache-Control", "no-store")
        return response


def wants_json() -> bool:
    """True when the client prefers JSON over HTML (API clients, ``/healthz``)."""
    if request.path == "/healthz" or request.is_json:
        return True
    best = request.accept_mimetypes.best_match(["text/html", "application/json"])
    return best == "application/json" and request.accept_mimetypes[best] > request.accept_mimetypes["text/html"]


def error_response(status: int, message: str):
    """The portal's error answer: a small HTML page or ``{"error": {...}}`` JSON. Never a traceback."""
    title = ERROR_MESSAGES.get(status, "Error")
    if wants_json():
        return make_response(jsonify(error={"status": status, "title": title, "message": message})), status
    try:
        return make_response(render_template("error.html", status=status, title=title, message=message)), status
    except Exception:  # noqa: BLE001 — e.g. the store is down while loading the user for the layout
        log.exception("error page could not be rendered")
        body = f"{status} {title}\n\n{message}\n"
        return app_response_text(body), status


def app_response_text(body: str):
    """A plain-text response (last resort when the HTML error page cannot be rendered)."""
    response = make_response(body)
    response.mimetype = "text/plain"
    return response


def _init_errors(app: Flask) -> None:
    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        status = exc.code or 500
        if status == 429:
            limit = getattr(exc, "description", "") or ""
            message = ERROR_MESSAGES[429] + (f" (limit: {limit})" if limit else "")
        else:
            message = exc.description or ERROR_MESSAGES.get(status, "Error")
        response, code = error_response(status, message)
        for name, value in exc.get_headers():
            if name.lower() in ("allow", "retry-after"):
                response.headers[name] = value
        return response, code

    @app.errorhandler(Exception)
    def unexpected_error(exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, ERROR_MESSAGES[500])

    @app.errorhandler(InternalServerError)
    def internal_error(exc: InternalServerError):
        log.error("internal error on %s %s: %r", request.method, request.path, exc.original_exception)
        return error_response(500, ERROR_MESSAGES[500])
