"""Meta (Facebook/Instagram) Ads connector on the official ``facebook-business`` SDK (26.x, Graph API v26.0).

OAuth: the Facebook Login dialog with ``state`` through authlib (portal); the callback's code is
exchanged for a short-lived user token, then at once for a long-lived one (``grant_type=
fb_exchange_token``, about 60 days) with authlib's requests ``OAuth2Session``. Meta has no refresh
tokens: ``refresh`` re-exchanges the long-lived token while it is still valid (the token asset does it
when fewer than ``META_REFRESH_WHEN_UNDER_DAYS`` days remain); an expired or revoked token (Graph
error 190, subcodes 463/458/460…) raises ``ReauthRequired``.

SDK use: one ``FacebookAdsApi(FacebookSession(app_id, app_secret, token))`` per session with the
session's ``GRAPH`` set to ``META_GRAPH_URL`` and ``api=`` passed to every object — never the
process-global default api and never ``FacebookAdsApi.init`` (whose default installs a crash
reporter). With an app secret every request carries ``appsecret_proof`` (HMAC-SHA256 of the token).
Paged edges go through the SDK's ``Cursor`` with a pass-through ``ObjectParser``: rows stay the JSON
objects Meta sent instead of typed SDK objects (2.4× the throughput; see ``MetaAdsSession._edge``).

Rate limits (Meta's business-use-case limits): a transport adapter mounted on the SDK's
``requests.Session`` sees every HTTP answer — successful or not, including async polls and pages —
and records ``x-business-use-case-usage`` (per ad account: ``call_count``/``total_cputime``/
``total_time`` in percent, ``estimated_time_to_regain_access`` in minutes), ``x-app-usage``,
``x-ad-account-usage`` and ``x-fb-ads-insights-throttle``. Before each request it slows down once the
account's (or app's) usage is past ``META_USAGE_HIGH_WATER_PCT``: a sleep growing linearly up to
``META_PACE_MAX_SLEEP_SECONDS`` at 100 %. Rate-limit errors (codes 4, 17, 32, 613, 80000–80014;
subcodes 2446079, 1487742) wait for the regain time when it fits in ``META_RATE_LIMIT_MAX_WAIT_SECONDS``
(0 minutes → short exponential waits within the same budget), otherwise raise ``RateLimited`` with
``retry_after`` = the regain time in seconds: the partition stops and the next schedule resumes it.
Transient errors (``is_transient``, codes 1/2, HTTP 5xx, connection errors) retry with exponential
backoff (``META_TRANSIENT_RETRIES`` × ``META_TRANSIENT_BACKOFF_SECONDS``·2^n), then raise
``TransientPlatformError`` (Dagster's retry policy takes over).

Data: campaigns of every status are asked for explicitly (``effective_status`` = all; the API leaves
ARCHIVED and DELETED out by default); insights at campaign level with ``time_increment=1`` and a
``campaign.effective_status`` filter (deleted campaigns' rows are otherwise missing), synchronous for
short ranges and as an asynchronous ``AdReportRun`` for ranges longer than ``META_ASYNC_THRESHOLD_DAYS``
(or when Meta answers "reduce the amount of data"); a failed report run is split in halves. Cursor
paging throughout (``paging.cursors.after``).

Units: budgets arrive as strings in *minor units* of the account currency (cents; yen for JPY and the
other currencies Meta gives offset 1) and become exact ``Decimal`` currency units; insights ``spend``
arrives in currency units and is kept exact (``Decimal(str)``). ``date_start`` is the account's local
date (the account's ``timezone_name``) and is stored as sent.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import re
import time
from decimal import Decimal, InvalidOperation
from typing import Any, Callable, Iterator

from pydantic_settings import BaseSettings

from resources import redaction
from resources.platforms.base import (
    Account,
    Connector,
    ConnectorSession,
    OAuthCallbackError,
    PlatformError,
    RateLimited,
    ReauthRequired,
    TransientPlatformError,
    exchange_callback_code,
    minor_units_to_decimal,
    settings_config,
)

log = logging.getLogger(__name__)
# the SDK sends access_token/appsecret_proof as query parameters; urllib3 logs URLs at DEBUG
redaction.install("urllib3.connectionpool")

# ---- data: endpoints, version, scopes, field lists ----------------------------------------------
API_VERSION = "v26.0"
DIALOG_URL = f"https://www.facebook.com/{API_VERSION}/dialog/oauth"
GRAPH_URL = "https://graph.facebook.com"
SCOPES = "ads_read,business_management"

ACCOUNT_FIELDS = ["account_id", "name", "currency", "timezone_name", "account_status"]
CAMPAIGN_FIELDS = ["id", "name", "status", "effective_status", "objective", "daily_budget", "lifetime_budget",
                   "start_time", "stop_time"]
#: every campaign status, asked for explicitly (without it ARCHIVED and DELETED are left out)
CAMPAIGN_STATUSES = ["ACTIVE", "PAUSED", "ARCHIVED", "DELETED", "IN_PROCESS", "WITH_ISSUES"]
INSIGHT_FIELDS = ["campaign_id", "impressions", "clicks", "spend", "actions", "date_start", "date_stop"]
#: action types summed into ``conversions`` (Meta's omni-channel totals; the pixel-specific
#: ``offsite_conversion.*`` duplicates of the same events are not added again)
CONVERSION_ACTION_TYPES = ("purchase", "lead", "mobile_app_install", "complete_registration")
#: currencies Meta gives offset 1 (no minor unit): budgets are whole units
ZERO_DECIMAL_CURRENCIES = {"CLP", "COP", "CRC", "HUF", "ISK", "IDR", "JPY", "KRW", "PYG", "TWD", "VND"}
ACCOUNT_STATUS = {1: "ACTIVE", 2: "DISABLED", 3: "UNSETTLED", 7: "PENDING_RISK_REVIEW", 8: "PENDING_SETTLEMENT",
                  9: "IN_GRACE_PERIOD", 100: "PENDING_CLOSURE", 101: "CLOSED", 201: "ANY_ACTIVE", 202: "ANY_CLOSED"}

#: error codes: expired/invalid token, rate limits, transient
TOKEN_ERROR_CODES = {190, 102}
TOKEN_ERROR_SUBCODES = {458, 459, 460, 463, 464, 467}
RATE_LIMIT_CODES = {4, 17, 32, 613} | set(range(80000, 80015))
RATE_LIMIT_SUBCODES = {2446079, 1487742}
#: limits that apply to one ad account (business use case limits, "too many calls from this ad-account"):
#: the sync defers that account only; 4 (app), 17 (user) and 32 (page) stop the whole connection
ACCOUNT_RATE_LIMIT_CODES = {613} | set(range(80000, 80015))
TRANSIENT_CODES = {1, 2}
TOO_MUCH_DATA_SUBCODES = {1487534}


class MetaAdsSettings(BaseSettings):
    """Meta Ads configuration; environment variables ``META_<FIELD>`` (e.g. ``META_APP_ID``).

    Fields:
        app_id, app_secret: the Meta app (App Dashboard → Settings → Basic).
        dialog_url: Facebook Login dialog (``https://www.facebook.com/v26.0/dialog/oauth``).
        graph_url: Graph API base without version (``https://graph.facebook.com``); becomes the SDK
            session's ``GRAPH``; the token endpoint is ``<graph_url>/<api_version>/oauth/access_token``.
        api_version: Graph API version (``v26.0``).
        scopes: comma-separated permissions requested in the dialog.
        refresh_when_under_days: re-exchange the long-lived token when fewer days than this remain.
        rate_limit_max_wait_seconds: longest total wait for a rate limit inside one call; a longer
            ``estimated_time_to_regain_access`` stops the sync with ``RateLimited`` instead.
        usage_high_water_pct: usage (percent of the account's or app's limit) from which calls slow down.
        pace_max_sleep_seconds: pause before each call at 100 % usage (linear from the high-water mark).
        transient_retries / transient_backoff_seconds: retries of transient errors (backoff b·2^n seconds).
        async_threshold_days: insights ranges longer than this use an asynchronous report run.
        async_poll_seconds: first pause between report-run polls (grows ×1.5 up to 30 s).
        async_timeout_seconds: give up on a report run after this long (transient error).
        page_size: ``limit`` of every paged request.
        http_timeout_seconds: per-request timeout.
    """

    model_config = settings_config("META_")

    app_id: str = ""
    app_secret: str = ""
    dialog_url: str = DIALOG_URL
    graph_url: str = GRAPH_URL
    api_version: str = API_VERSION
    scopes: str = SCOPES
    refresh_when_under_days: float = 15
    rate_limit_max_wait_seconds: float = 60
    usage_high_water_pct: float = 75
    pace_max_sleep_seconds: float = 10
    transient_retries: int = 3
    transient_backoff_seconds: float = 1.0
    async_threshold_days: int = 31
    async_poll_seconds: float = 2.0
    async_timeout_seconds: float = 900
    page_size: int = 500
    http_timeout_seconds: float = 60

    @property
    def token_url(self) -> str:
        """``<graph_url>/<api_version>/oauth/access_token``."""
        return f"{self.graph_url.rstrip('/')}/{self.api_version}/oauth/access_token"


def currency_exponent(currency: str) -> int:
    """Digits of the minor unit Meta uses for budgets in ``currency`` (0 for JPY, KRW, …; else 2)."""
    return 0 if (currency or "").upper() in ZERO_DECIMAL_CURRENCIES else 2


def _epoch_text(value: float | None) -> str:
    if value is None:
        return "unknown"
    return dt.datetime.fromtimestamp(float(value), dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


# ---- OAuth error mapping ---------------------------------------------------------------------------

def _graph_error_fields(error: Any) -> tuple[int | None, int | None, str]:
    """``(code, subcode, message)`` of a Graph error object (or whatever authlib put in ``error``)."""
    if isinstance(error, dict):
        return error.get("code"), error.get("error_subcode"), str(error.get("message") or "")[:200]
    return None, None, str(error or "")[:200]


def _rejected_code_message(error: Any) -> str:
    """The message for an authorization code the Graph token endpoint refused."""
    code, subcode, message = _graph_error_fields(error)
    return (f"Meta rejected the authorization code (code {code}"
            f"{'/' + str(subcode) if subcode else ''}: {message}).")


def _token_endpoint_error(exc: Exception, what: str) -> PlatformError:
    """Map an authlib/requests failure of the Graph token endpoint to a connector error."""
    import requests
    from authlib.integrations.base_client.errors import OAuthError

    if isinstance(exc, OAuthError):
        code, subcode, message = _graph_error_fields(exc.error)
        label = f"code {code}" + (f"/{subcode}" if subcode else "")
        if code in TOKEN_ERROR_CODES or subcode in TOKEN_ERROR_SUBCODES:
            return ReauthRequired(f"Meta refused the access token during {what} ({label}: {message}); "
                                  "reconnect Meta Ads.")
        if code in RATE_LIMIT_CODES:
            return RateLimited(f"Meta rate limit during {what} ({label}).")
        if code in TRANSIENT_CODES and "client secret" not in message.lower():
            return TransientPlatformError(f"Meta token endpoint failed during {what} ({label}: {message}).")
        if code == 101 or "client secret" in message.lower():
            return PlatformError(f"Meta rejected the app credentials during {what} ({label}: {message}); "
                                 "check META_APP_ID / META_APP_SECRET.")
        return PlatformError(f"Meta token endpoint refused {what} ({label}: {message}).")
    if isinstance(exc, requests.HTTPError):
        status = exc.response.status_code if exc.response is not None else 0
        return TransientPlatformError(f"Meta token endpoint failed with HTTP {status} during {what}.")
    if isinstance(exc, (requests.RequestException, ValueError)):
        return TransientPlatformError(f"Meta token endpoint unreachable or unreadable during {what}: "
                                      f"{type(exc).__name__}.")
    raise exc


def _normalise_token(answer: dict[str, Any]) -> dict[str, Any]:
    """``{access_token, token_type, expires_at (epoch s)?, long_lived}`` from a Graph token answer."""
    out = {"access_token": answer["access_token"], "token_type": str(answer.get("token_type") or "bearer").lower()}
    expires_at = answer.get("expires_at")
    if expires_at is None and answer.get("expires_in") not in (None, ""):
        expires_at = time.time() + float(answer["expires_in"])
    if expires_at is not None:
        out["expires_at"] = int(expires_at)
    out["long_lived"] = True
    return out


# ---- connector ---------------------------------------------------------------------------------------

class MetaAdsConnector(Connector):
    """Meta Ads (``meta``): Facebook Login through authlib, data through the facebook-business SDK.

    Accounts are ad accounts (``/me/adaccounts``: ``account_id`` without ``act_``, name, currency,
    ``timezone_name``, ``account_status``). Documents: see ``MetaAdsSession``. Token dict:
    ``{access_token, token_type, expires_at (epoch s), long_lived: True}`` (no refresh token).
    """

    id = "meta"
    display_name = "Meta Ads"
    api_concurrency = 2

    @classmethod
    def settings_class(cls):
        return MetaAdsSettings

    def is_configured(self) -> bool:
        return bool(self.settings.app_id and self.settings.app_secret)

    # ---- OAuth ---------------------------------------------------------------------------------
    def oauth_registration(self) -> dict[str, Any]:
        s = self.settings
        return {
            "client_id": s.app_id,
            "client_secret": s.app_secret,
            "authorize_url": s.dialog_url,
            "access_token_url": s.token_url,
            "client_kwargs": {"scope": s.scopes, "token_endpoint_auth_method": "client_secret_post"},
        }

    def finish_authorization(self, oauth_client, request) -> dict[str, Any]:
        """Exchange the callback's code (authlib checks ``state``) for a short-lived token, then at once
        for a long-lived one. Returns the normalised long-lived token.

        Raises:
            OAuthCallbackError: provider ``error=`` callback (e.g. the user cancelled), forged/missing
                state, invalid/used code, redirect URI mismatch.
            PlatformError: the token endpoint failed (the portal answers 502).
        """
        short = exchange_callback_code(
            oauth_client, request, platform="Meta",
            denied="Meta access was denied (the login dialog was cancelled).",
            rejected=_rejected_code_message)
        try:
            return self.exchange_long_lived(short["access_token"])
        except ReauthRequired as exc:
            raise OAuthCallbackError(str(exc)) from None

    def exchange_long_lived(self, access_token: str) -> dict[str, Any]:
        """``GET <graph>/<v>/oauth/access_token?grant_type=fb_exchange_token&fb_exchange_token=…`` →
        a normalised long-lived token (``expires_at`` ≈ now + 60 days).

        Raises:
            ReauthRequired: the token is expired/invalid (190).
            TransientPlatformError, RateLimited, PlatformError: see ``_token_endpoint_error``.
        """
        from authlib.integrations.requests_client import OAuth2Session

        s = self.settings
        session = OAuth2Session(s.app_id, s.app_secret, token_endpoint_auth_method="client_secret_post")
        try:
            answer = session.fetch_token(s.token_url, method="GET", grant_type="fb_exchange_token",
                                         fb_exchange_token=access_token, timeout=s.http_timeout_seconds)
        except Exception as exc:
            raise _token_endpoint_error(exc, "the long-lived token exchange") from None
        finally:
            session.close()
        if not answer.get("access_token"):
            raise TransientPlatformError("Meta's long-lived token answer has no access token.")
        return _normalise_token(dict(answer))

    # ---- token lifecycle -----------------------------------------------------------------------
    def needs_refresh(self, token: dict[str, Any], now: dt.datetime, margin_seconds: int) -> bool:
        """True when the token expires within ``max(margin_seconds, refresh_when_under_days)``."""
        expires_at = token.get("expires_at")
        if expires_at is None:
            return False
        window = max(float(margin_seconds), self.settings.refresh_when_under_days * 86400)
        return float(expires_at) - now.timestamp() <= window

    def refresh(self, token: dict[str, Any]) -> dict[str, Any]:
        """Re-exchange the still-valid long-lived token for a new one (Meta has no refresh tokens).

        Raises:
            ReauthRequired: the token already expired (nothing can renew it) or Meta refuses it (190).
            TransientPlatformError, RateLimited: temporary.
        """
        expires_at = token.get("expires_at")
        if expires_at is not None and float(expires_at) <= time.time():
            raise ReauthRequired(f"The Meta access token expired on {_epoch_text(expires_at)}; Meta has no refresh "
                                 "tokens, so the user must reconnect Meta Ads.")
        return self.exchange_long_lived(token["access_token"])

    def list_accounts(self, token: dict[str, Any]) -> list[Account]:
        """Every ad account the token reaches (``/me/adaccounts``, paged)."""
        session = self.open_session(token)
        try:
            return session.list_accounts()
        finally:
            session.close()

    def open_session(self, token: dict[str, Any]) -> "MetaAdsSession":
        return MetaAdsSession(self.settings, token)


# ---- session ---------------------------------------------------------------------------------------

@dataclasses.dataclass
class Usage:
    """Last known usage of one ad account (or of the app): percent of the limit, minutes to regain."""

    pct: float = 0.0
    regain_minutes: float = 0.0
    seen_at: float = 0.0


class _TooMuchData(Exception):
    """Internal: Meta asked to reduce the amount of data of a synchronous insights call."""


def _usage_adapter_class():
    from requests.adapters import HTTPAdapter

    class _UsageAdapter(HTTPAdapter):
        """Transport adapter that paces before and reads usage headers after every HTTP call."""

        def __init__(self, owner: "MetaAdsSession"):
            super().__init__()
            self.owner = owner

        def send(self, request, *args, **kwargs):
            self.owner._before_request(request.url)
            response = super().send(request, *args, **kwargs)
            self.owner._after_response(request.url, response.headers)
            return response

    return _UsageAdapter


_ACT_RE = re.compile(r"/act_(\d+)(?:/|$|\?)")


class MetaAdsSession(ConnectorSession):
    """The SDK bound to one token (``FacebookAdsApi`` over a ``FacebookSession`` of its own).

    Campaign document: ``{account_id, campaign_id, name, status (ACTIVE|PAUSED|ARCHIVED|DELETED),
    effective_status, objective, currency, budget (Decimal currency units or None), budget_period
    (DAILY|LIFETIME|None when ad sets carry the budgets), start_date, end_date ("YYYY-MM-DD",
    account-local, or None)}``.

    Metric document: ``{account_id, campaign_id, date ("YYYY-MM-DD", account-local date_start),
    impressions, clicks, spend (Decimal currency units), currency, conversions (Decimal: sum of the
    CONVERSION_ACTION_TYPES actions, 0 when none)}``.

    ``usage`` holds the last usage seen per ad account id (``"app"`` for the app); ``stats`` counts API
    calls, retries and seconds spent waiting for limits (pacing + rate-limit waits).
    """

    def __init__(self, settings: MetaAdsSettings, token: dict[str, Any], sleep: Callable[[float], None] = time.sleep):
        super().__init__()
        from facebook_business.api import FacebookAdsApi
        from facebook_business.session import FacebookSession

        self.settings = settings
        self._sleep = sleep
        self.usage: dict[str, Usage] = {}
        self._current_account: str | None = None
        self._fb = FacebookSession(settings.app_id or None, settings.app_secret or None, token["access_token"],
                                   timeout=settings.http_timeout_seconds)
        self._fb.GRAPH = settings.graph_url.rstrip("/")  # instance attribute: the class default stays production
        adapter = _usage_adapter_class()(self)
        self._fb.requests.mount("https://", adapter)
        self._fb.requests.mount("http://", adapter)
        self.api = FacebookAdsApi(self._fb, api_version=settings.api_version)

    # ---- transport hooks -----------------------------------------------------------------------
    def _account_of(self, url: str) -> str | None:
        match = _ACT_RE.search(url or "")
        return match.group(1) if match else self._current_account

    def _before_request(self, url: str) -> None:
        """Count the call; pause when the account's or the app's usage is past the high-water mark."""
        self.stats.api_calls += 1
        account = self._account_of(url)
        pct = max(self.usage.get(account, Usage()).pct if account else 0.0, self.usage.get("app", Usage()).pct)
        high = self.settings.usage_high_water_pct
        if pct < high or self.settings.pace_max_sleep_seconds <= 0:
            return
        pause = self.settings.pace_max_sleep_seconds * min(1.0, (pct - high) / max(1.0, 100.0 - high))
        if pause > 0:
            log.info("Meta usage at %.0f%% for %s: pausing %.2fs before the next call", pct, account or "app", pause)
            self.stats.throttled_seconds += pause
            self._sleep(pause)

    def _after_response(self, url: str, headers) -> None:
        """Record usage from ``x-business-use-case-usage``, ``x-app-usage``, ``x-ad-account-usage`` and
        ``x-fb-ads-insights-throttle`` (successful and failed answers alike)."""
        now = time.monotonic()
        account = self._account_of(url)
        try:
            raw = headers.get("x-business-use-case-usage")
            if raw:
                for account_id, entries in json.loads(raw).items():
                    entries = entries if isinstance(entries, list) else [entries]
                    pct = max((max(float(e.get("call_count") or 0), float(e.get("total_cputime") or 0),
                                   float(e.get("total_time") or 0)) for e in entries), default=0.0)
                    regain = max((float(e.get("estimated_time_to_regain_access") or 0) for e in entries), default=0.0)
                    self.usage[str(account_id)] = Usage(pct, regain, now)
            raw = headers.get("x-app-usage")
            if raw:
                app = json.loads(raw)
                self.usage["app"] = Usage(max(float(app.get(k) or 0) for k in ("call_count", "total_cputime", "total_time")),
                                          0.0, now)
            for name, key in (("x-ad-account-usage", "acc_id_util_pct"), ("x-fb-ads-insights-throttle", "acc_id_util_pct")):
                raw = headers.get(name)
                if raw and account:
                    value = float(json.loads(raw).get(key) or 0)
                    current = self.usage.get(account)
                    if current is None or current.seen_at != now:
                        self.usage[account] = Usage(value, 0.0, now)
                    else:
                        current.pct = max(current.pct, value)
            raw = headers.get("x-fb-ads-insights-throttle")
            if raw:
                app_pct = float(json.loads(raw).get("app_id_util_pct") or 0)
                app = self.usage.get("app")
                if app is None or app.seen_at != now:
                    self.usage["app"] = Usage(app_pct, 0.0, now)
                else:
                    app.pct = max(app.pct, app_pct)
        except (ValueError, TypeError, AttributeError):
            log.debug("unreadable Meta usage header on %s", redaction.redact(url or ""))

    # ---- calls with error handling -------------------------------------------------------------
    def _call(self, operation: Callable[[], Any], what: str) -> Any:
        """Run one SDK operation (one HTTP call, or one step of a cursor) with the error policy of the
        module docstring. ``StopIteration`` passes through."""
        import requests
        from facebook_business.exceptions import FacebookRequestError

        transient_attempt = 0
        rate_attempt = 0
        waited = 0.0
        while True:
            try:
                return operation()
            except FacebookRequestError as exc:
                code, subcode = exc.api_error_code(), exc.api_error_subcode()
                status = exc.http_status() or 0
                label = f"code {code}" + (f"/{subcode}" if subcode else "") if code is not None else f"HTTP {status}"
                message = str(exc.api_error_message() or "")[:200]
                if code in TOKEN_ERROR_CODES or subcode in TOKEN_ERROR_SUBCODES:
                    raise ReauthRequired(f"Meta rejected the access token during {what} ({label}: {message}); "
                                         "reconnect Meta Ads.") from None
                if code in RATE_LIMIT_CODES or subcode in RATE_LIMIT_SUBCODES:
                    regain = self._regain_seconds(exc)
                    wait = regain if regain > 0 else self.settings.transient_backoff_seconds * (2 ** rate_attempt)
                    if waited + wait > self.settings.rate_limit_max_wait_seconds:
                        regain_text = f"about {regain / 60:.0f} min" if regain else "unknown"
                        scoped = self._current_account if code in ACCOUNT_RATE_LIMIT_CODES else None
                        raise RateLimited(f"Meta rate limit during {what} ({label}; time to regain access: "
                                          f"{regain_text})", retry_after=regain or None, account_id=scoped) from None
                    log.info("Meta rate limit during %s (%s): waiting %.1fs", what, label, wait)
                    self._sleep(wait)
                    waited += wait
                    rate_attempt += 1
                    self.stats.retries += 1
                    self.stats.throttled_seconds += wait
                    for usage in self.usage.values():
                        usage.pct = 0.0  # we waited for the regain time: the figures are stale
                    continue
                if code == 1 and (subcode in TOO_MUCH_DATA_SUBCODES or "reduce the amount of data" in message.lower()):
                    raise _TooMuchData(message) from None
                if exc.api_transient_error() or code in TRANSIENT_CODES or status >= 500:
                    if transient_attempt >= self.settings.transient_retries:
                        raise TransientPlatformError(f"Meta API temporary failure during {what} ({label}: {message}); "
                                                     f"gave up after {transient_attempt} retries") from None
                    self._sleep(self.settings.transient_backoff_seconds * (2 ** transient_attempt))
                    transient_attempt += 1
                    self.stats.retries += 1
                    continue
                raise PlatformError(f"Meta API error during {what} ({label}: {message})") from None
            except (requests.ConnectionError, requests.Timeout) as exc:
                if transient_attempt >= self.settings.transient_retries:
                    raise TransientPlatformError(f"Meta API unreachable during {what}: {type(exc).__name__}") from None
                self._sleep(self.settings.transient_backoff_seconds * (2 ** transient_attempt))
                transient_attempt += 1
                self.stats.retries += 1

    def _regain_seconds(self, exc) -> float:
        """Seconds until access is regained, from the error's usage headers (0 when not said)."""
        minutes = 0.0
        headers = exc.http_headers() or {}
        try:
            raw = headers.get("x-business-use-case-usage") if hasattr(headers, "get") else None
            if raw:
                for entries in json.loads(raw).values():
                    for entry in entries if isinstance(entries, list) else [entries]:
                        minutes = max(minutes, float(entry.get("estimated_time_to_regain_access") or 0))
            raw = headers.get("x-ad-account-usage") if hasattr(headers, "get") else None
            if raw:
                minutes = max(minutes, float(json.loads(raw).get("reset_time_duration") or 0) / 60)
        except (ValueError, TypeError, AttributeError):
            pass
        return minutes * 60

    def _edge(self, node_id: str, endpoint: str, target_class, fields: list[str] | None, params: dict[str, Any],
              what: str) -> Iterator[dict[str, Any]]:
        """Rows of a paged Graph edge as the plain dicts Meta sent.

        The SDK's own ``Cursor`` builds the requests, follows ``paging.cursors.after`` and raises
        ``FacebookRequestError``; only its per-row parsing is replaced by a pass-through
        ``ObjectParser`` (building one typed SDK object per row and exporting it again cost about twice
        everything else together — HTTP, JSON, the store — when profiled).
        """
        from facebook_business.adobjects.objectparser import ObjectParser
        from facebook_business.api import Cursor

        parser = ObjectParser(custom_parse_method=_raw_row)
        return self._iterate(lambda: Cursor(target_objects_class=target_class, fields=fields, params=dict(params),
                                            api=self.api, node_id=node_id, endpoint=endpoint, object_parser=parser,
                                            include_summary=False), what)

    def _iterate(self, make_cursor: Callable[[], Any], what: str) -> Iterator[dict[str, Any]]:
        """Rows of a paged edge as plain dicts; every page load goes through ``_call`` (a failed page
        is retried from the same cursor position)."""
        cursor = self._call(make_cursor, what)
        iterator = iter(cursor)
        while True:
            try:
                obj = self._call(lambda: next(iterator), what)
            except StopIteration:
                return
            yield obj.export_all_data() if hasattr(obj, "export_all_data") else dict(obj)

    # ---- accounts ------------------------------------------------------------------------------
    def list_accounts(self) -> list[Account]:
        """See ``MetaAdsConnector.list_accounts``."""
        from facebook_business.adobjects.adaccount import AdAccount

        accounts = []
        for row in self._edge("me", "adaccounts", AdAccount, ACCOUNT_FIELDS, {"limit": self.settings.page_size},
                              "ad account listing"):
            status = row.get("account_status")
            try:
                status_name = ACCOUNT_STATUS.get(int(status), str(status)) if status is not None else None
            except (TypeError, ValueError):
                status_name = str(status)
            account_id = str(row.get("account_id") or str(row.get("id", "")).removeprefix("act_"))
            accounts.append(Account(id=account_id, name=row.get("name") or account_id,
                                    currency=row.get("currency") or "", time_zone=row.get("timezone_name") or "UTC",
                                    status=status_name))
        return accounts

    # ---- extraction ----------------------------------------------------------------------------
    def _ad_account(self, account: Account):
        from facebook_business.adobjects.adaccount import AdAccount

        self._current_account = account.id
        return AdAccount(f"act_{account.id}", api=self.api)

    def fetch_campaigns(self, account: Account) -> Iterator[dict[str, Any]]:
        """Campaign documents of one ad account (every status), streamed page by page."""
        from facebook_business.adobjects.campaign import Campaign

        ad_account = self._ad_account(account)
        exponent = currency_exponent(account.currency)
        params = {"effective_status": CAMPAIGN_STATUSES, "limit": self.settings.page_size}
        for row in self._edge(ad_account.get_id(), "campaigns", Campaign, CAMPAIGN_FIELDS, params,
                              f"campaigns of act_{account.id}"):
            daily, lifetime = row.get("daily_budget"), row.get("lifetime_budget")
            if daily not in (None, "", "0"):
                budget, period = minor_units_to_decimal(daily, exponent), "DAILY"
            elif lifetime not in (None, "", "0"):
                budget, period = minor_units_to_decimal(lifetime, exponent), "LIFETIME"
            else:
                budget, period = None, None
            start, stop = row.get("start_time"), row.get("stop_time")
            yield {
                "account_id": account.id,
                "campaign_id": str(row["id"]),
                "name": row.get("name"),
                "status": row.get("status"),
                "effective_status": row.get("effective_status"),
                "objective": row.get("objective"),
                "currency": account.currency,
                "budget": budget,
                "budget_period": period,
                "start_date": start[:10] if start else None,
                "end_date": stop[:10] if stop else None,
            }

    def fetch_daily_metrics(self, account: Account, start: dt.date, end: dt.date) -> Iterator[dict[str, Any]]:
        """Metric documents for ``[start, end]`` (account-local dates), streamed. Synchronous insights for
        short ranges, an asynchronous report run for longer ones (or when Meta asks for less data)."""
        if start > end:
            return
        ad_account = self._ad_account(account)
        days = (end - start).days + 1
        if days > self.settings.async_threshold_days:
            yield from self._map_rows(account, self._insights_async(ad_account, account, start, end))
            return
        yielded: set[tuple[str, str]] = set()
        try:
            for doc in self._map_rows(account, self._insights_sync(ad_account, account, start, end)):
                yielded.add((doc["campaign_id"], doc["date"]))
                yield doc
        except _TooMuchData:
            log.info("Meta asked for less data on act_%s %s..%s: switching to an async report run", account.id,
                     start, end)
            for doc in self._map_rows(account, self._insights_async(ad_account, account, start, end)):
                if (doc["campaign_id"], doc["date"]) not in yielded:
                    yield doc

    def _insights_params(self, start: dt.date, end: dt.date) -> dict[str, Any]:
        return {
            "level": "campaign",
            "time_increment": 1,
            "time_range": {"since": start.isoformat(), "until": end.isoformat()},
            "filtering": [{"field": "campaign.effective_status", "operator": "IN", "value": CAMPAIGN_STATUSES}],
            "limit": self.settings.page_size,
        }

    def _insights_sync(self, ad_account, account: Account, start: dt.date, end: dt.date) -> Iterator[dict]:
        params = self._insights_params(start, end)
        from facebook_business.adobjects.adsinsights import AdsInsights

        yield from self._edge(ad_account.get_id(), "insights", AdsInsights, INSIGHT_FIELDS, params,
                              f"insights of act_{account.id} {start}..{end}")

    def _insights_async(self, ad_account, account: Account, start: dt.date, end: dt.date) -> Iterator[dict]:
        """Rows of an ``AdReportRun``: create, poll until completed, page the result. A failed or
        skipped run is split in two halves (down to single days, then a transient error)."""
        what = f"insights report of act_{account.id} {start}..{end}"
        params = self._insights_params(start, end)
        params.pop("limit")
        run = self._call(lambda: ad_account.get_insights(fields=INSIGHT_FIELDS, params=params, is_async=True), what)
        deadline = time.monotonic() + self.settings.async_timeout_seconds
        interval = self.settings.async_poll_seconds
        while True:
            run = self._call(lambda: run.api_get(fields=["async_status", "async_percent_completion"]), what)
            status = run.get("async_status")
            if status == "Job Completed" and int(run.get("async_percent_completion") or 0) >= 100:
                break
            if status in ("Job Failed", "Job Skipped"):
                if end > start:
                    middle = start + dt.timedelta(days=(end - start).days // 2)
                    log.info("Meta %s: %s; splitting the range", what, status)
                    yield from self._insights_async(ad_account, account, start, middle)
                    yield from self._insights_async(ad_account, account, middle + dt.timedelta(days=1), end)
                    return
                raise TransientPlatformError(f"Meta {what}: the report run ended with '{status}'")
            if time.monotonic() > deadline:
                raise TransientPlatformError(f"Meta {what}: the report run did not finish within "
                                             f"{self.settings.async_timeout_seconds:.0f}s (last status {status!r})")
            self._sleep(interval)
            interval = min(interval * 1.5, 30.0)
        from facebook_business.adobjects.adsinsights import AdsInsights

        # the result's rows carry the run's fields; [] keeps the SDK from adding default fields
        yield from self._edge(run.get_id(), "insights", AdsInsights, [], {"limit": self.settings.page_size}, what)

    def _map_rows(self, account: Account, rows: Iterator[dict]) -> Iterator[dict[str, Any]]:
        for row in rows:
            yield {
                "account_id": account.id,
                "campaign_id": str(row["campaign_id"]),
                "date": row["date_start"],
                "impressions": int(row.get("impressions") or 0),
                "clicks": int(row.get("clicks") or 0),
                "spend": _decimal(row.get("spend")),
                "currency": account.currency,
                "conversions": _conversions(row.get("actions")),
            }

    def close(self) -> None:
        try:
            self._fb.requests.close()
        except Exception:  # pragma: no cover - best effort
            pass


def _raw_row(data: dict[str, Any], api=None) -> dict[str, Any]:
    """``ObjectParser`` custom parse method: keep the row as the JSON object Meta sent."""
    return data


def _decimal(value: Any) -> Decimal:
    """An exact Decimal from Meta's decimal strings (``"12.34"``); 0 when absent."""
    if value in (None, ""):
        return Decimal(0)
    try:
        return Decimal(str(value))
    except InvalidOperation:
        raise PlatformError(f"Meta sent an unreadable amount {str(value)[:20]!r}") from None


def _conversions(actions: Any) -> Decimal:
    """Sum of the ``CONVERSION_ACTION_TYPES`` values of an insights row's ``actions`` (0 when none)."""
    total = Decimal(0)
    for action in actions or []:
        if isinstance(action, dict) and action.get("action_type") in CONVERSION_ACTION_TYPES:
            total += _decimal(action.get("value"))
    return total
